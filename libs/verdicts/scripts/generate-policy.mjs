#!/usr/bin/env node
// Write a generated policy file (policy-file format) to stdout, for standalone `--policy FILE` runs:
//   node libs/verdicts/scripts/generate-policy.mjs [count=120] [seed=1] [kind,kind,…] > big.json
// Needs a built dist (`npx tsc -b libs/verdicts/tsconfig.json`).
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const lib = await import(join(dirname(fileURLToPath(import.meta.url)), '../dist/index.js'));
const [count = '120', seed = '1', kinds] = process.argv.slice(2);
const policy = lib.generatePolicy({ count: Number(count), seed: Number(seed), ...(kinds ? { kinds: kinds.split(',') } : {}) });
lib.compilePolicy(policy); // never write a policy that does not compile
process.stdout.write(lib.formatPolicy(policy));
