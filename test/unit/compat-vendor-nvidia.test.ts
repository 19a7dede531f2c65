// NVIDIA vGPU vendor checks on a fake sysfs: the same vGPU type on both ends (an mdev
// type, or a VF's nvidia/current_vgpu_type on kernels >= 6.8), the two models never
// mixed, and the host driver version (/sys/module/nvidia/version) equal on both ends.
import test from 'ava';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FakeSysfs } from '../fake/sysfs.ts';
import { setPciKernel } from '../../src/pci/kernel.ts';
import { describeDevice } from '../../src/compat/descriptor.ts';
import { nvidiaFindings } from '../../src/compat/vendors/nvidia.ts';
import { vendorFindings } from '../../src/compat/vendors/index.ts';
import type { DeviceDescriptor } from '../../src/compat/types.ts';

const f = new FakeSysfs();
Object.assign(process.env, f.env());
process.env.VFIO_MIG_STATE_DIR = mkdtempSync(join(tmpdir(), 'vfio-mig-nv-'));
setPciKernel(f);
test.after.always(() => {
  f.dispose();
  rmSync(process.env.VFIO_MIG_STATE_DIR!, { recursive: true, force: true });
});

const GPU = '0000:41:00.0';
const VF1 = '0000:41:00.4';
const VF2 = '0000:41:00.5';
const VF0 = '0000:41:00.6'; // no type set
const M1 = '83b8f4f2-509f-382f-3c1e-e6bfe0fa0011';
const M2 = '83b8f4f2-509f-382f-3c1e-e6bfe0fa0012';
f.addModule('nvidia', [{ name: 'nvidia' }], { loaded: true });
f.setModuleInfo('nvidia', { version: '550.90.05' });
f.addDevice({ bdf: GPU, vendor: '10de', device: '1eb8', class: '030200', driver: 'nvidia' });
for (const [vf, type] of [
  [VF1, '557'],
  [VF2, '560'],
  [VF0, '0'],
]) {
  f.addDevice({ bdf: vf!, vendor: '10de', device: '26b9', class: '030200', driver: 'nvidia' }, GPU);
  f.setDeviceFile(vf!, 'nvidia/current_vgpu_type', `${type}\n`);
}
f.addMdevParent(GPU, [
  { name: 'nvidia-63', label: 'GRID T4-2Q' },
  { name: 'nvidia-64', label: 'GRID T4-4Q' },
]);
f.addMdev(M1, GPU, 'nvidia-63', { driver: 'nvidia-vgpu-vfio', module: 'nvidia_vgpu_vfio' });
f.addMdev(M2, GPU, 'nvidia-64', { driver: 'nvidia-vgpu-vfio', module: 'nvidia_vgpu_vfio' });

const get = (list: ReturnType<typeof nvidiaFindings>, check: string) => list.find((x) => x.check === check);
const otherHost = (d: DeviceDescriptor, version: string): DeviceDescriptor => ({
  ...d,
  vendorAttrs: { ...d.vendorAttrs, 'module/nvidia/version': version },
  mdev: d.mdev ? { ...d.mdev, parentModuleVersion: version } : null,
});

test('mdev vGPUs: same type passes, another type fails; the host driver version comes from the nvidia module', (t) => {
  const m1 = describeDevice(M1);
  t.like(get(nvidiaFindings(m1, m1), 'nvidia-vgpu-type'), { verdict: 'pass' });
  t.like(get(nvidiaFindings(m1, describeDevice(M2)), 'nvidia-vgpu-type'), { verdict: 'fail' });
  t.like(get(nvidiaFindings(m1, m1), 'nvidia-host-driver'), { verdict: 'pass', advice: 'same host driver on both ends (550.90.05)' });
  const older = get(nvidiaFindings(m1, otherHost(m1, '535.183.04')), 'nvidia-host-driver')!;
  t.is(older.verdict, 'fail');
  t.regex(older.advice, /source 550.90.05, destination 535.183.04/);
});

test('VF vGPUs (kernel >= 6.8): current_vgpu_type compared; an unset type fails on the source', (t) => {
  const v1 = describeDevice(VF1);
  t.like(get(nvidiaFindings(v1, v1), 'nvidia-vgpu-type'), { verdict: 'pass', advice: 'same vGPU type on both ends (557)' });
  t.like(get(nvidiaFindings(v1, describeDevice(VF2)), 'nvidia-vgpu-type'), { verdict: 'fail' });
  const unset = get(nvidiaFindings(describeDevice(VF0)), 'nvidia-vgpu-type')!;
  t.is(unset.verdict, 'fail');
  t.regex(unset.advice, /creatable_vgpu_types/);
});

test('an mdev vGPU and a VF vGPU never migrate into each other', (t) => {
  const mixed = get(nvidiaFindings(describeDevice(M1), describeDevice(VF1)), 'nvidia-vgpu-model')!;
  t.is(mixed.verdict, 'fail');
  t.regex(mixed.advice, /kernels >= 6.8/);
});

test('the index picks the NVIDIA module for vGPUs only; an unreadable host driver version warns', (t) => {
  t.true(vendorFindings(describeDevice(M1)).some((x) => x.check === 'nvidia-host-driver'));
  t.deepEqual(vendorFindings(describeDevice(GPU)), [], 'the physical GPU itself is not a vGPU');
  const noVersion: DeviceDescriptor = { ...describeDevice(VF1), vendorAttrs: { 'nvidia/current_vgpu_type': '557' }, moduleVersion: null };
  t.like(get(nvidiaFindings(noVersion), 'nvidia-host-driver'), { verdict: 'warn' });
});
