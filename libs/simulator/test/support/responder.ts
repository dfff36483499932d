/**
 * A tool-side session loop for many-VM tests: answers every vCPU event with CONTINUE (echoing
 * new_value for CR/MSR), and closes the socket when KVM sends the UNHOOK VM event.
 */
import type { ToolConn } from './tool.js';

export function respond(t: ToolConn): { done: Promise<void>; events: () => number } {
  let n = 0;
  const done = (async () => {
    while (!t.isClosed) {
      let e;
      try {
        e = await Promise.race([t.nextEvent(60_000), t.closed.then(() => null)]);
      } catch {
        return;
      }
      if (e === null) return;
      n++;
      if (e.kind === 'vm-event') {
        t.close();
        return;
      }
      const d = e.data as { new_value?: bigint } | null;
      t.reply(e, 'CONTINUE', e.event.replyData ? (d?.new_value ?? 0n) : undefined);
    }
  })();
  return { done, events: () => n };
}
