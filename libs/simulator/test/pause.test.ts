/**
 * VM_PAUSE_VCPU and KVMI_VCPU_EVENT_PAUSE (§4.2, §5.4): one event per request, low priority (after a
 * pending event, only when no vCPU job is queued), the 1001 limit, and replies overtaking each other.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { commands, events, KvmErrno, MAX_PAUSE_REQUESTS } from '@periscope/kvmi';

import { startVm, until, type VmHarness } from './support/tool.js';

const harnesses: VmHarness[] = [];
afterEach(async () => {
  for (const h of harnesses.splice(0)) await h.cleanup();
});
async function vm(...args: Parameters<typeof startVm>): Promise<VmHarness> {
  const h = await startVm(...args);
  harnesses.push(h);
  return h;
}

describe('PAUSE', () => {
  it('one PAUSE event per request, each after the previous reply', async () => {
    const { tool: t, vm: v } = await vm();
    for (let i = 0; i < 3; i++) await t.ok('VM_PAUSE_VCPU', { vcpu: 0, wait: 1 });
    const seqs: number[] = [];
    for (let i = 0; i < 3; i++) {
      const e = await t.nextVcpuEvent();
      expect(e.event.key).toBe('PAUSE');
      expect(t.events.length).toBe(0); // the next one only after this reply
      seqs.push(e.seq);
      t.reply(e);
    }
    expect(seqs).toEqual([1, 2, 3]);
    await new Promise((r) => setTimeout(r, 30));
    expect(t.events.length).toBe(0);
    expect(v.vcpus[0]!.pendingPauseRequests).toBe(0);
  });

  it('is sent after a pending event: a vCPU waiting on a CR event pauses only after that reply', async () => {
    const { tool: t, vm: v } = await vm();
    await t.ok('VCPU_CONTROL_EVENTS', { vcpu: 0, event_id: events.CR.id, enable: 1 });
    await t.ok('VCPU_CONTROL_CR', { vcpu: 0, cr: 3, enable: 1 });
    const c = v.vcpus[0]!;
    const p = c.writeCr(3, c.cpu.sregs.cr3 | 0x8n);
    const cr = await t.nextVcpuEvent();
    await t.ok('VM_PAUSE_VCPU', { vcpu: 0, wait: 1 });
    await new Promise((r) => setTimeout(r, 30));
    expect(t.events.length).toBe(0);
    t.reply(cr, 'CONTINUE', (cr.data as { new_value: bigint }).new_value);
    await p;
    const pause = await t.nextVcpuEvent();
    expect(pause.event.key).toBe('PAUSE');
    expect(pause.seq).toBe(cr.seq + 1);
    t.reply(pause);
  });

  it('an injected exception is reported by TRAP before the next instruction\'s event', async () => {
    const { tool: t, vm: v } = await vm();
    await t.ok('VCPU_CONTROL_EVENTS', { vcpu: 0, event_id: events.HYPERCALL.id, enable: 1 });
    await t.ok('VM_PAUSE_VCPU', { vcpu: 0, wait: 1 });
    const first = await t.nextVcpuEvent();
    const hc = v.vcpus[0]!.vmcall(); // queued behind the pause
    await t.ok('VCPU_INJECT_EXCEPTION', { vcpu: 0, nr: 6, error_code: 0x55, address: 0n });
    await t.ok('VM_PAUSE_VCPU', { vcpu: 0, wait: 1 });
    t.reply(first);
    const order: string[] = [];
    for (let i = 0; i < 3; i++) {
      const e = await t.nextVcpuEvent();
      order.push(e.event.key);
      if (e.event.key === 'TRAP') expect(e.data).toEqual({ nr: 6, error_code: 0, address: 0n }); // #UD has no error code
      t.reply(e);
    }
    // The second pause request is served before the next guest entry; the exception is injected at
    // that entry and its TRAP is sent before the event of the guest's next instruction.
    expect(order).toEqual(['PAUSE', 'TRAP', 'HYPERCALL']);
    expect((await hc).value).toBe(0n);
  });

  it('is not sent while vCPU jobs are queued', async () => {
    const { tool: t, vm: v } = await vm({ jitterMs: 4, seed: 3 });
    // One write: the pause request, then 8 vCPU commands to the same vCPU.
    const pause = t.cmd('VM_PAUSE_VCPU', { vcpu: 0, wait: 1 });
    const infos = Array.from({ length: 8 }, () => t.cmd('VCPU_GET_INFO', { vcpu: 0 }));
    await pause;
    await Promise.all(infos);
    await t.nextVcpuEvent();
    const ids = t.received.map((m) => m.id);
    const lastInfo = ids.lastIndexOf(commands.VCPU_GET_INFO.id);
    const pauseEvent = ids.indexOf(1);
    expect(pauseEvent).toBeGreaterThan(lastInfo);
    expect(v.vcpus[0]!.waitingFor?.event).toBe('PAUSE');
  });

  it(`EBUSY once more than ${MAX_PAUSE_REQUESTS} requests are pending`, async () => {
    const { tool: t, vm: v } = await vm({ vcpus: 2 });
    // vCPU 1 is an AP that is not up: requests accumulate without being consumed.
    const rs = await Promise.all(Array.from({ length: MAX_PAUSE_REQUESTS + 2 }, () => t.errno('VM_PAUSE_VCPU', { vcpu: 1, wait: 0 })));
    expect(rs.filter((e) => e === 0)).toHaveLength(MAX_PAUSE_REQUESTS + 1);
    expect(rs[rs.length - 1]).toBe(KvmErrno.EBUSY);
    expect(v.vcpus[1]!.pendingPauseRequests).toBe(MAX_PAUSE_REQUESTS + 1);
    // Once the AP comes up it sends them one at a time.
    v.bringUpVcpu(1);
    const e = await t.nextVcpuEvent();
    expect(e).toMatchObject({ vcpu: 1 });
    expect(e.event.key).toBe('PAUSE');
    t.reply(e);
    await t.nextVcpuEvent();
    expect(v.vcpus[1]!.pendingPauseRequests).toBe(MAX_PAUSE_REQUESTS - 1);
  });

  it('connection loss clears pending pause requests and releases the waiting vCPU', async () => {
    const { tool: t, vm: v } = await vm({ vcpus: 2, apsOnline: true }, { unhookDelayMs: 300, reconnectSeconds: 10 });
    for (let i = 0; i < 5; i++) await t.ok('VM_PAUSE_VCPU', { vcpu: 1, wait: 1 });
    await t.nextVcpuEvent();
    expect(v.vcpus[1]!.pendingPauseRequests).toBe(4);
    t.close();
    await until(() => v.vcpus[1]!.pendingPauseRequests === 0 && v.vcpus[1]!.waitingFor === null, 2000, 'the release job');
    expect(v.hooked).toBe(true); // still hooked: QEMU has not called UNHOOK yet
  });
});

describe('replies overtake each other (§2.3)', () => {
  it('with a fixed seed, vCPU replies arrive out of order; each vCPU and the VM stay in order', async () => {
    const { tool: t } = await vm({ vcpus: 4, apsOnline: true, jitterMs: 6, seed: 42 });
    const sent: Array<{ seq: number; vcpu: number | null }> = [];
    const all: Array<Promise<unknown>> = [];
    for (let i = 0; i < 40; i++) {
      const seq = t.nextSeq();
      if (i % 5 === 4) {
        sent.push({ seq, vcpu: null });
        all.push(t.cmd('VM_GET_INFO', {}, seq));
      } else {
        const vcpu = i % 4;
        sent.push({ seq, vcpu });
        all.push(t.cmd('VCPU_GET_INFO', { vcpu }, seq));
      }
    }
    await Promise.all(all);
    const arrival = t.received.filter((m) => m.id !== 1 && m.id !== 0).map((m) => m.seq);
    const sentSeqs = sent.map((s) => s.seq);
    expect(arrival).not.toEqual(sentSeqs); // something overtook something
    // Within a vCPU (FIFO job list) and among VM commands (one receive thread), order is kept.
    for (const group of [null, 0, 1, 2, 3]) {
      const mine = sent.filter((s) => s.vcpu === group).map((s) => s.seq);
      expect(arrival.filter((s) => mine.includes(s))).toEqual(mine);
    }
    // VM replies are answered on the receive thread: they overtake queued vCPU replies.
    const firstVm = sent.find((s) => s.vcpu === null)!.seq;
    const earlierVcpu = sent.filter((s) => s.vcpu !== null && s.seq < firstVm).map((s) => s.seq);
    expect(earlierVcpu.some((s) => arrival.indexOf(s) > arrival.indexOf(firstVm))).toBe(true);
  });
});
