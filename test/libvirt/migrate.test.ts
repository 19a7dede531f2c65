// vfio-mig migrate and enable-events against the real libvirt test pair (two libvirtd 11.3
// "hosts" in their own network + mount namespaces, see hosts.ts). The domains have no real
// VFIO devices (this machine has none to give): the migration itself, the preflight gate,
// a refusal by the destination, and the persistent-definition edit are what is real here.
// Needs root; test/libvirt/setup.sh installs the packages. Serial: one pair of daemons.
import test from 'ava';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Connection, type Domain } from '../../src/libvirt/binding.ts';
import { DomainXml } from '../../src/libvirt/domain-xml.ts';
import { runCli } from '../cli-harness.ts';
import { setEnableEventsDeps } from '../../src/cli/enable-events.ts';
import { defaultMigrateDeps, setMigrateDeps } from '../../src/cli/migrate.ts';
import { observeSwitchoverAck } from '../../src/cli/migrate-switchover.ts';
import type { Analysis } from '../../src/report/analysis.ts';
import type { FactDevice } from '../../src/compat/preflight/facts.ts';
import { cannotRun, startHosts, tinyDomainXml, type Hosts } from './hosts.ts';

const why = cannotRun();

let hosts: Hosts;
let a: Connection;
let b: Connection;
const domains: Domain[] = [];
const work = mkdtempSync(join(tmpdir(), 'vfio-mig-migrate-lv-'));
const savedStateDir = process.env.VFIO_MIG_STATE_DIR;

if (why) {
  test('libvirt suite prerequisites', (t) => t.fail(`LIBVIRT SUITE CANNOT RUN: ${why}`));
} else {
  test.before(async () => {
    process.env.VFIO_MIG_STATE_DIR = join(work, 'state');
    hosts = await startHosts();
    a = Connection.open(hosts.a.uri);
    b = Connection.open(hosts.b.uri);
  });
  test.after.always(async () => {
    for (const d of domains) d.dispose();
    a?.close();
    b?.close();
    await hosts?.stop();
    rmSync(work, { recursive: true, force: true });
    if (savedStateDir === undefined) delete process.env.VFIO_MIG_STATE_DIR;
    else process.env.VFIO_MIG_STATE_DIR = savedStateDir;
  });
}

const stest = why ? test.skip : test.serial;

function stateOn(conn: Connection, name: string): string | undefined {
  try {
    const d = conn.lookupDomain(name);
    domains.push(d);
    return d.state().state;
  } catch {
    return undefined;
  }
}

stest('migrate moves a running domain A -> B: verdict ok, the timeline and the SVG written, persistent on B', async (t) => {
  const d = a.defineDomain(tinyDomainXml('vm-mig'));
  domains.push(d);
  d.start();
  const timeline = join(work, 'vm-mig.json');
  const svg = join(work, 'vm-mig.svg');
  const r = await runCli(['migrate', 'vm-mig', '--from', hosts.a.uri, '--to', hosts.b.uri, '--live', '--timeline', timeline, '--report', svg, '--timeout', '300']);
  t.log(`\n${r.out}${r.err}`);
  t.is(r.code, 0, r.err);
  t.regex(r.out, /^preflight: PASS/m);
  t.regex(r.out, /^verdict: ok - vm-mig runs on the destination \(running\)/m);
  t.regex(r.out, /^downtime:$/m);
  t.is(stateOn(b, 'vm-mig'), 'running');
  t.is(stateOn(a, 'vm-mig'), 'shutoff', 'the source keeps its (inactive) definition');
  // The persistent definition reached B: it survives a destroy there.
  const onB = b.lookupDomain('vm-mig');
  domains.push(onB);
  onB.destroy();
  t.is(onB.state().state, 'shutoff', 'persistent on B (PERSIST_DEST with the rewritten persistent XML)');
  t.regex(r.out, new RegExp(`^timeline: ${timeline}$`, 'm'));
  t.regex(r.out, new RegExp(`^report: ${svg}$`, 'm'));
  t.true(existsSync(timeline) && existsSync(svg), 'timeline and SVG written');
  const tl = JSON.parse(readFileSync(timeline, 'utf8')) as { format: string; origin: string };
  t.is(tl.format, 'vfio-mig/timeline');
  t.regex(readFileSync(svg, 'utf8'), /^<svg xmlns="http:\/\/www\.w3\.org\/2000\/svg"/m);
  onB.undefine();
  a.lookupDomain('vm-mig').undefine();
});

stest('--json: one object, verdict ok; --downtime auto sets the limit and says how it was derived', async (t) => {
  const d = a.defineDomain(tinyDomainXml('vm-mig-json'));
  domains.push(d);
  d.start();
  const r = await runCli(['migrate', 'vm-mig-json', '--from', hosts.a.uri, '--to', hosts.b.uri, '--live', '--json', '--downtime', 'auto', '--link-gbps', '0.001', '--timeout', '300']);
  t.is(r.code, 0, r.err);
  const j = JSON.parse(r.out) as { schema: string; verdict: string; exitCode: number; started: boolean; downtime: { limitMs: number; derivation: string }; destinationState: string };
  t.log(JSON.stringify({ ...j, preflight: undefined, analysis: undefined }, null, 2));
  t.is(j.schema, 'vfio-mig/migrate/1');
  t.is(j.verdict, 'ok');
  t.is(j.exitCode, 0);
  t.true(j.started);
  t.is(j.destinationState, 'running');
  // No device state: the auto limit is the room alone, below QEMU's 300 ms, so the limit in force is kept.
  t.regex(j.downtime.derivation, /^devices 0 B .* at 0\.1 MB\/s \(--link-gbps\) = 0 ms; x1\.25 \+ 50 ms = 50 ms/);
  t.regex(j.downtime.derivation, /kept/);
  t.is(j.downtime.limitMs, 300);
  b.lookupDomain('vm-mig-json').destroy();
  b.lookupDomain('vm-mig-json').undefine();
  a.lookupDomain('vm-mig-json').undefine();
});

stest('--switchover-ack between two libvirt 11.3 hosts: the gate passes and the source QEMU is seen with switchover-ack and return-path on while migrating', async (t) => {
  const d = a.defineDomain(tinyDomainXml('vm-mig-ack'));
  domains.push(d);
  d.start();
  const r = await runCli(['migrate', 'vm-mig-ack', '--from', hosts.a.uri, '--to', hosts.b.uri, '--live', '--json', '--switchover-ack', '--timeout', '300']);
  t.is(r.code, 0, r.err);
  const j = JSON.parse(r.out) as { verdict: string; started: boolean; notes: string[]; switchoverAck: { required: boolean; observed: boolean | null; detail: string; status: string; switchoverAck: boolean; returnPath: boolean } };
  t.log(j.switchoverAck);
  t.is(j.verdict, 'ok');
  t.true(j.started);
  t.is(j.switchoverAck.required, true);
  t.is(j.switchoverAck.observed, true, j.switchoverAck.detail);
  t.true(j.switchoverAck.switchoverAck);
  t.true(j.switchoverAck.returnPath);
  t.true(['setup', 'active', 'pre-switchover', 'device'].includes(j.switchoverAck.status), j.switchoverAck.status);
  t.false(j.notes.some((n) => /switchover-ack/.test(n)), 'no warning when it was on');
  // libvirt turned it off again afterwards: the destination QEMU reads it off now.
  const onB = b.lookupDomain('vm-mig-ack');
  domains.push(onB);
  const caps = (await onB.execute('query-migrate-capabilities')) as Array<{ capability: string; state: boolean }>;
  t.log(`B after: ${JSON.stringify(caps.filter((c) => c.capability === 'switchover-ack' || c.capability === 'return-path'))}`);
  onB.destroy();
  onB.undefine();
  a.lookupDomain('vm-mig-ack').undefine();
});

stest('--switchover-ack seen off (the seam: the source QEMU\'s reply altered to switchover-ack off): the migration\'s verdict and exit code stay, a WARNING line says so', async (t) => {
  const d = a.defineDomain(tinyDomainXml('vm-mig-ack-off'));
  domains.push(d);
  d.start();
  const real = await defaultMigrateDeps(60_000);
  let asked = 0;
  setMigrateDeps({
    ...real,
    // The real observation through the real pass-through; only the capability's state is turned off in the reply.
    observeSwitchoverAck: (q, o) =>
      observeSwitchoverAck(
        {
          execute: async (command, args, options) => {
            const r = await q.execute(command, args, options);
            if (command !== 'query-migrate-capabilities') return r;
            asked++;
            return (r as Array<{ capability: string; state: boolean }>).map((c) => (c.capability === 'switchover-ack' ? { ...c, state: false } : c));
          },
        },
        o,
      ),
  });
  try {
    const r = await runCli(['migrate', 'vm-mig-ack-off', '--from', hosts.a.uri, '--to', hosts.b.uri, '--live', '--switchover-ack', '--timeout', '300']);
    t.log(`\n${r.out}${r.err}`);
    t.is(r.code, 0, r.err);
    t.is(asked, 1, 'read once, while the migration was active');
    t.regex(r.out, /^switchover-ack: required; libvirt 11\.3\.\d+ -> 11\.3\.\d+ negotiates it/m);
    t.regex(r.out, /^verdict: ok - vm-mig-ack-off runs on the destination \(running\)$/m);
    t.regex(r.out, /^WARNING: switchover-ack was required but is OFF: source QEMU, migration active: switchover-ack off, return-path on\. /m);
  } finally {
    setMigrateDeps(undefined);
  }
  b.lookupDomain('vm-mig-ack-off').destroy();
  b.lookupDomain('vm-mig-ack-off').undefine();
  a.lookupDomain('vm-mig-ack-off').undefine();
});

stest('--downtime auto recomputes the limit with the throughput QEMU measured during the migration', async (t) => {
  // 1 GiB at a 1 MiB/s cap: seconds of transfer, long enough for QEMU to report its rate.
  const d = a.defineDomain(tinyDomainXml('vm-mig-measured').replace("<memory unit='MiB'>64</memory>", "<memory unit='MiB'>1024</memory>"));
  domains.push(d);
  d.start();
  const r = await runCli(['migrate', 'vm-mig-measured', '--from', hosts.a.uri, '--to', hosts.b.uri, '--live', '--json', '--downtime', 'auto', '--bandwidth', '1', '--timeout', '300']);
  t.is(r.code, 0, r.err);
  const j = JSON.parse(r.out) as { verdict: string; downtime: { limitMs: number; derivation: string; measured: { bytesPerSec: number; derivation: string } } };
  t.log(j.downtime);
  t.is(j.verdict, 'ok');
  t.regex(j.downtime.derivation, /\(assumed 10 Gbit\/s; --link-gbps\)/, 'before the start: the assumed rate');
  t.true(j.downtime.measured.bytesPerSec > 0 && j.downtime.measured.bytesPerSec < 4 * 1048576, 'about the 1 MiB/s cap');
  t.regex(j.downtime.measured.derivation, /at [\d.]+ MB\/s \(QEMU's measured throughput\) = 0 ms; x1\.25 \+ 50 ms = 50 ms; the limit in force \(300 ms\) covers it: kept$/);
  b.lookupDomain('vm-mig-measured').destroy();
  b.lookupDomain('vm-mig-measured').undefine();
  a.lookupDomain('vm-mig-measured').undefine();
});

stest('--downtime MS sets the limit through libvirt before the migration starts', async (t) => {
  const d = a.defineDomain(tinyDomainXml('vm-mig-dt'));
  domains.push(d);
  d.start();
  const r = await runCli(['migrate', 'vm-mig-dt', '--from', hosts.a.uri, '--to', hosts.b.uri, '--live', '--downtime', '1234', '--timeout', '300']);
  t.log(`\n${r.out}${r.err}`);
  t.is(r.code, 0, r.err);
  t.regex(r.out, /^downtime limit: 1234 ms \(--downtime 1234\)$/m);
  t.regex(r.out, /^ {2}limit: +1234 ms$/m);
  b.lookupDomain('vm-mig-dt').destroy();
  b.lookupDomain('vm-mig-dt').undefine();
  a.lookupDomain('vm-mig-dt').undefine();
});

stest('a failed preflight check stops the migration (exit 3) unless --force; the domain keeps running on A', async (t) => {
  // ivshmem-plain without master=on: a real QEMU migration blocker (the qemu-blockers check fails).
  const xml = tinyDomainXml('vm-mig-blocked').replace('<memballoon', "<shmem name='migshm'><model type='ivshmem-plain'/><size unit='M'>1</size></shmem>\n    <memballoon");
  const d = a.defineDomain(xml);
  domains.push(d);
  d.start();
  const r = await runCli(['migrate', 'vm-mig-blocked', '--from', hosts.a.uri, '--to', hosts.b.uri, '--live']);
  t.log(`\n${r.out}${r.err}`);
  t.is(r.code, 3, r.err);
  t.regex(r.out, /FAIL qemu-blockers source: QEMU blocks migration: .*ivshmem/);
  t.regex(r.out, /^not started: 1 failed check \(qemu-blockers source\)/m);
  t.notRegex(r.out, /^migrating/m, 'libvirt was never asked');
  t.is(stateOn(a, 'vm-mig-blocked'), 'running');
  t.is(stateOn(b, 'vm-mig-blocked'), undefined);
  // --force: libvirt is asked, QEMU refuses; the verdict is failed and the domain is still on A.
  const f = await runCli(['migrate', 'vm-mig-blocked', '--from', hosts.a.uri, '--to', hosts.b.uri, '--live', '--force', '--json']);
  const j = JSON.parse(f.out) as { verdict: string; started: boolean; libvirtError: string; sourceState: string; notes: string[] };
  t.log(j.libvirtError);
  t.is(f.code, 1, f.err);
  t.is(j.verdict, 'failed');
  t.true(j.started);
  t.regex(j.libvirtError, /ivshmem|migrat/i);
  t.is(j.sourceState, 'running');
  t.is(stateOn(a, 'vm-mig-blocked'), 'running');
  d.destroy();
  d.undefine();
});

stest('a destination refusal (a different domain of that name on B): verdict failed, exit 1, the domain still runs on A', async (t) => {
  const d = a.defineDomain(tinyDomainXml('vm-mig-clash'));
  domains.push(d);
  d.start();
  // Same name, another UUID: B's libvirt refuses the incoming domain.
  const other = b.defineDomain(tinyDomainXml('vm-mig-clash'));
  domains.push(other);
  const r = await runCli(['migrate', 'vm-mig-clash', '--from', hosts.a.uri, '--to', hosts.b.uri, '--live']);
  t.log(`\n${r.out}${r.err}`);
  t.is(r.code, 1, r.err);
  t.regex(r.out, /^verdict: failed - the migration failed; vm-mig-clash is running on the source/m);
  t.regex(r.out, /^libvirt: .*(already exists|uuid)/im);
  t.regex(r.out, /^QEMU had not started migrating: nothing on the source was touched$/m);
  t.regex(r.out, /^source devices: none \(the domain has no VFIO hostdevs\)$/m);
  t.is(stateOn(a, 'vm-mig-clash'), 'running');
  t.is(stateOn(b, 'vm-mig-clash'), 'shutoff', "B's own definition untouched");
  other.undefine();
  d.destroy();
  d.undefine();
});

stest('--timeout aborts a migration still running (exit 4, verdict timeout): the domain keeps running on A, nothing on B', async (t) => {
  // 1 GiB of guest RAM through a 1 MiB/s stream takes seconds even as zero pages: the 1 s limit comes first.
  const d = a.defineDomain(tinyDomainXml('vm-mig-slow').replace("<memory unit='MiB'>64</memory>", "<memory unit='MiB'>1024</memory>"));
  domains.push(d);
  d.start();
  const r = await runCli(['migrate', 'vm-mig-slow', '--from', hosts.a.uri, '--to', hosts.b.uri, '--live', '--bandwidth', '1', '--timeout', '1']);
  t.log(`\n${r.out}${r.err}`);
  t.is(r.code, 4, r.err);
  t.regex(r.out, /^verdict: timeout - the time limit was reached and the migration aborted; vm-mig-slow is running on the source/m);
  t.regex(r.out, /^libvirt: .*(cancel|abort)/im);
  t.is(stateOn(a, 'vm-mig-slow'), 'running');
  t.is(stateOn(b, 'vm-mig-slow'), undefined);
  d.destroy();
  d.undefine();
});

stest('the watch replaced at its seam: a broken ordering rule gives exit 5 after a real migration; a failed watch leaves libvirt\'s verdict', async (t) => {
  const real = await defaultMigrateDeps(60_000);
  const violated = {
    origin: 'watch', verdict: 'violated', reason: 'hostdev0 stopped before hostdev1 was in P2P (switchover)', status: 'completed', devices: [],
    violations: [{ rule: 'p2p-before-stop', message: 'hostdev0 stopped before hostdev1 was in P2P', at: 12 }], phases: [], events: { passes: 1 }, qemu: {}, notes: [],
  } as unknown as Analysis;
  let sawOptions: { domain: string; sourceUri: string; destUri: string } | undefined;
  setMigrateDeps({
    preflight: real.preflight,
    watch: async (o) => {
      sawOptions = o;
      o.onReady?.();
      return { record: { format: 'vfio-mig/timeline', version: 1, origin: 'watch', started: new Date().toISOString(), source: { events: [], devices: [] }, destination: { events: [], devices: [] }, ended: 'settled' } as never, analysis: violated, notes: [], timedOut: false };
    },
  });
  try {
    const d = a.defineDomain(tinyDomainXml('vm-mig-seam'));
    domains.push(d);
    d.start();
    const r = await runCli(['migrate', 'vm-mig-seam', '--from', hosts.a.uri, '--to', hosts.b.uri, '--live', '--timeline', join(work, 'seam.json')]);
    t.log(`\n${r.out}${r.err}`);
    t.is(r.code, 5, r.err);
    t.deepEqual(sawOptions && { domain: sawOptions.domain, sourceUri: sawOptions.sourceUri, destUri: sawOptions.destUri }, { domain: 'vm-mig-seam', sourceUri: hosts.a.uri, destUri: hosts.b.uri });
    t.regex(r.out, /^verdict: violated - vm-mig-seam runs on the destination \(running\); hostdev0 stopped before hostdev1/m);
    t.is(stateOn(b, 'vm-mig-seam'), 'running');
    // Back to A with a watch that fails: the migration's own result decides, the failure is said.
    setMigrateDeps({ preflight: real.preflight, watch: async () => Promise.reject(new Error('monitor events unavailable')) });
    const back = await runCli(['migrate', 'vm-mig-seam', '--from', hosts.b.uri, '--to', hosts.a.uri, '--live']);
    t.log(`\n${back.out}${back.err}`);
    t.is(back.code, 0, back.err);
    t.regex(back.out, /^verdict: ok - vm-mig-seam runs on the destination \(running\)$/m);
    t.regex(back.out, /^watch: the watch failed: monitor events unavailable$/m);
    t.is(stateOn(a, 'vm-mig-seam'), 'running');
  } finally {
    setMigrateDeps(undefined);
  }
  a.lookupDomain('vm-mig-seam').destroy();
  a.lookupDomain('vm-mig-seam').undefine();
  b.lookupDomain('vm-mig-seam').undefine();
});

stest('a domain that is not running is not migrated (exit 3)', async (t) => {
  const d = a.defineDomain(tinyDomainXml('vm-mig-off'));
  domains.push(d);
  const r = await runCli(['migrate', 'vm-mig-off', '--from', hosts.a.uri, '--to', hosts.b.uri]);
  t.is(r.code, 3);
  t.regex(r.err, /vm-mig-off is shutoff: migrate moves a running domain/);
  const none = await runCli(['migrate', 'vm-mig-none', '--from', hosts.a.uri, '--to', hosts.b.uri, '--json']);
  t.is(none.code, 3);
  t.is((JSON.parse(none.out) as { verdict: string }).verdict, 'not-started');
  d.undefine();
});

stest('enable-events edits the persistent definition: a user alias, migration-events=on; libvirt keeps both; a second run changes nothing', async (t) => {
  const xml = tinyDomainXml('vm-ev').replace(
    '<memballoon',
    "<hostdev mode='subsystem' type='pci' managed='no'><source><address domain='0x0000' bus='0xfe' slot='0x1f' function='0x7'/></source></hostdev>\n    <memballoon",
  );
  const d = a.defineDomain(xml);
  domains.push(d);
  const r = await runCli(['enable-events', 'vm-ev', '--uri', hosts.a.uri]);
  t.log(`\n${r.out}${r.err}`);
  t.is(r.code, 0, r.err);
  t.regex(r.out, /ua-hostdev0 0000:fe:1f\.7: migration-events=on/);
  t.regex(r.out, /takes effect when vm-ev next starts/);
  const after = DomainXml.parse(d.xml({ inactive: true }));
  t.is(after.hostdevs()[0]!.alias, 'ua-hostdev0', 'libvirt keeps the user alias in the persistent definition');
  t.deepEqual(after.qemuDeviceProperties('ua-hostdev0'), [{ name: 'migration-events', type: 'bool', value: 'true' }]);
  const again = await runCli(['enable-events', 'vm-ev', '--uri', hosts.a.uri]);
  t.is(again.code, 0);
  t.regex(again.out, /already has migration-events=on; nothing to change/);
  const none = await runCli(['enable-events', 'vm-nothing', '--uri', hosts.a.uri]);
  t.is(none.code, 1);
  d.undefine();
});

stest('enable-events --fix (facts of a kernel without CONFIG_IOMMUFD_DRIVER, an mlx5 VF): both trap fixes defined; libvirt accepts the override', async (t) => {
  const xml = tinyDomainXml('vm-ev-fix').replace(
    '<memballoon',
    "<hostdev mode='subsystem' type='pci' managed='no'><source><address domain='0x0000' bus='0xfe' slot='0x1f' function='0x6'/></source><alias name='ua-vf0'/></hostdev>\n    <memballoon",
  );
  const d = a.defineDomain(xml);
  domains.push(d);
  const device: FactDevice = { id: '0000:fe:1f.6', kind: 'pci', driver: 'mlx5_vfio_pci', iommuGroup: 7, inUse: false, capabilities: { ok: true, flags: ['STOP_COPY', 'P2P'], stopCopyBytes: 4096 } };
  setEnableEventsDeps({ localFacts: async () => ({ iommufdDriver: false, devices: [device] }) });
  let r;
  try {
    const dry = await runCli(['enable-events', 'vm-ev-fix', '--uri', hosts.a.uri, '--fix', '--dry-run']);
    t.is(dry.code, 0, dry.err);
    t.regex(dry.out, /would change/);
    t.deepEqual(DomainXml.parse(d.xml({ inactive: true })).qemuDeviceProperties('ua-vf0'), [], 'dry run: nothing defined');
    r = await runCli(['enable-events', 'vm-ev-fix', '--uri', hosts.a.uri, '--fix', '--json']);
  } finally {
    setEnableEventsDeps(undefined);
  }
  t.is(r.code, 0, r.err);
  const j = JSON.parse(r.out) as { changed: boolean; defined: boolean; changes: string[]; effective: string };
  t.log(j.changes.join('\n'));
  t.true(j.defined);
  t.is(j.effective, 'next-start');
  const props = DomainXml.parse(d.xml({ inactive: true })).qemuDeviceProperties('ua-vf0').map((p) => `${p.name}=${p.value}`);
  t.deepEqual(props, ['migration-events=true', 'x-device-dirty-page-tracking=off', 'enable-migration=on', 'x-pre-copy-dirty-page-tracking=off']);
  d.undefine();
});
