// Buffer codecs of uapi.ts: the bytes the kernel will read are exactly what the spec says.
import test from 'ava';
import * as U from '../../src/vfio/uapi.ts';

test('feature header: argsz counts header plus payload bytes, flags carry op and index', (t) => {
  const buf = U.encodeFeature(U.Feature.MIG_DEVICE_STATE, U.FeatureFlag.SET, U.encodeMigState(U.MigState.StopCopy));
  t.is(buf.length, 16);
  t.deepEqual(U.decodeFeatureHeader(buf), { argsz: 16, flags: 0x20002, feature: 2 });
  t.deepEqual(U.decodeMigState(U.featurePayload(buf)), { deviceState: 3, dataFd: -1 });
  const probe = U.encodeFeature(U.Feature.DMA_LOGGING_START, U.FeatureFlag.PROBE | U.FeatureFlag.SET);
  t.deepEqual(U.decodeFeatureHeader(probe), { argsz: 8, flags: 0x60006, feature: 6 });
  const sized = U.encodeFeature(U.Feature.MIG_DATA_SIZE, U.FeatureFlag.GET, 8);
  t.is(sized.readUInt32LE(0), 16);
  t.throws(() => U.encodeFeature(0x10000, U.FeatureFlag.GET), { instanceOf: RangeError });
  t.throws(() => U.encodeFeature(-1, U.FeatureFlag.GET), { instanceOf: RangeError });
});

test('u64 payloads round-trip, including values above 2^53', (t) => {
  const big = (1n << 60n) + 5n;
  t.is(U.decodeDataSize(U.encodeDataSize(big)), big);
  t.is(U.decodeMigrationFlags(U.encodeMigrationFlags(7n)), 7n);
});

test('precopy info is sent with flags 0 and argsz 24', (t) => {
  const buf = U.encodePrecopyInfo();
  t.is(buf.length, 24);
  t.is(buf.readUInt32LE(0), 24);
  t.is(buf.readUInt32LE(4), 0);
  U.writePrecopyInfo(buf, { flags: 1, initialBytes: 10n, dirtyBytes: 3n });
  t.deepEqual(U.decodePrecopyInfo(buf), { flags: 1, initialBytes: 10n, dirtyBytes: 3n });
});

test('group status, device info and fd argument layouts', (t) => {
  const gs = U.encodeGroupStatus();
  t.is(gs.readUInt32LE(0), 8);
  gs.writeUInt32LE(3, 4);
  t.deepEqual(U.decodeGroupStatus(gs), { flags: 3, viable: true, containerSet: true });
  const info = U.encodeDeviceInfo();
  t.is(info.readUInt32LE(0), 24);
  info.writeUInt32LE(U.DeviceInfoFlag.RESET | U.DeviceInfoFlag.PCI, 4);
  info.writeUInt32LE(9, 8);
  t.like(U.decodeDeviceInfo(info), { canReset: true, kind: 'pci', numRegions: 9 });
  const fdArg = U.encodeFdArg(42);
  t.is(fdArg.length, 4);
  t.is(fdArg.readInt32LE(0), 42);
  t.deepEqual([...U.encodeDeviceName('0000:00:03.0').subarray(-1)], [0]);
});

test('cdev/iommufd structs', (t) => {
  const bind = U.encodeBindIommufd(7);
  t.is(bind.readUInt32LE(0), 16, 'argsz without the token keeps older kernels happy');
  t.is(bind.readInt32LE(8), 7);
  const attach = U.encodeAttachIommufdPt(3);
  t.is(attach.readUInt32LE(0), 12);
  t.is(attach.readUInt32LE(8), 3);
  const alloc = U.encodeIoasAlloc();
  t.is(alloc.readUInt32LE(0), 12);
  alloc.writeUInt32LE(5, 8);
  t.is(U.decodeIoasAlloc(alloc), 5);
});

test('DMA logging payloads', (t) => {
  const ctl = U.encodeDmaLoggingControl(4096n, 2, 0x1000n);
  t.is(ctl.length, 24);
  t.is(ctl.readBigUInt64LE(16), 0x1000n);
  const ranges = U.encodeDmaLoggingRanges([{ iova: 0n, length: 4096n }, { iova: 8192n, length: 4096n }]);
  t.is(ranges.length, 32);
  t.is(ranges.readBigUInt64LE(16), 8192n);
  const rep = U.encodeDmaLoggingReport(0n, 1n << 20n, 4096n, 0xdead000n);
  t.is(rep.readBigUInt64LE(24), 0xdead000n);
});

test('region capability chains: finds CAP_TYPE, survives loops and bad offsets', (t) => {
  const buf = U.encodeRegionInfo(9, 64);
  buf.writeUInt32LE(U.RegionInfo.FLAG_CAPS, 4);
  buf.writeUInt32LE(32, 12);
  buf.writeUInt16LE(U.RegionInfo.CAP_TYPE, 32);
  buf.writeUInt32LE(48, 36); // next
  buf.writeUInt32LE(3, 40);
  buf.writeUInt32LE(1, 44);
  buf.writeUInt16LE(99, 48);
  buf.writeUInt32LE(32, 52); // loops back
  t.deepEqual(U.decodeRegionCapTypes(buf), [{ type: 3, subtype: 1 }]);
  buf.writeUInt32LE(4000, 12);
  t.deepEqual(U.decodeRegionCapTypes(buf), [], 'an offset outside the buffer ends the walk');
});

test('state names', (t) => {
  t.is(U.stateName(U.MigState.PreCopyP2P), 'PRE_COPY_P2P');
  t.true(U.isMigState(7));
  t.false(U.isMigState(8));
  t.false(U.isMigState('2'));
});
