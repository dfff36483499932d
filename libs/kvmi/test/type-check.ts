// Compile-time checks (run by `tsc -p tsconfig.test.json` in the build): each @ts-expect-error line
// must fail to type-check, or the build fails.
import { encodeCommand } from '../src/codec.js';

// @ts-expect-error vCPU commands need a vcpu
encodeCommand('VCPU_GET_INFO', 1, {});
// @ts-expect-error 64-bit guest values are bigint, never number
encodeCommand('VM_READ_PHYSICAL', 1, { gpa: 4096, size: 8 });
// @ts-expect-error count fields are derived from the tail, not given
encodeCommand('VM_WRITE_PHYSICAL', 1, { gpa: 0n, size: 3, data: new Uint8Array(3) });
encodeCommand('VCPU_CONTROL_CR', 1, { vcpu: 0, cr: 4, enable: 1 });
