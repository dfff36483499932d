#!/usr/bin/env node
// Writes docs/protocol.md from the built catalog (run after `tsc -b`).
import { writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { renderProtocolDoc } from '../dist/protocol-doc.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '../../..');
writeFileSync(join(root, 'docs/protocol.md'), renderProtocolDoc());
console.log('wrote docs/protocol.md');
