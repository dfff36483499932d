/**
 * Preloaded into every demo child (`node --import .../orphan-guard.js`): when the demo process
 * disappears without stopping its children (SIGKILL, a crash), the child is re-parented; it then
 * stops itself as on SIGTERM (a clean detach), and exits for sure 5 s later. Never keeps a process alive.
 */
const parent = process.ppid;
const timer = setInterval(() => {
  if (process.ppid === parent) return;
  clearInterval(timer);
  setTimeout(() => process.exit(1), 5000).unref();
  process.kill(process.pid, 'SIGTERM');
}, 500);
timer.unref();

export {};
