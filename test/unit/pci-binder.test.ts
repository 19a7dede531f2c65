// The binder on a fake PCI core: alias and rule binds, SR-IOV PFs and their VFs, whole
// IOMMU groups, idempotence, concurrent runs, unbind, and every failure path leaving
// the tree exactly as it was.
import test from 'ava';
import { existsSync, readFileSync, writeFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { FakeSysfs, type FakeOp } from '../fake/sysfs.ts';
import { bigAliasFile } from '../fake/sysfs-aliases.ts';
import { setPciKernel } from '../../src/pci/kernel.ts';
import { bind, unbind, type BindReport, type BindResult } from '../../src/pci/binder.ts';
import { ConfigError, PciError } from '../../src/pci/errors.ts';
import { InvalidDeviceIdError } from '../../src/host/sysfs.ts';
import { readState } from '../../src/pci/state.ts';

const EDU_A = '0000:01:00.0';
const EDU_B = '0000:02:00.0';
const BRIDGE = '0000:00:10.0';
const GPU = '0000:0a:00.0';
const GPU_AUDIO = '0000:0a:00.1';
const MLX_PF = '0000:3b:00.0';
const NIC = '0000:05:00.0';
const NO_GROUP = '0000:06:00.0';
const HOSTDEV = '0000:07:00.0';

const hosts: FakeSysfs[] = [];
test.after.always(() => hosts.forEach((h) => h.dispose()));

/** A fresh fake host for each test: env, seam and tree all point at it. */
function host(): FakeSysfs {
  const f = new FakeSysfs();
  hosts.push(f);
  Object.assign(process.env, f.env());
  setPciKernel(f);
  f.addBuiltinDriver({ name: 'pcieport', ids: [{ classPrefix: '0604' }] });
  f.addModule('vfio_pci', [{ name: 'vfio-pci' }]);
  f.addModule('edu_vfio_pci', [{ name: 'edu-vfio-pci' }]);
  f.addModule('mlx5_vfio_pci', [{ name: 'mlx5_vfio_pci' }]);
  f.addModule('mlx5_core', [{ name: 'mlx5_core', ids: [{ vendor: '15b3' }] }], { loaded: true });
  f.addModule('ixgbe', [{ name: 'ixgbe', ids: [{ vendor: '8086', device: '10fb' }] }], { loaded: true });
  f.addModule('nouveau', [{ name: 'nouveau', ids: [{ vendor: '10de', classPrefix: '03' }] }], { loaded: true });
  f.addModule('snd_hda_intel', [{ name: 'snd_hda_intel', ids: [{ classPrefix: '0403' }] }], { loaded: true });
  f.addModule('hostdrv', [{ name: 'hostdrv', ids: [{ vendor: 'abcd' }] }], { loaded: true });
  f.addModule('refusing_vfio_pci', [{ name: 'refusing-vfio-pci', probe: () => -19 }]);
  f.addModule('weird_vfio', [{ name: 'weird-variant' }]);
  f.addModule('broken_vfio_pci', [{ name: 'broken_vfio_pci' }], { initError: 'Unknown symbol in module' });

  f.addDevice({ bdf: BRIDGE, vendor: '1b36', device: '000c', class: '060400', group: 10, driver: 'pcieport' });
  f.addDevice({ bdf: EDU_A, vendor: '1234', device: '11e8', subsystemVendor: '1af4', subsystemDevice: '1100', class: '00ff00', group: 10 });
  f.addDevice({ bdf: EDU_B, vendor: '1234', device: '11e8', subsystemVendor: '1af4', subsystemDevice: '1100', class: '00ff00', group: 11 });
  f.addDevice({ bdf: GPU, vendor: '10de', device: '2236', class: '030000', group: 20, driver: 'nouveau' });
  f.addDevice({ bdf: GPU_AUDIO, vendor: '10de', device: '1aef', class: '040300', group: 20, driver: 'snd_hda_intel' });
  f.addDevice({ bdf: MLX_PF, vendor: '15b3', device: '101d', class: '020000', group: 30, driver: 'mlx5_core', sriov: { totalVfs: 4, vfDevice: '101e' } });
  f.addDevice({ bdf: NIC, vendor: '8086', device: '10fb', class: '020000', group: 40, driver: 'ixgbe' });
  f.addDevice({ bdf: NO_GROUP, vendor: 'abcf', device: '0001', class: '120000', group: null });
  f.addDevice({ bdf: HOSTDEV, vendor: 'abcd', device: '0001', class: '120000', group: 50, driver: 'hostdrv', override: 'hostdrv' });
  f.writeAliases(bigAliasFile(['alias vfio_pci:v0000ABCEd00000001sv*sd*bc*sc*i* weird_vfio']));
  return f;
}

const quick = { probeWaitMs: 0, lockTimeoutMs: 2_000 };

function byAddr(r: BindReport, addr: string): BindResult {
  const found = r.results.find((x) => x.address === addr);
  if (!found) throw new Error(`no result for ${addr}`);
  return found;
}

function rules(f: FakeSysfs, list: object[], extra: object = {}): void {
  f.writeConfig({ version: 1, rules: list, ...extra });
}

test.serial('bind --all with no config: alias variants for unbound PFs, VF autoprobe off, nothing else touched', async (t) => {
  const f = host();
  const before = f.snapshot();
  const r = await bind({ all: true, ...quick });
  t.true(r.ok);
  t.like(byAddr(r, EDU_A), { action: 'bound', previous: null, current: 'edu-vfio-pci', chosen: 'edu-vfio-pci', reason: 'alias', iommuGroup: 10 });
  t.like(byAddr(r, EDU_B), { action: 'bound', current: 'edu-vfio-pci' });
  for (const other of [BRIDGE, GPU, GPU_AUDIO, MLX_PF, NIC, HOSTDEV]) t.like(byAddr(r, other), { action: 'skipped', chosen: null }, other);
  t.true(f.moduleLoaded('edu_vfio_pci'));
  t.is(f.driverOf(EDU_A), 'edu-vfio-pci');
  t.is(f.overrideOf(EDU_A), 'edu-vfio-pci', 'the override stays, so a reprobe keeps the variant');
  t.is(f.driverOf(BRIDGE), 'pcieport', 'the dma-safe bridge in the group is left alone');
  // The PF's future VFs (15b3:101e) have a variant: host drivers must not grab them.
  t.deepEqual(r.pfs, [{ address: MLX_PF, action: 'autoprobe-off', detail: 'its VFs (15b3:101e) go to mlx5_vfio_pci (modules.alias)' }]);
  t.false(f.autoprobeOf(MLX_PF));
  // Exactly the kernel steps, in libvirt's order: module, override, probe (nothing to unbind).
  t.deepEqual(f.log.filter((o) => 'bdf' in o && o.bdf === EDU_A).map((o) => o.kind), ['override', 'probe']);
  t.deepEqual(f.ops('modprobe'), [{ kind: 'modprobe', module: 'edu_vfio_pci' }], 'loaded once for both devices');
  const state = readState();
  t.deepEqual(Object.keys(state.devices), [EDU_A, EDU_B]);
  t.like(state.devices[EDU_A], { driver: 'edu-vfio-pci', previousDriver: null, previousOverride: null });
  t.deepEqual(state.pfs[MLX_PF]?.previousAutoprobe, true);
  const after = f.snapshot();
  for (const bdf of [BRIDGE, GPU, GPU_AUDIO, NIC, HOSTDEV, NO_GROUP]) t.deepEqual(after[bdf], before[bdf], bdf);
});

test.serial('bind is idempotent: a second run changes nothing', async (t) => {
  const f = host();
  await bind({ all: true, ...quick });
  const ops = f.log.length;
  const stateText = readFileSync(join(f.stateDir, 'bindings.json'), 'utf8');
  const r = await bind({ all: true, ...quick });
  t.true(r.ok);
  t.like(byAddr(r, EDU_A), { action: 'already', current: 'edu-vfio-pci' });
  t.deepEqual(r.pfs, []);
  t.is(f.log.length, ops, 'no kernel action at all');
  t.is(readFileSync(join(f.stateDir, 'bindings.json'), 'utf8'), stateText);
});

test.serial('VFs created later stay unbound under autoprobe=0, and bind --device gives each its variant (udev path)', async (t) => {
  const f = host();
  await bind({ all: true, ...quick });
  const added: string[] = [];
  f.onAdd = (vf) => added.push(vf);
  f.writeAttr(join(f.sys, 'bus/pci/devices', MLX_PF, 'sriov_numvfs'), '2');
  t.deepEqual(added, ['0000:3c:00.0', '0000:3c:00.1']);
  t.is(f.driverOf('0000:3c:00.0'), undefined, 'mlx5_core did not grab the VF');
  for (const vf of added) {
    const r = await bind({ devices: [vf], ...quick });
    t.true(r.ok);
    t.like(byAddr(r, vf), { action: 'bound', reason: 'alias', current: 'mlx5_vfio_pci', previous: null });
  }
  t.true(f.moduleLoaded('mlx5_vfio_pci'));
  t.like(readState().devices['0000:3c:00.1'], { driver: 'mlx5_vfio_pci', previousDriver: null });
});

test.serial('a VF a host driver grabbed first is taken over: override before unbind', async (t) => {
  const f = host();
  f.writeAttr(join(f.sys, 'bus/pci/devices', MLX_PF, 'sriov_numvfs'), '1'); // autoprobe still on
  const vf = '0000:3c:00.0';
  t.is(f.driverOf(vf), 'mlx5_core');
  const from = f.log.length;
  const r = await bind({ devices: [vf], ...quick });
  t.like(byAddr(r, vf), { action: 'bound', previous: 'mlx5_core', current: 'mlx5_vfio_pci' });
  t.deepEqual(
    f.log.slice(from).map((o) => o.kind),
    ['modprobe', 'override', 'unbind', 'probe'],
  );
  t.like(readState().devices[vf], { previousDriver: 'mlx5_core', previousModule: 'mlx5_core', previousOverride: null });
  // unbind gives it back to the host driver.
  const u = await unbind({ devices: [vf], ...quick });
  t.true(u.ok);
  t.like(u.results[0], { action: 'restored', restore: 'mlx5_core' });
  t.is(f.driverOf(vf), 'mlx5_core');
  t.is(f.overrideOf(vf), undefined);
});

test.serial('a table rule moves devices from the alias variant to vfio-pci; unbind restores the original state', async (t) => {
  const f = host();
  const original = f.snapshot();
  await bind({ all: true, ...quick });
  rules(f, [{ vendor: '1234', device: '11e8', driver: 'vfio-pci', comment: 'plain vfio-pci for the lab' }]);
  const r = await bind({ all: true, ...quick });
  t.true(r.ok);
  t.like(byAddr(r, EDU_A), { action: 'bound', previous: 'edu-vfio-pci', current: 'vfio-pci', reason: 'rule', detail: 'rule 1 (line 4): plain vfio-pci for the lab' });
  t.is(f.driverOf(EDU_B), 'vfio-pci');
  t.like(readState().devices[EDU_A], { driver: 'vfio-pci', previousDriver: null, previousOverride: null }, 'the first previous state is kept');
  const u = await unbind(quick);
  t.true(u.ok);
  t.deepEqual(u.results.map((x) => [x.address, x.action, x.restore]), [
    [EDU_A, 'restored', null],
    [EDU_B, 'restored', null],
  ]);
  t.deepEqual(u.pfs, [{ address: MLX_PF, action: 'autoprobe-restored', detail: 'sriov_drivers_autoprobe back to 1' }]);
  t.deepEqual(f.snapshot(), original);
  t.deepEqual(readState(), { devices: {}, pfs: {} });
  const again = await unbind(quick);
  t.deepEqual(again.results, []);
  const notOurs = await unbind({ devices: [NIC], ...quick });
  t.like(notOurs.results[0], { action: 'not-managed', current: 'ixgbe' });
  t.is(f.driverOf(NIC), 'ixgbe');
});

test.serial('failure: the module is missing or fails to load - nothing changes', async (t) => {
  const f = host();
  rules(f, [
    { vendor: '1234', device: '11e8', driver: 'nosuch_vfio_pci' },
    { vendor: 'abcd', device: '0001', driver: 'broken_vfio_pci' },
  ]);
  const before = f.snapshot();
  const r = await bind({ all: true, ...quick });
  t.false(r.ok);
  const a = byAddr(r, EDU_A);
  t.is(a.action, 'failed');
  t.regex(a.error!, /^modprobe nosuch_vfio_pci for 0000:01:00\.0 failed: modprobe: FATAL: Module nosuch_vfio_pci not found.*; nothing was changed$/);
  t.regex(byAddr(r, HOSTDEV).error!, /modprobe broken_vfio_pci for 0000:07:00\.0 failed: modprobe: ERROR: could not insert 'broken_vfio_pci': Unknown symbol/);
  const after = f.snapshot();
  for (const bdf of [EDU_A, EDU_B, HOSTDEV]) t.deepEqual(after[bdf], before[bdf], bdf);
  t.deepEqual(readState().devices, {});
});

test.serial('failure: the probe binds nothing - the previous host driver and override come back', async (t) => {
  const f = host();
  rules(f, [{ vendor: 'abcd', device: '0001', driver: 'refusing-vfio-pci' }]);
  const before = f.snapshot();
  const r = await bind({ devices: [HOSTDEV], ...quick });
  t.false(r.ok);
  const res = byAddr(r, HOSTDEV);
  t.is(res.action, 'failed');
  t.is(res.current, 'hostdrv');
  t.regex(res.error!, /bind to refusing-vfio-pci for 0000:07:00\.0 failed: no driver bound after drivers_probe .*; the previous driver and driver_override were restored/);
  t.deepEqual(f.snapshot(), before);
  t.deepEqual(readState().devices, {}, 'the intent record is dropped again');
});

test.serial('failure: a concurrent actor binds another driver mid-way (bind race) - restored', async (t) => {
  const f = host();
  rules(f, [{ vendor: 'abcd', device: '0001', driver: 'vfio-pci' }]);
  const before = f.snapshot();
  // Right after our unbind, someone else sets its own override and reprobes.
  f.after(
    (op) => op.kind === 'unbind' && op.bdf === HOSTDEV,
    () => {
      f.writeAttr(join(f.sys, 'bus/pci/devices', HOSTDEV, 'driver_override'), 'hostdrv\n');
      f.writeAttr(join(f.sys, 'bus/pci/drivers_probe'), HOSTDEV);
    },
  );
  const r = await bind({ devices: [HOSTDEV], ...quick });
  const res = byAddr(r, HOSTDEV);
  t.is(res.action, 'failed');
  t.regex(res.error!, /hostdrv took the device instead \(a concurrent bind\?\)/);
  t.deepEqual(f.snapshot(), before);
});

test.serial('failure: each kernel write failing leaves the tree as it was', async (t) => {
  const failures: Array<[string, (op: FakeOp) => boolean, string]> = [
    ['override', (op) => op.kind === 'override', 'EINVAL'],
    ['unbind', (op) => op.kind === 'unbind', 'EBUSY'],
    ['drivers_probe', (op) => op.kind === 'probe', 'ENOMEM'],
  ];
  for (const [what, match, code] of failures) {
    const f = host();
    rules(f, [{ vendor: 'abcd', device: '0001', driver: 'vfio-pci' }]);
    const before = f.snapshot();
    f.failOn(match, code);
    const r = await bind({ devices: [HOSTDEV], ...quick });
    const res = byAddr(r, HOSTDEV);
    t.is(res.action, 'failed', what);
    t.regex(res.error!, new RegExp(`${code} writing .*the previous driver and driver_override were restored`), what);
    t.deepEqual(f.snapshot(), before, what);
  }
});

test.serial('failure during rollback is reported, not hidden', async (t) => {
  const f = host();
  rules(f, [{ vendor: 'abcd', device: '0001', driver: 'refusing-vfio-pci' }]);
  f.failOn((op) => op.kind === 'bind' && op.driver === 'hostdrv', 'EIO');
  f.failOn((op) => op.kind === 'probe', 'EIO', false); // the fallback too
  const r = await bind({ devices: [HOSTDEV], ...quick });
  const res = byAddr(r, HOSTDEV);
  t.is(res.action, 'failed');
  t.regex(res.error!, /restoring the previous drivers also failed: .*EIO/);
});

test.serial('IOMMU groups: a sibling on an uncovered host driver refuses the group, naming it', async (t) => {
  const f = host();
  rules(f, [{ vendor: '10de', device: '2236', driver: 'vfio-pci' }]);
  const before = f.snapshot();
  const r = await bind({ devices: [GPU], ...quick });
  t.false(r.ok);
  const res = byAddr(r, GPU);
  t.is(res.action, 'refused');
  t.regex(res.error!, /IOMMU group 20 cannot go to VFIO: 0000:0a:00\.1 is bound to host driver snd_hda_intel, which the table does not cover/);
  t.deepEqual(f.snapshot(), before);
  rules(f, [
    { vendor: '10de', device: '2236', driver: 'vfio-pci' },
    { vendor: '10de', device: '1aef', exclude: true },
  ]);
  t.regex(byAddr(await bind({ devices: [GPU], ...quick }), GPU).error!, /snd_hda_intel, which the table excludes \(excluded by rule 2/);
  t.deepEqual(f.snapshot(), before);
});

test.serial('IOMMU groups: covered siblings come along; one failing rolls the whole group back', async (t) => {
  const f = host();
  rules(f, [
    { vendor: '10de', device: '2236', driver: 'vfio-pci' },
    { vendor: '10de', device: '1aef', driver: 'vfio-pci' },
  ]);
  const before = f.snapshot();
  f.failOn((op) => op.kind === 'probe' && op.bdf === GPU_AUDIO, 'EIO');
  const r = await bind({ devices: [GPU], ...quick });
  t.like(byAddr(r, GPU), { action: 'failed' });
  t.regex(byAddr(r, GPU).error!, /not bound: 0000:0a:00\.1 in the same IOMMU group failed/);
  t.like(byAddr(r, GPU_AUDIO), { action: 'failed', reason: 'rule' });
  t.deepEqual(f.snapshot(), before, 'the video function went back to nouveau');
  const ok = await bind({ devices: [GPU], ...quick });
  t.true(ok.ok);
  t.like(byAddr(ok, GPU), { action: 'bound', current: 'vfio-pci' });
  t.like(byAddr(ok, GPU_AUDIO), { action: 'bound', current: 'vfio-pci', previous: 'snd_hda_intel' });
  t.regex(byAddr(ok, GPU_AUDIO).detail, /IOMMU group 20 sibling of 0000:0a:00\.0/);
  await unbind(quick);
  t.deepEqual(f.snapshot(), before);
});

test.serial('no IOMMU group, or a group a VM holds: refused and untouched', async (t) => {
  const f = host();
  rules(f, [{ vendor: 'abcf', device: '0001', driver: 'vfio-pci' }]);
  const ng = byAddr(await bind({ devices: [NO_GROUP], ...quick }), NO_GROUP);
  t.like(ng, { action: 'refused', chosen: 'vfio-pci' });
  t.regex(ng.error!, /no IOMMU group \(is the IOMMU on\?/);
  rules(f, [{ vendor: '1234', device: '11e8', driver: 'vfio-pci' }]);
  await bind({ devices: [EDU_B], ...quick });
  rules(f, [{ vendor: '1234', device: '11e8', driver: 'edu-vfio-pci' }]);
  f.busyGroups.add(11);
  const before = f.snapshot();
  const r = await bind({ devices: [EDU_B], ...quick });
  t.like(byAddr(r, EDU_B), { action: 'refused' });
  t.regex(byAddr(r, EDU_B).error!, /IOMMU group 11 is in use \(\/dev\/vfio\/11 is open - a running VM\?\)/);
  const u = await unbind({ devices: [EDU_B], ...quick });
  t.like(u.results[0], { action: 'refused' });
  t.false(u.ok);
  t.deepEqual(f.snapshot(), before);
  f.busyGroups.clear();
  t.true((await unbind(quick)).ok);
});

test.serial('the driver name is taken from the loaded module when the guess was wrong', async (t) => {
  const f = host();
  // abce:0001 has an alias to module weird_vfio, whose driver is weird-variant.
  const dev = '0000:08:00.0';
  f.addDevice({ bdf: dev, vendor: 'abce', device: '0001', class: '120000', group: 60 });
  const r = await bind({ devices: [dev], ...quick });
  t.like(byAddr(r, dev), { action: 'bound', chosen: 'weird-variant', current: 'weird-variant' });
  t.is(f.driverOf(dev), 'weird-variant');
});

test.serial('unbind loads the previous driver\'s module again when it was removed meanwhile', async (t) => {
  const f = host();
  rules(f, [{ vendor: 'abcd', device: '0001', driver: 'vfio-pci' }]);
  await bind({ devices: [HOSTDEV], ...quick });
  f.unloadModule('hostdrv');
  const u = await unbind(quick);
  t.true(u.ok, JSON.stringify(u));
  t.is(f.driverOf(HOSTDEV), 'hostdrv');
  t.is(f.overrideOf(HOSTDEV), 'hostdrv');
  t.true(f.moduleLoaded('hostdrv'));
});

test.serial('dry run: the plan, no kernel action, no state', async (t) => {
  const f = host();
  const r = await bind({ all: true, dryRun: true, ...quick });
  t.true(r.ok);
  t.like(byAddr(r, EDU_A), { action: 'would-bind', steps: ['modprobe edu_vfio_pci', 'driver_override=edu-vfio-pci', 'drivers_probe', 'verify driver is edu-vfio-pci'] });
  t.deepEqual(r.pfs, [{ address: MLX_PF, action: 'would-turn-autoprobe-off', detail: 'its VFs (15b3:101e) go to mlx5_vfio_pci (modules.alias)' }]);
  t.deepEqual(f.log, []);
  t.false(existsSync(join(f.stateDir, 'bindings.json')));
  const u = await unbind({ dryRun: true, ...quick });
  t.deepEqual(u.results, []);
});

test.serial('a broken config changes nothing; bad addresses are refused before any action', async (t) => {
  const f = host();
  f.writeConfig('{\n  "version": 1,\n  "rules": [ { "vendor": "1234", "device": "11e8", "driver": "vfio-pci", } ]\n}');
  await t.throwsAsync(bind({ all: true, ...quick }), { instanceOf: ConfigError, message: /config .*:3:74: invalid JSON/ });
  await t.throwsAsync(bind({ devices: ['0000:01:00.0/../../x'], ...quick }), { instanceOf: InvalidDeviceIdError });
  await t.throwsAsync(bind({ ...quick }), { instanceOf: PciError, message: /nothing selected/ });
  await t.throwsAsync(bind({ all: true, devices: [EDU_A], ...quick }), { message: /not both/ });
  t.deepEqual(f.log, []);
  f.removeConfig();
  const missing = await bind({ devices: ['0000:ff:1f.7'], ...quick });
  t.like(missing.results[0], { action: 'failed', address: '0000:ff:1f.7' });
  t.regex(missing.results[0]!.error!, /no such PCI device/);
  const skip = await bind({ devices: [NIC], ...quick });
  t.true(skip.ok, 'a device nothing matches is skipped, not an error (udev calls us for every VF)');
  t.like(skip.results[0], { action: 'skipped', reason: 'none' });
});

test.serial('two binds at once: one binds, the other finds it done', async (t) => {
  const f = host();
  const [a, b] = await Promise.all([bind({ all: true, ...quick }), bind({ all: true, ...quick })]);
  t.true(a.ok && b.ok);
  const actions = [byAddr(a, EDU_A).action, byAddr(b, EDU_A).action].sort();
  t.deepEqual(actions, ['already', 'bound']);
  t.is(f.ops('override').filter((o) => 'bdf' in o && o.bdf === EDU_A).length, 1, 'the device was moved once');
  t.false(existsSync(join(f.stateDir, 'bind.lock')), 'the lock is released');
});

test.serial('the lock: a dead holder is broken, a live one is waited for and then named', async (t) => {
  const f = host();
  mkdirSync(f.stateDir, { recursive: true });
  writeFileSync(join(f.stateDir, 'bind.lock'), '999999999 12345 0123456789abcdef\n');
  t.true((await bind({ all: true, ...quick })).ok, 'stale lock from a dead pid');
  const self = readFileSync(`/proc/${process.pid}/stat`, 'utf8');
  const start = self.slice(self.lastIndexOf(')') + 2).split(' ')[19];
  writeFileSync(join(f.stateDir, 'bind.lock'), `${process.pid} ${start} 0123456789abcdef\n`);
  await t.throwsAsync(bind({ all: true, ...quick, lockTimeoutMs: 200 }), { instanceOf: PciError, message: new RegExp(`pid ${process.pid}\\) has held .*bind\\.lock for more than 200 ms`) });
  writeFileSync(join(f.stateDir, 'bind.lock'), `${process.pid} 1 0123456789abcdef\n`);
  t.true((await bind({ all: true, ...quick })).ok, 'same pid, other start time: a reused pid, stale');
});

test.serial('a corrupt state file stops bind and unbind with a clear message', async (t) => {
  const f = host();
  mkdirSync(f.stateDir, { recursive: true });
  writeFileSync(join(f.stateDir, 'bindings.json'), '{"version":1,"devices":{"../x":{}}}');
  await t.throwsAsync(bind({ all: true, ...quick }), { instanceOf: PciError, message: /bindings\.json failed: bad entry for "\.\.\/x"/ });
  t.deepEqual(f.log, [], 'not even a modprobe');
  await t.throwsAsync(unbind(quick), { message: /fix or remove the file/ });
});
