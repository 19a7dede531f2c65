// The capability cache on the fake kernel: probing opens the device, reads GET MIGRATION
// and MIG_DATA_SIZE and closes it again; entries are written atomically (0644, no temp
// file left), carry the time and the driver build, and are refused - with the reason -
// once the driver, its srcversion, its build-id or (for a driver without either) the
// kernel changed; a device held by someone else is not probed and keeps its entry;
// damaged files and bad ids are refused, not thrown; `vfio-mig probe` drives it all.
import test from 'ava';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { installFake } from '../fake/install.ts';
import { VfioDevice } from '../../src/vfio/device.ts';
import { probeCapabilities, probeAfterBind } from '../../src/compat/probe.ts';
import { readCapabilities, writeCapabilities, capabilityPath, capabilitiesDir, listCachedIds } from '../../src/compat/cache.ts';
import { describeDevice } from '../../src/compat/descriptor.ts';
import { parseBuildIdNote } from '../../src/compat/identity.ts';
import { runCli } from '../cli-harness.ts';

const fake = installFake(test, { cdev: false });
const state = mkdtempSync(join(tmpdir(), 'vfio-mig-capcache-'));
process.env.VFIO_MIG_STATE_DIR = state;
test.after.always(() => rmSync(state, { recursive: true, force: true }));

const EDU = '0000:00:03.0';
const EDU2 = '0000:00:04.0';
const PLAIN = '0000:00:07.0'; // vfio-pci: no migration support
const HELD = '0000:00:09.0';
const MTTY = '83b8f4f2-509f-382f-3c1e-e6bfe0fa0001';
fake.addDevice({ id: EDU, flags: 7, stateSize: 8192 });
fake.addDevice({ id: EDU2, flags: 3, stateSize: 100 });
fake.addDevice({ id: PLAIN, driver: 'vfio-pci' });
fake.addDevice({ id: HELD, flags: 7 });
fake.addDevice({ id: MTTY, flags: 7, driver: 'vfio_mdev' });

// The driver's module as sysfs shows it: drivers/<name>/module -> module/<mod>.
const sys = fake.sysfsRoot;
function setModule(driver: string, module: string, info: { srcversion?: string; buildId?: string }): void {
  const mdir = join(sys, 'module', module);
  mkdirSync(join(mdir, 'notes'), { recursive: true });
  const link = join(sys, 'bus/pci/drivers', driver, 'module');
  if (!existsSync(link)) symlinkSync(mdir, link);
  rmSync(join(mdir, 'srcversion'), { force: true });
  if (info.srcversion) writeFileSync(join(mdir, 'srcversion'), `${info.srcversion}\n`);
  rmSync(join(mdir, 'notes', '.note.gnu.build-id'), { force: true });
  if (info.buildId) {
    const desc = Buffer.from(info.buildId, 'hex');
    const head = Buffer.alloc(12);
    head.writeUInt32LE(4, 0);
    head.writeUInt32LE(desc.length, 4);
    head.writeUInt32LE(3, 8);
    writeFileSync(join(mdir, 'notes', '.note.gnu.build-id'), Buffer.concat([head, Buffer.from('GNU\0'), desc]));
  }
}

async function dataSizeOf(id: string): Promise<string> {
  const d = VfioDevice.open(id);
  try {
    return (await d.dataSize()).toString();
  } finally {
    await d.close();
  }
}

test.serial('probe: flags and MIG_DATA_SIZE read from the open device, the device closed again, the entry stored 0644', async (t) => {
  const expectSize = await dataSizeOf(EDU);
  const { entry, path } = await probeCapabilities(EDU);
  t.is(fake.openFdCount(), 0, 'every fd the probe opened was closed');
  t.like(entry, { schema: 1, id: EDU, flags: 7, flagNames: ['STOP_COPY', 'P2P', 'PRE_COPY'], dataSize: expectSize, identity: { driver: 'edu-vfio-pci' } });
  t.like(entry.descriptor, { id: EDU, kind: 'pci', vendor: '1234', device: '11e8', driver: 'edu-vfio-pci', migration: { flags: 7, source: 'probe', dataSize: expectSize } });
  t.is(path, join(state, 'capabilities', `${EDU}.json`));
  t.is(statSync(path).mode & 0o777, 0o644);
  t.deepEqual(readdirSync(capabilitiesDir()).filter((n) => n.includes('.tmp')), [], 'no temp file left behind');
  const back = readCapabilities(EDU);
  t.true(back.ok);
  if (back.ok) t.deepEqual(back.entry, JSON.parse(readFileSync(path, 'utf8')));
  t.like(describeDevice(EDU).migration, { flags: 7, source: 'cache', dataSize: expectSize }, 'the descriptor takes its flags from the cache');
});

test.serial('a device held by another user is not probed and keeps its entry; the descriptor still gets the cached flags', async (t) => {
  const first = await probeCapabilities(HELD);
  const vm = VfioDevice.open(HELD); // "QEMU"
  try {
    await t.throwsAsync(probeCapabilities(HELD), { message: /EBUSY/ });
    const r = readCapabilities(HELD);
    t.true(r.ok);
    if (r.ok) t.is(r.entry.probedAt, first.entry.probedAt);
    t.like(describeDevice(HELD).migration, { flags: 7, source: 'cache' });
    t.regex(await probeAfterBind(HELD), /capabilities not probed: .*EBUSY/, 'the after-bind hook reports, never throws');
  } finally {
    await vm.close();
  }
});

test.serial('a device without migration support is recorded as such', async (t) => {
  const { entry } = await probeCapabilities(PLAIN);
  t.is(entry.flags, null);
  t.regex(entry.flagsError!, /not migratable/);
  t.is(entry.dataSize, null);
  t.is(entry.descriptor.migration, null);
  t.regex(entry.descriptor.migrationNote!, /GET MIGRATION refused/);
  t.is(describeDevice(PLAIN).migration, null);
  t.regex(describeDevice(PLAIN).migrationNote!, /refused GET MIGRATION/);
  t.regex(await probeAfterBind(PLAIN), /not migratable/);
});

test.serial('stale: the driver changed -> refused with the reason; back to the same build -> valid again', async (t) => {
  await probeCapabilities(EDU2);
  fake.setDriver(EDU2, 'vfio-pci');
  const r = readCapabilities(EDU2);
  t.false(r.ok);
  if (!r.ok) t.regex(r.reason, /stale: driver changed \(edu-vfio-pci -> vfio-pci\)/);
  t.is(describeDevice(EDU2).migration, null, 'a stale entry is not used');
  t.regex(describeDevice(EDU2).migrationNote!, /stale/);
  fake.setDriver(EDU2, 'edu-vfio-pci');
  t.true(readCapabilities(EDU2).ok);
});

test.serial('stale: srcversion or build-id of the module changed; kernel change matters only when neither is known', async (t) => {
  setModule('edu-vfio-pci', 'edu_vfio_pci', { srcversion: 'AAAA1111', buildId: '00112233445566778899aabbccddeeff00112233' });
  const { entry } = await probeCapabilities(EDU2);
  t.like(entry.identity, { module: 'edu_vfio_pci', srcversion: 'AAAA1111', buildId: '00112233445566778899aabbccddeeff00112233' });
  t.like(entry.descriptor, { module: 'edu_vfio_pci', srcversion: 'AAAA1111', buildId: '00112233445566778899aabbccddeeff00112233' });

  setModule('edu-vfio-pci', 'edu_vfio_pci', { srcversion: 'BBBB2222', buildId: '00112233445566778899aabbccddeeff00112233' });
  let r = readCapabilities(EDU2);
  t.false(r.ok);
  if (!r.ok) t.regex(r.reason, /srcversion of edu_vfio_pci changed \(AAAA1111 -> BBBB2222\)/);

  setModule('edu-vfio-pci', 'edu_vfio_pci', { srcversion: 'AAAA1111', buildId: 'ffff2233445566778899aabbccddeeff00112233' });
  r = readCapabilities(EDU2);
  t.false(r.ok);
  if (!r.ok) t.regex(r.reason, /rebuilt or replaced \(build-id 001122334455 -> ffff22334455\)/);

  setModule('edu-vfio-pci', 'edu_vfio_pci', { srcversion: 'AAAA1111', buildId: '00112233445566778899aabbccddeeff00112233' });
  process.env.VFIO_MIG_KERNEL_RELEASE = '9.9.9-test';
  try {
    t.true(readCapabilities(EDU2).ok, 'same module build on a new kernel: still valid');
    setModule('edu-vfio-pci', 'edu_vfio_pci', {});
    delete process.env.VFIO_MIG_KERNEL_RELEASE;
    await probeCapabilities(EDU2); // no srcversion, no build-id
    process.env.VFIO_MIG_KERNEL_RELEASE = '9.9.9-test';
    r = readCapabilities(EDU2);
    t.false(r.ok);
    if (!r.ok) t.regex(r.reason, /kernel changed .* no srcversion or build-id/);
  } finally {
    delete process.env.VFIO_MIG_KERNEL_RELEASE;
  }
});

test.serial('refused, not thrown: no entry, bad ids, damaged files, an entry of another device', async (t) => {
  rmSync(capabilityPath(MTTY), { force: true });
  let r = readCapabilities(MTTY);
  t.false(r.ok);
  if (!r.ok) t.regex(r.reason, /no cached capabilities .* vfio-mig probe/);
  r = readCapabilities('../../etc/passwd');
  t.false(r.ok);
  t.throws(() => capabilityPath('../x'), { message: /invalid device id/ });

  await probeCapabilities(EDU);
  const path = capabilityPath(EDU);
  const good = readFileSync(path, 'utf8');
  for (const [what, text, why] of [
    ['not JSON', '{', /damaged/],
    ['schema 2', good.replace('"schema": 1', '"schema": 2'), /schema 2 is not 1/],
    ['another device', good.replaceAll(`"${EDU}"`, `"${EDU2}"`), /holds 0000:00:04.0/],
    ['bad flags', good.replace('"flags": 7', '"flags": -1'), /flags is not a u32/],
    ['bad descriptor', good.replace('"kind": "pci"', '"kind": "usb"'), /kind is not pci or mdev/],
  ] as const) {
    writeFileSync(path, text);
    r = readCapabilities(EDU);
    t.false(r.ok, what);
    if (!r.ok) t.regex(r.reason, why, what);
  }
  writeFileSync(path, good);
  t.true(readCapabilities(EDU).ok);
});

test.serial('a write that fails validation leaves the old entry in place', async (t) => {
  const before = readFileSync(capabilityPath(EDU), 'utf8');
  const r = readCapabilities(EDU);
  if (!r.ok) return t.fail(r.reason);
  t.throws(() => writeCapabilities({ ...r.entry, flags: 1.5 }));
  t.is(readFileSync(capabilityPath(EDU), 'utf8'), before);
  t.deepEqual(listCachedIds().filter((i) => i === EDU), [EDU]);
});

test.serial('the build-id note parser reads GNU notes and skips others', (t) => {
  const note = (name: string, type: number, desc: Buffer) => {
    const n = Buffer.from(name);
    const pad = (b: Buffer) => Buffer.concat([b, Buffer.alloc((4 - (b.length % 4)) % 4)]);
    const h = Buffer.alloc(12);
    h.writeUInt32LE(n.length, 0);
    h.writeUInt32LE(desc.length, 4);
    h.writeUInt32LE(type, 8);
    return Buffer.concat([h, pad(n), pad(desc)]);
  };
  const id = Buffer.from('a1b2c3d4e5f60718293a4b5c6d7e8f9012345678', 'hex');
  t.is(parseBuildIdNote(Buffer.concat([note('Linux\0', 1, Buffer.from('xyz')), note('GNU\0', 3, id)])), id.toString('hex'));
  t.is(parseBuildIdNote(note('GNU\0', 1, id)), undefined);
  t.is(parseBuildIdNote(Buffer.from([1, 2, 3])), undefined);
});

test.serial('vfio-mig probe: probes and caches; --show checks entries; not migratable and stale entries exit 1', async (t) => {
  const ok = await runCli(['probe', EDU, EDU2, '--json']);
  t.is(ok.code, 0, ok.err);
  const rows = JSON.parse(ok.out) as Array<Record<string, unknown>>;
  t.like(rows[0], { device: EDU, ok: true, driver: 'edu-vfio-pci', flags: ['STOP_COPY', 'P2P', 'PRE_COPY'] });
  t.like(rows[1], { device: EDU2, ok: true, flags: ['STOP_COPY', 'P2P'] });

  const text = await runCli(['probe', EDU]);
  t.is(text.code, 0);
  t.regex(text.out, /DEVICE\s+DRIVER\s+FLAGS\s+MIG_DATA_SIZE\s+MIGRATION_VERSION\s+RESULT/);
  t.regex(text.out, new RegExp(`${EDU}\\s+edu-vfio-pci\\s+STOP_COPY\\|P2P\\|PRE_COPY`));

  const plain = await runCli(['probe', PLAIN]);
  t.is(plain.code, 1, 'a device without migration support is a failed probe');
  t.regex(plain.out, /FAILED/);

  const show = await runCli(['probe', '--show', EDU, '--json']);
  t.is(show.code, 0);
  t.like(JSON.parse(show.out)[0], { device: EDU, ok: true });
  fake.setDriver(EDU, 'vfio-pci');
  try {
    const stale = await runCli(['probe', '--show', EDU]);
    t.is(stale.code, 1);
    t.regex(stale.out, /FAILED .*stale: driver changed/);
  } finally {
    fake.setDriver(EDU, 'edu-vfio-pci');
  }
  const all = await runCli(['probe', '--show', '--json']);
  t.true((JSON.parse(all.out) as Array<{ device: string }>).some((r) => r.device === EDU), 'without devices: every cached entry');

  t.is((await runCli(['probe'])).code, 2, 'no device: usage');
  t.is((await runCli(['probe', '../x'])).code, 2, 'a bad id: usage');
  t.is((await runCli(['probe', EDU, EDU])).code, 2, 'a device twice: usage');
  t.is((await runCli(['probe', '--bogus'])).code, 2);
});
