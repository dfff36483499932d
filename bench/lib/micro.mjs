// Repeated timing for the per-message micro-benchmarks (libs/kvmi/bench, libs/verdicts/bench): five timed
// runs per path, the median kept; a path and its raw baseline timed in alternating runs, so both medians
// come from the same stretch of a shared machine's load.
//   prepare(fn) → bytes allocated per call (measured once, before timing)
//   timeRun(fn) → ns per call of one timed run
//   result(runs, bytes) → what the caller reports
export function microTimer({ prepare, timeRun, result, runs = 5 }) {
  const measure = (fn) => {
    const bytes = prepare(fn);
    const times = [];
    for (let r = 0; r < runs; r++) times.push(timeRun(fn));
    return result(times, bytes);
  };
  const measurePair = (fn, base) => {
    const bytes = [prepare(fn), prepare(base)];
    const times = [[], []];
    for (let r = 0; r < runs; r++) {
      times[0].push(timeRun(fn));
      times[1].push(timeRun(base));
    }
    return [result(times[0], bytes[0]), result(times[1], bytes[1])];
  };
  return { measure, measurePair };
}
