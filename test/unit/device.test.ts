// VfioDevice against the fake kernel: opening, every error path the fake can produce,
// migration flags, state moves, precopy info, reset, serialisation and fd ownership.
import test from 'ava';
import { installFake } from '../fake/install.ts';
import { VfioDevice, describeNonViableGroup } from '../../src/vfio/device.ts';
import { VfioError } from '../../src/vfio/errors.ts';
import { readToEnd, readAvailable, writeAll } from '../../src/vfio/data.ts';
import { MigState, Feature, FeatureFlag } from '../../src/vfio/uapi.ts';
import { Errno } from '../../src/host/errno.ts';

const fake = installFake(test, { cdev: false });
const A = '0000:00:03.0';
fake.addDevice({ id: A, flags: 7, seed: 1 });
fake.addDevice({ id: '0000:00:04.0', flags: 3, seed: 2 });
fake.addDevice({ id: '0000:00:05.0', flags: 1, seed: 3 });
fake.addDevice({ id: '0000:00:06.0', flags: 6n });
fake.addDevice({ id: '0000:00:07.0' }); // plain vfio-pci: no migration
fake.addDevice({ id: '0000:00:08.0', v1Region: true });
fake.addDevice({ id: '0000:00:09.0', flags: 7, group: 40 });
fake.addGroupSibling('0000:00:09.1', 40, 'ixgbe');
fake.addDevice({ id: '0000:00:0a.0', flags: 7, driver: 'ixgbevf' });
fake.addDevice({ id: '83b8f4f2-509f-382f-3c1e-e6bfe0fa0001', flags: 7, driver: 'vfio_mdev', precopyEmpty: 'zero' });
fake.addDevice({ id: '0000:00:0b.0', flags: 7, canReset: false });
const BIG = '0000:00:0c.0';
fake.addDevice({ id: BIG, flags: 7, stateSize: 200_000 });

test.serial('bad device names are refused before any path or kernel call', (t) => {
  const before = fake.ioctlLog.length;
  for (const bad of ['../../etc/passwd', '0000:00:03.0/../..', '00:03.0', '0000:00:20.0', '0000:00:03.8', '', 'x'.repeat(5000), '83b8f4f2-509f-382f-3c1e-e6bfe0fa000', '0000:00:03.0\0']) {
    const err = t.throws(() => VfioDevice.open(bad), { instanceOf: VfioError });
    t.is(err?.code, 'EINVAL', bad);
    t.regex(err?.message ?? '', /expected/);
  }
  t.is(fake.ioctlLog.length, before);
  t.is(fake.openFdCount(), 0);
});

test.serial('a device that does not exist, or is bound to a host driver, is explained', (t) => {
  const missing = t.throws(() => VfioDevice.open('0000:00:1f.7'), { instanceOf: VfioError });
  t.is(missing?.code, 'ENOENT');
  const hostBound = t.throws(() => VfioDevice.open('0000:00:0a.0'), { instanceOf: VfioError });
  t.is(hostBound?.code, 'ENOENT');
  t.regex(hostBound?.message ?? '', /not bound to a vfio-pci \(variant\) driver \(driver: ixgbevf\)/);
  t.is(fake.openFdCount(), 0, 'the container opened first was closed again');
});

test.serial('a non-viable group names the sibling that is not VFIO-bound', (t) => {
  const err = t.throws(() => VfioDevice.open('0000:00:09.0'), { instanceOf: VfioError });
  t.regex(err?.message ?? '', /group 40 is not viable: 0000:00:09\.1 is bound to ixgbe/);
  t.regex(describeNonViableGroup(40), /ixgbe/);
  t.is(fake.openFdCount(), 0);
});

test.serial('a group held by another process gives the EBUSY sentence', async (t) => {
  const first = VfioDevice.open(A);
  const err = t.throws(() => VfioDevice.open(A), { instanceOf: VfioError });
  t.is(err?.code, 'EBUSY');
  t.regex(err?.message ?? '', /group 10 is held by another process - is a VM using 0000:00:03\.0\?/);
  await first.close();
  t.is(fake.openFdCount(), 0);
});

test.serial('open through group/container and read device info', async (t) => {
  const d = VfioDevice.open(A.toUpperCase().replace('0000', '0000'));
  t.is(d.name, A);
  t.is(d.openedVia, 'group');
  t.is(d.group, 10);
  const info = await d.info();
  t.is(info.kind, 'pci');
  t.true(info.canReset);
  t.is(info.numRegions, 9);
  t.is(fake.openFdCount(), 3, 'container, group and device');
  await d.close();
  await d.close(); // idempotent
  t.is(fake.openFdCount(), 0);
});

test.serial('migration flags: defined sets pass, others and missing support are explained', async (t) => {
  for (const [id, flags] of [[A, 7], ['0000:00:04.0', 3], ['0000:00:05.0', 1]] as const) {
    const d = VfioDevice.open(id);
    t.is(await d.migrationFlags(), flags);
    await d.close();
  }
  const odd = VfioDevice.open('0000:00:06.0');
  const e1 = await t.throwsAsync(odd.migrationFlags(), { instanceOf: VfioError });
  t.regex(e1?.message ?? '', /lack STOP_COPY/);
  await odd.close();
  const plain = VfioDevice.open('0000:00:07.0');
  const e2 = await t.throwsAsync(plain.migrationFlags(), { instanceOf: VfioError });
  t.is(e2?.code, 'ENOTTY');
  t.regex(e2?.message ?? '', /not migratable/);
  await plain.close();
  const v1 = VfioDevice.open('0000:00:08.0');
  const e3 = await t.throwsAsync(v1.migrationFlags(), { instanceOf: VfioError });
  t.regex(e3?.message ?? '', /speaks only the removed v1 protocol - needs Linux >= 5.18 and a v2 driver/);
  await v1.close();
});

test.serial('feature probing follows the kernel: PROBE|GET on a SET-only feature is EINVAL', async (t) => {
  const d = VfioDevice.open(A);
  t.true(await d.probeFeature(Feature.MIGRATION, FeatureFlag.GET));
  t.false(await d.probeFeature(Feature.MIGRATION, FeatureFlag.SET));
  t.true(await d.probeFeature(Feature.MIG_DEVICE_STATE, FeatureFlag.GET | FeatureFlag.SET));
  t.false(await d.probeFeature(Feature.DMA_LOGGING_START, FeatureFlag.SET), 'no DMA logging ops');
  t.true(await d.probeFeature(Feature.MIG_DATA_SIZE, FeatureFlag.GET));
  await d.close();
});

test.serial('bad targets are refused without a kernel call', async (t) => {
  const d = VfioDevice.open('0000:00:04.0');
  await d.state();
  const before = fake.ioctlLog.length;
  for (const target of [8, -1, 99, 2.5, Number.NaN]) {
    const err = await t.throwsAsync(d.setState(target as MigState), { instanceOf: VfioError });
    t.is(err?.code, 'EINVAL');
    t.regex(err?.message ?? '', /out of range/);
  }
  const p2p = await t.throwsAsync(d.setState(MigState.PreCopy), { instanceOf: VfioError });
  t.regex(p2p?.message ?? '', /not a state this device supports/);
  const err = await t.throwsAsync(d.setState(MigState.Error), { instanceOf: VfioError });
  t.regex(err?.message ?? '', /ERROR can never be requested/);
  t.is(fake.ioctlLog.length, before + 1, 'only the flags GET reached the kernel');
  await d.close();
});

test.serial('a closed device and a closed data fd give EBADF, not a crash', async (t) => {
  const d = VfioDevice.open(A);
  const r = await d.setState(MigState.StopCopy);
  const f = r.dataFd!;
  f.close();
  const e1 = await t.throwsAsync(readToEnd(f, () => undefined), { instanceOf: VfioError });
  t.is(e1?.code, 'EBADF');
  const e2 = await t.throwsAsync(d.precopyInfo(f), { instanceOf: VfioError });
  t.is(e2?.code, 'EBADF');
  await d.setState(MigState.Running);
  await d.close();
  for (const call of [() => d.state(), () => d.setState(MigState.Stop), () => d.reset(), () => d.dataSize(), () => d.info()]) {
    const e = await t.throwsAsync(call(), { instanceOf: VfioError });
    t.is(e?.code, 'EBADF');
    t.regex(e?.message ?? '', /closed/);
  }
});

test.serial('setState returns a data fd only for session-opening arcs and tracks ownership', async (t) => {
  const d = VfioDevice.open(A);
  const toP2P = await d.setState(MigState.RunningP2P);
  t.is(toP2P.dataFd, undefined);
  t.deepEqual(toP2P.arcs, [{ from: MigState.Running, to: MigState.RunningP2P }]);
  const sc = await d.setState(MigState.StopCopy);
  t.truthy(sc.dataFd);
  t.is(sc.dataFd!.kind, 'saving');
  t.deepEqual(sc.arcs.map((a) => a.to), [MigState.Stop, MigState.StopCopy]);
  t.is(d.openDataFds, 1);
  const noop = await d.setState(MigState.StopCopy);
  t.is(noop.dataFd, undefined, 'requesting the current state is a no-op without a new fd');
  await d.setState(MigState.Running); // the state outlives close (mtty); later tests start in RUNNING
  await d.close();
  t.true(sc.dataFd!.closed, 'close() releases data fds the caller still held');
  t.is(fake.openFdCount(), 0);
});

test.serial('a failed SET re-reads the state and reports it', async (t) => {
  const d = VfioDevice.open(A);
  fake.inject(A, { arc: 'RUNNING_P2P>STOP', errno: Errno.EIO, outcome: 'stay' });
  const err = await t.throwsAsync(d.setState(MigState.StopCopy), { instanceOf: VfioError });
  t.is(err?.code, 'EIO');
  t.is(err?.stateAfter, 'RUNNING_P2P', 'the first arc succeeded, the second failed');
  t.is(err?.failedArc, 'RUNNING_P2P->STOP');
  t.regex(err?.message ?? '', /SET MIG_DEVICE_STATE RUNNING->STOP_COPY on 0000:00:03\.0 failed \(EIO\).*device is now in RUNNING_P2P/);
  fake.inject(A, { arc: 'RUNNING_P2P>STOP', errno: Errno.ENOMEM, outcome: 'error' });
  const err2 = await t.throwsAsync(d.setState(MigState.Stop), { instanceOf: VfioError });
  t.is(err2?.stateAfter, 'ERROR');
  const stuck = await t.throwsAsync(d.setState(MigState.Running), { instanceOf: VfioError });
  t.is(stuck?.code, 'EINVAL', 'the layer does not know better than the kernel: ERROR refuses SETs');
  await d.reset();
  t.is(await d.state(), MigState.Running);
  await d.close();
});

test.serial('reset on a device without a reset mechanism says so', async (t) => {
  const d = VfioDevice.open('0000:00:0b.0');
  const err = await t.throwsAsync(d.reset(), { instanceOf: VfioError });
  t.is(err?.code, 'EINVAL');
  t.regex(err?.message ?? '', /no usable reset/);
  await d.close();
});

test.serial('precopy info: flags are ignored unless v2 was enabled; mtty-style 0 means nothing now', async (t) => {
  const id = '83b8f4f2-509f-382f-3c1e-e6bfe0fa0001';
  const d = VfioDevice.open(id);
  t.is(d.name, id);
  const r = await d.setState(MigState.PreCopy);
  const info = await d.precopyInfo(r.dataFd!);
  t.is(info.flags, 0);
  t.true(info.initialBytes > 0n);
  const got = await readAvailable(r.dataFd!, () => undefined);
  t.is(BigInt(got), info.initialBytes);
  t.is(await readAvailable(r.dataFd!, () => undefined), 0, 'a 0 return in PRE_COPY is not EOF');
  fake.dirty(id, 100);
  t.is((await d.precopyInfo(r.dataFd!)).dirtyBytes, 100n);
  await d.enablePrecopyInfoV2();
  t.is((await d.precopyInfo(r.dataFd!)).flags, 0);
  r.dataFd!.close();
  await d.setState(MigState.Running);
  await d.close();
  const p2pOnly = VfioDevice.open('0000:00:04.0');
  const e = await t.throwsAsync(p2pOnly.enablePrecopyInfoV2(), { instanceOf: VfioError });
  t.is(e?.code, 'EINVAL', 'v2 opt-in needs PRE_COPY');
  await p2pOnly.close();
});

test.serial('ioctls of one device are serialised; calls queue behind a slow arc', async (t) => {
  const d = VfioDevice.open(A);
  fake.device(A).spec.arcLatencyMs = 20;
  const order: string[] = [];
  const p1 = d.setState(MigState.Stop).then(() => order.push('set'));
  const p2 = d.state().then((s) => order.push(`get:${s}`));
  await Promise.all([p1, p2]);
  t.deepEqual(order, ['set', `get:${MigState.Stop}`]);
  fake.device(A).spec.arcLatencyMs = 0;
  await d.setState(MigState.Running);
  await d.close();
});

test.serial('cancellation before the request leaves the device untouched', async (t) => {
  const d = VfioDevice.open(A);
  const ac = new AbortController();
  ac.abort();
  const err = await t.throwsAsync(d.setState(MigState.Stop, { signal: ac.signal }), { instanceOf: VfioError });
  t.is(err?.code, 'ECANCELED');
  t.is(await d.state(), MigState.Running);
  await d.close();
});

test.serial('dataSize follows what remains to be read', async (t) => {
  const d = VfioDevice.open(A);
  const total = await d.dataSize();
  const r = await d.setState(MigState.StopCopy);
  const buf = Buffer.alloc(100);
  const { sys } = await import('../../src/host/sys.ts');
  await sys().read(r.dataFd!.fd, buf, 100);
  t.is(await d.dataSize(), total - 100n);
  r.dataFd!.close();
  await d.setState(MigState.Running);
  await d.close();
});

test.serial('writeAll loops over short writes and rejects a stream with a bad header', async (t) => {
  const src = VfioDevice.open(BIG);
  const chunks: Buffer[] = [];
  const r = await src.setState(MigState.StopCopy);
  await readToEnd(r.dataFd!, (c) => void chunks.push(Buffer.from(c)), { chunkSize: 1000 });
  r.dataFd!.close();
  await src.setState(MigState.Running);
  await src.close();
  const stream = Buffer.concat(chunks);
  t.true(stream.length > 64 * 1024, 'more than one 64 KiB short write is needed');
  const dst = VfioDevice.open(BIG);
  const res = await dst.setState(MigState.Resuming);
  t.is(await writeAll(res.dataFd!, [stream.subarray(0, 10), stream.subarray(10)]), stream.length);
  t.is(res.dataFd!.bytes, stream.length);
  await t.throwsAsync(readToEnd(res.dataFd!, () => undefined), { instanceOf: VfioError, message: /resuming fd/ });
  await dst.setState(MigState.Stop);
  res.dataFd!.close();
  const again = await dst.setState(MigState.Resuming);
  const garbage = Buffer.from('NOTMAGIC-and-more-bytes');
  const err = await t.throwsAsync(writeAll(again.dataFd!, garbage), { instanceOf: VfioError });
  t.is(err?.code, 'EINVAL');
  t.regex(err?.message ?? '', /rejected the data/);
  again.dataFd!.close();
  await dst.reset();
  await dst.close();
});

test.serial('a session ended by a state change makes its fd fail with ENODEV', async (t) => {
  const d = VfioDevice.open(A);
  const r = await d.setState(MigState.StopCopy);
  await d.setState(MigState.Stop);
  const err = await t.throwsAsync(readToEnd(r.dataFd!, () => undefined), { instanceOf: VfioError });
  t.is(err?.code, 'ENODEV');
  t.regex(err?.message ?? '', /session was ended/);
  r.dataFd!.close();
  await d.setState(MigState.Running);
  await d.close();
  t.is(fake.openFdCount(), 0);
});
