// hisi_acc vendor checks on a fake sysfs: no P2P, so one such device per VM (a warning
// without the VM's device list, a verdict with it), and VFs on old QM hardware that
// refuse GET MIGRATION.
import test from 'ava';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FakeSysfs } from '../fake/sysfs.ts';
import { setPciKernel } from '../../src/pci/kernel.ts';
import { describeDevice } from '../../src/compat/descriptor.ts';
import { hisiAccFindings } from '../../src/compat/vendors/hisi-acc.ts';
import { vendorFindings } from '../../src/compat/vendors/index.ts';

const f = new FakeSysfs();
Object.assign(process.env, f.env());
process.env.VFIO_MIG_STATE_DIR = mkdtempSync(join(tmpdir(), 'vfio-mig-hisi-'));
setPciKernel(f);
test.after.always(() => {
  f.dispose();
  rmSync(process.env.VFIO_MIG_STATE_DIR!, { recursive: true, force: true });
});

const SEC_VF = '0000:76:00.1';
const ZIP_VF = '0000:77:00.1';
const NIC_VF = '0000:3b:00.2';
f.addModule('hisi_acc_vfio_pci', [{ name: 'hisi_acc_vfio_pci' }], { loaded: true });
f.addModule('mlx5_vfio_pci', [{ name: 'mlx5_vfio_pci' }], { loaded: true });
f.addDevice({ bdf: SEC_VF, vendor: '19e5', device: 'a256', class: '108000', driver: 'hisi_acc_vfio_pci' });
f.addDevice({ bdf: ZIP_VF, vendor: '19e5', device: 'a251', class: '120000', driver: 'hisi_acc_vfio_pci' });
f.addDevice({ bdf: NIC_VF, vendor: '15b3', device: '101e', class: '020000', driver: 'mlx5_vfio_pci' });

const probed = (flags: number, names: string[]) => ({ migration: { flags, flagNames: names, dataSize: '512', source: 'probe' as const, probedAt: '2026-12-05T10:00:00.000Z' } });
const sec = describeDevice(SEC_VF, probed(5, ['STOP_COPY', 'PRE_COPY']));

test('no P2P: a warning without the VM\'s devices; pass when it is the only VFIO device; fail beside another', (t) => {
  const alone = hisiAccFindings(sec);
  t.like(alone, [{ verdict: 'warn', check: 'hisi_acc-p2p' }]);
  t.regex(alone[0]!.advice, /only VFIO device/);
  t.like(hisiAccFindings(sec, undefined, { vmDevices: [sec] }), [{ verdict: 'pass', check: 'hisi_acc-p2p' }]);
  const two = hisiAccFindings(sec, undefined, { vmDevices: [sec, describeDevice(ZIP_VF), describeDevice(NIC_VF)] });
  t.like(two, [{ verdict: 'fail', check: 'hisi_acc-p2p' }]);
  t.regex(two[0]!.advice, /2 other VFIO device\(s\) \(0000:77:00.1, 0000:3b:00.2\)/);
  t.like(vendorFindings(sec, undefined, { vmDevices: [sec, describeDevice(ZIP_VF)] }), [{ verdict: 'fail', check: 'hisi_acc-p2p' }], 'through the index');
});

test('old QM hardware: GET MIGRATION refused -> fail; a destination on another driver -> fail', (t) => {
  const old = { ...describeDevice(ZIP_VF), migration: null, migrationNote: 'the device refused GET MIGRATION when probed at x: ENOTTY' };
  const out = hisiAccFindings(old);
  t.like(out[0], { verdict: 'fail', check: 'hisi_acc-migration' });
  t.regex(out[0]!.advice, /QM hardware v3/);
  t.like(hisiAccFindings(sec, describeDevice(NIC_VF)).find((x) => x.check === 'hisi_acc-destination-driver'), { verdict: 'fail' });
});
