/**
 * Detection evidence: the instruction at the event's RIP — its bytes read from the guest after the reply
 * (off the vCPU's stall path) and decoded — travels with the detection. The expected bytes are the
 * hand-written encoding of `mov cr0, rax` (0F 22 C0, Intel SDM Vol. 2B "MOV—Move to/from Control
 * Registers": 0F 22 /r, ModRM C0 = cr0, rax), independent of the simulator's instruction table.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { cleanup, CR0_WP, protectedVm, startAgent, startPeer, startVm, tempDir, testPolicy } from './fixture.js';

afterEach(cleanup);

describe('agent link: detection evidence', () => {
  it('a detection carries the bytes and the decoded text of the instruction at RIP', async () => {
    const peer = await startPeer({ autoAckDetections: true });
    const dir = tempDir();
    const sock = join(dir, 'e.sock');
    const h = await startAgent({ socketPath: sock, peer, policy: testPolicy(), stateDir: join(dir, 'state') });
    const { vm } = await startVm(sock, { vcpus: 1, seed: 9 });
    await protectedVm(h, vm);
    const cpu = vm.vcpus[0]!;
    cpu.cpu.sregs.cr0 |= CR0_WP;
    const r = await cpu.writeCr(0, cpu.cpu.sregs.cr0 & ~CR0_WP); // denied locally: raises a detection
    expect(r.events).toHaveLength(1);
    await peer.waitFor(() => peer.detections().length === 1, 10_000, 'the detection');
    const d = peer.detections()[0]!;
    expect(d.ruleId).toBe('cr0-wp-clear');
    expect(Buffer.from(d.instructionBytes).toString('hex')).toBe('0f22c0');
    expect(d.instructionText).toBe('mov cr0,rax');
    expect(d.attributes['instruction_unavailable']).toBeUndefined();
  }, 30_000);
});
