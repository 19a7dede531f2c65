// The migration_version protocol on a fake sysfs: every clause of "incompatible if ANY
// of" (different mdev type, attribute missing on either side, read error, write error)
// and "compatible only if ALL of" (same type, read ok, write ok), for PCI functions, for
// existing mdevs and for mdev types before an mdev exists (the type matched to the parent
// that offers it); and the descriptor rules where neither side has the attribute.
import test from 'ava';
import { FakeSysfs } from '../fake/sysfs.ts';
import { setPciKernel } from '../../src/pci/kernel.ts';
import { describeDevice } from '../../src/compat/descriptor.ts';
import { checkCompatibility, checkMdevParents } from '../../src/compat/migration-version.ts';
import { readMigrationVersionAt, MIGRATION_VERSION_MAX } from '../../src/compat/version-attr.ts';
import type { DeviceDescriptor } from '../../src/compat/types.ts';
import { join } from 'node:path';
import { writeCapabilities } from '../../src/compat/cache.ts';
import { driverIdentity } from '../../src/compat/identity.ts';

const SRC = '0000:01:00.0';
const DST = '0000:02:00.0';
const DST_OLD = '0000:03:00.0'; // another compat token: its driver refuses the source's string
const DST_NONE = '0000:04:00.0'; // no migration_version attribute
const DST_ENODEV = '0000:05:00.0'; // refuses every string with ENODEV
const PLAIN_A = '0000:06:00.0'; // no attribute on either side: descriptor rules
const PLAIN_B = '0000:07:00.0';
const PLAIN_SUBSYS = '0000:08:00.0';
const PLAIN_REV = '0000:09:00.0';
const READ_ERR = '0000:0b:00.0'; // its attribute's content is changed per case
const GPU_A = '0000:41:00.0'; // two PCI mdev parents offering the same type with different versions
const GPU_B = '0000:42:00.0';
const MDEV_SRC = '83b8f4f2-509f-382f-3c1e-e6bfe0fa0001';
const MDEV_DST = '83b8f4f2-509f-382f-3c1e-e6bfe0fa0002';
const MDEV_GPU = '83b8f4f2-509f-382f-3c1e-e6bfe0fa0003';
const MDEV_NOATTR = '83b8f4f2-509f-382f-3c1e-e6bfe0fa0004';

const f = new FakeSysfs();
Object.assign(process.env, f.env());
setPciKernel(f);
test.after.always(() => f.dispose());

f.addModule('edu_vfio_pci', [{ name: 'edu-vfio-pci' }], { loaded: true });
f.addModule('nvidia', [{ name: 'nvidia' }], { loaded: true });
f.setModuleInfo('edu_vfio_pci', { srcversion: 'A1B2C3D4E5F6A7B8C9D0E1F', buildId: '0123456789abcdef0123456789abcdef01234567' });
for (const bdf of [SRC, DST, DST_OLD, DST_NONE, DST_ENODEV, PLAIN_A, PLAIN_B, READ_ERR]) {
  f.addDevice({ bdf, vendor: '1234', device: '11e8', subsystemVendor: '1af4', subsystemDevice: '1100', class: '00ff00', revision: '10', driver: 'edu-vfio-pci' });
}
f.addDevice({ bdf: PLAIN_SUBSYS, vendor: '1234', device: '11e8', subsystemVendor: '1af4', subsystemDevice: '1101', class: '00ff00', revision: '10', driver: 'edu-vfio-pci' });
f.addDevice({ bdf: PLAIN_REV, vendor: '1234', device: '11e8', subsystemVendor: '1af4', subsystemDevice: '1100', class: '00ff00', revision: '11', driver: 'edu-vfio-pci' });
f.setDeviceMigrationVersion(SRC, 'edu-vfio-pci-1:1\n');
f.setDeviceMigrationVersion(DST, 'edu-vfio-pci-1:1\n');
f.setDeviceMigrationVersion(DST_OLD, 'edu-vfio-pci-1:2\n');
f.setDeviceMigrationVersion(DST_ENODEV, 'edu-vfio-pci-1:1\n', () => 'ENODEV');

f.addMdevParent('mtty', [
  { name: 'mtty-1', label: 'Single port serial', migrationVersion: 'mtty-v1\n' },
  { name: 'mtty-2', label: 'Dual port serial', migrationVersion: 'mtty-v1\n' },
  { name: 'mtty-4', label: 'Quad port serial' }, // no attribute
]);
f.addMdev(MDEV_SRC, 'mtty', 'mtty-2', { module: 'mtty' });
f.addMdev(MDEV_DST, 'mtty', 'mtty-2', { module: 'mtty' });
f.addMdev(MDEV_NOATTR, 'mtty', 'mtty-4', { module: 'mtty' });
f.addDevice({ bdf: GPU_A, vendor: '10de', device: '1eb8', class: '030200', driver: 'nvidia' });
f.addDevice({ bdf: GPU_B, vendor: '10de', device: '1eb8', class: '030200', driver: 'nvidia' });
f.addMdevParent(GPU_A, [{ name: 'nvidia-63', label: 'GRID T4-2Q', migrationVersion: 'nv-t4-r535\n' }]);
f.addMdevParent(GPU_B, [{ name: 'nvidia-63', label: 'GRID T4-2Q', migrationVersion: 'nv-t4-r550\n' }]);
f.addMdev(MDEV_GPU, GPU_A, 'nvidia-63', { driver: 'nvidia-vgpu-vfio', module: 'nvidia_vgpu_vfio' });

const writes = () => f.ops('migration_version') as Array<{ kind: 'migration_version'; path: string; value: string }>;

function withVersion(d: DeviceDescriptor, mv: DeviceDescriptor['migrationVersion']): DeviceDescriptor {
  return { ...d, migrationVersion: mv };
}

// --- compatible only if ALL of: same type, read ok, write ok --------------------------------

test.serial('PCI: the source string is written to the target and the driver accepts it -> compatible', (t) => {
  const src = describeDevice(SRC);
  t.deepEqual(src.migrationVersion, { present: true, value: 'edu-vfio-pci-1:1\n' });
  const before = writes().length;
  const v = checkCompatibility(src, DST);
  t.deepEqual(v, { compatible: true, decidedBy: 'migration_version', reason: v.reason });
  const w = writes().slice(before);
  t.is(w.length, 1, 'exactly one write');
  t.is(w[0]!.path, join(f.sys, 'devices/pci0000:00', DST, 'migration_version'));
  t.is(w[0]!.value, 'edu-vfio-pci-1:1\n', 'the bytes read, unparsed and untrimmed');
});

test.serial('mdev type before an mdev exists: written to <parent>/mdev_supported_types/<type>/migration_version', (t) => {
  const src = describeDevice(MDEV_SRC);
  t.like(src, { kind: 'mdev', mdev: { type: 'mtty-2', parent: 'mtty', typeName: 'Dual port serial' }, vendor: null, migrationVersion: { present: true, value: 'mtty-v1\n' } });
  const before = writes().length;
  const v = checkCompatibility(src, { parent: 'mtty', mdevType: 'mtty-2' });
  t.true(v.compatible, v.reason);
  t.is(v.decidedBy, 'migration_version');
  t.is(writes().slice(before)[0]!.path, join(f.sys, 'devices/virtual/mtty/mtty/mdev_supported_types/mtty-2/migration_version'));
});

test.serial('an existing mdev target: its type at its parent takes the write', (t) => {
  const before = writes().length;
  const v = checkCompatibility(describeDevice(MDEV_SRC), MDEV_DST);
  t.true(v.compatible, v.reason);
  t.regex(writes().slice(before)[0]!.path, /mtty\/mdev_supported_types\/mtty-2\/migration_version$/);
});

// --- incompatible if ANY of ----------------------------------------------------------------

test.serial('different mdev type -> incompatible, before any write (even though that type would accept the string)', (t) => {
  const before = writes().length;
  const v = checkCompatibility(describeDevice(MDEV_SRC), { parent: 'mtty', mdevType: 'mtty-1' });
  t.like(v, { compatible: false, decidedBy: 'mdevType' });
  t.regex(v.reason, /mtty-2.*mtty-1/);
  t.is(checkCompatibility(describeDevice(MDEV_SRC), MDEV_NOATTR).decidedBy, 'mdevType', 'an existing mdev of another type too');
  t.is(writes().length, before, 'nothing written');
});

test.serial('attribute missing on the target -> incompatible', (t) => {
  const v = checkCompatibility(describeDevice(SRC), DST_NONE);
  t.like(v, { compatible: false, decidedBy: 'migration_version' });
  t.regex(v.reason, /target .* has none$/);
  f.addDevice({ bdf: '0000:0c:00.0', vendor: '1234', device: '11e8', driver: 'vfio-pci' });
  t.regex(checkCompatibility(describeDevice(SRC), '0000:0c:00.0').reason, /bound to vfio-pci, the source to edu-vfio-pci: bind the target to the same driver first/);
});

test.serial('attribute missing on the source -> incompatible', (t) => {
  const src = describeDevice(PLAIN_A);
  t.deepEqual(src.migrationVersion, { present: false });
  const v = checkCompatibility(src, DST);
  t.like(v, { compatible: false, decidedBy: 'migration_version' });
  t.regex(v.reason, /source .* has none/);
});

test.serial('attribute missing on the mdev type of the target parent -> incompatible', (t) => {
  f.setMdevType('mtty', { name: 'mtty-2', label: 'Dual port serial' }); // drop the attribute
  try {
    const src = withVersion(describeDevice(MDEV_DST), { present: true, value: 'mtty-v1\n' });
    const v = checkCompatibility(src, { parent: 'mtty', mdevType: 'mtty-2' });
    t.like(v, { compatible: false, decidedBy: 'migration_version' });
  } finally {
    f.setMdevType('mtty', { name: 'mtty-2', label: 'Dual port serial', migrationVersion: 'mtty-v1\n' });
  }
});

test.serial('read error on the source (non-ASCII, longer than PATH_MAX, empty) -> incompatible, nothing written', (t) => {
  const cases: Array<[string, Buffer, RegExp]> = [
    ['non-ASCII', Buffer.from('edu-vfio-pci-1:\xe9\n', 'latin1'), /not printable ASCII \(0xe9/],
    ['NUL', Buffer.from('edu\0x\n', 'latin1'), /not printable ASCII \(0x0/],
    ['too long', Buffer.alloc(MIGRATION_VERSION_MAX + 1, 'a'), /more than 4096 bytes/],
    ['empty', Buffer.alloc(0), /empty/],
  ];
  for (const [what, bytes, why] of cases) {
    f.setDeviceMigrationVersion(READ_ERR, bytes, () => undefined); // would accept anything
    const src = describeDevice(READ_ERR);
    t.true(src.migrationVersion.present && 'error' in src.migrationVersion, what);
    t.regex((src.migrationVersion as { error: string }).error, why, what);
    const before = writes().length;
    const v = checkCompatibility(src, DST);
    t.like(v, { compatible: false, decidedBy: 'migration_version' }, what);
    t.regex(v.reason, /reading the source's migration_version failed/, what);
    t.is(writes().length, before, `${what}: nothing written`);
  }
  // Exactly PATH_MAX is still a valid value.
  f.setDeviceMigrationVersion(READ_ERR, Buffer.alloc(MIGRATION_VERSION_MAX, 'a'));
  t.is((describeDevice(READ_ERR).migrationVersion as { value: string }).value.length, MIGRATION_VERSION_MAX);
});

test.serial('a source read error carried in a descriptor from the peer keeps its errno', (t) => {
  const src = withVersion(describeDevice(SRC), { present: true, error: 'reading migration_version failed: EIO', errno: 'EIO' });
  t.deepEqual(checkCompatibility(src, DST), { compatible: false, decidedBy: 'migration_version', reason: "reading the source's migration_version failed: reading migration_version failed: EIO", errno: 'EIO' });
});

test.serial('write error -> incompatible, the driver\'s errno reported as it came (EINVAL, ENODEV)', (t) => {
  const src = describeDevice(SRC);
  const a = checkCompatibility(src, DST_OLD);
  t.like(a, { compatible: false, decidedBy: 'migration_version', errno: 'EINVAL' });
  t.regex(a.reason, /refused/);
  const b = checkCompatibility(src, DST_ENODEV);
  t.like(b, { compatible: false, decidedBy: 'migration_version', errno: 'ENODEV' });
  const log = writes();
  t.deepEqual(
    log.slice(-2).map((o) => (o as { error?: string }).error),
    ['EINVAL', 'ENODEV'],
  );
});

test.serial('one type at two parents with different versions: the type is checked at the parent that would create it', (t) => {
  const src = describeDevice(MDEV_GPU);
  t.like(src, { kind: 'mdev', vendor: '10de', device: '1eb8', mdev: { type: 'nvidia-63', parent: GPU_A, typeName: 'GRID T4-2Q', parentDriver: 'nvidia' }, driver: 'nvidia-vgpu-vfio' });
  t.true(checkCompatibility(src, { parent: GPU_A, mdevType: 'nvidia-63' }).compatible);
  t.like(checkCompatibility(src, { parent: GPU_B, mdevType: 'nvidia-63' }), { compatible: false, decidedBy: 'migration_version', errno: 'EINVAL' });
  const all = checkMdevParents(src);
  t.deepEqual(
    all.map((p) => [p.parent, p.verdict.compatible]),
    [
      [GPU_A, true],
      [GPU_B, false],
    ],
  );
});

test.serial('a parent that does not offer the type -> incompatible, naming the parents that do', (t) => {
  const v = checkCompatibility(describeDevice(MDEV_GPU), { parent: 'mtty', mdevType: 'nvidia-63' });
  t.like(v, { compatible: false, decidedBy: 'mdevType' });
  t.regex(v.reason, new RegExp(`offered by ${GPU_A}, ${GPU_B}`));
});

// --- kind, bad input -------------------------------------------------------------------------

test.serial('a PCI function and an mdev never match', (t) => {
  t.like(checkCompatibility(describeDevice(SRC), MDEV_DST), { compatible: false, decidedBy: 'kind' });
  t.like(checkCompatibility(describeDevice(MDEV_SRC), DST), { compatible: false, decidedBy: 'kind' });
  t.like(checkCompatibility(describeDevice(SRC), { parent: 'mtty', mdevType: 'mtty-2' }), { compatible: false, decidedBy: 'kind' });
});

test.serial('invalid targets and sources are refused, not thrown', (t) => {
  const src = describeDevice(SRC);
  t.like(checkCompatibility(src, '../../etc'), { compatible: false, decidedBy: 'target' });
  t.like(checkCompatibility(src, '0000:7f:00.0'), { compatible: false, decidedBy: 'target' });
  t.like(checkCompatibility(src, { parent: '../x', mdevType: 'mtty-2' }), { compatible: false, decidedBy: 'target' });
  t.like(checkCompatibility({ ...src, schema: 2 } as unknown as DeviceDescriptor, DST), { compatible: false, decidedBy: 'source' });
  t.like(checkCompatibility({ ...src, id: '../x' }, DST), { compatible: false, decidedBy: 'source' });
  t.like(checkCompatibility(withVersion(src, { present: true, value: 'caf\u00e9' }), DST), { compatible: false, decidedBy: 'source' });
});

// --- neither side has the attribute: the descriptor rules decide ------------------------------

test.serial('no attribute on either side: equal descriptors -> compatible, decided by the descriptor', (t) => {
  const v = checkCompatibility(describeDevice(PLAIN_A), PLAIN_B);
  t.like(v, { compatible: true, decidedBy: 'descriptor' });
  t.regex(v.reason, /equal: vendor, device, subsystem vendor, subsystem device, revision, class, driver, srcversion/);
  t.regex(v.reason, /not compared: .*migration flags/);
});

test.serial('no attribute on either side: the first differing field decides', (t) => {
  const a = describeDevice(PLAIN_A);
  t.like(checkCompatibility(a, PLAIN_SUBSYS), { compatible: false, decidedBy: 'subsystemDevice' });
  t.like(checkCompatibility(a, PLAIN_REV), { compatible: false, decidedBy: 'revision' });
  t.like(checkCompatibility({ ...a, vendor: '8086' }, PLAIN_B), { compatible: false, decidedBy: 'vendor' });
  t.like(checkCompatibility({ ...a, class: '020000' }, PLAIN_B), { compatible: false, decidedBy: 'class' });
  t.like(checkCompatibility({ ...a, driver: 'vfio-pci' }, PLAIN_B), { compatible: false, decidedBy: 'driver' });
  t.like(checkCompatibility({ ...a, srcversion: 'FFFF' }, PLAIN_B), { compatible: false, decidedBy: 'srcversion' });
  t.like(checkCompatibility({ ...a, srcversion: null }, PLAIN_B), { compatible: false, decidedBy: 'srcversion' }, 'known on one side only is a difference');
  t.like(checkCompatibility({ ...a, moduleVersion: '1.0' }, PLAIN_B), { compatible: false, decidedBy: 'moduleVersion' });
  t.like(checkCompatibility({ ...a, firmware: { ...a.firmware, version: '22.1' } }, PLAIN_B), { compatible: true }, 'firmware shown on one side only is not compared');
  const probed = (flags: number) => ({ flags, flagNames: [], dataSize: null, source: 'probe' as const, probedAt: new Date().toISOString() });
  t.like(checkCompatibility({ ...a, migration: probed(3) }, PLAIN_B), { compatible: true }, 'target flags unknown (never probed): not compared');
  // The target's flags come from its capability cache entry (a VM may hold it).
  writeCapabilities({ schema: 1, id: PLAIN_B, probedAt: new Date().toISOString(), identity: driverIdentity({ kind: 'pci', bdf: PLAIN_B }), flags: 7, flagNames: ['STOP_COPY', 'P2P', 'PRE_COPY'], dataSize: '4096', descriptor: describeDevice(PLAIN_B) });
  t.like(describeDevice(PLAIN_B).migration, { flags: 7, source: 'cache' });
  t.like(checkCompatibility({ ...a, migration: probed(3) }, PLAIN_B), { compatible: false, decidedBy: 'migrationFlags' });
  t.like(checkCompatibility({ ...a, migration: probed(7) }, PLAIN_B), { compatible: true, decidedBy: 'descriptor' });
});

test.serial('no attribute on either side, mdev type target: same type compared, the mdev driver not known yet', (t) => {
  const src = describeDevice(MDEV_NOATTR);
  t.deepEqual(src.migrationVersion, { present: false });
  const v = checkCompatibility(src, { parent: 'mtty', mdevType: 'mtty-4' });
  t.like(v, { compatible: true, decidedBy: 'descriptor' });
  t.regex(v.reason, /mdev type/);
  t.regex(v.reason, /driver \(not known before the mdev exists\)/);
  t.like(checkCompatibility({ ...src, mdev: { ...src.mdev!, parentDriver: 'other' } }, { parent: 'mtty', mdevType: 'mtty-4' }), { compatible: false, decidedBy: 'parentDriver' });
});

test.serial('the reader: a missing attribute is absent, an unreadable one is an error with its errno', (t) => {
  t.deepEqual(readMigrationVersionAt(join(f.sys, 'nonexistent', 'migration_version')), { present: false });
  const dir = join(f.sys, 'devices/pci0000:00', SRC); // a directory: read fails with EISDIR
  const r = readMigrationVersionAt(dir);
  t.like(r, { present: true, errno: 'EISDIR' });
});
