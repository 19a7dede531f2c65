// Compatibility against the real 6.12 kernel: the edu test driver's migration_version
// (it accepts exactly the string it would print itself and refuses anything else with
// EINVAL), the upstream mtty sample (which has no migration_version on 6.12, so the
// descriptor rules decide), the capability cache filled by `vfio-mig probe` and by the
// binder's after-bind hook, and a cache entry refused once the device's driver changed.
//
// Leaves the edu devices bound to edu-vfio-pci (with that driver_override) and their
// compat tokens at "1", as the other rig files expect.
import test from 'ava';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runCli } from '../cli-harness.ts';
import { requireRig, prepareEdu, prepareMtty, eduKnob, bindPci, driverOf, EDU_DRIVER } from './guest.ts';
import { describeDevice } from '../../src/compat/descriptor.ts';
import { checkCompatibility, checkMdevParents } from '../../src/compat/migration-version.ts';
import { readCapabilities } from '../../src/compat/cache.ts';
import { VfioDevice } from '../../src/vfio/device.ts';

requireRig(test);
const inRig = Boolean(process.env.VFIO_MIG_IN_RIG);
const work = mkdtempSync(join(tmpdir(), 'vfio-mig-compat-'));
process.env.VFIO_MIG_STATE_DIR = join(work, 'state');
process.env.VFIO_MIG_CONFIG = join(work, 'config.json'); // none: the binder chooses by modules.alias
delete process.env.VFIO_MIG_SYSFS;
delete process.env.VFIO_MIG_DEV;
delete process.env.VFIO_MIG_MODULES_DIR;

const edu = inRig ? prepareEdu() : [];
const mtty = inRig ? prepareMtty(2) : [];
const MTTY_TYPES = '/sys/class/mdev_bus/mtty/mdev_supported_types';

test.after.always(() => {
  if (inRig) {
    for (const bdf of edu) {
      if (driverOf(bdf) !== EDU_DRIVER) bindPci(bdf, EDU_DRIVER);
      eduKnob(bdf, 'compat', '1');
    }
  }
  rmSync(work, { recursive: true, force: true });
});

test.serial('edu: the descriptor holds identity, driver build and the migration_version the driver prints', (t) => {
  const d = describeDevice(edu[0]!);
  t.like(d, { schema: 1, id: edu[0], kind: 'pci', vendor: '1234', device: '11e8', driver: EDU_DRIVER, module: 'edu_vfio_pci', mdev: null });
  t.deepEqual(d.migrationVersion, { present: true, value: 'edu-vfio-pci-1:1\n' });
  const srcversionFile = '/sys/module/edu_vfio_pci/srcversion';
  t.is(d.srcversion, existsSync(srcversionFile) ? readFileSync(srcversionFile, 'utf8').trim() : null);
  if (existsSync('/sys/module/edu_vfio_pci/notes/.note.gnu.build-id')) t.regex(d.buildId ?? '', /^[0-9a-f]{40}$/, 'the module build-id');
  t.regex(d.kernel, /^6\.12\./);
  t.log(`srcversion ${d.srcversion ?? 'none (no MODULE_VERSION, no CONFIG_MODULE_SRCVERSION_ALL)'}, build-id ${d.buildId ?? 'none'}, firmware: ${d.firmware.note}`);
});

test.serial('edu: the target driver accepts the source string -> compatible', (t) => {
  const v = checkCompatibility(describeDevice(edu[0]!), edu[1]!);
  t.deepEqual(v, { compatible: true, decidedBy: 'migration_version', reason: v.reason });
});

test.serial('edu: another compat token, another version or another driver prefix -> the driver refuses with EINVAL', (t) => {
  const src = describeDevice(edu[0]!);
  eduKnob(edu[1]!, 'compat', '2');
  try {
    t.is(readFileSync(`/sys/bus/pci/devices/${edu[1]}/migration_version`, 'utf8'), 'edu-vfio-pci-1:2\n');
    t.like(checkCompatibility(src, edu[1]!), { compatible: false, decidedBy: 'migration_version', errno: 'EINVAL' });
    // Both sides on token 2: compatible again.
    eduKnob(edu[0]!, 'compat', '2');
    t.like(checkCompatibility(describeDevice(edu[0]!), edu[1]!), { compatible: true, decidedBy: 'migration_version' });
  } finally {
    eduKnob(edu[0]!, 'compat', '1');
    eduKnob(edu[1]!, 'compat', '1');
  }
  for (const forged of ['edu-vfio-pci-2:1\n', 'other-vfio-pci-1:1\n', 'edu-vfio-pci-1:\n']) {
    t.like(checkCompatibility({ ...src, migrationVersion: { present: true, value: forged } }, edu[1]!), { compatible: false, decidedBy: 'migration_version', errno: 'EINVAL' }, forged.trim());
  }
});

test.serial('mtty on 6.12 has no migration_version: the descriptor rules decide, and the type must match', (t) => {
  t.false(existsSync(join(MTTY_TYPES, 'mtty-2', 'migration_version')), 'upstream mtty (6.12) has no migration_version on its types');
  t.false(existsSync(join(MTTY_TYPES, 'mtty-1', 'migration_version')));
  const m = describeDevice(mtty[0]!);
  t.like(m, { kind: 'mdev', vendor: null, mdev: { type: 'mtty-2', parent: 'mtty', parentDriver: null }, migrationVersion: { present: false } });
  t.log(`mtty mdev driver: ${m.driver ?? 'none'} (module ${m.module ?? 'none'}), type name: ${m.mdev?.typeName ?? 'none'}`);
  const existing = checkCompatibility(m, mtty[1]!);
  t.like(existing, { compatible: true, decidedBy: 'descriptor' });
  t.log(existing.reason);
  t.like(checkCompatibility(m, { parent: 'mtty', mdevType: 'mtty-2' }), { compatible: true, decidedBy: 'descriptor' });
  t.like(checkCompatibility(m, { parent: 'mtty', mdevType: 'mtty-1' }), { compatible: false, decidedBy: 'mdevType' });
  t.deepEqual(
    checkMdevParents(m).map((p) => [p.parent, p.verdict.compatible]),
    [['mtty', true]],
  );
  t.like(checkCompatibility(m, edu[0]!), { compatible: false, decidedBy: 'kind' });
  t.like(checkCompatibility(describeDevice(edu[0]!), mtty[0]!), { compatible: false, decidedBy: 'kind' });
});

test.serial('vfio-mig probe caches edu and mtty capabilities; a held device is not probed and keeps its entry', async (t) => {
  const r = await runCli(['probe', edu[0]!, mtty[0]!, '--json']);
  t.is(r.code, 0, r.err + r.out);
  const rows = JSON.parse(r.out) as Array<{ device: string; flags: string[]; dataSize: string }>;
  const blob = Number(eduKnob(edu[0]!, 'blob_size'));
  const eduFlags = Number(eduKnob(edu[0]!, 'flags'));
  t.like(rows[0], { device: edu[0], dataSize: String(blob + 128) });
  t.is(rows[0]!.flags.length, [1, 2, 4].filter((b) => eduFlags & b).length);
  t.like(rows[1], { device: mtty[0], flags: ['STOP_COPY', 'P2P', 'PRE_COPY'], dataSize: '96' });
  const cached = readCapabilities(edu[0]!);
  t.true(cached.ok);
  t.like(describeDevice(edu[0]!).migration, { source: 'cache', dataSize: String(blob + 128) });

  const vm = VfioDevice.open(edu[0]!); // stands in for QEMU holding the device
  try {
    const held = await runCli(['probe', edu[0]!, '--json']);
    t.is(held.code, 1);
    t.regex(JSON.parse(held.out)[0].error, /not probed: .*EBUSY/);
    const still = readCapabilities(edu[0]!);
    t.true(still.ok && cached.ok && still.entry.probedAt === cached.entry.probedAt, 'the entry from the idle probe stays');
  } finally {
    await vm.close();
  }
  t.log(r.out);
});

test.serial('a driver change makes the entry stale; `vfio-mig bind` rebinds by alias and its after-bind hook probes again', async (t) => {
  const id = edu[0]!;
  const before = readCapabilities(id);
  t.true(before.ok);
  bindPci(id, 'vfio-pci');
  const stale = readCapabilities(id);
  t.false(stale.ok);
  if (!stale.ok) t.regex(stale.reason, /stale: driver changed \(edu-vfio-pci -> vfio-pci\)/);
  t.is(describeDevice(id).migration, null, 'a stale entry is never used');

  const b = await runCli(['bind', '--device', id, '--json']);
  t.is(b.code, 0, b.err + b.out);
  const res = (JSON.parse(b.out) as { results: Array<{ address: string; action: string; current: string; afterBind?: string }> }).results.find((x) => x.address === id);
  t.like(res, { action: 'bound', current: EDU_DRIVER });
  t.regex(res?.afterBind ?? '', /^capabilities cached: flags \S+, MIG_DATA_SIZE \d+$/);
  const fresh = readCapabilities(id);
  t.true(fresh.ok);
  if (fresh.ok && before.ok) t.true(fresh.entry.probedAt > before.entry.probedAt, 'probed again by the bind');
  t.log(res?.afterBind);
});
