// The last-resort time bound of a hook. libvirtd waits for a hook with no timeout of its
// own, and a sysfs write can block in the kernel (an unbind waits for the driver's
// remove) where no timer of ours can run: the main thread is stuck in the syscall. A
// worker thread is not: when the deadline passes it writes the hook's one line to stderr
// and kills the process, so libvirt gets an answer (a failure) instead of hanging.

import { Worker } from 'node:worker_threads';

const CODE = `
const { workerData } = require('node:worker_threads');
const { writeSync } = require('node:fs');
setTimeout(() => {
  try { writeSync(2, workerData.line); } catch {}
  process.kill(process.pid, 'SIGKILL');
}, workerData.ms);
`;

export interface Watchdog {
  stop(): Promise<void>;
}

/** Kills this process after `ms` unless stopped first; `line` is written to stderr first. */
export function startWatchdog(ms: number, line: string): Watchdog {
  const worker = new Worker(CODE, { eval: true, workerData: { ms, line: line.endsWith('\n') ? line : `${line}\n` } });
  worker.unref();
  return {
    async stop() {
      await worker.terminate();
    },
  };
}
