// The syscall seam: the ONE place that binds libc through koffi.
//
// Everything above this file talks to the `Syscalls` interface, never to koffi, so unit
// tests swap in the fake backend (test/unit/fake-kernel.ts) with `setSyscalls()` -
// the same split as rust-vmm's vfio_syscall module. koffi is imported lazily: CLI
// commands and hooks that never touch a device do not pay for loading it.

import { createRequire } from 'node:module';
import { errnoName } from './errno.ts';
import { BlockingPool, type BlockingCall, type PoolOptions, type PoolStats } from './blocking-pool.ts';

/** A failed system call: the raw errno, before any VFIO meaning is attached. */
export class SysError extends Error {
  readonly errno: number;
  readonly code: string;
  readonly syscall: string;
  constructor(syscall: string, errno: number) {
    super(`${syscall}: ${errnoName(errno)}`);
    this.name = 'SysError';
    this.errno = errno;
    this.code = errnoName(errno);
    this.syscall = syscall;
  }
}

/**
 * Builds a SysError without capturing a stack trace: the seam's errors are caught and
 * re-thrown as VfioError (which has the useful stack) one frame up, and capturing a
 * stack costs ~7 us under tsx - 15x the ioctl itself.
 */
export function sysError(syscall: string, errno: number): SysError {
  const limit = Error.stackTraceLimit;
  Error.stackTraceLimit = 0;
  try {
    return new SysError(syscall, errno);
  } finally {
    Error.stackTraceLimit = limit;
  }
}

export const OpenFlag = {
  O_RDONLY: 0,
  O_WRONLY: 1,
  O_RDWR: 2,
  O_NONBLOCK: 0o4000,
  O_CLOEXEC: 0o2000000,
} as const;

export const PollEvent = { POLLIN: 0x1, POLLOUT: 0x4, POLLERR: 0x8, POLLHUP: 0x10, POLLNVAL: 0x20 } as const;

/**
 * When a blocking call really ran, in this thread's performance.now() time base: the
 * moment the call was issued to the kernel (not when it was queued) and when it returned.
 * Filled in by the backend when the caller passes an object.
 */
export interface CallTiming {
  issuedAt?: number;
  returnedAt?: number;
}

/** ioctl's third argument: a buffer (passed as a pointer), an integer by value, or none. */
export type IoctlArg = Buffer | number | undefined;

export interface Syscalls {
  /** Returns the new fd; throws SysError. Always adds O_CLOEXEC. */
  open(path: string, flags: number): number;
  close(fd: number): void;
  /** Synchronous ioctl (VFIO ioctls complete quickly or are the call we wait on anyway). */
  ioctl(fd: number, request: number, arg?: IoctlArg): number;
  /**
   * ioctl on a thread of its own, for calls that may block (slow device arcs): N calls in
   * flight block in the kernel at the same time. `timing`, when given, is filled in with
   * when the call really ran (the real backend does; a fake may not).
   */
  ioctlAsync(fd: number, request: number, arg?: Buffer, timing?: CallTiming): Promise<number>;
  /** read(2) off the event loop; resolves with the byte count (0 = EOF). */
  read(fd: number, buf: Buffer, length: number): Promise<number>;
  /** write(2) off the event loop; resolves with the byte count accepted (may be short). */
  write(fd: number, buf: Buffer, length: number): Promise<number>;
  /** poll(2) on one fd; resolves with revents (0 on timeout). */
  poll(fd: number, events: number, timeoutMs: number): Promise<number>;
  /** Gets `threads` blocking calls' worth of threads ready before a parallel phase (optional). */
  prewarm?(threads: number): Promise<void>;
}

// ---------------------------------------------------------------------------------
// The real backend.

interface KoffiFunction {
  (...args: unknown[]): number;
}

interface LibcFunctions {
  open: KoffiFunction;
  close: KoffiFunction;
  ioctlVariadic: KoffiFunction;
  ioctlPtr: KoffiFunction;
  ioctlInt: KoffiFunction;
  errno: () => number;
}

interface KoffiModule {
  load(name: string): KoffiLib;
  struct(name: string, members: Record<string, string>): unknown;
  errno(): number;
}

interface KoffiLib {
  func(proto: string): KoffiFunction;
  func(name: string, ret: string, args: string[]): KoffiFunction;
}

let koffiLibc: { koffi: KoffiModule; lib: KoffiLib } | undefined;

/** koffi and libc.so.6, loaded once, on first use. */
function koffiAndLibc(): { koffi: KoffiModule; lib: KoffiLib } {
  if (!koffiLibc) {
    // koffi is CommonJS with a prebuilt native addon; require keeps the import lazy.
    const koffi = createRequire(import.meta.url)('koffi') as KoffiModule;
    koffiLibc = { koffi, lib: koffi.load('libc.so.6') };
  }
  return koffiLibc;
}

let libc: LibcFunctions | undefined;

function loadLibc(): LibcFunctions {
  if (libc) return libc;
  const { koffi, lib } = koffiAndLibc();
  libc = {
    open: lib.func('int open(const char *path, int flags, int mode)'),
    close: lib.func('int close(int fd)'),
    // ioctl is variadic in libc; the kernel reads the third argument as an unsigned long.
    ioctlVariadic: lib.func('int ioctl(int fd, unsigned long request, ...)'),
    // Fixed prototypes of the same symbol: they skip the per-call type parsing of
    // variadic calls (about 50x cheaper here).
    ioctlPtr: lib.func('ioctl', 'int', ['int', 'unsigned long', 'void *']),
    ioctlInt: lib.func('ioctl', 'int', ['int', 'unsigned long', 'unsigned long']),
    errno: () => koffi.errno(),
  };
  return libc;
}

function checkBuffer(buf: Buffer, length: number, what: string): void {
  if (!Number.isInteger(length) || length < 0 || length > buf.length) {
    throw new RangeError(`${what}: length ${length} does not fit a ${buf.length}-byte buffer`);
  }
}

function checkFd(fd: number, what: string): void {
  // A negative or non-integer fd would reach the kernel as garbage: refuse it here.
  if (!Number.isInteger(fd) || fd < 0 || fd > 0x7fffffff) throw new SysError(what, 9 /* EBADF */);
}

// Blocking calls run on dedicated threads (./blocking-pool.ts), one per call in flight:
// koffi's own async calls share libuv's 4-thread pool, which capped "devices move in
// parallel" at four. The cap and the idle time come from the environment:
//   VFIO_MIG_SYS_THREADS          most calls in flight at once (default 128)
//   VFIO_MIG_SYS_THREAD_IDLE_MS   an idle thread exits after this long (default 30000)

function envInt(name: string, fallback: number, min: number): number {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const v = Number(raw);
  if (!Number.isInteger(v) || v < min) throw new RangeError(`${name} must be an integer >= ${min}, got '${raw}'`);
  return v;
}

let pool: BlockingPool | undefined;

function blockingPool(): BlockingPool {
  pool ??= new BlockingPool({ maxThreads: envInt('VFIO_MIG_SYS_THREADS', 128, 1), idleMs: envInt('VFIO_MIG_SYS_THREAD_IDLE_MS', 30_000, 0) });
  return pool;
}

/** Changes the blocking-call pool's cap or idle time at run time (tests, benchmarks). */
export function configureSysThreads(options: Partial<PoolOptions>): void {
  blockingPool().configure(options);
}

/** How many blocking-call threads exist, start, run a call; how many calls wait. */
export function sysThreadStats(): PoolStats {
  return blockingPool().stats();
}

/** Runs a blocking call on the pool; errno was read in the worker right after the call. */
async function callBlocking(name: string, call: BlockingCall, timing?: CallTiming): Promise<{ result: number; revents: number }> {
  const r = await blockingPool().run(call);
  if (timing) {
    timing.issuedAt = r.issuedAt;
    timing.returnedAt = r.returnedAt;
  }
  if (r.result < 0) throw sysError(name, r.errno);
  return r;
}

/**
 * ioctl through libc's variadic declaration, kept as the reference for the fixed
 * prototypes (test/unit/sys.test.ts checks both agree); not used on hot paths.
 */
export function ioctlVariadic(fd: number, request: number, arg?: IoctlArg): number {
  checkFd(fd, 'ioctl');
  const c = loadLibc();
  const r = Buffer.isBuffer(arg) ? c.ioctlVariadic(fd, request, 'void *', arg) : c.ioctlVariadic(fd, request, 'unsigned long', arg ?? 0);
  if (r < 0) throw sysError('ioctl', c.errno());
  return r;
}

export const libcSyscalls: Syscalls = {
  open(path, flags) {
    if (path.includes('\0')) throw new SysError('open', 22 /* EINVAL */);
    const c = loadLibc();
    const fd = c.open(path, flags | OpenFlag.O_CLOEXEC, 0);
    if (fd < 0) throw sysError(`open ${path}`, c.errno());
    return fd;
  },
  close(fd) {
    checkFd(fd, 'close');
    const c = loadLibc();
    if (c.close(fd) < 0) throw sysError('close', c.errno());
  },
  ioctl(fd, request, arg) {
    checkFd(fd, 'ioctl');
    const c = loadLibc();
    const r = Buffer.isBuffer(arg) ? c.ioctlPtr(fd, request, arg) : c.ioctlInt(fd, request, arg ?? 0);
    if (r < 0) throw sysError('ioctl', c.errno());
    return r;
  },
  async ioctlAsync(fd, request, arg, timing) {
    checkFd(fd, 'ioctl');
    return (await callBlocking('ioctl', { op: 'ioctl', fd, request, arg }, timing)).result;
  },
  async read(fd, buf, length) {
    checkFd(fd, 'read');
    checkBuffer(buf, length, 'read');
    return (await callBlocking('read', { op: 'read', fd, buf, length })).result;
  },
  async write(fd, buf, length) {
    checkFd(fd, 'write');
    checkBuffer(buf, length, 'write');
    return (await callBlocking('write', { op: 'write', fd, buf, length })).result;
  },
  async poll(fd, events, timeoutMs) {
    checkFd(fd, 'poll');
    if (!Number.isInteger(timeoutMs)) throw new RangeError(`poll: timeout ${timeoutMs} is not an integer`);
    return (await callBlocking('poll', { op: 'poll', fd, events, timeoutMs })).revents;
  },
  prewarm(threads) {
    return blockingPool().prewarm(threads);
  },
};

let current: Syscalls = libcSyscalls;

/** The backend every VFIO call goes through. */
export function sys(): Syscalls {
  return current;
}

/**
 * Starts `threads` blocking-call threads of the current backend and resolves when they
 * are ready (a no-op on a backend without threads, e.g. the fake kernel). Call it before
 * a phase that issues N slow calls at once, so that their start-up is not in the phase.
 */
export function prewarm(threads: number): Promise<void> {
  return current.prewarm ? current.prewarm(threads) : Promise.resolve();
}

/** Swaps the backend (unit tests install the fake kernel); returns the previous one. */
export function setSyscalls(backend: Syscalls): Syscalls {
  const previous = current;
  current = backend;
  return previous;
}

// ---------------------------------------------------------------------------------
// SCM_RIGHTS, for src/qmp: QEMU's getfd/add-fd take the descriptor as ancillary data on
// the same sendmsg(2) as the command bytes, and node's net.Socket cannot send ancillary
// data. Appended here because this file is the one libc binding (DESIGN.md section 2).

interface SendmsgLibc {
  sendmsg: (fd: number, msg: unknown, flags: number) => number;
  errno: () => number;
}

let sendmsgLibc: SendmsgLibc | undefined;

function loadSendmsg(): SendmsgLibc {
  if (sendmsgLibc) return sendmsgLibc;
  const { koffi, lib } = koffiAndLibc();
  // Named with a prefix: koffi type names are process-global.
  koffi.struct('vfio_mig_iovec', { iov_base: 'void *', iov_len: 'size_t' });
  koffi.struct('vfio_mig_msghdr', {
    msg_name: 'void *',
    msg_namelen: 'uint32_t',
    msg_iov: 'vfio_mig_iovec *',
    msg_iovlen: 'size_t',
    msg_control: 'void *',
    msg_controllen: 'size_t',
    msg_flags: 'int',
  });
  sendmsgLibc = { sendmsg: lib.func('long sendmsg(int fd, const vfio_mig_msghdr *msg, int flags)'), errno: () => koffi.errno() };
  return sendmsgLibc;
}

const SOL_SOCKET = 1;
const SCM_RIGHTS = 1;
const MSG_DONTWAIT = 0x40;
const MSG_NOSIGNAL = 0x4000; // a closed peer gives EPIPE, not a process-killing SIGPIPE

/**
 * Sends `payload` on the stream socket `socketFd` with `fdToSend` attached (SCM_RIGHTS),
 * without blocking. Returns the number of payload bytes the kernel accepted (the fd travels
 * with the first byte; the caller writes any remainder normally). Throws SysError (EAGAIN
 * when the socket buffer is full, ENOTSOCK/EINVAL for a non-unix socket).
 */
export function sendFd(socketFd: number, payload: Buffer, fdToSend: number): number {
  checkFd(socketFd, 'sendmsg');
  checkFd(fdToSend, 'sendmsg');
  if (payload.length === 0) throw new RangeError('sendmsg: the payload must not be empty (the fd travels with its first byte)');
  const c = loadSendmsg();
  // struct cmsghdr { size_t cmsg_len; int cmsg_level; int cmsg_type; int fd; } padded to
  // CMSG_SPACE(sizeof(int)) = 24 on LP64; cmsg_len = CMSG_LEN(sizeof(int)) = 20.
  const control = Buffer.alloc(24);
  control.writeBigUInt64LE(20n, 0);
  control.writeInt32LE(SOL_SOCKET, 8);
  control.writeInt32LE(SCM_RIGHTS, 12);
  control.writeInt32LE(fdToSend, 16);
  const msg = {
    msg_name: null,
    msg_namelen: 0,
    msg_iov: [{ iov_base: payload, iov_len: payload.length }],
    msg_iovlen: 1,
    msg_control: control,
    msg_controllen: control.length,
    msg_flags: 0,
  };
  const n = Number(c.sendmsg(socketFd, msg, MSG_DONTWAIT | MSG_NOSIGNAL));
  if (n < 0) throw sysError('sendmsg', c.errno());
  return n;
}
