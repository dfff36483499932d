/**
 * Operations on one VM that need its agent link (pause, resume, trace start/stop, memory read, registers,
 * responses, …), run wherever the VM is owned.
 *
 * A VM is owned by the replica its host agent is connected to. Every HTTP route, gRPC method and CLI path
 * that acts on a VM goes through `VmOperations.run()`: when the VM is live on this replica the registered
 * handler runs here; otherwise the operation is handed to the router (replicas.ts: through the database and
 * a notification channel to the owning replica), which runs the same handler there and returns its result.
 * Handlers therefore take and return plain JSON (bigints as strings), so a result is the same wherever it ran.
 */
import { AnalysisError, type AnalysisErrorCode } from './errors.js';
import type { LiveVm } from './link.js';

export type JsonValue = string | number | boolean | null | JsonValue[] | { [k: string]: JsonValue };
export type JsonObject = { [k: string]: JsonValue };

/** Who asked (audit identity: an operator name, `policy:NAME`, `module:NAME`, …). */
export interface OperationContext {
  readonly vm: LiveVm;
  readonly by: string;
}

export type OperationHandler = (ctx: OperationContext, args: JsonObject) => Promise<JsonObject>;

/** Runs an operation on the replica that owns the VM; set by the replica router (replicas.ts). */
export type RemoteRunner = (vmUuid: string, name: string, args: JsonObject, by: string) => Promise<JsonObject>;

export class VmOperations {
  private readonly handlers = new Map<string, OperationHandler>();
  private remote: RemoteRunner | undefined;

  constructor(private readonly live: (uuid: string) => LiveVm | undefined) {}

  /** Register a named operation (once per name). */
  register(name: string, handler: OperationHandler): void {
    if (this.handlers.has(name)) throw new Error(`operation ${name} registered twice`);
    this.handlers.set(name, handler);
  }

  has(name: string): boolean {
    return this.handlers.has(name);
  }

  /** Install the cross-replica runner (several replicas on PostgreSQL). */
  setRemote(runner: RemoteRunner | undefined): void {
    this.remote = runner;
  }

  /**
   * Run `name` on VM `vmUuid`: here when it is live here, else on its owner through the router.
   * Throws AnalysisError `not-attached` when no replica has the VM live, `not-found` for an unknown operation.
   */
  async run(vmUuid: string, name: string, args: JsonObject, by: string): Promise<JsonObject> {
    const handler = this.handlers.get(name);
    if (!handler) throw new AnalysisError('not-found', `no VM operation ${JSON.stringify(name)}`);
    const vm = this.live(vmUuid);
    if (vm && !vm.session.closed) return handler({ vm, by }, args);
    if (this.remote) return this.remote(vmUuid, name, args, by);
    throw new AnalysisError('not-attached', `VM ${vmUuid} has no agent linked to this replica (and no other replica is reachable): cannot run ${name} now`);
  }

  /** Run on this replica only (the router's entry point on the owner). */
  async runLocal(vmUuid: string, name: string, args: JsonObject, by: string): Promise<JsonObject> {
    const handler = this.handlers.get(name);
    if (!handler) throw new AnalysisError('not-found', `no VM operation ${JSON.stringify(name)}`);
    const vm = this.live(vmUuid);
    if (!vm || vm.session.closed) throw new AnalysisError('not-attached', `VM ${vmUuid} is not live on this replica`);
    return handler({ vm, by }, args);
  }
}

/** Serialise an error so a remote caller can rethrow it with the same code. */
export function errorJson(e: unknown): JsonObject {
  if (e instanceof AnalysisError) return { code: e.code, message: e.message };
  return { code: 'internal', message: e instanceof Error ? e.message : String(e) };
}

export function errorFromJson(j: JsonObject): AnalysisError {
  const code = typeof j['code'] === 'string' ? j['code'] : 'internal';
  return new AnalysisError(code as AnalysisErrorCode, typeof j['message'] === 'string' ? j['message'] : 'remote operation failed');
}
