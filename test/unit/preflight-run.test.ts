// Preflight end to end on a fake host: a fake PCI sysfs (test/fake/sysfs.ts), fake kernel
// config files, QEMU's answers through a fake QMP executor, a fixed compatibility layer.
// The destination is this same fake host, reached in-process (a local URI). Also the
// CLI's --xml form, host-facts, the rewritten destination XML, and the JSON schema.
import test from 'ava';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { installFakeSysfs } from '../fake/sysfs.ts';
import { runCli } from '../cli-harness.ts';
import { DomainXml } from '../../src/libvirt/domain-xml.ts';
import { readMetadata, writeMetadata } from '../../src/compat/domain-metadata.ts';
import type { QmpExecutor } from '../../src/qmp/commands.ts';
import { QmpError } from '../../src/qmp/errors.ts';
import { setCompatPort, type CompatPort, type CapabilityFact } from '../../src/compat/preflight/compat-port.ts';
import { collectHostFacts, setGroupInUseProbe } from '../../src/compat/preflight/collect.ts';
import { destinationFacts } from '../../src/compat/preflight/peer.ts';
import { parseHostFacts, HOST_FACTS_SCHEMA } from '../../src/compat/preflight/facts.ts';
import { preflightDomain, rewriteXml, DEFAULT_LINK_BYTES_PER_SEC, type PreflightDeps, type DomainInput } from '../../src/compat/preflight/run.ts';
import { readKernelConfig } from '../../src/compat/preflight/kernel-config.ts';
import { PREFLIGHT_SCHEMA, type PreflightReport } from '../../src/compat/preflight/types.ts';
import { domainView } from '../../src/compat/preflight/domain-view.ts';
import { setPreflightDeps } from '../../src/cli/preflight.ts';

const fake = installFakeSysfs(test);
const SRC = '0000:3b:00.2'; // the VM's mlx5 VF (held by the VM)
const PLAIN = '0000:3b:00.3'; // bound to plain vfio-pci
const DST = '0000:5e:00.2'; // a free compatible VF
const HISI = '0000:7a:00.1'; // another vendor: incompatible
fake.addDevice({ bdf: SRC, vendor: '15b3', device: '101e', driver: 'mlx5_vfio_pci', group: 30 });
fake.addDevice({ bdf: PLAIN, vendor: '15b3', device: '101e', driver: 'vfio-pci', group: 31 });
fake.addDevice({ bdf: DST, vendor: '15b3', device: '101e', driver: 'mlx5_vfio_pci', group: 32 });
fake.addDevice({ bdf: HISI, vendor: '19e5', device: 'a251', driver: 'hisi_acc_vfio_pci', group: 33 });
fake.addDevice({ bdf: '0000:00:1f.0', vendor: '8086', device: 'a1c8', driver: 'lpc_ich' }); // not VFIO: not listed
setGroupInUseProbe((g) => g === 30 || g === 33); // VMs hold the mlx5 VF and the hisi device

// Kernel config: /boot/config-<release> says CONFIG_IOMMUFD_DRIVER=y unless a test rewrites it.
const kdir = mkdtempSync(join(tmpdir(), 'vfio-mig-kcfg-'));
const RELEASE = '6.12.95+deb12-amd64';
mkdirSync(join(kdir, 'boot'));
mkdirSync(join(kdir, 'proc'));
Object.assign(process.env, { VFIO_MIG_BOOT: join(kdir, 'boot'), VFIO_MIG_PROC: join(kdir, 'proc'), VFIO_MIG_KERNEL_RELEASE: RELEASE });
const setIommufd = (on: boolean) => writeFileSync(join(kdir, 'boot', `config-${RELEASE}`), `CONFIG_VFIO=m\n${on ? 'CONFIG_IOMMUFD_DRIVER=y' : '# CONFIG_IOMMUFD_DRIVER is not set'}\n`);
setIommufd(true);
test.after.always(() => rmSync(kdir, { recursive: true, force: true }));

const caps: Record<string, CapabilityFact> = {
  [SRC]: { ok: true, flags: ['STOP_COPY', 'P2P', 'PRE_COPY'], stopCopyBytes: 4 * 1024 * 1024 },
  [DST]: { ok: true, flags: ['STOP_COPY', 'P2P', 'PRE_COPY'], stopCopyBytes: 4 * 1024 * 1024 },
  [HISI]: { ok: true, flags: ['STOP_COPY'], stopCopyBytes: 1024 },
};

// A fixed compatibility layer: same vendor and driver = compatible (the real one writes migration_version).
const identity = (id: string) => ({
  vendor: readFileSync(join(fake.sys, 'bus/pci/devices', id, 'vendor'), 'utf8').trim(),
  driver: fake.driverOf(id),
});
const compat: CompatPort = {
  async describeDevice(id) {
    return { id, kind: 'pci', ...identity(id) };
  },
  async checkCompatibility(source, target) {
    const t = identity(typeof target === 'string' ? target : target.parent);
    const s = source as { vendor: string; driver: string };
    if (s.vendor !== t.vendor) return { compatible: false, decidedBy: 'vendor', reason: `vendor ${t.vendor} differs`, errno: 'EINVAL' };
    if (s.driver !== t.driver) return { compatible: false, decidedBy: 'driver', reason: `driver ${t.driver} differs` };
    return { compatible: true, decidedBy: 'migration_version', reason: 'the driver accepted the source version' };
  },
  async readCapabilities(id) {
    return caps[id] ?? { ok: false, reason: `no capability cache entry for ${id}` };
  },
  async vendorFindings(source, destination) {
    const dst = (destination as { id?: string } | undefined)?.id ?? 'unknown';
    return (source as { vendor: string }).vendor === '0x15b3' ? [{ verdict: 'pass', check: 'mlx5-psid', advice: `PSID equal on ${(source as { id: string }).id} and ${dst}.` }] : [];
  },
  async embedMetadata(xml, descriptors) {
    const doc = DomainXml.parse(xml);
    writeMetadata(doc, { host: 'src', hostdevs: descriptors.map((d) => ({ alias: d.alias, type: d.type, address: d.address, descriptor: d.descriptor as Record<string, unknown> })) });
    return doc.serialize();
  },
  async readMetadata(xml) {
    return (readMetadata(DomainXml.parse(xml))?.hostdevs ?? []).map((e, index) => ({ ...e, index }));
  },
};
setCompatPort(compat);

const deps: PreflightDeps = {
  compat,
  localFacts: (queries, uri) => collectHostFacts({ compat, queries, ...(uri ? { libvirtUri: uri } : {}) }),
  destinationFacts: (req) => destinationFacts({ ...req, command: undefined }),
};

/** QEMU's answers to the queries preflight sends; anything else is refused (and recorded). */
class FakeQmp implements QmpExecutor {
  readonly sent: string[] = [];
  constructor(readonly replies: Record<string, unknown>) {}
  async execute(command: string): Promise<unknown> {
    this.sent.push(command);
    if (!(command in this.replies)) throw new QmpError(command, 'CommandNotFound', `The command ${command} has not been found`);
    return this.replies[command];
  }
}

const qemu = (over: Record<string, unknown> = {}): FakeQmp =>
  new FakeQmp({
    'query-version': { qemu: { major: 10, minor: 0, micro: 2 }, package: 'Debian 1:10.0.2+ds-2' },
    'query-migrate': {},
    'query-migrate-capabilities': [
      { capability: 'postcopy-ram', state: false },
      { capability: 'multifd', state: false },
      { capability: 'switchover-ack', state: false },
    ],
    'query-migrate-parameters': { 'downtime-limit': 300, 'avail-switchover-bandwidth': 0 },
    ...over,
  });

const liveXml = (devices: string[], extra = '') => `<domain type='kvm' id='3' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>vm1</name>
  <memory unit='KiB'>2097152</memory>
  <devices>
${devices
  .map(
    (bdf, i) => `    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source>
        <address domain='0x${bdf.slice(0, 4)}' bus='0x${bdf.slice(5, 7)}' slot='0x${bdf.slice(8, 10)}' function='0x${bdf.slice(11)}'/>
      </source>
      <alias name='hostdev${i}'/>
      <address type='pci' domain='0x0000' bus='0x07' slot='0x00' function='0x0'/>
    </hostdev>`,
  )
  .join('\n')}
  </devices>
${extra}</domain>
`;

const DEST_URI = 'qemu+unix:///system?socket=/run/nowhere/libvirt-sock';

function input(xml: string, q: FakeQmp | undefined, over: Partial<DomainInput> = {}): DomainInput {
  return {
    name: 'vm1',
    xml,
    running: q !== undefined,
    qmp: q,
    sourceLibvirt: { ok: true, value: '11.3.0' },
    destination: { uri: DEST_URI, libvirt: { ok: true, value: '11.3.0' }, qemu: { ok: true, value: '10.0.2' } },
    options: { postcopy: false, parallel: false, linkBytesPerSec: DEFAULT_LINK_BYTES_PER_SEC, linkAssumed: true },
    ...over,
  };
}

const verdicts = (r: PreflightReport) => Object.fromEntries(r.checks.map((c) => [`${c.id} ${c.subject}`, c.verdict]));

test.serial('a migratable domain passes every check; preflight sends QEMU queries only', async (t) => {
  const q = qemu();
  const { report, assignments } = await preflightDomain(input(liveXml([SRC]), q), deps);
  t.is(report.schema, PREFLIGHT_SCHEMA);
  t.deepEqual(report.checks.filter((c) => c.verdict !== 'pass'), []);
  t.is(report.verdict, 'pass');
  t.is(report.exitCode, 0);
  t.true(q.sent.every((c) => c.startsWith('query-')), q.sent.join(' '));
  t.deepEqual(assignments.map((a) => [a.alias, a.target]), [['hostdev0', DST]], 'the busy source device and the other vendor are not offered');
  t.like(assignments[0]!.descriptor, { id: DST, driver: 'mlx5_vfio_pci' }, 'the destination sent its device\'s descriptor');
  t.is(report.checks.find((c) => c.id === 'vendor-mlx5-psid')!.advice, `PSID equal on ${SRC} and ${DST}.`, 'vendor checks compare both ends');
  t.is(report.downtime!.deviceBytes, 4 * 1024 * 1024);
  t.true(report.downtime!.deviceMs > 3 && report.downtime!.deviceMs < 4, '4 MiB at 10 Gbit/s');
});

test.serial('plain vfio-pci, QEMU blockers, postcopy, no P2P: each its own failing check; exit 2', async (t) => {
  const q = qemu({
    'query-version': { qemu: { major: 8, minor: 1, micro: 5 }, package: '' },
    'query-migrate': { 'blocked-reasons': ['Multiple VFIO devices migration is supported only if all of them support P2P migration'] },
  });
  const { report } = await preflightDomain(input(liveXml([SRC, PLAIN, HISI]), q, { options: { postcopy: true, parallel: false, linkBytesPerSec: DEFAULT_LINK_BYTES_PER_SEC, linkAssumed: true } }), deps);
  const v = verdicts(report);
  t.is(v['qemu-version source'], 'fail', 'three devices on QEMU 8.1');
  t.is(v[`device-capability hostdev1 ${PLAIN}`], 'fail');
  t.is(v['multi-device-p2p domain'], 'fail');
  t.is(v['qemu-blockers source'], 'fail');
  t.is(v['postcopy source'], 'fail');
  t.is(v[`destination-device hostdev2 ${HISI}`], 'fail', 'the only hisi device is taken');
  t.regex(report.checks.find((c) => c.id === 'destination-device' && c.subject.includes(HISI))!.detail, /taken/);
  t.is(report.verdict, 'fail');
  t.is(report.exitCode, 2);
  const blocker = report.checks.find((c) => c.id === 'qemu-blockers')!;
  t.regex(blocker.advice, /P2P/);
});

test.serial('kernel without CONFIG_IOMMUFD_DRIVER, config unreadable, a pinned device that never converges', async (t) => {
  setIommufd(false);
  try {
    const edu = liveXml([HISI]);
    const { report } = await preflightDomain(input(edu, qemu()), deps);
    const v = verdicts(report);
    t.is(v[`dirty-tracking hostdev0 ${HISI}`], 'warn', 'a PCI driver without DMA logging: the type1 IOMMU tracks');
    t.is(v['pinned-convergence domain'], 'fail');
    t.is(v['downtime-prediction domain'], 'fail');
    // avail-switchover-bandwidth lets it switch over; the prediction then counts all 2 GiB of RAM.
    const fixed = await preflightDomain(input(edu, qemu({ 'query-migrate-parameters': { 'downtime-limit': 300, 'avail-switchover-bandwidth': 1 << 30 } })), deps);
    t.is(verdicts(fixed.report)['pinned-convergence domain'], 'pass');
    t.true(fixed.report.downtime!.ramMs > 1700, `${fixed.report.downtime!.ramMs} ms for 2 GiB at 10 Gbit/s`);
    t.is(verdicts(fixed.report)['downtime-prediction domain'], 'warn');
  } finally {
    setIommufd(true);
  }
  rmSync(join(kdir, 'boot', `config-${RELEASE}`));
  try {
    t.is(readKernelConfig().source, null);
    const { report } = await preflightDomain(input(liveXml([SRC]), qemu()), deps);
    t.is(verdicts(report)[`dirty-tracking hostdev0 ${SRC}`], 'warn', 'mlx5 does device dirty tracking; the config cannot be read');
    // /proc/config.gz is the fallback.
    writeFileSync(join(kdir, 'proc', 'config.gz'), gzipSync('CONFIG_IOMMUFD_DRIVER=y\n'));
    t.regex(readKernelConfig().source!, /config\.gz$/);
    t.is(verdicts((await preflightDomain(input(liveXml([SRC]), qemu()), deps)).report)[`dirty-tracking hostdev0 ${SRC}`], 'pass');
  } finally {
    rmSync(join(kdir, 'proc', 'config.gz'), { force: true });
    setIommufd(true);
  }
});

test.serial('downtime-limit below the device state at the link rate fails; the advice names the limit to set', async (t) => {
  const q = qemu({ 'query-migrate-parameters': { 'downtime-limit': 2 } });
  const { report } = await preflightDomain(input(liveXml([SRC]), q), deps);
  const c = report.checks.find((x) => x.id === 'downtime-limit')!;
  t.is(c.verdict, 'fail');
  t.regex(c.advice, /virsh migrate-setmaxdowntime DOMAIN \d+/);
});

test.serial('a destination libvirt that does not answer, and no destination facts, are reported', async (t) => {
  const noDest = input(liveXml([SRC]), qemu(), {
    destination: { uri: 'qemu+tcp://10.0.0.9/system', libvirt: { ok: false, error: 'unable to connect' }, qemu: { ok: false, error: 'unable to connect' } },
  });
  const { report } = await preflightDomain(noDest, deps);
  const v = verdicts(report);
  t.is(v['destination-libvirt destination'], 'fail');
  t.is(v['destination-facts destination'], 'warn');
  t.regex(report.checks.find((c) => c.id === 'destination-facts')!.detail, /--dest-facts/);
  t.is(v[`destination-device hostdev0 ${SRC}`], 'warn');
});

test.serial('a domain that is not running: its QEMU cannot be asked (warn), everything else is still checked', async (t) => {
  const { report } = await preflightDomain(input(liveXml([SRC]), undefined), deps);
  t.is(verdicts(report)['qemu-version source'], 'warn');
  t.is(report.verdict, 'warn');
  t.is(report.exitCode, 1);
});

test.serial('destination XML: the compatible device substituted, the descriptors embedded; --xml preflight of it on the destination passes', async (t) => {
  const xml = liveXml([SRC]);
  const result = await preflightDomain(input(xml, qemu()), deps);
  const out = await rewriteXml(xml, result, compat);
  t.deepEqual(out.notes, [`hostdev0: ${SRC} -> ${DST}`]);
  const doc = DomainXml.parse(out.xml);
  t.like(doc.hostdevs()[0], { pci: { domain: 0, bus: 0x5e, slot: 0, function: 2 }, guestPci: { bus: 7 } });
  t.like(readMetadata(doc)!.hostdevs[0], { address: SRC, alias: 'hostdev0' });
  // A persistent definition has no aliases: its entries carry none either.
  const inactive = await rewriteXml(xml.replace("      <alias name='hostdev0'/>\n", ''), result, compat);
  t.like(readMetadata(DomainXml.parse(inactive.xml))!.hostdevs[0], { address: SRC, alias: undefined });
  t.like(DomainXml.parse(inactive.xml).hostdevs()[0], { pci: { bus: 0x5e }, alias: undefined });
  const dir = mkdtempSync(join(tmpdir(), 'vfio-mig-pf-'));
  try {
    writeFileSync(join(dir, 'dest.xml'), out.xml);
    setPreflightDeps(deps);
    const r = await runCli(['preflight', '--xml', join(dir, 'dest.xml'), '--json']);
    const report = JSON.parse(r.out) as PreflightReport;
    t.is(report.schema, PREFLIGHT_SCHEMA);
    t.is(report.destination, 'local');
    t.is(verdicts(report)[`destination-device hostdev0 ${DST}`], 'pass');
    t.is(r.code, report.exitCode);
    // Without the metadata the XML's device is checked as it is, and the missing descriptor said.
    writeFileSync(join(dir, 'bare.xml'), liveXml([PLAIN]));
    const bare = await runCli(['preflight', '--xml', join(dir, 'bare.xml')]);
    t.is(bare.code, 2);
    t.regex(bare.out, /^VERDICT\s+CHECK\s+SUBJECT\s+FINDING/m);
    t.regex(bare.out, /WARN\s+source-descriptor\s+hostdev0 0000:3b:00\.3\s+the XML carries no vfio-mig descriptor/);
    t.regex(bare.out, /FAIL\s+device-capability\s+hostdev0 0000:3b:00\.3\s+0000:3b:00\.3 is bound to plain vfio-pci/);
    t.regex(bare.out, /^ {6}-> Bind it to its variant driver/m);
    t.regex(bare.out, /verdict: FAIL \(\d+ fail, \d+ warn, \d+ pass; exit 2\)/);
  } finally {
    setPreflightDeps(undefined);
    rmSync(dir, { recursive: true, force: true });
  }
});

test.serial('preflight usage errors exit 2', async (t) => {
  setPreflightDeps(deps);
  try {
    t.is((await runCli(['preflight'])).code, 2);
    t.regex((await runCli(['preflight', 'vm1'])).err, /--to <libvirt-uri> is required/);
    t.regex((await runCli(['preflight', 'vm1', '--to', DEST_URI, '--link-gbps', '0'])).err, /--link-gbps must be a number/);
    t.regex((await runCli(['preflight', '--xml', '/nonexistent.xml'])).err, /cannot read --xml/);
    // No source libvirt (or no libvirt0 at all): exit 2, one line, and with --json still a report.
    const r = await runCli(['preflight', 'vm1', '--to', DEST_URI, '--connect', 'qemu+unix:///system?socket=/nonexistent/libvirt-sock', '--json']);
    t.is(r.code, 2);
    t.regex(r.err, /^vfio-mig preflight: cannot reach the source's libvirt at qemu\+unix/);
    t.is(r.err.trim().split('\n').length, 1);
    const report = JSON.parse(r.out) as PreflightReport;
    t.like(report, { schema: PREFLIGHT_SCHEMA, verdict: 'fail', exitCode: 2, checks: [{ id: 'source-libvirt', verdict: 'fail' }] });
  } finally {
    setPreflightDeps(undefined);
  }
});

test.serial('host-facts --json: versioned facts that parse back; --sources answers compatibility per source device', async (t) => {
  const plain = await runCli(['host-facts', '--json']);
  t.is(plain.code, 0);
  const facts = parseHostFacts(plain.out);
  t.is(facts.schema, HOST_FACTS_SCHEMA);
  t.is(facts.kernel.release, RELEASE);
  t.true(facts.kernelConfig.iommufdDriver);
  t.deepEqual(facts.devices.map((d) => [d.id, d.driver, d.inUse]), [
    [SRC, 'mlx5_vfio_pci', true],
    [PLAIN, 'vfio-pci', false],
    [DST, 'mlx5_vfio_pci', false],
    [HISI, 'hisi_acc_vfio_pci', true],
  ]);
  const dir = mkdtempSync(join(tmpdir(), 'vfio-mig-pf-'));
  try {
    writeFileSync(join(dir, 'src.json'), JSON.stringify({ sources: [{ key: 'hostdev0', descriptor: await compat.describeDevice(SRC) }] }));
    const r = await runCli(['host-facts', '--json', '--sources', join(dir, 'src.json')]);
    const withAnswers = parseHostFacts(r.out);
    const a = withAnswers.compatibility[0]!;
    t.is(a.key, 'hostdev0');
    t.deepEqual(a.candidates.filter((c) => c.compatible && c.free).map((c) => c.target), [DST]);
    t.like(a.candidates.find((c) => c.target === HISI), { compatible: false, errno: 'EINVAL' });
    const table = await runCli(['host-facts', '--sources', join(dir, 'src.json')]);
    t.regex(table.out, /^DEVICE\s+IDS\s+DRIVER\s+IN USE\s+MIGRATION/m);
    t.regex(table.out, /compatible, free\s+0000:5e:00\.2/);
    writeFileSync(join(dir, 'bad.json'), '{"sources": [{"descriptor": {}}]}');
    t.not((await runCli(['host-facts', '--sources', join(dir, 'bad.json')])).code, 0);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test.serial('the real compatibility layer behind the port: descriptors, the compatibility verdict, the cache, vendors, metadata', async (t) => {
  const { loadCompat } = await import('../../src/compat/preflight/compat-port.ts');
  const real = await loadCompat();
  const d = (await real.describeDevice(SRC)) as { id: string; kind: string; driver: string };
  t.like(d, { id: SRC, kind: 'pci', driver: 'mlx5_vfio_pci' });
  const v = await real.checkCompatibility(d, DST);
  t.is(typeof v.compatible, 'boolean');
  t.true(v.decidedBy.length > 0, JSON.stringify(v));
  t.false((await real.checkCompatibility(d, HISI)).compatible, 'another vendor never is');
  const cap = await real.readCapabilities(SRC);
  t.false(cap.ok, 'nothing probed on this fake host');
  t.true(Array.isArray(await real.vendorFindings(d, undefined, { vmDevices: [d, { junk: true }] })));
  const xml = await real.embedMetadata(liveXml([SRC]), [{ alias: 'hostdev0', index: 0, type: 'pci', address: SRC, descriptor: d }]);
  const back = await real.readMetadata(xml);
  t.like(back[0], { alias: 'hostdev0', address: SRC, descriptor: { id: SRC } });
});

test.serial('destination XML for an mdev: pointed at the free mdev preflight assigned there, so the live and the persistent XML agree', async (t) => {
  const text = readFileSync(new URL('../fixtures/libvirt-xml/hostdev-mdev-display.xml', import.meta.url), 'utf8');
  const view = domainView(DomainXml.parse(text));
  const target = '83b8f4f2-509f-382f-3c1e-e6bfe0fa0002';
  const result = { assignments: [{ alias: view.hostdevs[0]!.alias, target }], view, descriptors: [] } as unknown as Parameters<typeof rewriteXml>[1];
  const out = await rewriteXml(text, result, compat);
  t.is(DomainXml.parse(out.xml).hostdevs()[0]!.mdevUuid, target);
  t.deepEqual(out.notes, [`${view.hostdevs[0]!.alias}: mdev 53764d0e-85a0-42b4-af5c-2046b460b1dc -> ${target}`]);
  // A destination that only offers to create one: the XML keeps the UUID and says so.
  const create = { ...result, assignments: [{ alias: view.hostdevs[0]!.alias, target: 'new mdev nvidia-35 on 0000:65:00.0' }] } as typeof result;
  const kept = await rewriteXml(text, create, compat);
  t.is(DomainXml.parse(kept.xml).hostdevs()[0]!.mdevUuid, '53764d0e-85a0-42b4-af5c-2046b460b1dc');
  t.regex(kept.notes[0]!, /create that mdev there under the same UUID/);
});
