// `vfio-mig watch`, libvirt form, against two real libvirt 11.3 daemons (hosts A and B in
// their own network + mount namespaces, see hosts.ts) migrating TCG QEMU 10 domains with
// the libvirt API while the watch runs in the same process: QEMU's events come through
// libvirt's monitor events from both hosts, QEMU's figures through libvirt's job
// statistics. The domains have no hostdev (the machine has no VFIO device), so the device
// rules have nothing to check; the migration's status, phases, downtime and the vCPU
// events are real.
import test from 'ava';
import { PassThrough } from 'node:stream';
import { chmodSync, mkdirSync, readFileSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Connection, Domain, ErrorCode, LibvirtError, MigrateFlag } from '../../src/libvirt/binding.ts';
import { watchLibvirt } from '../../src/cli/watch-libvirt.ts';
import { main } from '../../src/cli/main.ts';
import * as qmp from '../../src/qmp/commands.ts';
import type { Analysis } from '../../src/report/analysis.ts';
import { parseTimeline, type RecordedEvent, type WatchRecord } from '../../src/report/timeline.ts';
import { cannotRun, startHosts, tinyDomainXml, type Hosts } from './hosts.ts';

const why = cannotRun();
let hosts: Hosts;
let a: Connection;
let b: Connection;
const domains: Domain[] = [];

if (why) {
  test('libvirt watch suite prerequisites', (t) => t.fail(`LIBVIRT SUITE CANNOT RUN: ${why}`));
} else {
  test.before(async () => {
    // B's qemu hook refuses incoming migrations of domains named *refuse* (libvirt runs it
    // with "<name> migrate begin -" while preparing the destination; a non-zero exit aborts).
    hosts = await startHosts({
      beforeStart: (dir, name) => {
        if (name !== 'B') return;
        mkdirSync(join(dir, 'etc', 'hooks'), { recursive: true });
        writeFileSync(join(dir, 'etc', 'hooks', 'qemu'), '#!/bin/sh\ncat >/dev/null\ncase "$1:$2" in *refuse*:migrate) echo "test host B refuses $1" >&2; exit 1;; esac\nexit 0\n');
        chmodSync(join(dir, 'etc', 'hooks', 'qemu'), 0o755);
      },
    });
    a = Connection.open(hosts.a.uri, { events: true });
    b = Connection.open(hosts.b.uri);
  });
  test.after.always(async () => {
    for (const d of domains) d.dispose();
    a?.close();
    b?.close();
    await hosts?.stop();
  });
}
const stest = why ? test.skip : test.serial;

function start(name: string, memoryMiB = 64): Domain {
  const d = a.defineDomain(tinyDomainXml(name).replace("<memory unit='MiB'>64</memory>", `<memory unit='MiB'>${memoryMiB}</memory>`));
  domains.push(d);
  d.start();
  return d;
}

function migrate(d: Domain, bandwidth?: number): Promise<void> {
  return d.migrateToUri3(`qemu+unix:///system?socket=${hosts.b.dir}/run/libvirt-sock`, { uri: `tcp://${hosts.b.addr}`, ...(bandwidth ? { bandwidth } : {}) }, MigrateFlag.LIVE | MigrateFlag.PEER2PEER);
}

const names = (evs: RecordedEvent[], event: string): string[] => evs.filter((e) => e.event === event).map((e) => String(e.data.status ?? ''));

stest('a completed migration A -> B: verdict ok, status completed, downtime from libvirt, events from both hosts', async (t) => {
  const d = start('vm-watch-ok');
  let ready!: () => void;
  const isReady = new Promise<void>((r) => (ready = r));
  const watching = watchLibvirt({ domain: 'vm-watch-ok', sourceUri: hosts.a.uri, destUri: hosts.b.uri, timeoutMs: 180_000, settleMs: 10_000, onReady: ready });
  await isReady;
  const t0 = Date.now();
  await migrate(d);
  const { record, analysis, timedOut } = await watching;
  t.log(`migration ${Date.now() - t0} ms; verdict ${analysis.verdict}: ${analysis.reason}; downtime ${analysis.downtimeMs} ms; notes: ${analysis.notes.join(' | ')}`);
  t.false(timedOut);
  t.is(record.ended, 'settled');
  t.is(analysis.verdict, 'ok', analysis.reason);
  t.is(analysis.status, 'completed');
  t.is(analysis.qemu.status, 'completed');
  t.is(typeof analysis.downtimeMs, 'number');
  t.is(analysis.downtimeMs, analysis.qemu.downtimeMs, "QEMU's own figure (through libvirt), not the events bound");
  t.true(analysis.qemu.downtimeMs! >= 0 && analysis.qemu.downtimeMs! < 60_000);
  t.is(typeof analysis.qemu.setupTimeMs, 'number');
  t.true((analysis.qemu.ramTransferred ?? 0) > 0);
  t.is(analysis.qemu.destinationStatus, 'completed');
  // QEMU's events from both hosts, through libvirt.
  const src = record.source.events;
  const dst = record.destination.events;
  t.deepEqual(names(src, 'MIGRATION').filter((s) => ['setup', 'active', 'completed'].includes(s)), ['setup', 'active', 'completed']);
  t.true(names(src, 'MIGRATION').includes('pre-switchover'), 'libvirt pauses the source before switchover');
  t.true(src.some((e) => e.event === 'STOP'));
  t.true(names(dst, 'MIGRATION').includes('completed'));
  t.true(dst.some((e) => e.event === 'RESUME'));
  t.true(src.every((e) => Math.abs(e.timestamp.seconds * 1000 - Date.now()) < 600_000), "QEMU's timestamps");
  t.is(analysis.events.stopToResumeMs !== undefined, true, 'source STOP -> destination RESUME measured');
  t.deepEqual(analysis.phases.map((p) => p.name).slice(0, 3), ['setup', 'iteration', 'switchover']);
  t.regex(record.source.endpoint, /^libvirt:qemu\+unix:.*\/vm-watch-ok$/);
  t.is(record.source.initialStatus, 'running');
  t.is(record.destination.initialStatus, 'inmigrate', 'the destination QEMU was started for the migration, paused');
  t.truthy(record.source.libvirtJob);
  t.is(record.source.libvirtJob!.operation, 5, 'migration-out statistics');
  // The record is what `vfio-mig report` reads: the same verdict, and an SVG.
  t.is(parseTimeline(JSON.parse(JSON.stringify(record))).origin, 'watch');
  const dir = mkdtempSync(join(tmpdir(), 'vfio-mig-lv-watch-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  writeFileSync(join(dir, 'ok.json'), JSON.stringify(record));
  const rout = new PassThrough();
  let r = '';
  rout.on('data', (c) => (r += c));
  t.is(await main(['report', join(dir, 'ok.json'), '-o', join(dir, 'ok.svg')], rout, new PassThrough()), 0);
  t.regex(r, /^verdict: ok - the migration completed/);
  t.regex(r, new RegExp(`QEMU's figure: +${analysis.qemu.downtimeMs} ms`));
  t.regex(readFileSync(join(dir, 'ok.svg'), 'utf8'), /<svg[^>]*>[\s\S]*destination: vCPUs[\s\S]*<\/svg>\s*$/);
  const onB = b.lookupDomain('vm-watch-ok');
  domains.push(onB);
  t.is(onB.state().state, 'running');
  onB.destroy();
  d.undefine();
});

stest('a migration cancelled while iterating (virDomainAbortJob): the CLI says failed, exit 1, the domain runs on A', async (t) => {
  // 2 GiB of (mostly zero) RAM at 1 MiB/s: several seconds of iteration to cancel in.
  const d = start('vm-watch-cancel', 2048);
  const dir = mkdtempSync(join(tmpdir(), 'vfio-mig-lv-watch-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const timeline = join(dir, 'timeline.json');
  const out = new PassThrough();
  const err = new PassThrough();
  let o = '';
  let e = '';
  out.on('data', (c) => (o += c));
  let ready!: () => void;
  const isReady = new Promise<void>((r) => (ready = r));
  err.on('data', (c) => {
    e += c;
    if (/watching domain vm-watch-cancel/.test(e)) ready();
  });
  const cli = main(['watch', '--source-domain', 'vm-watch-cancel', '--source-uri', hosts.a.uri, '--dest-uri', hosts.b.uri, '--json', '--timeout', '180', '--settle', '10', '--timeline', timeline], out, err);
  let early = false;
  await Promise.race([isReady, cli.then(() => void (early = true))]);
  if (early) return t.fail(`watch ended before it was ready: ${e}`);
  const eventsBefore = (await qmp.queryMigrateCapabilities(d)).find((c) => c.capability === 'events')?.state;
  const events = a.qemuMonitorEvents({ domain: d, event: 'MIGRATION' });
  t.teardown(() => events.close());
  const mark = events.lastSeq;
  const migration = migrate(d, 1);
  const active = await events.waitFor('MIGRATION', (ev) => ev.typed.status === 'active', 60_000, { since: mark });
  t.is(active.domain, 'vm-watch-cancel');
  // libvirt allows the job statistics and the abort (both are not "modify" jobs) while it migrates.
  const during = d.jobStats();
  t.is(during.type, 'unbounded');
  t.is(during.operation, 'migration-out');
  t.true((during.memoryTotal ?? 0) > 0, "QEMU's figures, through libvirt");
  t.is(d.jobInfo().type, 'unbounded');
  // libvirt 11.3 also answers the QMP pass-through during its migration (the watch does
  // not use it: it taints the domain). Recorded here so a change in libvirt shows.
  t.is((await qmp.queryMigrate(d)).status, 'active');
  // The `events` capability: libvirt turns it on when it starts QEMU (the watch does not touch it).
  t.true(eventsBefore, 'events capability on before the migration');
  t.true((await qmp.queryMigrateCapabilities(d)).find((c) => c.capability === 'events')?.state, 'events capability on during the migration');
  d.abortJob();
  const failure = await t.throwsAsync(migration, { instanceOf: LibvirtError });
  t.is(failure!.code, ErrorCode.OPERATION_ABORTED);
  const code = await cli;
  t.log(`stderr: ${e.trim()}`);
  const analysis = JSON.parse(o) as Analysis;
  t.log(`verdict ${analysis.verdict}: ${analysis.reason}; notes: ${analysis.notes.join(' | ')}`);
  t.is(code, 1);
  t.is(analysis.verdict, 'failed');
  t.is(analysis.status, 'cancelled');
  t.is(analysis.failure?.phase, 'iteration');
  t.regex(analysis.reason, /cancelled in the iteration/);
  const record = JSON.parse(readFileSync(timeline, 'utf8')) as WatchRecord;
  t.true(names(record.source.events, 'MIGRATION').includes('cancelled'));
  t.true(names(record.destination.events, 'MIGRATION').includes('failed'), "the destination QEMU's own events came too");
  t.is(d.state().state, 'running', 'the domain still runs on A');
  t.is(b.findDomain('vm-watch-cancel'), undefined, 'and not on B');
  // `vfio-mig report` renders the file with the same verdict and exit code.
  const rout = new PassThrough();
  let r = '';
  rout.on('data', (c) => (r += c));
  t.is(await main(['report', timeline], rout, new PassThrough()), 1);
  t.regex(r, /^verdict: failed - the migration cancelled in the iteration/);
  d.destroy();
  d.undefine();
});

stest("the destination refuses the domain (its migrate hook fails): failed in setup, QEMU never started, the domain runs on A", async (t) => {
  const d = start('vm-watch-refuse');
  let ready!: () => void;
  const isReady = new Promise<void>((r) => (ready = r));
  const watching = watchLibvirt({ domain: 'vm-watch-refuse', sourceUri: hosts.a.uri, destUri: hosts.b.uri, timeoutMs: 60_000, settleMs: 5_000, onReady: ready });
  await isReady;
  const e = await t.throwsAsync(migrate(d), { instanceOf: LibvirtError });
  t.is(e!.code, ErrorCode.HOOK_SCRIPT_FAILED);
  const { record, analysis, timedOut } = await watching;
  t.log(`verdict ${analysis.verdict}: ${analysis.reason}; notes: ${analysis.notes.join(' | ')}`);
  t.false(timedOut, 'the short job libvirt held (tens of ms) was seen');
  t.is(analysis.verdict, 'failed');
  t.is(analysis.status, 'failed');
  t.is(analysis.failure?.phase, 'setup');
  t.true(analysis.notes.some((n) => /before QEMU reported a final status \(QEMU never started migrating\)/.test(n)));
  t.deepEqual(record.source.events.filter((x) => x.event === 'MIGRATION'), [], 'QEMU never migrated');
  t.is(d.state().state, 'running');
  d.destroy();
  d.undefine();
});

stest('the CLI: no such domain on the source is exit 3, hostile names and URIs are usage errors (exit 2)', async (t) => {
  const run = async (args: string[]): Promise<{ code: number; err: string }> => {
    const err = new PassThrough();
    let e = '';
    err.on('data', (c) => (e += c));
    const code = await main(['watch', ...args], new PassThrough(), err);
    return { code, err: e };
  };
  const none = await run(['--source-domain', 'no-such-vm', '--source-uri', hosts.a.uri, '--dest-uri', hosts.b.uri, '--timeout', '30']);
  t.is(none.code, 3);
  t.regex(none.err, /no domain named "no-such-vm"/);
  const down = await run(['--source-domain', 'x', '--source-uri', 'qemu+unix:///system?socket=/nonexistent/sock', '--dest-uri', hosts.b.uri]);
  t.is(down.code, 3);
  t.regex(down.err, /source: cannot connect to libvirt/);
  t.is((await run(['--source-domain', 'a/b', '--source-uri', hosts.a.uri, '--dest-uri', hosts.b.uri])).code, 2);
  t.is((await run(['--source-domain', 'vm', '--source-uri', 'qemu:///system\n--evil', '--dest-uri', hosts.b.uri])).code, 2);
});
