// mlx5 vendor checks on a fake sysfs: the `migratable` capability seen through its effect
// (the probed migration flags; devlink itself is not in sysfs), firmware version and PSID
// from the PF's RDMA device compared across both ends, and what is said when sysfs does
// not show them.
import test from 'ava';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FakeSysfs } from '../fake/sysfs.ts';
import { setPciKernel } from '../../src/pci/kernel.ts';
import { describeDevice } from '../../src/compat/descriptor.ts';
import { mlx5Findings } from '../../src/compat/vendors/mlx5.ts';
import { vendorFindings } from '../../src/compat/vendors/index.ts';
import type { DeviceDescriptor } from '../../src/compat/types.ts';

const f = new FakeSysfs();
Object.assign(process.env, f.env());
process.env.VFIO_MIG_STATE_DIR = mkdtempSync(join(tmpdir(), 'vfio-mig-mlx5-'));
setPciKernel(f);
test.after.always(() => {
  f.dispose();
  rmSync(process.env.VFIO_MIG_STATE_DIR!, { recursive: true, force: true });
});

const PF_A = '0000:3b:00.0';
const VF_A = '0000:3b:00.2';
const PF_B = '0000:5e:00.0';
const VF_B = '0000:5e:00.2';
const PF_C = '0000:af:00.0'; // no mlx5_ib: no RDMA device
const VF_C = '0000:af:00.2';
f.addModule('mlx5_core', [{ name: 'mlx5_core' }], { loaded: true });
f.addModule('mlx5_vfio_pci', [{ name: 'mlx5_vfio_pci' }], { loaded: true });
for (const [pf, vf] of [
  [PF_A, VF_A],
  [PF_B, VF_B],
  [PF_C, VF_C],
]) {
  f.addDevice({ bdf: pf!, vendor: '15b3', device: '1021', class: '020000', driver: 'mlx5_core' });
  f.addDevice({ bdf: vf!, vendor: '15b3', device: '101e', class: '020000', driver: 'mlx5_vfio_pci' }, pf);
}
f.setDeviceFile(PF_A, 'infiniband/mlx5_0/fw_ver', '28.39.1002\n');
f.setDeviceFile(PF_A, 'infiniband/mlx5_0/board_id', 'MT_0000000834\n');
f.setDeviceFile(PF_B, 'infiniband/mlx5_2/fw_ver', '28.41.1000\n');
f.setDeviceFile(PF_B, 'infiniband/mlx5_2/board_id', 'MT_0000000834\n');

const probed = (flags: number, names: string[]) => ({ migration: { flags, flagNames: names, dataSize: '1048576', source: 'probe' as const, probedAt: '2026-12-05T10:00:00.000Z' } });
const byCheck = (list: ReturnType<typeof mlx5Findings>) => Object.fromEntries(list.map((x) => [x.check, x]));

test('migratable: probed flags pass; a refused GET MIGRATION fails with the devlink recipe; unknown warns that sysfs cannot show it', (t) => {
  const ok = byCheck(mlx5Findings(describeDevice(VF_A, probed(3, ['STOP_COPY', 'P2P']))));
  t.is(ok['mlx5-migratable']!.verdict, 'pass');

  const refused: DeviceDescriptor = { ...describeDevice(VF_A), migration: null, migrationNote: 'the device refused GET MIGRATION when probed at 2026-12-05: ENOTTY' };
  const r = byCheck(mlx5Findings(refused))['mlx5-migratable']!;
  t.is(r.verdict, 'fail');
  t.regex(r.advice, /devlink port function set pci\/0000:3b:00.0\/<port of this VF> migratable enable/);
  t.regex(r.advice, /while the VF is unbound/);

  const unknown = byCheck(mlx5Findings(describeDevice(VF_A)))['mlx5-migratable']!;
  t.is(unknown.verdict, 'warn');
  t.regex(unknown.advice, /cannot be seen in sysfs/);
  t.regex(unknown.advice, /vfio-mig probe 0000:3b:00.2/);
});

test('firmware version and PSID: equal -> pass, different -> fail, not in sysfs -> warn naming devlink', (t) => {
  const a = describeDevice(VF_A, probed(3, ['STOP_COPY', 'P2P']));
  const b = describeDevice(VF_B, probed(3, ['STOP_COPY', 'P2P']));
  const c = describeDevice(VF_C, probed(3, ['STOP_COPY', 'P2P']));
  t.like(a.firmware, { version: '28.39.1002', psid: 'MT_0000000834', from: 'physfn/infiniband/mlx5_0' });

  const same = byCheck(mlx5Findings(a, a));
  t.is(same['mlx5-firmware-version']!.verdict, 'pass');
  t.is(same['mlx5-psid']!.verdict, 'pass');

  const diff = byCheck(mlx5Findings(a, b));
  t.is(diff['mlx5-firmware-version']!.verdict, 'fail');
  t.regex(diff['mlx5-firmware-version']!.advice, /source 28.39.1002, destination 28.41.1000/);
  t.is(diff['mlx5-psid']!.verdict, 'pass');

  const hidden = byCheck(mlx5Findings(a, c));
  t.is(hidden['mlx5-firmware-version']!.verdict, 'warn');
  t.regex(hidden['mlx5-firmware-version']!.advice, /devlink dev info/);
  t.is(byCheck(mlx5Findings(c))['mlx5-psid']!.verdict, 'warn');
  t.is(byCheck(mlx5Findings(a))['mlx5-firmware-version']!.verdict, 'pass', 'no destination: the source value is stated');
});

test('a destination VF not on mlx5_vfio_pci fails; vendorFindings picks the module by driver and validates its input', (t) => {
  const a = describeDevice(VF_A, probed(3, ['STOP_COPY', 'P2P']));
  const pfAsDst = describeDevice(PF_B);
  t.is(byCheck(mlx5Findings(a, pfAsDst))['mlx5-destination-driver']!.verdict, 'fail');
  const viaIndex = vendorFindings(JSON.parse(JSON.stringify(a)), JSON.parse(JSON.stringify(a)));
  t.deepEqual(viaIndex.map((x) => x.check), ['mlx5-migratable', 'mlx5-migratable', 'mlx5-firmware-version', 'mlx5-psid']);
  t.deepEqual(vendorFindings(describeDevice(PF_A)), [], 'mlx5_core (the PF) has no vendor module');
  t.like(vendorFindings({ schema: 9 })[0], { verdict: 'warn', check: 'vendor-descriptor' });
});
