// The libvirt qemu hook, invoked directly: as a process from a freshly built install tree
// (hooks/qemu -> dist/js/hook-qemu.mjs, exactly what libvirtd runs) on a fake sysfs
// host, with domain XML from libvirt's own test corpus (test/fixtures/libvirt-xml) -
// pass-through, remap, refusal, concurrent incoming migrations - and in-process
// (qemuHook() with the fake kernel seam, which reacts to sysfs writes) where a
// prepare has to bind, a group is held open, or release gives drivers back.
import test from 'ava';
import { execFileSync } from 'node:child_process';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { installFakeSysfs } from '../fake/sysfs.ts';
import { DomainXml } from '../../src/libvirt/domain-xml.ts';
import { readMetadata, removeMetadata, writeMetadata, type DescriptorJson } from '../../src/compat/domain-metadata.ts';
import { describeDevice } from '../../src/compat/descriptor.ts';
import { qemuHook } from '../../src/hooks/qemu.ts';
import { makePrefix, repo, runHook, type Prefix } from './hook-harness.ts';

const FIXTURES = join(repo, 'test', 'fixtures', 'libvirt-xml');
const fixture = (name: string) => readFileSync(join(FIXTURES, name), 'utf8');

const fake = installFakeSysfs(test);
const extra = {
  VFIO_MIG_LOG_DIR: join(fake.root, 'log'),
  VFIO_MIG_LIBVIRT_RUN_DIR: join(fake.root, 'run-libvirt-qemu'),
  VFIO_MIG_LIBVIRT_VERSION: '11.3.0',
  VFIO_MIG_HOST_NAME: 'dst-host',
};
Object.assign(process.env, extra);
const env = { ...fake.env(), ...extra };
mkdirSync(extra.VFIO_MIG_LIBVIRT_RUN_DIR, { recursive: true });

// The destination host: four mlx5 VFs on their variant driver (groups 40-43), a VF of
// another model, an Intel NIC on its host driver, and an mtty-like mdev parent with two mdevs.
fake.addModule('mlx5_vfio_pci', [{ name: 'mlx5_vfio_pci' }], { loaded: true });
fake.addModule('mlx5_core', [{ name: 'mlx5_core', ids: [{ vendor: '15b3' }] }], { loaded: true });
fake.addModule('i40e', [{ name: 'i40e', ids: [{ vendor: '8086', device: '1572' }] }], { loaded: true });
fake.addModule('vfio_pci', [{ name: 'vfio-pci' }], { loaded: true });
// mlx5_vfio_pci claims the 101e VFs through modules.alias, as the real module does.
fake.writeAliases(['alias vfio_pci:v000015B3d0000101Esv*sd*bc*sc*i* mlx5_vfio_pci', 'alias pci:v000015B3d0000101Dsv*sd*bc*sc*i* mlx5_core']);
const VFS = ['0000:3c:00.1', '0000:3c:00.2', '0000:3c:00.3', '0000:3c:00.4'];
VFS.forEach((bdf, i) => fake.addDevice({ bdf, vendor: '15b3', device: '101e', driver: 'mlx5_vfio_pci', group: 40 + i }));
fake.addDevice({ bdf: '0000:3d:00.1', vendor: '15b3', device: '101f', driver: 'mlx5_vfio_pci', group: 50 });
fake.addDevice({ bdf: '0000:5e:00.0', vendor: '8086', device: '1572', driver: 'i40e', group: 60 });
fake.addMdevParent('mtty', [{ name: 'mtty-2', label: 'Dual-port-serial' }]);
const MDEVS = ['11111111-2222-4333-8444-555555555501', '11111111-2222-4333-8444-555555555502'];
for (const [i, u] of MDEVS.entries()) fake.addMdev(u, 'mtty', 'mtty-2', { driver: 'mtty', module: 'mtty', group: 70 + i });

let prefix: Prefix;
test.before(async () => {
  prefix = await makePrefix();
});
test.after.always(() => prefix?.dispose());

/** A source host's descriptor: a device like `like` on this host, at the source's address. */
function sourceDescriptor(like: string, sourceId: string, change: Partial<Record<string, unknown>> = {}): DescriptorJson {
  return { ...(describeDevice(like) as unknown as DescriptorJson), id: sourceId, ...change };
}

/** Corpus XML with an <alias> in each hostdev (live XML has them) and vfio-mig metadata. */
function incoming(file: string, opts: { descriptors?: Array<DescriptorJson | undefined>; name?: string; alias?: boolean } = {}): string {
  let xml = fixture(file);
  if (opts.name) xml = xml.replace(/<name>[^<]*<\/name>/, `<name>${opts.name}</name>`);
  let n = 0;
  if (opts.alias !== false) xml = xml.replace(/<\/source>(\s*)/g, (_m, ws: string) => `</source>${ws}<alias name='hostdev${n++}'/>${ws}`);
  if (!opts.descriptors) return xml;
  const doc = DomainXml.parse(xml);
  const hs = doc.hostdevs();
  writeMetadata(doc, {
    host: 'src-host',
    hostdevs: opts.descriptors.flatMap((d, i) =>
      d ? [{ alias: hs[i]!.alias, type: hs[i]!.type as 'pci' | 'mdev', address: hs[i]!.type === 'pci' ? '0000:06:12.5' : hs[i]!.mdevUuid!, descriptor: d }] : [],
    ),
  });
  return doc.serialize();
}

function reservations(): Array<{ device: string; domain: string; op: string }> {
  try {
    return JSON.parse(readFileSync(join(fake.stateDir, 'reservations.json'), 'utf8')).reservations;
  } catch {
    return [];
  }
}

function clearReservations(): void {
  rmSync(join(fake.stateDir, 'reservations.json'), { force: true });
}

/** Runs `fn` over `items`, `n` at a time (the machine has 2 cores and others use them too). */
async function inBatches<T, R>(items: T[], n: number, fn: (x: T) => Promise<R>): Promise<R[]> {
  const out: R[] = [];
  for (let i = 0; i < items.length; i += n) out.push(...(await Promise.all(items.slice(i, i + n).map(fn))));
  return out;
}

const oneLine = (s: string) => s.trim().split('\n').length === 1 && !/\n\s+at /.test(s);

// --- pass-through ------------------------------------------------------------------------------

const index = readFileSync(join(FIXTURES, 'INDEX.tsv'), 'utf8').trim().split('\n').slice(1).map((l) => l.split('\t'));
// INDEX counts <hostdev> elements; <interface type='hostdev'> (a VF as a NIC) is a VFIO hostdev too.
const noHostdev = index.filter((c) => c[4] === '0').map((c) => c[0]!).filter((f) => !/<interface[^>]*type='hostdev'/.test(fixture(f)));

test.serial('pass-through: every corpus domain without hostdevs, every operation - exit 0, no output, nothing heavy loaded', async (t) => {
  t.timeout(300_000); // ~150 node processes on a shared 2-core machine
  t.true(noHostdev.length >= 10);
  const jobs = noHostdev.flatMap((file) => [['prepare', 'begin'], ['migrate', 'begin'], ['release', 'end']].map(([op, sub]) => ({ file, op: op!, sub: sub! })));
  const runs = await inBatches(jobs, 4, async (j) => ({ ...j, r: await runHook(prefix, ['vm1', j.op, j.sub, '-'], { stdin: fixture(j.file), env, trace: true }) }));
  for (const { file, op, r } of runs) {
    t.is(r.code, 0, `${file} ${op}: ${r.stderr}`);
    t.is(r.stdout, '', `${file} ${op}`);
    t.is(r.stderr, '', `${file} ${op}`);
    const heavy = r.loaded.filter((l) => /koffi|fast-xml-parser|\.ts$|src\//.test(l));
    t.deepEqual(heavy, [], `${file} ${op} loaded ${heavy.join(', ')}`);
    const chunks = r.loaded.filter((l) => l.includes('/dist/js/'));
    t.true(chunks.length <= 3, `${file} ${op}: ${chunks.length} bundle files loaded: ${chunks.join(' ')}`);
  }
  t.deepEqual(reservations(), []);
});

test.serial('pass-through: non-VFIO hostdevs (USB, SCSI) and operations the hook leaves alone', async (t) => {
  for (const file of ['hostdev-usb-address-device.xml', 'hostdev-scsi-vhost-scsi-pci.xml']) {
    const r = await runHook(prefix, ['vm1', 'prepare', 'begin', '-'], { stdin: fixture(file), env, trace: true });
    t.is(r.code, 0, r.stderr);
    t.is(r.stderr, '');
  }
  for (const [op, sub] of [['start', 'begin'], ['started', 'begin'], ['stopped', 'end'], ['reconnect', 'begin'], ['restore', 'begin'], ['prepare', 'end'], ['attach', 'begin']]) {
    const r = await runHook(prefix, ['vm1', op!, sub!, '-'], { stdin: incoming('hostdev-pci-address.x86_64-latest.xml'), env, trace: true });
    t.is(r.code, 0, `${op} ${sub}`);
    t.is(r.stdout + r.stderr, '', `${op} ${sub}`);
    t.deepEqual(r.loaded.filter((l) => l.includes('/dist/js/')), [], `${op} ${sub} loads nothing`);
  }
});

// --- migrate begin: remap -----------------------------------------------------------------------

test.serial('migrate: the source PCI address becomes a free compatible local VF, reserved, with metadata for this host', async (t) => {
  clearReservations();
  const xml = incoming('hostdev-pci-address.x86_64-latest.xml', { descriptors: [sourceDescriptor(VFS[0]!, '0000:06:12.5')] });
  const r = await runHook(prefix, ['vm-a', 'migrate', 'begin', '-'], { stdin: xml, env });
  t.is(r.code, 0, r.stderr);
  const out = DomainXml.parse(r.stdout);
  t.deepEqual(out.hostdevs()[0]!.pci, { domain: 0, bus: 0x3c, slot: 0, function: 1 });
  // Only the address attributes moved: the rest of the document is as it came in.
  const before = xml.split('\n');
  const after = r.stdout.split('\n');
  const changed = after.filter((l, i) => l !== before[i]);
  t.true(changed.some((l) => /bus='0x3c' slot='0x00' function='0x1'/.test(l)), changed.join('\n'));
  const md = readMetadata(out)!;
  t.is(md.host, 'dst-host');
  t.is(md.hostdevs[0]!.address, '0000:3c:00.1');
  t.is(md.hostdevs[0]!.descriptor.id, '0000:3c:00.1');
  t.deepEqual(reservations().map((x) => [x.device, x.domain, x.op]), [['0000:3c:00.1', 'vm-a', 'migrate']]);
  // The --persistent caveat, on stderr, one line; exit status 0.
  t.true(oneLine(r.stderr), r.stderr);
  t.regex(r.stderr, /remapped hostdev0 \(0000:06:12\.5\) -> 0000:3c:00\.1 .*--persistent/);
  t.log(`migrate with one hostdev: ${r.ms} ms`);

  // A second incoming domain gets the next VF; the same domain again (a retry) keeps its own.
  const r2 = await runHook(prefix, ['vm-b', 'migrate', 'begin', '-'], { stdin: xml.replace(/<name>[^<]*</, '<name>vm-b<'), env });
  t.is(r2.code, 0, r2.stderr);
  t.deepEqual(DomainXml.parse(r2.stdout).hostdevs()[0]!.pci, { domain: 0, bus: 0x3c, slot: 0, function: 2 });
  const again = await runHook(prefix, ['vm-a', 'migrate', 'begin', '-'], { stdin: xml, env });
  t.deepEqual(DomainXml.parse(again.stdout).hostdevs()[0]!.pci, { domain: 0, bus: 0x3c, slot: 0, function: 1 });
  t.is(reservations().length, 2);
});

test.serial('migrate: the XML of "vfio-mig preflight --print-xml" (addresses already this host\'s, no aliases) keeps its device', async (t) => {
  clearReservations();
  const xml = incoming('hostdev-pci-address.x86_64-latest.xml', { alias: false, descriptors: [sourceDescriptor(VFS[0]!, '0000:06:12.5')] }).replace(
    "bus='0x06' slot='0x12' function='0x5'",
    "bus='0x3c' slot='0x00' function='0x2'",
  );
  const r = await runHook(prefix, ['vm-pf', 'migrate', 'begin', '-'], { stdin: xml, env });
  t.is(r.code, 0, r.stderr);
  t.deepEqual(DomainXml.parse(r.stdout).hostdevs()[0]!.pci, { domain: 0, bus: 0x3c, slot: 0, function: 2 });
  t.is(r.stderr, '', 'nothing remapped, so no --persistent caveat');
  t.deepEqual(reservations().map((x) => x.device), ['0000:3c:00.2']);
});

test.serial('migrate: an mdev source gets a free local mdev of the same type (UUID rewritten)', async (t) => {
  clearReservations();
  const src = '53764d0e-85a0-42b4-af5c-2046b460b1dc';
  const xml = incoming('hostdev-mdev-precreated.xml', { descriptors: [sourceDescriptor(MDEVS[0]!, src)] });
  const r = await runHook(prefix, ['vm-m', 'migrate', 'begin', '-'], { stdin: xml, env });
  t.is(r.code, 0, r.stderr);
  t.is(DomainXml.parse(r.stdout).hostdevs()[0]!.mdevUuid, MDEVS[0]);
  t.false(r.stdout.includes(src.slice(0, 8)) && r.stdout.includes(`uuid='${src}'`));
  t.deepEqual(reservations().map((x) => x.device), [MDEVS[0]]);
});

test.serial('migrate: migration-events=on as a <qemu:override> when the config asks for it', async (t) => {
  clearReservations();
  fake.writeConfig({ version: 1, hooks: { migrationEvents: true } });
  t.teardown(() => fake.removeConfig());
  const xml = incoming('hostdev-pci-address.x86_64-latest.xml', { descriptors: [sourceDescriptor(VFS[0]!, '0000:06:12.5')] });
  const r = await runHook(prefix, ['vm-e', 'migrate', 'begin', '-'], { stdin: xml, env });
  t.is(r.code, 0, r.stderr);
  const out = DomainXml.parse(r.stdout);
  t.deepEqual(out.qemuDeviceProperties('hostdev0'), [{ name: 'migration-events', type: 'bool', value: 'true' }]);
  t.regex(r.stdout, /xmlns:qemu='http:\/\/libvirt\.org\/schemas\/domain\/qemu\/1\.0'/);
});

test.serial('migrate without vfio-mig metadata: the same address is kept when it is here, VFIO-bound and free; else refused with the preflight pointer', async (t) => {
  clearReservations();
  const xml = incoming('hostdev-pci-address.x86_64-latest.xml').replace(/bus='0x06' slot='0x12' function='0x5'/, "bus='0x3c' slot='0x00' function='0x3'");
  const keep = await runHook(prefix, ['vm-k', 'migrate', 'begin', '-'], { stdin: xml, env });
  t.is(keep.code, 0, keep.stderr);
  t.is(keep.stdout, '', 'unchanged: nothing printed');
  t.deepEqual(reservations().map((x) => x.device), ['0000:3c:00.3']);
  const other = await runHook(prefix, ['vm-other', 'migrate', 'begin', '-'], { stdin: xml.replace(/<name>[^<]*</, '<name>vm-other<'), env });
  t.is(other.code, 1);
  t.true(oneLine(other.stderr), other.stderr);
  t.regex(other.stderr, /^vfio-mig qemu hook: "vm-other" migrate: hostdev0 \(0000:3c:00\.3\): .*reserved for "vm-k".*vfio-mig preflight/);
  const absent = await runHook(prefix, ['vm-x', 'migrate', 'begin', '-'], { stdin: incoming('hostdev-pci-address.x86_64-latest.xml'), env });
  t.is(absent.code, 1);
  t.regex(absent.stderr, /0000:06:12\.5\): the XML carries no vfio-mig metadata .*does not exist here.*vfio-mig preflight/);
  const onHost = xml.replace(/bus='0x3c' slot='0x00' function='0x3'/, "bus='0x5e' slot='0x00' function='0x0'").replace("managed='yes'", "managed='no'");
  const host = await runHook(prefix, ['vm-x', 'migrate', 'begin', '-'], { stdin: onHost, env });
  t.is(host.code, 1);
  t.regex(host.stderr, /bound to i40e, not a VFIO driver/);
  t.is(host.stdout + absent.stdout + other.stdout, '');
});

// --- migrate begin: refusal ---------------------------------------------------------------------

test.serial('migrate: no compatible device -> exit 1, one line naming the hostdev and why, nothing printed or reserved', async (t) => {
  clearReservations();
  const xml = incoming('hostdev-pci-address.x86_64-latest.xml', { descriptors: [sourceDescriptor(VFS[0]!, '0000:06:12.5', { device: '1021' })] });
  const r = await runHook(prefix, ['vm-r', 'migrate', 'begin', '-'], { stdin: xml, env });
  t.is(r.code, 1);
  t.is(r.stdout, '');
  t.true(oneLine(r.stderr), r.stderr);
  t.regex(r.stderr, /^vfio-mig qemu hook: "vm-r" migrate: hostdev0 \(0000:06:12\.5\): no free compatible device on this host: no VFIO-bound PCI function of that kind/);
  t.deepEqual(reservations(), []);

  // Same model, but a different driver build: the descriptors decide, and say which field.
  const other = incoming('hostdev-pci-address.x86_64-latest.xml', { descriptors: [sourceDescriptor(VFS[0]!, '0000:06:12.5', { driver: 'other_vfio_pci' })] });
  const r2 = await runHook(prefix, ['vm-r', 'migrate', 'begin', '-'], { stdin: other, env });
  t.is(r2.code, 1);
  t.regex(r2.stderr, /0 in use or reserved, 4 incompatible \(0000:3c:00\.1: driver differs/);
  t.deepEqual(reservations(), []);

  // Every compatible VF taken: reserved by others.
  writeFileSync(join(fake.stateDir, 'reservations.json'), JSON.stringify({ version: 1, reservations: VFS.map((d, i) => ({ device: d, domain: `busy${i}`, op: 'migrate', since: new Date().toISOString() })) }));
  const ok = incoming('hostdev-pci-address.x86_64-latest.xml', { descriptors: [sourceDescriptor(VFS[0]!, '0000:06:12.5')] });
  const r3 = await runHook(prefix, ['vm-r', 'migrate', 'begin', '-'], { stdin: ok, env });
  t.is(r3.code, 1);
  t.regex(r3.stderr, /4 in use or reserved, 0 incompatible/);
  // Expired reservations (their domain never started) no longer count.
  writeFileSync(join(fake.stateDir, 'reservations.json'), JSON.stringify({ version: 1, reservations: VFS.map((d, i) => ({ device: d, domain: `busy${i}`, op: 'migrate', since: '2020-01-01T00:00:00.000Z' })) }));
  const r4 = await runHook(prefix, ['vm-r', 'migrate', 'begin', '-'], { stdin: ok, env });
  t.is(r4.code, 0, r4.stderr);
  t.deepEqual(reservations().map((x) => x.domain), ['vm-r']);
});

test.serial('migrate: stale metadata (an entry without its hostdev) and a broken descriptor are refused', async (t) => {
  clearReservations();
  const doc = DomainXml.parse(fixture('q35-virt-manager-basic.x86_64-latest.xml'));
  writeMetadata(doc, { host: 'src-host', hostdevs: [{ alias: 'hostdev0', type: 'pci', address: '0000:3b:00.2', descriptor: sourceDescriptor(VFS[0]!, '0000:3b:00.2') }] });
  const r = await runHook(prefix, ['vm-s', 'migrate', 'begin', '-'], { stdin: doc.serialize(), env });
  t.is(r.code, 1);
  t.regex(r.stderr, /metadata lists hostdev hostdev0 \(pci 0000:3b:00\.2\) but the domain has no such hostdev/);
  const broken = incoming('hostdev-pci-address.x86_64-latest.xml', { descriptors: [sourceDescriptor(VFS[0]!, '0000:06:12.5')] }).replace(/<vfio-mig:descriptor>\{/, '<vfio-mig:descriptor>{{');
  const r2 = await runHook(prefix, ['vm-s', 'migrate', 'begin', '-'], { stdin: broken, env });
  t.is(r2.code, 1);
  t.regex(r2.stderr, /descriptor is not JSON/);
  t.true(oneLine(r2.stderr));
});

test.serial('migrate: a device a running domain uses (libvirt status file) is not picked', async (t) => {
  clearReservations();
  const status = `<domstatus state='running' reason='booted' pid='4242'>\n  <domain type='kvm' id='3'>\n    <name>running-vm</name>\n    <devices>\n      <hostdev mode='subsystem' type='pci' managed='no'>\n        <source>\n          <address domain='0x0000' bus='0x3c' slot='0x00' function='0x1'/>\n        </source>\n      </hostdev>\n    </devices>\n  </domain>\n</domstatus>\n`;
  writeFileSync(join(extra.VFIO_MIG_LIBVIRT_RUN_DIR, 'running-vm.xml'), status);
  t.teardown(() => rmSync(join(extra.VFIO_MIG_LIBVIRT_RUN_DIR, 'running-vm.xml'), { force: true }));
  const xml = incoming('hostdev-pci-address.x86_64-latest.xml', { descriptors: [sourceDescriptor(VFS[0]!, '0000:06:12.5')] });
  const r = await runHook(prefix, ['vm-n', 'migrate', 'begin', '-'], { stdin: xml, env });
  t.is(r.code, 0, r.stderr);
  t.deepEqual(DomainXml.parse(r.stdout).hostdevs()[0]!.pci, { domain: 0, bus: 0x3c, slot: 0, function: 2 });
});

test.serial('concurrent migrate hooks on one host pick distinct devices (4 processes at once, 4 VFs)', async (t) => {
  clearReservations();
  const xml = incoming('hostdev-pci-address.x86_64-latest.xml', { descriptors: [sourceDescriptor(VFS[0]!, '0000:06:12.5')] });
  const names = ['c0', 'c1', 'c2', 'c3'];
  const runs = await Promise.all(names.map((n) => runHook(prefix, [n, 'migrate', 'begin', '-'], { stdin: xml.replace(/<name>[^<]*</, `<name>${n}<`), env })));
  for (const r of runs) t.is(r.code, 0, r.stderr);
  const picked = runs.map((r) => DomainXml.parse(r.stdout).hostdevs()[0]!.pci!.function);
  t.deepEqual([...new Set(picked)].sort(), [1, 2, 3, 4], `picked ${picked}`);
  t.deepEqual(reservations().map((x) => x.domain).sort(), names);
  // A fifth finds nothing free, and says so.
  const fifth = await runHook(prefix, ['c4', 'migrate', 'begin', '-'], { stdin: xml.replace(/<name>[^<]*</, '<name>c4<'), env });
  t.is(fifth.code, 1);
  t.regex(fifth.stderr, /4 in use or reserved/);
});

test.serial('migrate with 8 hostdevs: all remapped in document order, distinct', async (t) => {
  clearReservations();
  for (let i = 0; i < 4; i++) fake.addDevice({ bdf: `0000:3c:01.${i}`, vendor: '15b3', device: '101e', driver: 'mlx5_vfio_pci', group: 80 + i });
  t.teardown(() => clearReservations());
  let xml = fixture('hostdev-pci-address.x86_64-latest.xml');
  const block = /( *<hostdev [\s\S]*?<\/hostdev>\n)/.exec(xml)![1]!;
  const many = Array.from({ length: 8 }, (_, i) => block.replace(/function='0x5'/, `function='0x${i}'`).replace(/slot='0x02'/, `slot='0x${(i + 2).toString(16).padStart(2, '0')}'`)).join('');
  xml = xml.replace(block, many);
  const doc = DomainXml.parse(xml);
  writeMetadata(doc, { host: 'src-host', hostdevs: doc.hostdevs().map((h, i) => ({ alias: undefined, type: 'pci', address: `0000:06:12.${i}`, descriptor: sourceDescriptor(VFS[0]!, `0000:06:12.${i}`) })) });
  const r = await runHook(prefix, ['vm-8', 'migrate', 'begin', '-'], { stdin: doc.serialize(), env });
  t.is(r.code, 0, r.stderr);
  const got = DomainXml.parse(r.stdout).hostdevs().map((h) => h.pci);
  t.is(new Set(got.map((p) => JSON.stringify(p))).size, 8);
  t.deepEqual(got[0], { domain: 0, bus: 0x3c, slot: 0, function: 1 });
  t.log(`migrate with 8 hostdevs: ${r.ms} ms`);
});

// --- prepare and release, in-process (the fake kernel reacts to the binder's writes) -------------

function sink() {
  const s = new PassThrough();
  let text = '';
  s.on('data', (c) => (text += c));
  return { s, text: () => text };
}

async function hookInProcess(argv: string[], xml: string): Promise<{ code: number; out: string; err: string }> {
  const out = sink();
  const err = sink();
  const code = await qemuHook(argv, { stdin: async () => ({ kind: 'text', text: xml }), out: out.s, err: err.s, watchdog: false, timeoutMs: 20_000 });
  return { code, out: out.text(), err: err.text() };
}

const pciXml = (bdf: string, extraAttrs = "managed='no'", name = 'vm-p') => {
  const [d, b, sf] = bdf.split(':') as [string, string, string];
  const [s, f] = sf.split('.') as [string, string];
  return incoming('hostdev-pci-address.x86_64-latest.xml', { name })
    .replace("managed='yes'", extraAttrs)
    .replace(/domain='0x0000' bus='0x06' slot='0x12' function='0x5'/, `domain='0x${d}' bus='0x${b}' slot='0x${s}' function='0x${f}'`);
};

test.serial('prepare: binds a hostdev to its chosen driver (a rule), reserves it; refuses with one line when nothing migration-capable is chosen', async (t) => {
  clearReservations();
  const refused = await hookInProcess(['vm-p', 'prepare', 'begin', '-'], pciXml('0000:5e:00.0'));
  t.is(refused.code, 1);
  t.regex(refused.err, /^vfio-mig qemu hook: "vm-p" prepare: hostdev0 \(0000:5e:00\.0\): no migration-capable VFIO driver for 8086:1572 .*add a rule/);
  t.is(fake.driverOf('0000:5e:00.0'), 'i40e', 'untouched');

  fake.writeConfig({ version: 1, rules: [{ vendor: '8086', device: '1572', driver: 'vfio-pci', comment: 'test' }] });
  t.teardown(() => fake.removeConfig());
  const ok = await hookInProcess(['vm-p', 'prepare', 'begin', '-'], pciXml('0000:5e:00.0'));
  t.is(ok.code, 0, ok.err);
  t.is(fake.driverOf('0000:5e:00.0'), 'vfio-pci');
  t.deepEqual(reservations().map((x) => [x.device, x.domain, x.op]), [['0000:5e:00.0', 'vm-p', 'prepare']]);
  // Another domain cannot start with it now.
  const clash = await hookInProcess(['vm-q', 'prepare', 'begin', '-'], pciXml('0000:5e:00.0', "managed='no'", 'vm-q'));
  t.is(clash.code, 1);
  t.regex(clash.err, /is reserved for domain "vm-p"/);

  // release end with releasePolicy restore: the reservation goes, i40e comes back.
  fake.writeConfig({ version: 1, rules: [{ vendor: '8086', device: '1572', driver: 'vfio-pci' }], hooks: { releasePolicy: 'restore' } });
  const rel = await hookInProcess(['vm-p', 'release', 'end', 'shutdown'], pciXml('0000:5e:00.0'));
  t.is(rel.code, 0, rel.err);
  t.is(rel.err, '');
  t.deepEqual(reservations(), []);
  t.is(fake.driverOf('0000:5e:00.0'), 'i40e');
  const log = readFileSync(join(extra.VFIO_MIG_LOG_DIR, 'hooks.log'), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
  t.true(log.some((e) => e.event === 'bound' && e.device === '0000:5e:00.0' && e.driver === 'vfio-pci'));
  t.true(log.some((e) => e.event === 'released' && e.domain === 'vm-p' && e.restored.includes('0000:5e:00.0')));
});

test.serial('prepare: keep policy leaves the driver; a held-open group and managed=yes disagreements are refused', async (t) => {
  clearReservations();
  const ok = await hookInProcess(['vm-p', 'prepare', 'begin', '-'], pciXml(VFS[0]!));
  t.is(ok.code, 0, ok.err);
  const rel = await hookInProcess(['vm-p', 'release', 'end', 'destroyed'], pciXml(VFS[0]!));
  t.is(rel.code, 0);
  t.is(fake.driverOf(VFS[0]!), 'mlx5_vfio_pci', 'kept for reuse');
  t.deepEqual(reservations(), []);

  fake.busyGroups.add(41);
  t.teardown(() => fake.busyGroups.delete(41));
  const busy = await hookInProcess(['vm-p', 'prepare', 'begin', '-'], pciXml(VFS[1]!));
  t.is(busy.code, 1);
  t.regex(busy.err, /0000:3c:00\.2\) is in use: its VFIO group is held open/);

  // managed='yes' on libvirt 11: libvirt binds the modules.alias variant - the table's choice too.
  const managed = await hookInProcess(['vm-p', 'prepare', 'begin', '-'], pciXml(VFS[2]!, "managed='yes'"));
  t.is(managed.code, 0, managed.err);
  t.is(fake.driverOf(VFS[2]!), 'mlx5_vfio_pci');
  // No variant for the device: libvirt would bind plain vfio-pci.
  const plain = await hookInProcess(['vm-p3', 'prepare', 'begin', '-'], pciXml('0000:3d:00.1', "managed='yes'", 'vm-p3'));
  t.is(plain.code, 1);
  t.regex(plain.err, /no migration-capable variant driver .*libvirt would bind plain vfio-pci/);
  // A rule that disagrees with libvirt's pick: refused unless <driver model> says the rule's driver.
  fake.writeConfig({ version: 1, rules: [{ vendor: '15b3', device: '101e', driver: 'mlx5_vfio_pci_v2' }] });
  t.teardown(() => fake.removeConfig());
  const noModel = await hookInProcess(['vm-p2', 'prepare', 'begin', '-'], pciXml(VFS[3]!, "managed='yes'", 'vm-p2'));
  t.is(noModel.code, 1);
  t.regex(noModel.err, /libvirt will bind mlx5_vfio_pci \(managed='yes'\) but vfio-mig's table chooses mlx5_vfio_pci_v2 .*<driver model='mlx5_vfio_pci_v2'\/>/);
  const model = await hookInProcess(['vm-p2', 'prepare', 'begin', '-'], pciXml(VFS[3]!, "managed='yes'", 'vm-p2').replace('</source>', "</source>\n      <driver model='mlx5_vfio_pci_v2'/>"));
  t.is(model.code, 0, model.err);
  clearReservations();
});

test.serial('prepare: an mdev must exist; release drops its reservation', async (t) => {
  clearReservations();
  const xml = incoming('hostdev-mdev-precreated.xml');
  const missing = await hookInProcess(['vm-m', 'prepare', 'begin', '-'], xml);
  t.is(missing.code, 1);
  t.regex(missing.err, /mdev 53764d0e-85a0-42b4-af5c-2046b460b1dc\): no such mdev on this host/);
  const ok = await hookInProcess(['vm-m', 'prepare', 'begin', '-'], xml.replace('53764d0e-85a0-42b4-af5c-2046b460b1dc', MDEVS[1]!));
  t.is(ok.code, 0, ok.err);
  t.deepEqual(reservations().map((x) => x.device), [MDEVS[1]]);
  const rel = await hookInProcess(['vm-m', 'release', 'end', 'migrated'], xml.replace('53764d0e-85a0-42b4-af5c-2046b460b1dc', MDEVS[1]!));
  t.is(rel.code, 0);
  t.deepEqual(reservations(), []);
});

test.serial('a crash of ours is caught and logged with the domain: exit 0 for a domain without VFIO hostdevs, 1 for one with', async (t) => {
  clearReservations();
  // Simulate a bug deep inside: the XML model throws a TypeError.
  const real = Object.getOwnPropertyDescriptor(DomainXml.prototype, 'hostdevs')!;
  Object.defineProperty(DomainXml.prototype, 'hostdevs', { ...real, value: () => { throw new TypeError('boom'); } });
  t.teardown(() => Object.defineProperty(DomainXml.prototype, 'hostdevs', real));
  const usb = await hookInProcess(['vm-u', 'prepare', 'begin', '-'], fixture('hostdev-usb-address-device.xml'));
  t.is(usb.code, 0);
  t.true(oneLine(usb.err), usb.err);
  t.regex(usb.err, /^vfio-mig qemu hook: "vm-u" prepare: internal error \(a vfio-mig bug.*TypeError: boom; the domain has no VFIO hostdev, so it is let through/);
  const vfio = await hookInProcess(['vm-v', 'prepare', 'begin', '-'], pciXml(VFS[0]!, "managed='no'", 'vm-v'));
  t.is(vfio.code, 1);
  t.regex(vfio.err, /"vm-v" prepare: internal error .*TypeError: boom$/m);
  const rel = await hookInProcess(['vm-v', 'release', 'end', '-'], pciXml(VFS[0]!, "managed='no'", 'vm-v'));
  t.is(rel.code, 0, 'release can never be refused');
  const log = readFileSync(join(extra.VFIO_MIG_LOG_DIR, 'hooks.log'), 'utf8');
  t.regex(log, /"domain":"vm-u","operation":"prepare","event":"crash","error":"TypeError: boom"/);
});

test.serial('a damaged reservations file refuses VFIO domains with one line that says what to fix', async (t) => {
  clearReservations();
  writeFileSync(join(fake.stateDir, 'reservations.json'), '{"version": 1, "reservations": [{"device": "../../etc"}]}');
  t.teardown(() => clearReservations());
  const r = await hookInProcess(['vm-v', 'prepare', 'begin', '-'], pciXml(VFS[0]!, "managed='no'", 'vm-v'));
  t.is(r.code, 1);
  t.true(oneLine(r.err), r.err);
  t.regex(r.err, /reservations\.json is damaged \(entry 1\); fix or remove it/);
});

// --- time bounds --------------------------------------------------------------------------------

test.serial('time bound: a lock another live process holds ends in a refusal naming it, within the bound', async (t) => {
  clearReservations();
  // This test process holds bind.lock (pid + its start time, as lock.ts writes it).
  const stat = readFileSync('/proc/self/stat', 'utf8');
  const start = stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
  mkdirSync(fake.stateDir, { recursive: true });
  writeFileSync(join(fake.stateDir, 'bind.lock'), `${process.pid} ${start} 0123456789abcdef\n`);
  t.teardown(() => rmSync(join(fake.stateDir, 'bind.lock'), { force: true }));
  const xml = incoming('hostdev-pci-address.x86_64-latest.xml', { descriptors: [sourceDescriptor(VFS[0]!, '0000:06:12.5')] });
  const r = await runHook(prefix, ['vm-l', 'migrate', 'begin', '-'], { stdin: xml, env: { ...env, VFIO_MIG_HOOK_TIMEOUT: '3' } });
  t.is(r.code, 1);
  t.true(oneLine(r.stderr), r.stderr);
  t.regex(r.stderr, new RegExp(`"vm-l" migrate: .*another vfio-mig bind/unbind \\(pid ${process.pid}\\) has held .*bind\\.lock`));
  t.deepEqual(reservations(), []);
  t.log(`refused after ${r.ms} ms (bound 3 s)`);
});

test.serial('time bound: a syscall blocked in the kernel (a FIFO as the config) - the watchdog writes the line and kills the hook', async (t) => {
  const fifo = join(fake.root, 'config.fifo');
  execFileSync('mkfifo', [fifo]);
  t.teardown(() => rmSync(fifo, { force: true }));
  const r = await runHook(prefix, ['vm-w', 'prepare', 'begin', '-'], { stdin: pciXml(VFS[0]!, "managed='no'", 'vm-w'), env: { ...env, VFIO_MIG_CONFIG: fifo, VFIO_MIG_HOOK_TIMEOUT: '1' }, timeoutMs: 30_000 });
  t.is(r.signal, 'SIGKILL');
  t.true(oneLine(r.stderr), r.stderr);
  t.regex(r.stderr, /^vfio-mig qemu hook: "vm-w" prepare: still running after 1 s \(a sysfs write blocked in the kernel\?\); stopped/);
  t.true(r.ms < 20_000, `${r.ms} ms`);
  t.log(`killed after ${r.ms} ms (bound 1 s + 2 s)`);
});

// --- the vfio-mig metadata element (src/compat/domain-metadata.ts) -----------------------------

test('metadata: written after <name>/<uuid> when absent, read back, replaced in place, removed to the original bytes', (t) => {
  const original = fixture('hostdev-pci-address.x86_64-latest.xml');
  const doc = DomainXml.parse(original);
  t.is(readMetadata(doc), undefined);
  const descriptor = { schema: 1, id: '0000:06:12.5', kind: 'pci', vendor: '15b3', note: 'a <tag> & "quotes"' };
  writeMetadata(doc, { host: 'src-host', hostdevs: [{ alias: 'hostdev0', type: 'pci', address: '0000:06:12.5', descriptor }] });
  const xml = doc.serialize();
  t.regex(xml, /<uuid>[^<]*<\/uuid>\n {2}<metadata>\n {4}<vfio-mig:hostdevs xmlns:vfio-mig='https:\/\/vfio-mig\.org\/xmlns\/domain\/1' version='1' host='src-host'>\n {6}<vfio-mig:hostdev alias='hostdev0' type='pci' address='0000:06:12\.5'>\n {8}<vfio-mig:descriptor>/);
  // Everything outside the new element is byte for byte what it was.
  t.is(xml.replace(/\n {2}<metadata>[\s\S]*<\/metadata>/, ''), original);
  const back = readMetadata(DomainXml.parse(xml))!;
  t.deepEqual(back, { version: 1, host: 'src-host', hostdevs: [{ alias: 'hostdev0', type: 'pci', address: '0000:06:12.5', descriptor }] });
  // Replacing keeps one element (libvirt allows one per namespace) in the same place.
  const again = DomainXml.parse(xml);
  writeMetadata(again, { host: 'dst-host', hostdevs: [] });
  t.is((again.serialize().match(/vfio-mig:hostdevs /g) ?? []).length, 1);
  t.is(readMetadata(again)!.host, 'dst-host');
  t.true(removeMetadata(again));
  t.is(again.serialize(), original);
});

test('metadata: another prefix for our namespace is ours; malformed entries are errors that say what is wrong', (t) => {
  const base = fixture('q35-virt-manager-basic.x86_64-latest.xml');
  const withMd = (inner: string, attrs = "version='1'") => base.replace('</name>', `</name>\n  <metadata>\n    <x:hostdevs xmlns:x='https://vfio-mig.org/xmlns/domain/1' ${attrs}>${inner}</x:hostdevs>\n    <other:thing xmlns:other='urn:other'/>\n  </metadata>`);
  const ok = readMetadata(DomainXml.parse(withMd(`<x:hostdev type='mdev' address='53764D0E-85A0-42B4-AF5C-2046B460B1DC'><x:descriptor>{"a":1}</x:descriptor></x:hostdev>`)))!;
  t.deepEqual(ok.hostdevs, [{ alias: undefined, type: 'mdev', address: '53764d0e-85a0-42b4-af5c-2046b460b1dc', descriptor: { a: 1 } }]);
  const bad: Array<[string, string | undefined, RegExp]> = [
    ['', "version='2'", /version "2" is not supported/],
    [`<x:hostdev type='usb' address='0000:00:01.0'><x:descriptor>{}</x:descriptor></x:hostdev>`, undefined, /type must be pci or mdev/],
    [`<x:hostdev type='pci' address='0000:00:01.0/../..'><x:descriptor>{}</x:descriptor></x:hostdev>`, undefined, /is not a PCI address/],
    [`<x:hostdev type='pci' address='0000:00:01.0'/>`, undefined, /has no descriptor/],
    [`<x:hostdev type='pci' address='0000:00:01.0'><x:descriptor>[1]</x:descriptor></x:hostdev>`, undefined, /not a JSON object/],
    [`<x:hostdev type='pci' address='0000:00:01.0' alias='a b'><x:descriptor>{}</x:descriptor></x:hostdev>`, undefined, /alias "a b" is not a QEMU device id/],
  ];
  for (const [inner, attrs, re] of bad) t.throws(() => readMetadata(DomainXml.parse(withMd(inner, attrs))), { message: re });
});
