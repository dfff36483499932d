// Preloaded into a campaign's child process (`node --import …/event-loop-probe.mjs bin/periscope …`): measures
// that process's event-loop delay and writes it, every 100 ms, to the file named by PERISCOPE_EVENT_LOOP_PROBE
// as JSON {pid, maxMs, p99Ms, samples}. A vCPU waiting on the process waits also for this delay, so the
// campaigns add it to the bounds they check. Nothing else in the process changes.
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { renameSync, writeFileSync } from 'node:fs';

const file = process.env.PERISCOPE_EVENT_LOOP_PROBE;
if (file) {
  const h = monitorEventLoopDelay({ resolution: 5 });
  h.enable();
  const write = () => {
    try {
      const tmp = `${file}.${process.pid}.tmp`;
      writeFileSync(tmp, JSON.stringify({ pid: process.pid, maxMs: h.max / 1e6, p99Ms: h.count ? h.percentile(99) / 1e6 : 0, samples: h.count }));
      renameSync(tmp, file);
    } catch {
      // the campaign's directory went away: nothing to report to
    }
  };
  setInterval(write, 100).unref();
  process.on('exit', write);
}
