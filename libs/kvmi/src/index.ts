/**
 * @periscope/kvmi — the KVMI v12 wire protocol, for both ends of the socket.
 *
 * - `catalog`: every message declared once (ids, scopes, layouts, checks, actions).
 * - `structs` / `layout`: every C struct, declared once with the layout DSL.
 * - `codec`: encoders, decoders and kernel-faithful validation derived from the catalog.
 * - `framing` / `handshake`: stream framing and the QEMU ↔ introspector handshake.
 * - `unconfirmed`: every reading we chose where the fact sheets say UNCONFIRMED.
 */
export * from './constants.js';
export * from './errors.js';
export * from './layout.js';
export * as structs from './structs.js';
export * from './catalog.js';
export * from './codec.js';
export * from './unconfirmed.js';
export { renderProtocolDoc } from './protocol-doc.js';
export * from './framing.js';
export * from './handshake.js';
export * from './session.js';
