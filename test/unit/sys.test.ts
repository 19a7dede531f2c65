// The real syscall seam (koffi over libc), on files every machine has: /dev/null, pipes.
import test from 'ava';
import { openSync, closeSync, mkdtempSync, writeFileSync, readFileSync, writeSync, rmSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { libcSyscalls as sys, ioctlVariadic, SysError, OpenFlag, PollEvent, prewarm, configureSysThreads, sysThreadStats, setSyscalls, type CallTiming } from '../../src/host/sys.ts';
import { encodeFeature, Feature, FeatureFlag, Ioctl } from '../../src/vfio/uapi.ts';
import { errnoName, errnoValue } from '../../src/host/errno.ts';

test('open/close, and errno names for failures', (t) => {
  const fd = sys.open('/dev/null', OpenFlag.O_RDWR);
  t.true(fd >= 0);
  sys.close(fd);
  const e = t.throws(() => sys.close(fd), { instanceOf: SysError });
  t.is(e?.code, 'EBADF');
  const missing = t.throws(() => sys.open('/nonexistent/x', OpenFlag.O_RDONLY), { instanceOf: SysError });
  t.is(missing?.code, 'ENOENT');
  t.is(missing?.errno, 2);
  const nul = t.throws(() => sys.open('/dev/null\0/etc/passwd', OpenFlag.O_RDONLY), { instanceOf: SysError });
  t.is(nul?.code, 'EINVAL');
});

test('fds are opened close-on-exec (data fds must not leak into spawned helpers)', (t) => {
  const fd = sys.open('/dev/null', OpenFlag.O_RDONLY);
  const info = readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8');
  sys.close(fd);
  const flags = Number.parseInt(/flags:\s+([0-7]+)/.exec(info)?.[1] ?? '0', 8);
  t.is(flags & OpenFlag.O_CLOEXEC, OpenFlag.O_CLOEXEC);
});

test('ioctl: fixed prototypes and the variadic declaration agree (ENOTTY on /dev/null)', (t) => {
  const fd = sys.open('/dev/null', OpenFlag.O_RDWR);
  try {
    const buf = encodeFeature(Feature.MIGRATION, FeatureFlag.GET, 8);
    t.is(t.throws(() => sys.ioctl(fd, Ioctl.DEVICE_FEATURE, buf), { instanceOf: SysError })?.code, 'ENOTTY');
    t.is(t.throws(() => ioctlVariadic(fd, Ioctl.DEVICE_FEATURE, buf), { instanceOf: SysError })?.code, 'ENOTTY');
    t.is(t.throws(() => sys.ioctl(fd, Ioctl.CHECK_EXTENSION, 3), { instanceOf: SysError })?.code, 'ENOTTY');
    t.is(t.throws(() => ioctlVariadic(fd, Ioctl.GET_API_VERSION), { instanceOf: SysError })?.code, 'ENOTTY');
  } finally {
    sys.close(fd);
  }
});

test('ioctlAsync runs off the event loop and reports errno', async (t) => {
  const fd = sys.open('/dev/null', OpenFlag.O_RDWR);
  try {
    const err = await t.throwsAsync(sys.ioctlAsync(fd, Ioctl.DEVICE_FEATURE, Buffer.alloc(16)), { instanceOf: SysError });
    t.is(err?.code, 'ENOTTY');
  } finally {
    sys.close(fd);
  }
});

test('invalid fds never reach the kernel', async (t) => {
  for (const fd of [-1, 1.5, Number.NaN, 2 ** 40]) {
    t.is(t.throws(() => sys.ioctl(fd, Ioctl.DEVICE_FEATURE), { instanceOf: SysError })?.code, 'EBADF');
    t.is((await t.throwsAsync(sys.read(fd, Buffer.alloc(1), 1), { instanceOf: SysError }))?.code, 'EBADF');
  }
  await t.throwsAsync(sys.read(0, Buffer.alloc(4), 8), { instanceOf: RangeError });
});

test('read/write/poll on a real file, with byte counts and EOF', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'sys-'));
  const path = join(dir, 'f');
  writeFileSync(path, 'hello world');
  const fd = sys.open(path, OpenFlag.O_RDWR);
  try {
    t.is((await sys.poll(fd, PollEvent.POLLIN, 0)) & PollEvent.POLLIN, PollEvent.POLLIN);
    const buf = Buffer.alloc(64);
    t.is(await sys.read(fd, buf, 64), 11);
    t.is(buf.subarray(0, 11).toString(), 'hello world');
    t.is(await sys.read(fd, buf, 64), 0, 'EOF');
    t.is(await sys.write(fd, Buffer.from('!!'), 2), 2);
  } finally {
    sys.close(fd);
  }
  const ro = openSync(path, 'r');
  t.is((await t.throwsAsync(sys.write(ro, Buffer.from('x'), 1), { instanceOf: SysError }))?.code, 'EBADF');
  closeSync(ro);
});

test('errno names both ways', (t) => {
  t.is(errnoName(42), 'ENOMSG');
  t.is(errnoName(9999), 'errno 9999');
  t.is(errnoValue('ENOTTY'), 25);
  t.is(errnoValue('NOPE'), undefined);
});

// ---------------------------------------------------------------------------------
// The blocking-call threads: real concurrency, not libuv's 4-thread pool.

const FIONREAD = 0x541b;

/** `n` FIFOs opened O_RDWR (so neither open nor a later write blocks); reads on them block. */
function fifos(n: number): { fds: number[]; dispose(): void } {
  const dir = mkdtempSync(join(tmpdir(), 'sys-fifo-'));
  const paths = Array.from({ length: n }, (_, i) => join(dir, `f${i}`));
  execFileSync('mkfifo', paths);
  const fds = paths.map((p) => sys.open(p, OpenFlag.O_RDWR));
  return {
    fds,
    dispose() {
      // Closing an fd does not wake a read blocked on it in another thread: feed every
      // pipe first, so that no read of a failed test keeps a thread (and ava) waiting.
      for (const fd of fds) writeSync(fd, '.');
      for (const fd of fds) sys.close(fd);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

async function until(what: string, cond: () => boolean, ms = 20_000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

test.serial('16 reads block at the same time and each resolves when its own pipe gets data', async (t) => {
  const n = 16;
  const p = fifos(n);
  try {
    const order: number[] = [];
    const bufs = p.fds.map(() => Buffer.alloc(8));
    const reads = p.fds.map((fd, i) => sys.read(fd, bufs[i]!, 8).then((bytes) => (order.push(i), bytes)));
    await until('16 reads in flight', () => sysThreadStats().busy >= n);
    t.is(sysThreadStats().queued, 0, 'no read waits for a thread');
    // Reverse order: with 4 threads, read 15 would still be queued behind reads 0-3.
    for (let i = n - 1; i >= 0; i--) {
      writeSync(p.fds[i]!, `pipe ${i}`);
      t.is(await reads[i], `pipe ${i}`.length);
      t.is(bufs[i]!.toString('utf8', 0, `pipe ${i}`.length), `pipe ${i}`);
    }
    t.deepEqual(order, Array.from({ length: n }, (_, i) => n - 1 - i));
  } finally {
    p.dispose();
  }
});

test.serial('64 calls in flight at once (the coordinator moves up to 64 devices in parallel)', async (t) => {
  const n = 64;
  const p = fifos(n);
  try {
    const reads = p.fds.map((fd) => sys.read(fd, Buffer.alloc(1), 1));
    await until('64 reads in flight', () => sysThreadStats().busy >= n, 60_000);
    t.is(sysThreadStats().busy, n);
    for (const fd of p.fds) writeSync(fd, 'x');
    t.deepEqual(await Promise.all(reads), p.fds.map(() => 1));
  } finally {
    p.dispose();
  }
});

test.serial('at the thread cap calls wait in order, and a waiting call never settles before it ran', async (t) => {
  configureSysThreads({ maxThreads: 2 });
  const p = fifos(3);
  try {
    const settled: number[] = [];
    const reads = p.fds.map((fd, i) => sys.read(fd, Buffer.alloc(4), 4).then((b) => (settled.push(i), b)));
    await until('two reads in flight, one waiting', () => sysThreadStats().busy === 2 && sysThreadStats().queued === 1);
    t.is(sysThreadStats().threads, 2);
    writeSync(p.fds[2]!, 'late'); // its read is still queued: nothing may settle
    await new Promise((r) => setTimeout(r, 100));
    t.deepEqual(settled, []);
    writeSync(p.fds[0]!, 'a');
    t.is(await reads[0], 1);
    t.is(await reads[2], 4, 'the queued read ran on the freed thread and found its data');
    writeSync(p.fds[1]!, 'b');
    t.is(await reads[1], 1);
    t.deepEqual(settled, [0, 2, 1]);
  } finally {
    configureSysThreads({ maxThreads: 128 });
    p.dispose();
  }
});

test.serial('errno comes from the worker thread that made the call', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'sys-'));
  const dirFd = sys.open(dir, OpenFlag.O_RDONLY);
  const path = join(dir, 'f');
  writeFileSync(path, 'x');
  const ro = sys.open(path, OpenFlag.O_RDONLY);
  try {
    t.is((await t.throwsAsync(sys.read(dirFd, Buffer.alloc(8), 8), { instanceOf: SysError }))?.code, 'EISDIR');
    t.is((await t.throwsAsync(sys.write(ro, Buffer.from('y'), 1), { instanceOf: SysError }))?.code, 'EBADF');
    t.is((await t.throwsAsync(sys.ioctlAsync(ro, Ioctl.DEVICE_FEATURE, Buffer.alloc(16)), { instanceOf: SysError }))?.code, 'ENOTTY');
    const closed = sys.open(path, OpenFlag.O_RDONLY);
    sys.close(closed);
    t.is((await t.throwsAsync(sys.read(closed, Buffer.alloc(1), 1), { instanceOf: SysError }))?.code, 'EBADF');
    t.is(await sys.poll(closed, PollEvent.POLLIN, 0), PollEvent.POLLNVAL, 'poll reports a closed fd in revents');
  } finally {
    sys.close(ro);
    sys.close(dirFd);
    rmSync(dir, { recursive: true, force: true });
  }
});

test.serial('ioctl output, 1 MiB reads and writes travel through the thread scratch intact', async (t) => {
  const p = fifos(1);
  const dir = mkdtempSync(join(tmpdir(), 'sys-'));
  try {
    writeSync(p.fds[0]!, 'twelve bytes');
    const count = Buffer.alloc(4);
    t.is(await sys.ioctlAsync(p.fds[0]!, FIONREAD, count), 0);
    t.is(count.readInt32LE(0), 12, 'FIONREAD wrote into the caller buffer');

    const data = randomBytes(1536 * 1024);
    const path = join(dir, 'big');
    writeFileSync(path, data);
    const fd = sys.open(path, OpenFlag.O_RDWR);
    try {
      const chunk = Buffer.alloc(1 << 20);
      t.is(await sys.read(fd, chunk, chunk.length), 1 << 20);
      t.true(chunk.equals(data.subarray(0, 1 << 20)));
      const rest = Buffer.alloc(1 << 20);
      t.is(await sys.read(fd, rest, rest.length), data.length - (1 << 20), 'a short read');
      t.true(rest.subarray(0, data.length - (1 << 20)).equals(data.subarray(1 << 20)));
      const more = randomBytes(1 << 20);
      // A view into a bigger buffer: only `length` bytes from its start are written.
      const view = Buffer.concat([more, Buffer.alloc(16)]).subarray(0, more.length + 16);
      t.is(await sys.write(fd, view, more.length), more.length);
    } finally {
      sys.close(fd);
    }
    const after = readFileSync(path);
    t.is(after.length, data.length + (1 << 20));
  } finally {
    p.dispose();
    rmSync(dir, { recursive: true, force: true });
  }
});

test.serial('timing says when the worker really issued the call, in this thread\'s time base', async (t) => {
  const fd = sys.open('/dev/null', OpenFlag.O_RDWR);
  try {
    await prewarm(1);
    const timing: CallTiming = {};
    const before = performance.now();
    await t.throwsAsync(sys.ioctlAsync(fd, Ioctl.DEVICE_FEATURE, Buffer.alloc(16), timing), { instanceOf: SysError });
    const after = performance.now();
    t.true(typeof timing.issuedAt === 'number' && typeof timing.returnedAt === 'number');
    t.true(before <= timing.issuedAt!, `${before} <= issuedAt ${timing.issuedAt}`);
    t.true(timing.issuedAt! <= timing.returnedAt!);
    t.true(timing.returnedAt! <= after, `returnedAt ${timing.returnedAt} <= ${after}`);
  } finally {
    sys.close(fd);
  }
  // issuedAt is when the call reached the kernel, not when it was queued: with one thread
  // busy on a blocked read, an ioctl waits; it is issued only after the read returned.
  configureSysThreads({ maxThreads: 1 });
  const p = fifos(1);
  try {
    const read = sys.read(p.fds[0]!, Buffer.alloc(1), 1);
    await until('the read to block', () => sysThreadStats().busy === 1);
    const timing: CallTiming = {};
    const queuedAt = performance.now();
    const ioctl = sys.ioctlAsync(p.fds[0]!, FIONREAD, Buffer.alloc(4), timing);
    await new Promise((r) => setTimeout(r, 150));
    const fedAt = performance.now();
    writeSync(p.fds[0]!, 'x');
    await read;
    await ioctl;
    t.true(timing.issuedAt! >= fedAt, `issued at ${timing.issuedAt!.toFixed(1)}, queued at ${queuedAt.toFixed(1)}, read fed at ${fedAt.toFixed(1)}`);
    t.true(timing.issuedAt! <= timing.returnedAt!);
  } finally {
    configureSysThreads({ maxThreads: 128 });
    p.dispose();
  }
});

test.serial('prewarm starts threads ahead of time; idle threads exit', async (t) => {
  configureSysThreads({ idleMs: 200 });
  try {
    await prewarm(6);
    const s = sysThreadStats();
    t.true(s.threads >= 6 && s.starting === 0, JSON.stringify(s));
    await prewarm(0);
    await until('idle threads to exit', () => sysThreadStats().threads === 0, 5000);
    t.pass();
  } finally {
    configureSysThreads({ idleMs: 30_000 });
  }
});

/** Runs a snippet in a fresh node (with tsx) that imports sys.ts as `sys`; returns its output and time. */
function child(code: string, opts: { input?: string } = {}): { out: string; ms: number } {
  const sysPath = new URL('../../src/host/sys.ts', import.meta.url).pathname;
  const script = `const m = await import(${JSON.stringify(sysPath)}); const sys = m.libcSyscalls; ${code}`;
  const t0 = performance.now();
  const out = execFileSync(process.execPath, ['--import=tsx', '--input-type=module', '-e', script], { encoding: 'utf8', timeout: 20_000, env: { ...process.env, VFIO_MIG_SYS_THREAD_IDLE_MS: '' }, input: opts.input });
  return { out, ms: performance.now() - t0 };
}

test.serial('an idle thread never keeps the process alive; a call in flight does', async (t) => {
  // Default idle time is 30 s: the process must still end at once after its last call.
  const done = child(`const fd = sys.open('/dev/null', 0); await sys.read(fd, Buffer.alloc(4), 4); console.log('read done');`);
  t.is(done.out.trim(), 'read done');
  t.true(done.ms < 15_000, `the process ended ${done.ms.toFixed(0)} ms after start`);
  // A read that blocks on stdin (a pipe) with nothing else pending keeps the process alive
  // until the data arrives - a thread running a call is referenced.
  const waited = child(`const b = Buffer.alloc(16); const n = await sys.read(0, b, 16); console.log('got ' + b.toString('utf8', 0, n));`, { input: 'hello' });
  t.is(waited.out.trim(), 'got hello');
});

test.serial('prewarm() follows the installed backend: a backend without threads (the fake kernel) starts none', async (t) => {
  const before = sysThreadStats().threads;
  const previous = setSyscalls({ ...sys, prewarm: undefined });
  try {
    await prewarm(8);
    t.is(sysThreadStats().threads, before);
  } finally {
    setSyscalls(previous);
  }
});
