// The compatibility descriptor on a fake sysfs: PCI identity, driver and module facts
// (srcversion, version, build-id), firmware from the RDMA device of a VF's PF, mdevs with
// a virtual and a PCI parent (vendor/device then the parent's), NVIDIA vGPU attributes,
// JSON round trips through the validator, refusals of bad ids and bad descriptors; and
// the binder's after-bind hook, which `vfio-mig bind` uses to probe freshly bound devices.
import test from 'ava';
import { release } from 'node:os';
import { FakeSysfs } from '../fake/sysfs.ts';
import { setPciKernel } from '../../src/pci/kernel.ts';
import { bind } from '../../src/pci/binder.ts';
import { describeDevice, validateDescriptor, NoSuchDeviceError, DescriptorError, type DeviceDescriptor } from '../../src/compat/descriptor.ts';
import { InvalidDeviceIdError } from '../../src/host/sysfs.ts';
import { bigAliasFile } from '../fake/sysfs-aliases.ts';

const EDU = '0000:01:00.0';
const EDU_B = '0000:02:00.0';
const MLX_PF = '0000:3b:00.0';
const MLX_VF = '0000:3b:00.2';
const HISI = '0000:75:00.1';
const NV_VF = '0000:41:00.4';
const NV_GPU = '0000:42:00.0';
const MTTY_DEV = '83b8f4f2-509f-382f-3c1e-e6bfe0fa0001';
const NV_MDEV = '83b8f4f2-509f-382f-3c1e-e6bfe0fa0002';

const f = new FakeSysfs();
Object.assign(process.env, f.env());
setPciKernel(f);
test.after.always(() => f.dispose());

f.addModule('edu_vfio_pci', [{ name: 'edu-vfio-pci' }], { loaded: true });
f.addModule('mlx5_core', [{ name: 'mlx5_core' }], { loaded: true });
f.addModule('mlx5_vfio_pci', [{ name: 'mlx5_vfio_pci' }], { loaded: true });
f.addModule('hisi_acc_vfio_pci', [{ name: 'hisi_acc_vfio_pci' }], { loaded: true });
f.addModule('nvidia', [{ name: 'nvidia' }], { loaded: true });
f.setModuleInfo('mlx5_vfio_pci', { srcversion: '5D1E4C0A7F2B9E3D6C8A1B0', version: '' });
f.setModuleInfo('edu_vfio_pci', { buildId: 'c0ffee00112233445566778899aabbccddeeff00' });
f.setModuleInfo('nvidia', { version: '550.90.05', srcversion: '0A1B2C3D4E5F60718293A4B' });
f.addDevice({ bdf: EDU, vendor: '0x1234', device: '0x11E8', subsystemVendor: '1af4', subsystemDevice: '1100', class: '00ff00', revision: '10', driver: 'edu-vfio-pci' });
f.addDevice({ bdf: EDU_B, vendor: '1234', device: '11e8', subsystemVendor: '1af4', subsystemDevice: '1100', class: '00ff00', revision: '10' });
f.addDevice({ bdf: MLX_PF, vendor: '15b3', device: '101d', class: '020000', driver: 'mlx5_core' });
f.addDevice({ bdf: MLX_VF, vendor: '15b3', device: '101e', class: '020000', driver: 'mlx5_vfio_pci' }, MLX_PF);
f.setDeviceFile(MLX_PF, 'infiniband/mlx5_0/fw_ver', '28.39.1002\n');
f.setDeviceFile(MLX_PF, 'infiniband/mlx5_0/board_id', 'MT_0000000834\n');
f.addDevice({ bdf: HISI, vendor: '19e5', device: 'a256', class: '108000', driver: 'hisi_acc_vfio_pci' });
f.addDevice({ bdf: NV_VF, vendor: '10de', device: '26b9', class: '030200', driver: 'nvidia' });
f.setDeviceFile(NV_VF, 'nvidia/current_vgpu_type', '557\n');
f.addDevice({ bdf: NV_GPU, vendor: '10de', device: '1eb8', subsystemVendor: '10de', subsystemDevice: '12a2', class: '030200', revision: 'a1', driver: 'nvidia' });
f.addMdevParent('mtty', [{ name: 'mtty-2', label: 'Dual port serial' }]);
f.addMdev(MTTY_DEV, 'mtty', 'mtty-2', { module: 'mtty' });
f.addMdevParent(NV_GPU, [{ name: 'nvidia-63', label: 'GRID T4-2Q' }]);
f.addMdev(NV_MDEV, NV_GPU, 'nvidia-63', { driver: 'nvidia-vgpu-vfio', module: 'nvidia_vgpu_vfio' });

function roundTrip(d: DeviceDescriptor): DeviceDescriptor {
  return validateDescriptor(JSON.parse(JSON.stringify(d)));
}

test('PCI function: identity, driver, module facts, kernel, schema 1; survives a JSON round trip', (t) => {
  const d = describeDevice(EDU.toUpperCase());
  t.like(d, {
    schema: 1,
    id: EDU,
    kind: 'pci',
    vendor: '1234',
    device: '11e8',
    subsystemVendor: '1af4',
    subsystemDevice: '1100',
    revision: '10',
    class: '00ff00',
    physfn: null,
    driver: 'edu-vfio-pci',
    module: 'edu_vfio_pci',
    srcversion: null,
    moduleVersion: null,
    buildId: 'c0ffee00112233445566778899aabbccddeeff00',
    mdev: null,
    kernel: release(),
    migrationVersion: { present: false },
    vendorAttrs: {},
  });
  t.is(d.migration, null);
  t.regex(d.migrationNote!, /no cached capabilities/);
  t.regex(d.firmware.note, /not in sysfs/);
  t.deepEqual(roundTrip(d), d);
});

test.serial('an unbound function has no driver facts (before the binder test binds it)', (t) => {
  t.like(describeDevice(EDU_B), { driver: null, module: null, srcversion: null, buildId: null });
});

test('mlx5 VF: srcversion of mlx5_vfio_pci, firmware version and PSID from the PF\'s RDMA device', (t) => {
  const d = describeDevice(MLX_VF);
  t.like(d, { physfn: MLX_PF, driver: 'mlx5_vfio_pci', module: 'mlx5_vfio_pci', srcversion: '5D1E4C0A7F2B9E3D6C8A1B0' });
  t.deepEqual(d.firmware, { version: '28.39.1002', psid: 'MT_0000000834', from: 'physfn/infiniband/mlx5_0', note: 'read from the RDMA device (fw_ver, board_id)' });
  t.deepEqual(roundTrip(d), d);
});

test('mdev with a virtual parent (mtty): type, parent, no PCI identity', (t) => {
  const d = describeDevice(MTTY_DEV);
  t.like(d, { kind: 'mdev', vendor: null, device: null, driver: 'mtty', module: 'mtty', mdev: { type: 'mtty-2', typeName: 'Dual port serial', parent: 'mtty', parentDriver: null } });
  t.deepEqual(roundTrip(d), d);
});

test('mdev with a PCI parent (NVIDIA vGPU): vendor/device are the parent\'s; parent driver and its version', (t) => {
  const d = describeDevice(NV_MDEV);
  t.like(d, {
    kind: 'mdev',
    vendor: '10de',
    device: '1eb8',
    subsystemDevice: '12a2',
    revision: 'a1',
    driver: 'nvidia-vgpu-vfio',
    module: 'nvidia_vgpu_vfio',
    mdev: { type: 'nvidia-63', typeName: 'GRID T4-2Q', parent: NV_GPU, parentDriver: 'nvidia', parentModule: 'nvidia', parentModuleVersion: '550.90.05', parentSrcversion: '0A1B2C3D4E5F60718293A4B' },
  });
  t.is(d.vendorAttrs['module/nvidia/version'], '550.90.05');
  t.deepEqual(roundTrip(d), d);
});

test('NVIDIA vGPU as a VF (kernels >= 6.8): nvidia/current_vgpu_type and the host driver version', (t) => {
  const d = describeDevice(NV_VF);
  t.deepEqual(d.vendorAttrs, { 'nvidia/current_vgpu_type': '557', 'module/nvidia/version': '550.90.05' });
  t.like(d, { kind: 'pci', mdev: null, moduleVersion: '550.90.05' });
});

test('bad ids are refused before any path is built; a missing device is named', (t) => {
  t.throws(() => describeDevice('../../etc'), { instanceOf: InvalidDeviceIdError });
  t.throws(() => describeDevice('0000:3b:00.2/../..'), { instanceOf: InvalidDeviceIdError });
  t.throws(() => describeDevice('0000:7f:00.0'), { instanceOf: NoSuchDeviceError });
});

test('the validator refuses descriptors from outside that are not well formed', (t) => {
  const good = describeDevice(EDU);
  const bad: Array<[string, unknown]> = [
    ['not an object', 'x'],
    ['schema', { ...good, schema: 2 }],
    ['kind', { ...good, kind: 'usb' }],
    ['id with a path', { ...good, id: '../../x' }],
    ['mdev id on pci', { ...good, id: MTTY_DEV }],
    ['vendor', { ...good, vendor: '12345' }],
    ['flags', { ...good, migration: { flags: -1, flagNames: [], dataSize: null, source: 'probe', probedAt: 'x' } }],
    ['dataSize', { ...good, migration: { flags: 7, flagNames: [], dataSize: '1e9', source: 'probe', probedAt: 'x' } }],
    ['migrationVersion non-ASCII', { ...good, migrationVersion: { present: true, value: '\u00ff' } }],
    ['migrationVersion too long', { ...good, migrationVersion: { present: true, value: 'a'.repeat(4097) } }],
    ['mdev without facts', { ...good, kind: 'mdev', id: MTTY_DEV, mdev: null }],
    ['vendorAttrs key', { ...good, vendorAttrs: { '../x': '1' } }],
    ['firmware', { ...good, firmware: null }],
  ];
  for (const [what, input] of bad) t.throws(() => validateDescriptor(input), { instanceOf: DescriptorError }, what);
  const extra = validateDescriptor({ ...good, injected: 'x' }) as unknown as Record<string, unknown>;
  t.false('injected' in extra, 'unknown fields are dropped');
});

test.serial('binder after-bind hook: runs for devices bound to a VFIO driver, records its line, a throw never fails the bind', async (t) => {
  f.writeAliases(bigAliasFile([]));
  const calls: Array<[string, string]> = [];
  const r = await bind({ devices: [EDU_B], probeWaitMs: 0, lockTimeoutMs: 2_000, afterBind: async (bdf, driver) => (calls.push([bdf, driver]), 'capabilities cached: flags STOP_COPY') });
  t.true(r.ok);
  t.deepEqual(calls, [[EDU_B, 'edu-vfio-pci']]);
  t.like(r.results.find((x) => x.address === EDU_B), { action: 'bound', afterBind: 'capabilities cached: flags STOP_COPY' });

  // Already bound: nothing new to probe. Dry run: nothing bound.
  const again = await bind({ devices: [EDU_B], probeWaitMs: 0, afterBind: async (bdf) => void calls.push([bdf, 'again']) });
  t.like(again.results[0], { action: 'already' });
  t.is(again.results[0]!.afterBind, undefined);
  t.is(calls.length, 1);

  f.writeAttr(`${f.sys}/bus/pci/drivers/edu-vfio-pci/unbind`, EDU_B);
  const dry = await bind({ devices: [EDU_B], dryRun: true, afterBind: async (bdf) => void calls.push([bdf, 'dry']) });
  t.like(dry.results[0], { action: 'would-bind' });
  t.is(calls.length, 1);

  const boom = await bind({
    devices: [EDU_B],
    probeWaitMs: 0,
    lockTimeoutMs: 2_000,
    afterBind: async () => {
      throw new Error('EBUSY');
    },
  });
  t.true(boom.ok, 'the bind itself succeeded');
  t.like(boom.results[0], { action: 'bound', afterBind: 'after-bind hook failed: EBUSY' });
});
