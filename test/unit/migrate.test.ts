// vfio-mig migrate and enable-events, the parts that are plain functions: argument
// validation, the --downtime auto arithmetic, which preflight failures stop the migration
// and what --fix resolves, the XML edits (destination live XML, persistent XML, the trap
// fixes), and the verdict with its exit code from libvirt's result and the watch's
// analysis (the watch mocked at the function seam: a WatchResult built here).
import test from 'ava';
import { DomainXml } from '../../src/libvirt/domain-xml.ts';
import { downtimeAuto, EXIT, outcomeLines, parseMigrateArgs, planTraps, verdictOf, type MigrateOptions, type Outcome } from '../../src/cli/migrate.ts';
import { DIRTY_TRACKING_FIX, editDefinition, EVENTS_PROPERTY, PINNED_FIX, trapFixes } from '../../src/cli/enable-events.ts';
import { check, PREFLIGHT_SCHEMA, type Check, type PreflightReport } from '../../src/compat/preflight/types.ts';
import type { FactDevice } from '../../src/compat/preflight/facts.ts';
import type { Analysis } from '../../src/report/analysis.ts';
import type { WatchResult } from '../../src/cli/watch.ts';
import { runCli } from '../cli-harness.ts';
import { observeSwitchoverAck, switchoverAckLines, switchoverAckRefusalLine, switchoverAckRefusals, type SwitchoverAckInputs } from '../../src/cli/migrate-switchover.ts';
import type { QmpExecutor } from '../../src/qmp/commands.ts';

// --- arguments -----------------------------------------------------------------------------

const parse = (argv: string[]): MigrateOptions => {
  const r = parseMigrateArgs(argv, {});
  if (r === 'help') throw new Error('help');
  return r;
};

test('arguments: defaults', (t) => {
  const o = parse(['vm1', '--to', 'qemu+ssh://dst/system']);
  t.is(o.domain, 'vm1');
  t.is(o.from, 'qemu:///system');
  t.false(o.live);
  t.false(o.force);
  t.false(o.fix);
  t.is(o.downtime, undefined);
  t.is(o.linkBytesPerSec, 1.25e9);
  t.true(o.linkAssumed);
  t.is(o.timeoutMs, 1_800_000);
  t.false(o.switchoverAck);
  t.is(parseMigrateArgs(['vm1', '--to', 'x://y', '--help'], {}), 'help');
  t.is((parseMigrateArgs(['vm1', '--to', 'qemu+ssh://d/system'], { LIBVIRT_DEFAULT_URI: 'qemu+unix:///system?socket=/s' }) as MigrateOptions).from, 'qemu+unix:///system?socket=/s');
});

test('arguments: every option read', (t) => {
  const o = parse(['vm1', '--to', 'qemu+ssh://dst/system', '--from', 'qemu:///system', '--live', '--json', '--force', '--fix', '--downtime', '450', '--link-gbps', '25', '--timeline', '/tmp/t.json', '--report', '/tmp/r.svg', '--timeout', '90', '--migrate-uri', 'tcp://10.0.0.2', '--bandwidth', '100', '--undefine-source', '--switchover-ack']);
  t.like(o, { live: true, json: true, force: true, fix: true, downtime: 450, linkAssumed: false, timeline: '/tmp/t.json', report: '/tmp/r.svg', timeoutMs: 90_000, migrateUri: 'tcp://10.0.0.2', bandwidthMiB: 100, undefineSource: true, switchoverAck: true });
  t.is(o.linkBytesPerSec, 25e9 / 8);
  t.is(parse(['vm1', '--to', 'x://y', '--downtime', 'auto']).downtime, 'auto');
});

test('arguments: refused with a reason', (t) => {
  const bad: Array<[string[], RegExp]> = [
    [['--to', 'x://y'], /which domain/],
    [['vm1'], /--to <libvirt-uri> is required/],
    [['vm1', 'vm2', '--to', 'x://y'], /unexpected argument "vm2"/],
    [['vm1', '--to', 'qemu:///system', '--from', 'qemu:///system'], /same URI/],
    [['vm1', '--to', 'x://y', '--downtime', 'fast'], /--downtime must be an integer/],
    [['vm1', '--to', 'x://y', '--downtime', '0'], /--downtime must be/],
    [['vm1', '--to', 'x://y', '--downtime', '1.5'], /--downtime must be an integer/],
    [['vm1', '--to', 'x://y', '--downtime', '2000001'], /at most 2000000/],
    [['vm1', '--to', 'x://y', '--link-gbps', '-1'], /--link-gbps/],
    [['vm1', '--to', 'x://y', '--timeout', '0'], /--timeout/],
    [['vm1', '--to', 'x://y', '--report', 'out.png'], /SVG file/],
    [['vm1', '--to', 'x://y', '--timeline', 'a.svg', '--report', 'a.svg'], /same file/],
    [['vm1', '--to', 'x://y', '--migrate-uri', '10.0.0.2'], /--migrate-uri must be a URI/],
    [['vm1', '--to', 'x://y', '--bandwidth', '1.5'], /--bandwidth must be an integer/],
    [['vm1', '--to', 'x://y', '--to', 'z://w'], /--to given more than once/],
    [['vm1', '--to', 'x://y', '--postcopy'], /unknown option --postcopy/],
    [['vm1', '--to', 'x://y', '--live=yes'], /--live takes no value/],
    [['vm1', '--to', 'x://y', '--switchover-ack=on'], /--switchover-ack takes no value/],
  ];
  for (const [argv, re] of bad) t.throws(() => parseMigrateArgs(argv, {}), { name: 'UsageError', message: re }, argv.join(' '));
});

test('the CLI: usage errors exit 2 with the usage; --help is the full page', async (t) => {
  const r = await runCli(['migrate', 'vm1']);
  t.is(r.code, 2);
  t.regex(r.err, /--to <libvirt-uri> is required/);
  t.regex(r.err, /usage: vfio-mig migrate <domain> --to <libvirt-uri>/);
  const h = await runCli(['migrate', '--help']);
  t.is(h.code, 0);
  for (const s of ['--downtime V', 'auto ', 'dirty-tracking', 'pinned-convergence', 'enable-events', 'exit codes:', '4 time limit reached', '--switchover-ack', 'custom-monitor', 'libvirt >= 11.3']) t.true(h.out.includes(s), s);
  const e = await runCli(['enable-events', '--help']);
  t.is(e.code, 0);
  t.regex(e.out, /next start/);
  t.is((await runCli(['enable-events'])).code, 2);
  const top = await runCli(['--help']);
  t.regex(top.out, /vfio-mig migrate <domain> --to URI/);
  t.regex(top.out, /vfio-mig enable-events <domain>/);
});

// --- --downtime auto ---------------------------------------------------------------------

test('downtime auto: small device state at 10 Gbit/s fits QEMU\'s 300 ms: kept, and the derivation says why', (t) => {
  const d = downtimeAuto({ deviceBytes: 4 * 1048576, unknownDevices: [], ramBytes: 0, rateBytesPerSec: 1.25e9, rateSource: 'assumed', currentLimitMs: 300 });
  // 4 MiB / 1.25 GB/s = 3.36 ms; x1.25 + 50 = 54.2 -> 55
  t.is(d.limitMs, 300);
  t.false(d.change);
  t.is(d.derivation, 'devices 4.0 MiB (MIG_DATA_SIZE estimates) at 1.25 GB/s (assumed 10 Gbit/s; --link-gbps) = 3.4 ms; x1.25 + 50 ms = 55 ms; the limit in force (300 ms) covers it: kept');
});

test('downtime auto: large device state raises the limit', (t) => {
  const d = downtimeAuto({ deviceBytes: 400 * 1048576, unknownDevices: ['hostdev1 0000:3b:00.3'], ramBytes: 0, rateBytesPerSec: 1.25e9, rateSource: 'given', currentLimitMs: 300 });
  // 419430400 / 1.25e9 = 335.54 ms; x1.25 = 419.43 + 50 = 469.43 -> 470
  t.is(d.limitMs, 470);
  t.true(d.change);
  t.regex(d.derivation, /^devices 400 MiB \(MIG_DATA_SIZE estimates; none for hostdev1 0000:3b:00\.3\) at 1\.25 GB\/s \(--link-gbps\) = 335\.5 ms; x1\.25 \+ 50 ms = 470 ms; raised from 300 ms$/);
});

test('downtime auto: guest RAM counts when it moves while stopped; a measured rate is named', (t) => {
  const d = downtimeAuto({ deviceBytes: 1e6, unknownDevices: [], ramBytes: 1024 * 1048576, rateBytesPerSec: 100e6, rateSource: 'measured', currentLimitMs: 300 });
  // (1e6 + 1073741824) / 1e8 = 10.7474 s; x1.25 = 13434.3 + 50 -> 13485
  t.is(d.limitMs, 13485);
  t.regex(d.derivation, /guest RAM 1\.0 GiB \(moves while stopped\) at 100\.0 MB\/s \(QEMU's measured throughput\)/);
  t.throws(() => downtimeAuto({ deviceBytes: 1, unknownDevices: [], ramBytes: 0, rateBytesPerSec: 0, rateSource: 'given', currentLimitMs: 300 }), { instanceOf: RangeError });
  // Never above QEMU's maximum.
  t.is(downtimeAuto({ deviceBytes: 1e12, unknownDevices: [], ramBytes: 0, rateBytesPerSec: 1e3, rateSource: 'given', currentLimitMs: 300 }).limitMs, 2_000_000);
});

// --- traps -------------------------------------------------------------------------------

function report(checks: Check[]): PreflightReport {
  return { schema: PREFLIGHT_SCHEMA, domain: 'vm1', destination: 'qemu+ssh://d/system', verdict: checks.some((c) => c.verdict === 'fail') ? 'fail' : 'pass', exitCode: 0, checks };
}
const pass = (id: string, detail = 'fine') => check(id, 'versions', 'source', 'pass', detail, 'Nothing to do.');
const fail = (id: string, subject = 'domain') => check(id, 'dirty-tracking', subject, 'fail', `${id} failed`, `fix ${id}`);
const opts = (over: Partial<MigrateOptions> = {}) => ({ domain: 'vm1', fix: false, downtime: undefined, linkBytesPerSec: 1.25e9, ...over });

test('traps: nothing failed, nothing to do', (t) => {
  const p = planTraps(report([pass('qemu-version'), pass('pinned-convergence')]), opts());
  t.deepEqual(p, { blocking: [], availSwitchoverBandwidth: undefined, ramInLimit: false, needsLimit: false, remedies: [] });
});

test('traps: dirty tracking blocks even with --fix (a property of the running QEMU) and names enable-events --fix and a restart', (t) => {
  for (const fix of [false, true]) {
    const p = planTraps(report([fail('dirty-tracking', 'hostdev0 0000:3b:00.2')]), opts({ fix }));
    t.deepEqual(p.blocking.map((c) => c.id), ['dirty-tracking']);
    t.regex(p.remedies[0]!, /^hostdev0 0000:3b:00\.2: needs x-device-dirty-page-tracking=off and enable-migration=on.*vfio-mig enable-events vm1 --fix", shut vm1 down and start it/);
  }
});

test('traps: the pinned device blocks without --fix; --fix sets avail-switchover-bandwidth and a limit holding RAM, and the no-switchover prediction goes with it', (t) => {
  const checks = [fail('pinned-convergence'), fail('downtime-prediction')];
  const without = planTraps(report(checks), opts());
  t.deepEqual(without.blocking.map((c) => c.id), ['pinned-convergence', 'downtime-prediction']);
  t.is(without.availSwitchoverBandwidth, undefined);
  t.regex(without.remedies[0]!, /--fix does both/);
  const withFix = planTraps(report(checks), opts({ fix: true, linkBytesPerSec: 1e9 }));
  t.deepEqual(withFix.blocking, []);
  t.is(withFix.availSwitchoverBandwidth, 1e9);
  t.true(withFix.ramInLimit);
  t.true(withFix.needsLimit);
  // The prediction failing on its own (no pinned trap) still blocks with --fix.
  t.deepEqual(planTraps(report([fail('downtime-prediction')]), opts({ fix: true })).blocking.map((c) => c.id), ['downtime-prediction']);
});

test('traps: an avail-switchover-bandwidth already in force counts all RAM against the limit', (t) => {
  const p = planTraps(report([pass('pinned-convergence', 'pinned devices (hostdev0 x); avail-switchover-bandwidth=1000 B/s lets QEMU switch over')]), opts());
  t.true(p.ramInLimit);
  t.deepEqual(p.blocking, []);
});

test('traps: the downtime limit is resolved by --downtime auto, --fix or a large enough --downtime MS', (t) => {
  const r = report([fail('downtime-limit')]);
  t.deepEqual(planTraps(r, opts(), 470).blocking.map((c) => c.id), ['downtime-limit']);
  t.regex(planTraps(r, opts(), 470).remedies[0]!, /at least 470 ms/);
  t.true(planTraps(r, opts({ downtime: 'auto' }), 470).needsLimit);
  t.deepEqual(planTraps(r, opts({ downtime: 'auto' }), 470).blocking, []);
  t.deepEqual(planTraps(r, opts({ fix: true }), 470).blocking, []);
  t.deepEqual(planTraps(r, opts({ downtime: 400 }), 470).blocking.map((c) => c.id), ['downtime-limit']);
  t.deepEqual(planTraps(r, opts({ downtime: 500 }), 470).blocking, []);
});

test('traps: any other failed check blocks, --fix or not', (t) => {
  for (const id of ['qemu-version', 'device-capability', 'destination-device', 'qemu-blockers', 'destination-libvirt']) {
    t.deepEqual(planTraps(report([fail(id)]), opts({ fix: true, downtime: 'auto' })).blocking.map((c) => c.id), [id]);
  }
});

// --- XML edits ---------------------------------------------------------------------------

const QEMU_NS = 'http://libvirt.org/schemas/domain/qemu/1.0';
const LIVE = `<domain type='kvm' id='3'>
  <name>vm1</name>
  <!-- kept -->
  <memory unit='KiB'>1048576</memory>
  <devices>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source>
        <address domain='0x0000' bus='0x3b' slot='0x00' function='0x2'/>
      </source>
      <alias name='hostdev0'/>
      <address type='pci' domain='0x0000' bus='0x06' slot='0x00' function='0x0'/>
    </hostdev>
    <hostdev mode='subsystem' type='usb' managed='yes'>
      <source><vendor id='0x1234'/><product id='0xbeef'/></source>
      <alias name='hostdev1'/>
    </hostdev>
  </devices>
</domain>
`;
// The same domain's persistent definition: no aliases.
const PERSISTENT = LIVE.replace(" id='3'", '').replace(/\n +<alias name='hostdev[01]'\/>/g, '');

/** The document with the override block and the namespace declaration taken out again. */
function withoutOverride(xml: string): string {
  return xml.replace(/\n {2}<qemu:override>[\s\S]*<\/qemu:override>/, '').replace(` xmlns:qemu='${QEMU_NS}'`, '');
}

test('editDefinition, live XML: migration-events=on on the VFIO hostdev by its alias; the usb hostdev and the rest byte for byte', (t) => {
  const r = editDefinition(LIVE, { events: true, fixes: new Map(), addUserAliases: false });
  t.true(r.changed);
  t.deepEqual(r.changes, ['hostdev0 0000:3b:00.2: migration-events=on (per-device migration events)']);
  const doc = DomainXml.parse(r.xml);
  t.deepEqual(doc.qemuDeviceProperties('hostdev0'), [{ name: 'migration-events', type: 'bool', value: 'true' }]);
  t.deepEqual(doc.qemuDeviceProperties('hostdev1'), []);
  t.is(withoutOverride(r.xml), LIVE);
  // Idempotent: a second pass finds it set and returns the input untouched.
  const again = editDefinition(r.xml, { events: true, fixes: new Map(), addUserAliases: false });
  t.false(again.changed);
  t.is(again.xml, r.xml);
});

test('editDefinition, persistent XML: a hostdev without alias gets ua-hostdev0, indented like its siblings, and the override names it', (t) => {
  const r = editDefinition(PERSISTENT, { events: true, fixes: new Map([[0, [...DIRTY_TRACKING_FIX, PINNED_FIX]]]), addUserAliases: true });
  t.is(r.changes[0], 'ua-hostdev0 0000:3b:00.2: alias ua-hostdev0 added (a persistent definition keeps only user aliases; <qemu:override> needs one)');
  t.true(r.xml.includes("      </source>\n      <address type='pci' domain='0x0000' bus='0x06' slot='0x00' function='0x0'/>\n      <alias name='ua-hostdev0'/>\n    </hostdev>"));
  const doc = DomainXml.parse(r.xml);
  t.is(doc.hostdevs()[0]!.alias, 'ua-hostdev0');
  t.is(doc.hostdevs()[1]!.alias, undefined, 'the usb hostdev is not VFIO: left alone');
  t.deepEqual(
    doc.qemuDeviceProperties('ua-hostdev0').map((p) => `${p.name}=${p.value}`),
    ['migration-events=true', 'x-device-dirty-page-tracking=off', 'enable-migration=on', 'x-pre-copy-dirty-page-tracking=off'],
  );
  t.is(withoutOverride(r.xml).replace("\n      <alias name='ua-hostdev0'/>", ''), PERSISTENT);
  // The alias is now there: a second pass adds nothing.
  t.false(editDefinition(r.xml, { events: true, fixes: new Map([[0, DIRTY_TRACKING_FIX]]), addUserAliases: true }).changed);
});

test('editDefinition: an alias already taken elsewhere is not reused; existing user aliases are', (t) => {
  const clash = PERSISTENT.replace('<devices>', "<devices>\n    <controller type='usb' model='none'><alias name='ua-hostdev0'/></controller>");
  const r = editDefinition(clash, { events: true, fixes: new Map(), addUserAliases: true });
  t.is(DomainXml.parse(r.xml).hostdevs()[0]!.alias, 'ua-hostdev0-1');
  const own = LIVE.replace("<alias name='hostdev0'/>", "<alias name='ua-nic'/>");
  const r2 = editDefinition(own, { events: true, fixes: new Map(), addUserAliases: true });
  t.deepEqual(r2.changes, ['ua-nic 0000:3b:00.2: migration-events=on (per-device migration events)']);
});

test('editDefinition: a property set already, in another spelling or by <qemu:commandline>, counts as set', (t) => {
  const set = LIVE.replace('<domain ', `<domain xmlns:qemu='${QEMU_NS}' `).replace(
    '</domain>',
    "  <qemu:commandline>\n    <qemu:arg value='-set'/>\n    <qemu:arg value='device.hostdev0.migration-events=on'/>\n  </qemu:commandline>\n</domain>",
  );
  t.false(editDefinition(set, { events: true, fixes: new Map(), addUserAliases: false }).changed);
  // events off and no fixes: nothing to do at all.
  t.false(editDefinition(LIVE, { events: false, fixes: new Map(), addUserAliases: true }).changed);
  t.is(EVENTS_PROPERTY.name, 'migration-events');
});

// --- trap fixes from host facts --------------------------------------------------------------

const fact = (id: string, driver: string): FactDevice => ({ id, kind: 'pci', driver, iommuGroup: 1, inUse: true, capabilities: { ok: true, flags: ['STOP_COPY', 'P2P'], stopCopyBytes: 4096 } });
const names = (m: Map<number, { name: string }[]>) => [...m.entries()].map(([i, ps]) => `${i}:${ps.map((p) => p.name).join(',')}`);

test('trapFixes: a DMA-logging driver on a kernel without CONFIG_IOMMUFD_DRIVER gets both fixes; with it, none', (t) => {
  t.deepEqual(names(trapFixes(LIVE, false, [fact('0000:3b:00.2', 'mlx5_vfio_pci')])), ['0:x-device-dirty-page-tracking,enable-migration,x-pre-copy-dirty-page-tracking']);
  // With CONFIG_IOMMUFD_DRIVER the device tracks its own dirty pages: nothing is needed.
  t.deepEqual(names(trapFixes(LIVE, true, [fact('0000:3b:00.2', 'mlx5_vfio_pci')])), []);
  // Another driver on a kernel with the option: the IOMMU (type1) pins all RAM: the pinned fix only.
  t.deepEqual(names(trapFixes(LIVE, true, [fact('0000:3b:00.2', 'edu-vfio-pci')])), ['0:x-pre-copy-dirty-page-tracking']);
});

test('trapFixes: properties already in the XML are not proposed again', (t) => {
  const fixed = editDefinition(LIVE, { events: false, fixes: new Map([[0, [...DIRTY_TRACKING_FIX, PINNED_FIX]]]), addUserAliases: false }).xml;
  t.deepEqual(names(trapFixes(fixed, false, [fact('0000:3b:00.2', 'mlx5_vfio_pci')])), []);
});

// --- verdict and exit codes (the watch mocked: its result built here) ------------------------

function analysis(over: Partial<Analysis>): Analysis {
  return {
    origin: 'watch',
    verdict: 'ok',
    reason: 'every device went through its states in order',
    status: 'completed',
    devices: [{ id: 'hostdev0', source: ['running', 'running-p2p', 'stop-copy', 'stop'], destination: ['resuming', 'running-p2p', 'running'], final: { source: 'stop', destination: 'running' } }],
    violations: [],
    phases: [],
    events: { stopToResumeMs: 42.04, downtimeBoundMs: 30.5, passes: 3 },
    qemu: { downtimeMs: 55 },
    notes: [],
    ...over,
  };
}
const watched = (a: Analysis): WatchResult => ({ record: {} as WatchResult['record'], analysis: a, notes: [], timedOut: false });

test('verdict: migrated and watched ok -> ok, exit 0; the downtime parts and the files listed', (t) => {
  const o: Outcome = { migrated: true, watch: watched(analysis({})), sourceState: 'shutoff', destinationState: 'running' };
  t.deepEqual(verdictOf(o), { verdict: 'ok', exitCode: EXIT.OK });
  const lines = outcomeLines(o, { domain: 'vm1', predicted: { deviceMs: 3.4, ramMs: 296.6, totalMs: 300, limitMs: 300, linkBytesPerSec: 1.25e9, deviceBytes: 4194304, unknownDevices: [], ramBasis: 'x' }, limitMs: 300, timeline: '/t.json', report: '/t.svg' });
  t.deepEqual(lines, [
    'verdict: ok - vm1 runs on the destination (running)',
    'downtime:',
    '  predicted:        ~300 ms (devices 3.4 ms + RAM 296.6 ms; 4.0 MiB of device state at 1.25 GB/s)',
    '  limit:            300 ms',
    "  QEMU's figure:    55 ms",
    '  STOP -> RESUME:   42 ms',
    '  events bound:     30.5 ms',
    'timeline: /t.json',
    'report: /t.svg',
  ]);
});

test('verdict: migrated but an ordering rule broken -> violated, exit 5', (t) => {
  const o: Outcome = { migrated: true, watch: watched(analysis({ verdict: 'violated', reason: 'hostdev0 stopped before every device was in P2P' })), destinationState: 'running' };
  t.deepEqual(verdictOf(o), { verdict: 'violated', exitCode: 5 });
  t.is(outcomeLines(o, { domain: 'vm1' })[0], 'verdict: violated - vm1 runs on the destination (running); hostdev0 stopped before every device was in P2P');
});

test('verdict: libvirt failed -> failed, exit 1: the device, the phase, QEMU\'s error and where the source devices were left', (t) => {
  const a = analysis({
    verdict: 'failed',
    status: 'failed',
    failure: { phase: 'setup', devices: ['hostdev0'], detail: 'the migration failed during setup' },
    phases: [{ name: 'setup', side: 'source', start: 0, end: 12 }],
    qemu: { errorDesc: 'vfio 0000:3b:00.2: Failed to start DMA logging, err -95 (Operation not supported)' },
    devices: [{ id: 'hostdev0', source: ['running'], destination: [], final: { source: 'running', destination: 'running' } }],
  });
  const o: Outcome = { migrated: false, libvirtError: 'virDomainMigrateToURI3 vm1: operation failed: job migration out failed', watch: watched(a), sourceState: 'running' };
  t.deepEqual(verdictOf(o), { verdict: 'failed', exitCode: 1 });
  const lines = outcomeLines(o, { domain: 'vm1' });
  t.deepEqual(lines.slice(0, 5), [
    'verdict: failed - the migration failed; vm1 is running on the source',
    'libvirt: virDomainMigrateToURI3 vm1: operation failed: job migration out failed',
    'failed in phase setup, device hostdev0: the migration failed during setup',
    'QEMU reported: vfio 0000:3b:00.2: Failed to start DMA logging, err -95 (Operation not supported)',
    'source devices left in: hostdev0 running',
  ]);
});

test('verdict: aborted at the time limit -> timeout, exit 4; not watched -> device states unknown', (t) => {
  const o: Outcome = { migrated: false, aborted: 'timeout', libvirtError: 'operation aborted: migration out job: canceled by client', sourceState: 'running', watchError: 'this build has no libvirt watch' };
  t.deepEqual(verdictOf(o), { verdict: 'timeout', exitCode: 4 });
  const lines = outcomeLines(o, { domain: 'vm1' });
  t.is(lines[0], 'verdict: timeout - the time limit was reached and the migration aborted; vm1 is running on the source');
  t.true(lines.includes('source devices left in: unknown (not watched)'));
  t.true(lines.includes('watch: this build has no libvirt watch'));
  // An interrupt is a failure, not a time limit.
  t.deepEqual(verdictOf({ migrated: false, aborted: 'interrupted' }), { verdict: 'failed', exitCode: 1 });
  // A migration that completed despite a late abort counts as done.
  t.deepEqual(verdictOf({ migrated: true, aborted: 'timeout' }), { verdict: 'ok', exitCode: 0 });
});

test('verdict: watched without device events says migration-events is off; a domain without hostdevs says so', (t) => {
  const o: Outcome = { migrated: false, watch: watched(analysis({ verdict: 'failed', devices: [], phases: [{ name: 'iteration', side: 'source', start: 0, end: 5 }] })), sourceState: 'running' };
  t.true(outcomeLines(o, { domain: 'vm1' }).includes('source devices left in: unknown (no VFIO_MIGRATION events; migration-events is off on the source)'));
  t.true(outcomeLines(o, { domain: 'vm1', hostdevs: 0 }).includes('source devices: none (the domain has no VFIO hostdevs)'));
});

test('verdict: refused before QEMU began (no phase, no RAM sent): said instead of a phase', (t) => {
  const a = analysis({ verdict: 'failed', status: 'unknown', devices: [], phases: [], failure: { phase: 'unknown', devices: [], detail: 'the migration did not finish while watched' } });
  const lines = outcomeLines({ migrated: false, libvirtError: "operation failed: domain 'vm1' already exists with uuid ...", watch: watched(a), sourceState: 'running' }, { domain: 'vm1', hostdevs: 0 });
  t.true(lines.includes('QEMU had not started migrating: nothing on the source was touched'));
  t.false(lines.some((l) => l.startsWith('failed in phase')));
  // QEMU had sent RAM though no phase was recorded: the phase line stays.
  const begun = analysis({ verdict: 'failed', status: 'failed', devices: [], phases: [], qemu: { totalTimeMs: 1679, ramTransferred: 4096 }, failure: { phase: 'setup', devices: [], detail: 'the migration failed in the setup phase' } });
  const l2 = outcomeLines({ migrated: false, aborted: 'timeout', watch: watched(begun), sourceState: 'running' }, { domain: 'vm1', hostdevs: 0 });
  t.true(l2.includes('failed in phase setup: the migration failed in the setup phase'));
});

// --- --switchover-ack: the gate before the start ----------------------------------------------

const ok = <T>(value: T) => ({ ok: true as const, value });
const inputs = (over: Partial<SwitchoverAckInputs> = {}): SwitchoverAckInputs => ({
  sourceLibvirt: ok('11.3.0'),
  destinationLibvirt: ok('11.3.0'),
  sourceQemu: ok('10.0.2'),
  destinationQemu: ok('10.0.2'),
  sourceCapabilities: ok(['xbzrle', 'return-path', 'switchover-ack', 'events']),
  ...over,
});

test('switchover-ack gate: libvirt 11.3 and QEMU 10 on both ends, the capability known: no reason to refuse', (t) => {
  t.deepEqual(switchoverAckRefusals(inputs()), []);
  t.deepEqual(switchoverAckRefusals(inputs({ sourceLibvirt: ok('12.0.0'), destinationQemu: ok('8.1.0') })), []);
});

test('switchover-ack gate: libvirt older than 11.3 on either side is refused, naming the side and the version', (t) => {
  const src = switchoverAckRefusals(inputs({ sourceLibvirt: ok('11.2.0') }));
  t.is(src.length, 1);
  t.regex(src[0]!, /^the source runs libvirt 11\.2\.0, older than 11\.3: libvirt 11\.3 or later negotiates switchover-ack itself/);
  const dst = switchoverAckRefusals(inputs({ destinationLibvirt: ok('9.0.0') }));
  t.is(dst.length, 1);
  t.regex(dst[0]!, /^the destination runs libvirt 9\.0\.0, older than 11\.3/);
  t.deepEqual(switchoverAckRefusals(inputs({ sourceLibvirt: ok('10.10.0'), destinationLibvirt: ok('11.2.9') })).map((r) => r.split(',')[0]), ['the source runs libvirt 10.10.0', 'the destination runs libvirt 11.2.9']);
  // A version that could not be asked is no pass.
  t.regex(switchoverAckRefusals(inputs({ destinationLibvirt: { ok: false, error: 'cannot connect' } }))[0]!, /^the destination's libvirt version is unknown \(cannot connect\)/);
  t.regex(switchoverAckRefusalLine(src), /^--switchover-ack cannot be met: the source runs libvirt 11\.2\.0.*See docs\/performance\.md/);
});

test('switchover-ack gate: a QEMU without the capability (older than 8.1, or not listing it) is refused', (t) => {
  t.regex(switchoverAckRefusals(inputs({ destinationQemu: ok('8.0.4') }))[0]!, /^the destination runs QEMU 8\.0\.4, older than 8\.1: QEMU 8\.1 or later has the switchover-ack capability/);
  const old = switchoverAckRefusals(inputs({ sourceQemu: ok('7.2.0'), sourceCapabilities: ok(['xbzrle', 'return-path']) }));
  t.deepEqual(old, ['the source runs QEMU 7.2.0, older than 8.1: QEMU 8.1 or later has the switchover-ack capability', 'the source QEMU does not know the switchover-ack capability (query-migrate-capabilities)']);
  t.deepEqual(switchoverAckRefusals(inputs({ sourceCapabilities: undefined })), ["the source QEMU's migration capabilities were not asked: whether it knows switchover-ack is unknown"]);
  t.deepEqual(switchoverAckRefusals(inputs({ sourceQemu: undefined })), ["the source's QEMU version is unknown (not asked): QEMU 8.1 or later has the switchover-ack capability"]);
});

// --- --switchover-ack: the observation during the migration ----------------------------------

/** A source QEMU whose query-migrate walks through `statuses` (the last repeats), with `caps` on. */
function fakeSource(statuses: string[], caps: Record<string, boolean>, fail?: string): QmpExecutor & { sent: string[] } {
  const sent: string[] = [];
  let i = 0;
  return {
    sent,
    async execute(command: string) {
      sent.push(command);
      if (command === fail) throw new Error(`${command}: Requested operation is not valid: domain is not running`);
      if (command === 'query-migrate') return { status: statuses[Math.min(i++, statuses.length - 1)] };
      if (command === 'query-migrate-capabilities') return Object.entries(caps).map(([capability, state]) => ({ capability, state }));
      throw new Error(`unexpected ${command}`);
    },
  };
}

test('switchover-ack observed on: the capabilities are read once the migration has begun (libvirt sets them before migrate), not before', async (t) => {
  const q = fakeSource(['none', 'none', 'active'], { 'return-path': true, 'switchover-ack': true, xbzrle: false });
  const r = await observeSwitchoverAck(q, { signal: new AbortController().signal, pollMs: 1 });
  t.deepEqual(r, { required: true, observed: true, status: 'active', returnPath: true, switchoverAck: true, detail: 'source QEMU, migration active: switchover-ack on, return-path on' });
  t.deepEqual(q.sent, ['query-migrate', 'query-migrate', 'query-migrate', 'query-migrate-capabilities']);
  // setup counts already: a fast migration may go from setup to completed between two polls.
  t.is((await observeSwitchoverAck(fakeSource(['none', 'setup', 'completed'], { 'return-path': true, 'switchover-ack': true }), { signal: new AbortController().signal, pollMs: 1 })).status, 'setup');
  t.deepEqual(switchoverAckLines(r), ['switchover-ack: on (source QEMU, migration active: switchover-ack on, return-path on)']);
});

test('switchover-ack observed off (e.g. a tunnelled migration): observed false, a WARNING line that leaves the verdict to the migration', async (t) => {
  const r = await observeSwitchoverAck(fakeSource(['active'], { 'return-path': false, 'switchover-ack': false }), { signal: new AbortController().signal, pollMs: 1 });
  t.is(r.observed, false);
  t.is(r.detail, 'source QEMU, migration active: switchover-ack off, return-path off');
  const lines = switchoverAckLines(r);
  t.is(lines.length, 1);
  t.regex(lines[0]!, /^WARNING: switchover-ack was required but is OFF: source QEMU, migration active: switchover-ack off, return-path off\. .*the verdict above is the migration's own/);
  // switchover-ack on without return-path does not count: the destination cannot ack.
  t.is((await observeSwitchoverAck(fakeSource(['device'], { 'return-path': false, 'switchover-ack': true }), { signal: new AbortController().signal, pollMs: 1 })).observed, false);
});

test('switchover-ack not observed: the migration ended before it was seen active, a query failed, or the call returned first -> null with why', async (t) => {
  const never = await observeSwitchoverAck(fakeSource(['none', 'failed'], {}), { signal: new AbortController().signal, pollMs: 1 });
  t.deepEqual(never, { required: true, observed: null, status: 'failed', detail: "not observed: the source QEMU's migration was never seen in setup or active (last status: failed)" });
  const broken = await observeSwitchoverAck(fakeSource(['active'], {}, 'query-migrate-capabilities'), { signal: new AbortController().signal, pollMs: 1 });
  t.is(broken.observed, null);
  t.regex(broken.detail, /^not observed: query-migrate-capabilities on the source failed: .*domain is not running/);
  const ac = new AbortController();
  const p = observeSwitchoverAck(fakeSource(['none'], {}), { signal: ac.signal, pollMs: 5 });
  setTimeout(() => ac.abort(), 30);
  const stopped = await p;
  t.is(stopped.observed, null);
  t.regex(stopped.detail, /never seen in setup or active \(last status: none\)/);
  t.regex(switchoverAckLines(stopped)[0]!, /^WARNING: switchover-ack was required but could not be verified: /);
});
