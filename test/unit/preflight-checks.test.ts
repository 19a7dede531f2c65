// The preflight checks one by one: each failing verdict shown on the smallest input that
// causes it, next to the input that passes. Pure functions of what was gathered: domain
// XML, host facts, QEMU's answers.
import test from 'ava';
import { DomainXml } from '../../src/libvirt/domain-xml.ts';
import { domainView, type VfioHostdev } from '../../src/compat/preflight/domain-view.ts';
import { kernelVersionCheck, libvirtVersionCheck, qemuVersionCheck } from '../../src/compat/preflight/versions.ts';
import { deviceCapabilityCheck, p2pCheck } from '../../src/compat/preflight/devices.ts';
import { analysePinned, dirtyTrackingCheck, pinnedConvergenceCheck } from '../../src/compat/preflight/dirty-tracking.ts';
import type { Check } from '../../src/compat/preflight/types.ts';
import { downtimeChecks, type DowntimeInput } from '../../src/compat/preflight/downtime.ts';
import { blockersCheck, postcopyCheck } from '../../src/compat/preflight/qemu-checks.ts';
import { destinationDeviceChecks, factsCheck } from '../../src/compat/preflight/destination.ts';
import { capabilityFact, flagNames } from '../../src/compat/preflight/compat-port.ts';
import { HOST_FACTS_SCHEMA, type FactDevice, type HostFacts } from '../../src/compat/preflight/facts.ts';
import type { QemuFacts } from '../../src/compat/preflight/qmp-facts.ts';

const QEMU_NS = "xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'";

function domain(devices: string, extra = ''): string {
  return `<domain type='kvm' ${QEMU_NS}>
  <name>vm1</name>
  <memory unit='KiB'>1048576</memory>
  <devices>
${devices}
  </devices>
${extra}</domain>
`;
}

const pciHostdev = (bus: string, fn: number, alias: string, managed = 'yes') => `    <hostdev mode='subsystem' type='pci' managed='${managed}'>
      <source><address domain='0x0000' bus='0x${bus}' slot='0x00' function='0x${fn}'/></source>
      <alias name='${alias}'/>
    </hostdev>`;
const mdevHostdev = (uuid: string, alias: string) => `    <hostdev mode='subsystem' type='mdev' model='vfio-pci'>
      <source><address uuid='${uuid}'/></source>
      <alias name='${alias}'/>
    </hostdev>`;
const override = (alias: string, props: Record<string, string>) => `  <qemu:override>
    <qemu:device alias='${alias}'>
      <qemu:frontend>
${Object.entries(props).map(([k, v]) => `        <qemu:property name='${k}' type='string' value='${v}'/>`).join('\n')}
      </qemu:frontend>
    </qemu:device>
  </qemu:override>
`;

const UUID = '83b8f4f2-509f-382f-3c1e-e6bfe0fa0001';
const view = (xml: string) => domainView(DomainXml.parse(xml));
const one = (xml: string): VfioHostdev => view(xml).hostdevs[0]!;

function dev(id: string, driver: string, flags: string[] | null, stopCopyBytes: number | null = 4096): FactDevice {
  return {
    id,
    kind: id.includes('-') ? 'mdev' : 'pci',
    driver,
    iommuGroup: 10,
    inUse: true,
    capabilities: flags === null ? { ok: false, reason: 'no capability cache entry for ' + id } : { ok: true, flags, stopCopyBytes },
  };
}

// --- domain view ---------------------------------------------------------------------------

test('domain view: VFIO hostdevs, aliases, properties from <qemu:override> and <qemu:commandline>', (t) => {
  const xml = domain(
    [pciHostdev('3b', 2, 'hostdev0'), mdevHostdev(UUID, 'hostdev1'), "    <hostdev mode='subsystem' type='usb'><source><vendor id='0x1234'/><product id='0x0001'/></source></hostdev>"].join('\n'),
    override('hostdev1', { 'x-device-dirty-page-tracking': 'off', 'enable-migration': 'on' }) +
      "  <qemu:commandline>\n    <qemu:arg value='-set'/>\n    <qemu:arg value='device.hostdev0.x-pre-copy-dirty-page-tracking=off'/>\n  </qemu:commandline>\n",
  );
  const v = view(xml);
  t.is(v.memoryBytes, 1024 ** 3);
  t.deepEqual(v.hostdevs.map((h) => h.label), ['hostdev0 0000:3b:00.2', `hostdev1 ${UUID}`]);
  t.is(v.hostdevs[0]!.properties.get('x-pre-copy-dirty-page-tracking'), 'off');
  t.is(v.hostdevs[1]!.properties.get('enable-migration'), 'on');
  t.is(v.skipped.length, 1, 'the usb hostdev is not a VFIO device');
});

// --- versions ------------------------------------------------------------------------------

test('qemu-version: fail below 8.1, fail below 8.2 with several devices, pass at 10.0', (t) => {
  t.is(qemuVersionCheck('source', '8.0.5', undefined, 1).verdict, 'fail');
  t.regex(qemuVersionCheck('source', '8.0.5', undefined, 1).advice, /8\.1/);
  t.is(qemuVersionCheck('source', '8.1.0', undefined, 1).verdict, 'pass');
  const multi = qemuVersionCheck('destination', '8.1.3', undefined, 2);
  t.is(multi.verdict, 'fail');
  t.regex(multi.detail, /P2P/);
  t.is(qemuVersionCheck('source', '10.0.2', undefined, 2).verdict, 'pass');
  t.is(qemuVersionCheck('source', undefined, 'no QMP', 1).verdict, 'warn');
});

test('kernel-version: fail below 5.18 on either end', (t) => {
  const c = kernelVersionCheck('destination', '5.15.0-91-generic');
  t.is(c.verdict, 'fail');
  t.is(c.subject, 'destination');
  t.is(kernelVersionCheck('source', '6.12.95+deb12-amd64').verdict, 'pass');
  t.is(kernelVersionCheck('source', undefined, 'no facts').verdict, 'warn');
});

test('libvirt-version: below 8.6 fails with hostdevs; below 10 managed=yes fails, managed=no pre-bound passes', (t) => {
  const managed = [{ label: 'hostdev0 0000:3b:00.2', managed: true, driver: 'mlx5_vfio_pci', variantBound: true }];
  const unmanaged = [{ label: 'hostdev0 0000:3b:00.2', managed: false, driver: 'mlx5_vfio_pci', variantBound: true }];
  const unbound = [{ label: 'hostdev0 0000:3b:00.2', managed: false, driver: 'mlx5_core', variantBound: false }];
  t.is(libvirtVersionCheck('source', '8.0.0', undefined, unmanaged).verdict, 'fail');
  const m = libvirtVersionCheck('destination', '9.0.0', undefined, managed);
  t.is(m.verdict, 'fail');
  t.regex(m.advice, /managed='no'/);
  t.is(libvirtVersionCheck('source', '9.0.0', undefined, unbound).verdict, 'fail');
  t.is(libvirtVersionCheck('source', '9.0.0', undefined, unmanaged).verdict, 'pass');
  t.is(libvirtVersionCheck('source', '11.3.0', undefined, managed).verdict, 'pass');
  t.is(libvirtVersionCheck('source', '9.0.0', undefined, []).verdict, 'pass', 'no hostdevs: nothing to bind');
});

// --- devices -------------------------------------------------------------------------------

test('device-capability: absent, plain vfio-pci, no cache entry, no STOP_COPY fail; a variant driver with flags passes', (t) => {
  const h = one(domain(pciHostdev('3b', 2, 'hostdev0')));
  t.is(deviceCapabilityCheck(h, undefined).verdict, 'fail');
  const plain = deviceCapabilityCheck(h, dev('0000:3b:00.2', 'vfio-pci', null));
  t.is(plain.verdict, 'fail');
  t.regex(plain.detail, /plain vfio-pci/);
  const nocache = deviceCapabilityCheck(h, dev('0000:3b:00.2', 'mlx5_vfio_pci', null));
  t.is(nocache.verdict, 'fail');
  t.regex(nocache.advice, /vfio-mig bind/);
  t.is(deviceCapabilityCheck(h, dev('0000:3b:00.2', 'mlx5_vfio_pci', ['P2P'])).verdict, 'fail');
  const ok = deviceCapabilityCheck(h, dev('0000:3b:00.2', 'mlx5_vfio_pci', ['STOP_COPY', 'P2P', 'PRE_COPY'], 3 * 1024 * 1024));
  t.is(ok.verdict, 'pass');
  t.regex(ok.detail, /3\.0 MiB/);
});

test('multi-device-p2p: two devices, one without P2P, fails', (t) => {
  const v = view(domain([pciHostdev('3b', 2, 'hostdev0'), pciHostdev('3b', 3, 'hostdev1')].join('\n')));
  const bad = p2pCheck(v.hostdevs, [dev('0000:3b:00.2', 'x_vfio_pci', ['STOP_COPY', 'P2P']), dev('0000:3b:00.3', 'x_vfio_pci', ['STOP_COPY'])]);
  t.is(bad.verdict, 'fail');
  t.regex(bad.detail, /without P2P: hostdev1/);
  t.is(p2pCheck(v.hostdevs, [dev('0000:3b:00.2', 'x', ['STOP_COPY', 'P2P']), dev('0000:3b:00.3', 'x', ['STOP_COPY', 'P2P'])]).verdict, 'pass');
  t.is(p2pCheck(v.hostdevs.slice(0, 1), []).verdict, 'pass');
});

test('capability cache entries are read by flag bits, MIG_DATA_SIZE as a decimal string; a refused probe is not a capability', (t) => {
  t.deepEqual(flagNames(7), ['STOP_COPY', 'P2P', 'PRE_COPY']);
  t.deepEqual(capabilityFact({ ok: true, entry: { flags: 3, flagNames: ['STOP_COPY', 'P2P'], dataSize: '1048576' } }), { ok: true, flags: ['STOP_COPY', 'P2P'], stopCopyBytes: 1048576 });
  const refused = capabilityFact({ ok: true, entry: { flags: null, flagsError: 'ENOTTY' } });
  t.false(refused.ok);
  t.deepEqual(capabilityFact({ ok: false, reason: 'stale: srcversion changed' }), { ok: false, reason: 'stale: srcversion changed' });
});

// --- QEMU ----------------------------------------------------------------------------------

const qemuFacts = (over: Partial<QemuFacts> = {}): QemuFacts => ({
  version: { ok: true, value: '10.0.2' },
  migrate: { ok: true, value: {} },
  capabilities: { ok: true, value: {} },
  parameters: { ok: true, value: { 'downtime-limit': 300 } },
  ...over,
});

test('qemu-blockers: blocked-reasons fail with advice for the reason', (t) => {
  const c = blockersCheck(qemuFacts({ migrate: { ok: true, value: { 'blocked-reasons': [`${UUID}: VFIO device doesn't support device and IOMMU dirty tracking`] } } }));
  t.is(c.verdict, 'fail');
  t.regex(c.advice, /enable-migration=on/);
  t.is(blockersCheck(qemuFacts()).verdict, 'pass');
  t.is(blockersCheck(qemuFacts({ migrate: { ok: false, error: 'CommandNotFound' } })).verdict, 'warn');
});

test('postcopy: requested or enabled with VFIO devices fails', (t) => {
  t.is(postcopyCheck(qemuFacts(), true, 1).verdict, 'fail');
  t.is(postcopyCheck(qemuFacts({ capabilities: { ok: true, value: { 'postcopy-ram': true } } }), false, 1).verdict, 'fail');
  t.is(postcopyCheck(qemuFacts(), false, 1).verdict, 'pass');
  t.is(postcopyCheck(qemuFacts(), true, 0).verdict, 'pass', 'no VFIO device: postcopy is not ours to refuse');
});

// --- dirty tracking ------------------------------------------------------------------------

test('dirty-tracking: an mdev on a kernel without CONFIG_IOMMUFD_DRIVER fails; the two properties fix it; one alone fails', (t) => {
  const bare = one(domain(mdevHostdev(UUID, 'hostdev0')));
  const c = dirtyTrackingCheck(bare, false, dev(UUID, 'mtty', ['STOP_COPY', 'P2P', 'PRE_COPY']));
  t.is(c.verdict, 'fail');
  t.regex(c.detail, /lacks CONFIG_IOMMUFD_DRIVER/);
  t.regex(c.advice, /x-device-dirty-page-tracking=off and enable-migration=on/);
  t.is(dirtyTrackingCheck(bare, null, undefined).verdict, 'warn', 'config unreadable: cannot tell');
  t.is(dirtyTrackingCheck(bare, true, undefined).verdict, 'pass');
  const both = one(domain(mdevHostdev(UUID, 'hostdev0'), override('hostdev0', { 'x-device-dirty-page-tracking': 'off', 'enable-migration': 'on' })));
  t.is(dirtyTrackingCheck(both, false, undefined).verdict, 'pass');
  const half = one(domain(mdevHostdev(UUID, 'hostdev0'), override('hostdev0', { 'x-device-dirty-page-tracking': 'off' })));
  const h = dirtyTrackingCheck(half, false, undefined);
  t.is(h.verdict, 'fail');
  t.regex(h.detail, /migration blocker/);
});

test('pinned-convergence: a PCI device without dirty tracking never converges; either workaround passes', (t) => {
  const xml = domain(pciHostdev('00', 4, 'hostdev0'));
  const devices = [dev('0000:00:00.4', 'edu-vfio-pci', ['STOP_COPY', 'P2P'], 12)];
  const trap = analysePinned(view(xml).hostdevs, devices, false, undefined);
  const c = pinnedConvergenceCheck(trap);
  t.is(c.verdict, 'fail');
  t.regex(c.detail, /never converges/);
  t.is(pinnedConvergenceCheck(analysePinned(view(xml).hostdevs, devices, false, 1 << 30)).verdict, 'pass');
  const off = view(domain(pciHostdev('00', 4, 'hostdev0'), override('hostdev0', { 'x-pre-copy-dirty-page-tracking': 'off' })));
  t.is(pinnedConvergenceCheck(analysePinned(off.hostdevs, devices, false, undefined)).verdict, 'pass');
  // mlx5 with device dirty tracking on a kernel that has it: RAM is tracked, nothing pinned-dirty.
  const mlx = analysePinned(view(xml).hostdevs, [dev('0000:00:00.4', 'mlx5_vfio_pci', ['STOP_COPY', 'P2P', 'PRE_COPY'])], true, undefined);
  t.is(mlx.allDirty.length, 0);
  // mdevs behind an emulated IOMMU pin nothing.
  t.is(analysePinned(view(domain(mdevHostdev(UUID, 'hostdev0'))).hostdevs, [], false, undefined).allDirty.length, 0);
});

// --- downtime ------------------------------------------------------------------------------

function downtimeInput(over: Partial<DowntimeInput> = {}): DowntimeInput {
  const hostdevs = view(domain(pciHostdev('3b', 2, 'hostdev0'))).hostdevs;
  const devices = [dev('0000:3b:00.2', 'mlx5_vfio_pci', ['STOP_COPY', 'P2P', 'PRE_COPY'], 64 * 1024 * 1024)];
  return {
    hostdevs,
    devices,
    memoryBytes: 1024 ** 3,
    limitMs: 300,
    linkBytesPerSec: 1.25e9,
    linkAssumed: false,
    pinned: analysePinned(hostdevs, devices, true, undefined),
    qemuVersion: '10.0.2',
    capabilities: {},
    parallel: false,
    ...over,
  };
}

test('downtime-limit: device state larger than limit x link rate fails (never switches over), with the limit to set', (t) => {
  // 1 GiB of device state at 10 Gbit/s is ~859 ms, above a 300 ms limit.
  const inp = downtimeInput({ devices: [dev('0000:3b:00.2', 'mlx5_vfio_pci', ['STOP_COPY', 'P2P'], 1024 ** 3)] });
  const { checks, prediction } = downtimeChecks(inp);
  const limit = checks.find((c) => c.id === 'downtime-limit')!;
  t.is(limit.verdict, 'fail');
  t.regex(limit.advice, /migrate-setmaxdowntime DOMAIN \d+/);
  t.true(prediction.deviceMs > 800 && prediction.deviceMs < 900);
  // Raising the limit makes it pass; the prediction counts device state plus RAM.
  const ok = downtimeChecks({ ...inp, limitMs: 2000 });
  t.is(ok.checks.find((c) => c.id === 'downtime-limit')!.verdict, 'pass');
  t.is(ok.checks.find((c) => c.id === 'downtime-prediction')!.verdict, 'pass');
  t.is(ok.prediction.totalMs, 2000, 'RAM takes at most the rest of the limit');
});

test('downtime-prediction: a pinned device sends all guest RAM during downtime (above the limit: warn); unresolved trap: fail', (t) => {
  const hostdevs = view(domain(pciHostdev('00', 4, 'hostdev0'), override('hostdev0', { 'x-pre-copy-dirty-page-tracking': 'off' }))).hostdevs;
  const devices = [dev('0000:00:00.4', 'edu-vfio-pci', ['STOP_COPY', 'P2P'], 12)];
  const pinned = analysePinned(hostdevs, devices, false, undefined);
  const { checks, prediction } = downtimeChecks(downtimeInput({ hostdevs, devices, pinned }));
  t.true(prediction.ramMs > 800, '1 GiB of RAM at 10 Gbit/s');
  t.regex(prediction.ramBasis, /all guest RAM/);
  t.is(checks.find((c) => c.id === 'downtime-prediction')!.verdict, 'warn');
  const trap = downtimeChecks(downtimeInput({ hostdevs: view(domain(pciHostdev('00', 4, 'hostdev0'))).hostdevs, devices, pinned: analysePinned(view(domain(pciHostdev('00', 4, 'hostdev0'))).hostdevs, devices, false, undefined) }));
  t.is(trap.checks.find((c) => c.id === 'downtime-prediction')!.verdict, 'fail');
});

test('downtime levers: switchover-ack, PRE_COPY and multifd named when off; warn only when the budget is tight', (t) => {
  const relaxed = downtimeChecks(downtimeInput());
  const ack = relaxed.checks.find((c) => c.id === 'lever-switchover-ack')!;
  t.is(ack.verdict, 'pass');
  t.regex(ack.detail, /switchover-ack off: QEMU may switch over/);
  t.regex(relaxed.checks.find((c) => c.id === 'lever-multifd')!.detail, /multifd off/);
  // 128 MiB of non-PRE_COPY state: ~107 ms of a 150 ms limit.
  const tight = downtimeChecks(downtimeInput({ limitMs: 150, devices: [dev('0000:3b:00.2', 'hisi_acc_vfio_pci', ['STOP_COPY', 'P2P'], 128 * 1024 * 1024)] }));
  t.is(tight.checks.find((c) => c.id === 'lever-precopy')!.verdict, 'warn');
  t.is(tight.checks.find((c) => c.id === 'lever-multifd')!.verdict, 'warn');
  t.is(downtimeChecks(downtimeInput({ limitMs: 150, parallel: true, devices: [dev('0000:3b:00.2', 'x', ['STOP_COPY', 'P2P'], 128 * 1024 * 1024)] })).checks.find((c) => c.id === 'lever-multifd')!.verdict, 'pass');
  t.regex(downtimeChecks(downtimeInput({ qemuVersion: '9.2.0' })).checks.find((c) => c.id === 'lever-multifd')!.detail, /needs QEMU 10\.0/);
});

test('switchover-ack through libvirt: 11.3 negotiates it for the migration (off before it means nothing); older libvirt is judged by the capability in force', (t) => {
  // A PRE_COPY device and a tight budget, the capability off on the running QEMU.
  const tightPrecopy = { limitMs: 150, devices: [dev('0000:3b:00.2', 'x', ['STOP_COPY', 'P2P', 'PRE_COPY'], 128 * 1024 * 1024)], capabilities: { 'switchover-ack': false } };
  const ack = (libvirtVersion?: string): Check => downtimeChecks(downtimeInput({ ...tightPrecopy, libvirtVersion })).checks.find((c) => c.id === 'lever-switchover-ack')!;
  t.is(ack('11.3.0').verdict, 'pass');
  t.regex(ack('11.3.0').detail, /libvirt 11\.3\.0 turns it on .* unless it is --tunnelled/);
  t.is(ack('9.0.0').verdict, 'warn');
  t.regex(ack('9.0.0').detail, /older than 11\.3/);
  t.is(ack(undefined).verdict, 'warn', 'a bare QEMU: the capability in force is all there is');
});

// --- destination ---------------------------------------------------------------------------

function facts(compat: HostFacts['compatibility']): HostFacts {
  return {
    schema: HOST_FACTS_SCHEMA,
    hostname: 'dst',
    collectedAt: '',
    kernel: { release: '6.12.95' },
    kernelConfig: { source: null, iommufdDriver: null },
    libvirt: { version: null },
    qemu: { version: null },
    devices: [],
    compatibility: compat,
  };
}

test('destination-device: incompatible, all taken, none offered, no descriptor fail; a free compatible one passes and is used once', (t) => {
  const v = view(domain([pciHostdev('3b', 2, 'hostdev0'), pciHostdev('3b', 3, 'hostdev1')].join('\n')));
  const incompatible = destinationDeviceChecks(v.hostdevs.slice(0, 1), facts([{ key: 'hostdev0', candidates: [{ target: '0000:5e:00.2', free: true, compatible: false, decidedBy: 'migration_version', reason: 'the driver refused', errno: 'EINVAL' }] }]), new Map());
  t.is(incompatible.checks[0]!.verdict, 'fail');
  t.regex(incompatible.checks[0]!.detail, /the driver refused/);
  const taken = destinationDeviceChecks(v.hostdevs.slice(0, 1), facts([{ key: 'hostdev0', candidates: [{ target: '0000:5e:00.2', free: false, compatible: true, decidedBy: 'migration_version', reason: '' }] }]), new Map());
  t.regex(taken.checks[0]!.detail, /taken/);
  t.is(destinationDeviceChecks(v.hostdevs.slice(0, 1), facts([{ key: 'hostdev0', candidates: [] }]), new Map()).checks[0]!.verdict, 'fail');
  t.is(destinationDeviceChecks(v.hostdevs.slice(0, 1), facts([]), new Map([['hostdev0', 'no such device']])).checks[0]!.verdict, 'fail');
  t.is(destinationDeviceChecks(v.hostdevs.slice(0, 1), undefined, new Map()).checks[0]!.verdict, 'warn');
  // Two hostdevs, one free compatible device: the second finds it taken.
  const shared = [{ target: '0000:5e:00.2', free: true, compatible: true, decidedBy: 'migration_version', reason: '' }];
  const two = destinationDeviceChecks(v.hostdevs, facts([{ key: 'hostdev0', candidates: shared }, { key: 'hostdev1', candidates: shared }]), new Map());
  t.deepEqual(two.checks.map((c) => c.verdict), ['pass', 'fail']);
  t.deepEqual(two.assignments, [{ alias: 'hostdev0', target: '0000:5e:00.2' }]);
  t.is(factsCheck(undefined, 'none', 'ssh: Permission denied').verdict, 'warn');
});

test('device-capability: flag bits the uAPI does not define are named and warned about', (t) => {
  t.deepEqual(flagNames(0x19), ['STOP_COPY', 'UNKNOWN_0X18']);
  t.deepEqual(flagNames(['STOP_COPY', '0x8']), ['STOP_COPY', 'UNKNOWN_0X8']);
  const h = one(domain(pciHostdev('3b', 2, 'hostdev0')));
  const c = deviceCapabilityCheck(h, dev('0000:3b:00.2', 'x_vfio_pci', flagNames(0x9)));
  t.is(c.verdict, 'warn');
  t.regex(c.detail, /UNKNOWN_0X8/);
});
