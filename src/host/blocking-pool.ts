// Dedicated threads for blocking libc calls (ioctl, read, write, poll), so that N devices'
// slow calls really block in the kernel at the same time.
//
// Why not koffi's `fn.async`: it runs on libuv's thread pool, which has 4 threads unless
// UV_THREADPOOL_SIZE is set before the pool's first use - and that pool is shared with
// fs, dns and zlib. Measured on the rig (6.12, edu devices with 50 ms arcs), 12 devices
// moved only 3.7-3.9x faster than one after the other. Here every call in flight gets a
// thread of its own: the pool grows on demand up to a cap, idle threads exit, and a thread
// never keeps the process alive unless it is running a call.
//
// Each worker thread loads koffi itself (koffi is an N-API addon: one instance per thread)
// and makes SYNCHRONOUS calls; errno is read in the worker right after its call. A worker
// cannot see a Buffer of the main thread, so data goes through a SharedArrayBuffer scratch
// per thread, grown on demand (a 1 MiB read chunk is one copy out). A worker never opens or
// closes an fd: fds stay owned by the caller, and a call's promise settles only after its
// call has returned (or its thread is gone), never while the call is queued or running.

import { Worker } from 'node:worker_threads';
import { createRequire } from 'node:module';

/** One blocking call, as the main thread hands it to the pool. */
export type BlockingCall =
  | { op: 'ioctl'; fd: number; request: number; arg?: Buffer }
  | { op: 'read'; fd: number; buf: Buffer; length: number }
  | { op: 'write'; fd: number; buf: Buffer; length: number }
  | { op: 'poll'; fd: number; events: number; timeoutMs: number };

/** What came back: libc's return value, errno (0 unless result < 0), and when it ran. */
export interface BlockingResult {
  result: number;
  errno: number;
  /** poll only: revents of the one pollfd. */
  revents: number;
  /** When the worker issued / got back the call, in the MAIN thread's performance.now() base. */
  issuedAt: number;
  returnedAt: number;
}

export interface PoolOptions {
  /** Most threads at once (= most calls in flight); further calls wait in FIFO order. */
  maxThreads: number;
  /** An idle thread exits after this long. */
  idleMs: number;
}

export interface PoolStats {
  /** Threads that exist (starting, idle or busy). */
  threads: number;
  starting: number;
  busy: number;
  /** Calls waiting for a thread. */
  queued: number;
  maxThreads: number;
}

// The control block shared with each worker: Int32 slots, then Float64 slots.
const C = { state: 0, fd: 1, len: 2, events: 3, timeout: 4, newScratch: 5, errno: 6, revents: 7 } as const;
const N = { request: 0, result: 1, t0: 2, t1: 3 } as const;
const CTL_INTS = 8;
const CTL_NUMS = 4;
/** C.state: idle, quit, done (results stored), failed (the worker threw), or the op to run. */
const State = { idle: 0, quit: 1, done: 6, failed: 7 } as const;
const Op = { ioctl: 2, read: 3, write: 4, poll: 5 } as const;

// The worker's code, run with `new Worker(code, { eval: true })` so that it needs no file
// of its own: the same under tsx, in esbuild bundles and in dist/. Plain CommonJS.
//
// Hand-over without messages on the way in: the main thread fills the control block and
// wakes the worker with Atomics.notify; the worker, parked in Atomics.wait (no event loop,
// no message to decode), makes the call, stores the results and marks itself done; a
// tiny message wakes the main thread's event loop, which collects every finished thread.
// Under TCG in the rig this round trip cost about half of a postMessage ping-pong
// (Atomics.waitAsync on the way back was slower still).
const WORKER_CODE = `'use strict';
const { parentPort, workerData, receiveMessageOnPort } = require('node:worker_threads');
const ctl = new Int32Array(workerData.control, 0, ${CTL_INTS});
const num = new Float64Array(workerData.control, ${CTL_INTS * 4}, ${CTL_NUMS});
const signal = new Int32Array(workerData.signal);
let koffi, ioctl, read, write, poll, loaded = false;
const pfd = Buffer.alloc(8);
let scratch = new Uint8Array(workerData.scratch);
try {
  koffi = require(workerData.koffiPath);
  const lib = koffi.load('libc.so.6');
  ioctl = lib.func('ioctl', 'int', ['int', 'unsigned long', 'void *']);
  read = lib.func('long read(int fd, void *buf, size_t count)');
  write = lib.func('long write(int fd, const void *buf, size_t count)');
  poll = lib.func('int poll(void *fds, unsigned long nfds, int timeout)');
  loaded = true;
} catch (err) {
  parentPort.postMessage({ fatal: String((err && err.stack) || err) });
}
const origin = performance.timeOrigin;
function call(op) {
  const fd = ctl[${C.fd}], len = ctl[${C.len}];
  let r;
  switch (op) {
    case ${Op.ioctl}:
      num[${N.t0}] = origin + performance.now();
      r = ioctl(fd, num[${N.request}], len >= 0 ? scratch.subarray(0, len) : null);
      break;
    case ${Op.read}:
      num[${N.t0}] = origin + performance.now();
      r = Number(read(fd, scratch.subarray(0, len), len));
      break;
    case ${Op.write}:
      num[${N.t0}] = origin + performance.now();
      r = Number(write(fd, scratch.subarray(0, len), len));
      break;
    case ${Op.poll}:
      pfd.writeInt32LE(fd, 0);
      pfd.writeInt16LE(ctl[${C.events}], 4);
      pfd.writeInt16LE(0, 6);
      num[${N.t0}] = origin + performance.now();
      r = poll(pfd, 1, ctl[${C.timeout}]);
      break;
    default:
      throw new Error('unknown op ' + op);
  }
  // errno right after the call, in the thread that made it.
  ctl[${C.errno}] = r < 0 ? koffi.errno() : 0;
  num[${N.t1}] = origin + performance.now();
  num[${N.result}] = r;
  if (op === ${Op.poll}) ctl[${C.revents}] = pfd.readInt16LE(6) & 0xffff;
}
if (loaded) {
  // Every op once on fd -1 (EBADF, or POLLNVAL), through the same code as real calls: the
  // first real call then pays no lazy compilation or koffi set-up - under TCG that was
  // tens of ms per thread, spread over the first parallel phase.
  ctl[${C.fd}] = -1;
  ctl[${C.len}] = 8;
  for (const op of [${Op.ioctl}, ${Op.read}, ${Op.write}, ${Op.poll}]) call(op);
  ctl[${C.len}] = -1;
  call(${Op.ioctl});
  parentPort.postMessage('ready');
  for (;;) {
    const op = Atomics.load(ctl, ${C.state});
    if (op === ${State.quit}) break;
    if (op === ${State.idle} || op === ${State.done} || op === ${State.failed}) {
      Atomics.wait(ctl, ${C.state}, op);
      continue;
    }
    if (ctl[${C.newScratch}]) {
      scratch = new Uint8Array(receiveMessageOnPort(parentPort).message);
      ctl[${C.newScratch}] = 0;
    }
    let failure;
    try {
      call(op);
    } catch (err) {
      failure = String((err && err.message) || err);
    }
    if (failure !== undefined) {
      Atomics.store(ctl, ${C.state}, ${State.failed});
      parentPort.postMessage({ error: failure });
    } else {
      Atomics.store(ctl, ${C.state}, ${State.done});
      // Only the first thread to finish since the main thread last looked posts a message;
      // the main thread then collects every finished thread at once (N arcs that end
      // together cost one wake-up of the event loop, not N).
      if (Atomics.add(signal, 0, 1) === 0) parentPort.postMessage('done');
    }
  }
}
`;

type WorkerReply = 'ready' | 'done' | { fatal: string } | { error: string };

interface Pending {
  call: BlockingCall;
  resolve: (r: BlockingResult) => void;
  reject: (e: Error) => void;
}

interface Thread {
  worker: Worker;
  ready: boolean;
  busy: Pending | undefined;
  ctl: Int32Array;
  num: Float64Array;
  /** The main thread's view of this thread's scratch (grown when a call needs more). */
  scratch: Uint8Array;
  /** performance.now() when it last became idle. */
  idleSince: number;
  /** prewarm() callers waiting for this thread to be ready. */
  waiters: { resolve: () => void; reject: (e: Error) => void }[];
}

const MIN_SCRATCH = 64 * 1024;

function callBytes(call: BlockingCall): number {
  switch (call.op) {
    case 'ioctl':
      return call.arg ? call.arg.length : -1;
    case 'read':
    case 'write':
      return call.length;
    case 'poll':
      return -1;
  }
}

export class BlockingPool {
  readonly #threads = new Set<Thread>();
  /** Ready threads without a call, most recently used last (reused first, so the others age out). */
  readonly #idle: Thread[] = [];
  readonly #queue: Pending[] = [];
  /** Threads running a call. */
  readonly #busy = new Set<Thread>();
  /** Shared with every worker: how many finished since the main thread last collected. */
  readonly #signal = new Int32Array(new SharedArrayBuffer(4));
  #starting = 0;
  #koffiPath: string | undefined;
  #options: PoolOptions;
  #warming = 0;
  #sweeper: NodeJS.Timeout | undefined;

  constructor(options: PoolOptions) {
    this.#options = { ...options };
  }

  configure(options: Partial<PoolOptions>): void {
    if (options.maxThreads !== undefined && (!Number.isInteger(options.maxThreads) || options.maxThreads < 1)) {
      throw new RangeError(`maxThreads must be a positive integer, got ${options.maxThreads}`);
    }
    if (options.idleMs !== undefined && (!Number.isFinite(options.idleMs) || options.idleMs < 0)) {
      throw new RangeError(`idleMs must be a non-negative number, got ${options.idleMs}`);
    }
    this.#options = { ...this.#options, ...options };
    while (this.#threads.size > this.#options.maxThreads && this.#idle.length > 0) this.#retire(this.#idle.shift()!);
    for (const t of this.#idle) t.idleSince = performance.now();
    this.#stopSweeper();
    this.#startSweeper();
  }

  stats(): PoolStats {
    const busy = this.#threads.size - this.#starting - this.#idle.length;
    return { threads: this.#threads.size, starting: this.#starting, busy, queued: this.#queue.length, maxThreads: this.#options.maxThreads };
  }

  /** Runs one blocking call on a thread of its own (queued FIFO when the cap is reached). */
  run(call: BlockingCall): Promise<BlockingResult> {
    return new Promise((resolve, reject) => {
      const p = { call, resolve, reject };
      const t = this.#queue.length === 0 ? this.#idle.pop() : undefined;
      if (t) this.#dispatch(t, p);
      else {
        this.#queue.push(p);
        this.#pump();
      }
    });
  }

  /**
   * Starts threads until `n` exist (at most the cap) and resolves when they are all ready,
   * so the first calls of a parallel phase do not pay for thread start-up (~150 ms here,
   * seconds under TCG). Rejects if a thread cannot start (e.g. koffi cannot load).
   */
  async prewarm(n: number): Promise<void> {
    const want = Math.min(Math.max(0, Math.floor(n)), this.#options.maxThreads);
    // No idle thread exits while threads are being warmed (their start-up can take longer
    // than the idle time); afterwards every idle thread gets a full idle period.
    this.#warming++;
    try {
      while (this.#threads.size < want) this.#spawn();
      await Promise.all(
        [...this.#threads].filter((t) => !t.ready).map((t) => new Promise<void>((resolve, reject) => t.waiters.push({ resolve, reject }))),
      );
    } finally {
      this.#warming--;
      for (const t of this.#idle) t.idleSince = performance.now();
    }
  }

  #pump(): void {
    // Hand queued calls to idle threads, oldest call first.
    while (this.#queue.length > 0 && this.#idle.length > 0) this.#dispatch(this.#idle.pop()!, this.#queue.shift()!);
    // Every call still queued gets a thread of its own, up to the cap.
    while (this.#queue.length > this.#starting && this.#threads.size < this.#options.maxThreads) this.#spawn();
  }

  #spawn(): void {
    this.#koffiPath ??= createRequire(import.meta.url).resolve('koffi');
    const control = new SharedArrayBuffer(CTL_INTS * 4 + CTL_NUMS * 8);
    const scratch = new SharedArrayBuffer(MIN_SCRATCH);
    const worker = new Worker(WORKER_CODE, {
      eval: true,
      workerData: { koffiPath: this.#koffiPath, control, scratch, signal: this.#signal.buffer },
      // Not the parent's flags: under tsx they would load tsx's loader in every thread.
      execArgv: [],
      // The worker never opens or closes fds, and must not close the caller's on exit.
      trackUnmanagedFds: false,
      stdout: false,
      stderr: false,
    });
    const t: Thread = {
      worker,
      ready: false,
      busy: undefined,
      ctl: new Int32Array(control, 0, CTL_INTS),
      num: new Float64Array(control, CTL_INTS * 4, CTL_NUMS),
      scratch: new Uint8Array(scratch),
      idleSince: 0,
      waiters: [],
    };
    this.#threads.add(t);
    this.#starting++;
    // Referenced while starting and while running a call: a call in flight keeps the
    // process alive (as libuv's pool would), an idle thread never does.
    worker.on('message', (m: WorkerReply) => this.#onMessage(t, m));
    worker.on('error', (err: Error) => this.#lost(t, err));
    worker.on('exit', (code: number) => this.#lost(t, new Error(`blocking-call thread exited (code ${code})`)));
  }

  #onMessage(t: Thread, m: WorkerReply): void {
    if (m === 'ready') {
      t.ready = true;
      this.#starting--;
      for (const w of t.waiters.splice(0)) w.resolve();
      this.#becomeIdle(t);
      return;
    }
    if (m === 'done') return this.#collect();
    if ('fatal' in m) {
      this.#lost(t, new Error(`blocking-call thread could not load koffi/libc: ${m.fatal}`));
      void t.worker.terminate();
      return;
    }
    // The worker threw (a bad argument reached koffi): fail this call only.
    const p = t.busy;
    if (!p || Atomics.load(t.ctl, C.state) !== State.failed) return;
    t.busy = undefined;
    this.#busy.delete(t);
    p.reject(new Error(`blocking ${p.call.op}: ${m.error}`));
    this.#becomeIdle(t);
  }

  /** Completes every call whose thread has stored its results. */
  #collect(): void {
    // Reset first: a thread finishing after this posts again, so none is missed.
    Atomics.exchange(this.#signal, 0, 0);
    const finished = [...this.#busy].filter((t) => Atomics.load(t.ctl, C.state) === State.done);
    for (const t of finished) this.#complete(t);
  }

  #complete(t: Thread): void {
    const p = t.busy!;
    t.busy = undefined;
    this.#busy.delete(t);
    const result = t.num[N.result]!;
    // The kernel wrote into the scratch: copy back what the caller's buffer should hold.
    if (result > 0 && p.call.op === 'read') p.call.buf.set(t.scratch.subarray(0, result));
    if (p.call.op === 'ioctl' && p.call.arg && p.call.arg.length > 0) p.call.arg.set(t.scratch.subarray(0, p.call.arg.length));
    const origin = performance.timeOrigin;
    p.resolve({
      result,
      errno: t.ctl[C.errno]!,
      revents: p.call.op === 'poll' ? t.ctl[C.revents]! : 0,
      issuedAt: t.num[N.t0]! - origin,
      returnedAt: t.num[N.t1]! - origin,
    });
    this.#becomeIdle(t);
  }

  #dispatch(t: Thread, p: Pending): void {
    const call = p.call;
    const bytes = callBytes(call);
    if (bytes > t.scratch.length) {
      let size = MIN_SCRATCH;
      while (size < bytes) size *= 2;
      const sab = new SharedArrayBuffer(size);
      t.scratch = new Uint8Array(sab);
      // Read by the worker (receiveMessageOnPort) before it looks at the call.
      t.worker.postMessage(sab);
      t.ctl[C.newScratch] = 1;
    }
    if (call.op === 'ioctl' && call.arg && bytes > 0) t.scratch.set(call.arg);
    if (call.op === 'write' && bytes > 0) t.scratch.set(call.buf.subarray(0, call.length));
    t.ctl[C.fd] = call.fd;
    t.ctl[C.len] = bytes;
    if (call.op === 'ioctl') t.num[N.request] = call.request;
    if (call.op === 'poll') {
      t.ctl[C.events] = call.events;
      t.ctl[C.timeout] = call.timeoutMs;
    }
    t.busy = p;
    this.#busy.add(t);
    t.worker.ref();
    Atomics.store(t.ctl, C.state, Op[call.op]);
    Atomics.notify(t.ctl, C.state);
  }

  #becomeIdle(t: Thread): void {
    if (!this.#threads.has(t)) return;
    if (this.#queue.length > 0) return this.#dispatch(t, this.#queue.shift()!);
    if (this.#threads.size > this.#options.maxThreads) return this.#retire(t); // the cap was lowered
    t.worker.unref();
    t.idleSince = performance.now();
    this.#idle.push(t);
    this.#startSweeper();
  }

  /** One unref'd timer for the whole pool retires threads idle for longer than idleMs. */
  #startSweeper(): void {
    if (this.#sweeper || this.#idle.length === 0) return;
    const period = Math.max(10, Math.min(this.#options.idleMs / 2, 5000));
    this.#sweeper = setInterval(() => this.#sweep(), period);
    this.#sweeper.unref();
  }

  #stopSweeper(): void {
    if (this.#sweeper) clearInterval(this.#sweeper);
    this.#sweeper = undefined;
  }

  #sweep(): void {
    if (this.#warming > 0) return;
    const limit = performance.now() - this.#options.idleMs;
    // Oldest first: #idle is ordered by the time each thread became idle.
    while (this.#idle.length > 0 && this.#idle[0]!.idleSince <= limit) this.#retire(this.#idle.shift()!);
    if (this.#idle.length === 0) this.#stopSweeper();
  }

  /** Ends an idle thread (already taken off #idle): it leaves its wait loop and exits. */
  #retire(t: Thread): void {
    this.#threads.delete(t);
    Atomics.store(t.ctl, C.state, State.quit);
    Atomics.notify(t.ctl, C.state);
  }

  /** A thread died (or could not start): fail only what it held, never a queued call that others can run. */
  #lost(t: Thread, err: Error): void {
    if (!this.#threads.has(t)) return;
    this.#threads.delete(t);
    if (!t.ready) this.#starting--;
    const i = this.#idle.indexOf(t);
    if (i >= 0) this.#idle.splice(i, 1);
    for (const w of t.waiters.splice(0)) w.reject(err);
    const p = t.busy;
    t.busy = undefined;
    this.#busy.delete(t);
    // The thread is gone, so its call is no longer running: settling now is safe.
    p?.reject(err);
    // Its 'done' message (for itself or others) may be lost with it: collect now.
    this.#collect();
    if (!t.ready && this.#threads.size === 0) {
      // Nothing can run the queued calls (start-up fails): they never ran and never will.
      for (const q of this.#queue.splice(0)) q.reject(err);
      return;
    }
    if (t.ready) this.#pump();
  }
}
