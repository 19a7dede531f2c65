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

// The worker's code, run with `new Worker(code, { eval: true })` so that it needs no file
// of its own: the same under tsx, in esbuild bundles and in dist/. Plain CommonJS.
const WORKER_CODE = `'use strict';
const { parentPort, workerData } = require('node:worker_threads');
let koffi, ioctl, read, write, poll, loaded = false;
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
const pfd = Buffer.alloc(8);
let scratch = new Uint8Array(0);
if (loaded) parentPort.on('message', (m) => {
  if (m.scratch) scratch = new Uint8Array(m.scratch);
  let r = -1, errno = 0, revents = 0, t0 = 0, t1 = 0;
  try {
    switch (m.op) {
      case 'ioctl': {
        const arg = m.len >= 0 ? scratch.subarray(0, m.len) : null;
        t0 = origin + performance.now();
        r = ioctl(m.fd, m.request, arg);
        if (r < 0) errno = koffi.errno();
        t1 = origin + performance.now();
        break;
      }
      case 'read': {
        const buf = scratch.subarray(0, m.len);
        t0 = origin + performance.now();
        r = Number(read(m.fd, buf, m.len));
        if (r < 0) errno = koffi.errno();
        t1 = origin + performance.now();
        break;
      }
      case 'write': {
        const buf = scratch.subarray(0, m.len);
        t0 = origin + performance.now();
        r = Number(write(m.fd, buf, m.len));
        if (r < 0) errno = koffi.errno();
        t1 = origin + performance.now();
        break;
      }
      case 'poll': {
        pfd.writeInt32LE(m.fd, 0);
        pfd.writeInt16LE(m.events, 4);
        pfd.writeInt16LE(0, 6);
        t0 = origin + performance.now();
        r = poll(pfd, 1, m.timeoutMs);
        if (r < 0) errno = koffi.errno();
        t1 = origin + performance.now();
        revents = pfd.readInt16LE(6) & 0xffff;
        break;
      }
      default:
        throw new Error('unknown op ' + m.op);
    }
  } catch (err) {
    parentPort.postMessage({ error: String(err && err.message || err) });
    return;
  }
  parentPort.postMessage({ r, errno, revents, t0, t1 });
});
if (loaded) parentPort.postMessage({ ready: true });
`;

interface WorkerReply {
  ready?: true;
  fatal?: string;
  error?: string;
  r?: number;
  errno?: number;
  revents?: number;
  t0?: number;
  t1?: number;
}

interface Pending {
  call: BlockingCall;
  resolve: (r: BlockingResult) => void;
  reject: (e: Error) => void;
}

interface Thread {
  worker: Worker;
  ready: boolean;
  busy: Pending | undefined;
  /** The main thread's view of this thread's scratch (undefined until a call needs one). */
  scratch: Uint8Array | undefined;
  idleTimer: NodeJS.Timeout | undefined;
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
  readonly #queue: Pending[] = [];
  #koffiPath: string | undefined;
  #options: PoolOptions;
  #warming = 0;

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
    let excess = this.#threads.size - this.#options.maxThreads;
    for (const t of [...this.#threads]) {
      if (!t.ready || t.busy) continue;
      if (excess-- > 0) this.#retire(t);
      else this.#idle(t);
    }
  }

  stats(): PoolStats {
    let starting = 0;
    let busy = 0;
    for (const t of this.#threads) {
      if (!t.ready) starting++;
      else if (t.busy) busy++;
    }
    return { threads: this.#threads.size, starting, busy, queued: this.#queue.length, maxThreads: this.#options.maxThreads };
  }

  /** Runs one blocking call on a thread of its own (queued FIFO when the cap is reached). */
  run(call: BlockingCall): Promise<BlockingResult> {
    return new Promise((resolve, reject) => {
      this.#queue.push({ call, resolve, reject });
      this.#pump();
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
      for (const t of this.#threads) if (t.ready && !t.busy) this.#idle(t);
    }
  }

  #pump(): void {
    // Hand queued calls to idle threads, oldest call first.
    for (const t of this.#threads) {
      if (this.#queue.length === 0) return;
      if (t.ready && !t.busy) this.#dispatch(t, this.#queue.shift()!);
    }
    // Every call still queued gets a thread of its own, up to the cap.
    let starting = 0;
    for (const t of this.#threads) if (!t.ready) starting++;
    while (this.#queue.length > starting && this.#threads.size < this.#options.maxThreads) {
      this.#spawn();
      starting++;
    }
  }

  #spawn(): void {
    this.#koffiPath ??= createRequire(import.meta.url).resolve('koffi');
    const worker = new Worker(WORKER_CODE, {
      eval: true,
      workerData: { koffiPath: this.#koffiPath },
      // Not the parent's flags: under tsx they would load tsx's loader in every thread.
      execArgv: [],
      // The worker never opens or closes fds, and must not close the caller's on exit.
      trackUnmanagedFds: false,
      stdout: false,
      stderr: false,
    });
    const t: Thread = { worker, ready: false, busy: undefined, scratch: undefined, idleTimer: undefined, waiters: [] };
    this.#threads.add(t);
    // Referenced while starting and while running a call: a call in flight keeps the
    // process alive (as libuv's pool would), an idle thread never does.
    worker.on('message', (m: WorkerReply) => this.#onMessage(t, m));
    worker.on('error', (err: Error) => this.#lost(t, err));
    worker.on('exit', (code: number) => this.#lost(t, new Error(`blocking-call thread exited (code ${code})`)));
  }

  #onMessage(t: Thread, m: WorkerReply): void {
    if (m.ready) {
      t.ready = true;
      for (const w of t.waiters.splice(0)) w.resolve();
      this.#idle(t);
      this.#pump();
      return;
    }
    if (m.fatal !== undefined) {
      this.#lost(t, new Error(`blocking-call thread could not load koffi/libc: ${m.fatal}`));
      void t.worker.terminate();
      return;
    }
    const p = t.busy;
    if (!p) return; // a reply without a call: cannot happen; ignore rather than crash
    t.busy = undefined;
    if (m.error !== undefined) {
      p.reject(new Error(`blocking ${p.call.op}: ${m.error}`));
    } else {
      const result = m.r ?? -1;
      // The kernel wrote into the scratch: copy back what the caller's buffer should hold.
      if (result > 0 && p.call.op === 'read') p.call.buf.set(t.scratch!.subarray(0, result));
      if (p.call.op === 'ioctl' && p.call.arg) p.call.arg.set(t.scratch!.subarray(0, p.call.arg.length));
      const origin = performance.timeOrigin;
      p.resolve({ result, errno: m.errno ?? 0, revents: m.revents ?? 0, issuedAt: (m.t0 ?? 0) - origin, returnedAt: (m.t1 ?? 0) - origin });
    }
    this.#idle(t);
    this.#pump();
  }

  #dispatch(t: Thread, p: Pending): void {
    if (t.idleTimer) clearTimeout(t.idleTimer);
    t.idleTimer = undefined;
    const call = p.call;
    const bytes = callBytes(call);
    let newScratch: SharedArrayBuffer | undefined;
    if (bytes > 0 && (!t.scratch || t.scratch.length < bytes)) {
      let size = MIN_SCRATCH;
      while (size < bytes) size *= 2;
      newScratch = new SharedArrayBuffer(size);
      t.scratch = new Uint8Array(newScratch);
    }
    if (call.op === 'ioctl' && call.arg) t.scratch!.set(call.arg);
    if (call.op === 'write') t.scratch!.set(call.buf.subarray(0, call.length));
    t.busy = p;
    t.worker.ref();
    const msg =
      call.op === 'ioctl'
        ? { op: call.op, fd: call.fd, request: call.request, len: bytes }
        : call.op === 'poll'
          ? { op: call.op, fd: call.fd, events: call.events, timeoutMs: call.timeoutMs }
          : { op: call.op, fd: call.fd, len: bytes };
    t.worker.postMessage(newScratch ? { ...msg, scratch: newScratch } : msg);
  }

  #idle(t: Thread): void {
    if (!this.#threads.has(t)) return;
    t.worker.unref();
    if (t.idleTimer) clearTimeout(t.idleTimer);
    t.idleTimer = setTimeout(() => this.#retire(t), this.#options.idleMs);
    t.idleTimer.unref();
  }

  #retire(t: Thread): void {
    if (t.busy || !this.#threads.has(t)) return;
    if (this.#warming > 0 && this.#threads.size <= this.#options.maxThreads) return this.#idle(t);
    this.#threads.delete(t);
    void t.worker.terminate();
  }

  /** A thread died (or could not start): fail only what it held, never a queued call that others can run. */
  #lost(t: Thread, err: Error): void {
    if (!this.#threads.has(t)) return;
    this.#threads.delete(t);
    if (t.idleTimer) clearTimeout(t.idleTimer);
    for (const w of t.waiters.splice(0)) w.reject(err);
    const p = t.busy;
    t.busy = undefined;
    // The thread is gone, so its call is no longer running: settling now is safe.
    p?.reject(err);
    if (!t.ready && this.#threads.size === 0) {
      // Nothing can run the queued calls (start-up fails): they never ran and never will.
      for (const q of this.#queue.splice(0)) q.reject(err);
      return;
    }
    if (t.ready) this.#pump();
  }
}

