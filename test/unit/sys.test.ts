// The real syscall seam (koffi over libc), on files every machine has: /dev/null, pipes.
import test from 'ava';
import { openSync, closeSync, mkdtempSync, writeFileSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { libcSyscalls as sys, ioctlVariadic, SysError, OpenFlag, PollEvent } from '../../src/host/sys.ts';
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
