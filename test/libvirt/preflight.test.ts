// vfio-mig preflight against the real libvirt test pair (two libvirtd 11.3 "hosts" in
// their own network + mount namespaces, see hosts.ts): a running TCG domain on A checked
// towards B. The domains here have no real VFIO devices, so the device checks must say
// so honestly: the tiny domain has no VFIO hostdev (nothing device-specific applies), and
// a defined domain whose hostdev names a PCI function this machine does not have fails
// its device check. Destination facts come once in-process (B's URI is a local unix
// socket) and once through the peer command, run inside B's network namespace.
// Needs root; test/libvirt/setup.sh installs the packages. Serial: one pair of daemons.
import test from 'ava';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Connection, Domain, MigrateFlag } from '../../src/libvirt/binding.ts';
import { DomainXml } from '../../src/libvirt/domain-xml.ts';
import { runCli } from '../cli-harness.ts';
import { cannotRun, startHosts, tinyDomainXml, type Hosts } from './hosts.ts';
import { PREFLIGHT_SCHEMA, type PreflightReport } from '../../src/compat/preflight/types.ts';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const why = cannotRun();

let hosts: Hosts;
let a: Connection;
let b: Connection;
const domains: Domain[] = [];
const work = mkdtempSync(join(tmpdir(), 'vfio-mig-pf-lv-'));

if (why) {
  test('libvirt suite prerequisites', (t) => t.fail(`LIBVIRT SUITE CANNOT RUN: ${why}`));
} else {
  test.before(async () => {
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
  });
}

const stest = why ? test.skip : test.serial;
const byId = (r: PreflightReport, id: string) => r.checks.filter((c) => c.id === id);

stest('a running domain without VFIO devices, A -> B: the table, every check passes, exit 0', async (t) => {
  const d = a.defineDomain(tinyDomainXml('vm-pf'));
  domains.push(d);
  d.start();
  const r = await runCli(['preflight', 'vm-pf', '--connect', hosts.a.uri, '--to', hosts.b.uri]);
  t.log(`\n${r.out}${r.err}`);
  t.is(r.code, 0, r.err);
  t.regex(r.out, /^VERDICT\s+CHECK\s+SUBJECT\s+FINDING$/m);
  t.regex(r.out, /PASS\s+vfio-hostdevs\s+domain\s+the domain has no VFIO hostdevs/);
  t.regex(r.out, /PASS\s+qemu-version\s+source\s+QEMU 10\.\d+\.\d+/);
  t.regex(r.out, /PASS\s+libvirt-version\s+destination\s+libvirt 11\.\d+\.\d+/);
  t.regex(r.out, /PASS\s+qemu-blockers\s+source\s+query-migrate reports no blocked-reasons/);
  t.regex(r.out, /PASS\s+destination-facts\s+destination\s+host facts of .* via local/);
  t.regex(r.out, /verdict: PASS \(0 fail, 0 warn, \d+ pass; exit 0\)/);
});

stest('the same as JSON, destination facts through the peer command inside B\'s namespace; postcopy is not refused without VFIO devices', async (t) => {
  const cmd = ['ip', 'netns', 'exec', hosts.b.netns, process.execPath, '--import', 'tsx', join(root, 'src/cli/main.ts')];
  process.env.VFIO_MIG_PEER_COMMAND = JSON.stringify(cmd);
  let r;
  try {
    r = await runCli(['preflight', 'vm-pf', '--connect', hosts.a.uri, '--to', hosts.b.uri, '--json', '--postcopy', '--timeout', '120']);
  } finally {
    delete process.env.VFIO_MIG_PEER_COMMAND;
  }
  t.is(r.code, 0, r.err);
  const report = JSON.parse(r.out) as PreflightReport;
  t.log(JSON.stringify(report, null, 2));
  t.is(report.schema, PREFLIGHT_SCHEMA);
  t.is(report.domain, 'vm-pf');
  t.is(report.destination, hosts.b.uri);
  t.is(report.verdict, 'pass');
  t.is(report.exitCode, 0);
  t.regex(byId(report, 'destination-facts')[0]!.detail, /via command ip netns exec/);
  t.is(byId(report, 'postcopy')[0]!.verdict, 'pass');
  t.deepEqual(byId(report, 'device-capability'), [], 'no hostdev, no device check');
  t.is(report.downtime, undefined, 'no device state to predict');
  t.true(report.checks.every((c) => c.advice.length > 0 && !c.advice.includes('\n')), 'one sentence of advice each');
});

stest('--print-xml writes a destination XML libvirt accepts: the domain migrates A -> B with it', async (t) => {
  const file = join(work, 'vm-pf.dest.xml');
  const r = await runCli(['preflight', 'vm-pf', '--connect', hosts.a.uri, '--to', hosts.b.uri, '--print-xml', file]);
  t.is(r.code, 0, r.err);
  t.regex(r.out, /destination XML: .*vm-pf\.dest\.xml/);
  t.regex(r.out, /virsh migrate --live --xml /);
  const xml = readFileSync(file, 'utf8');
  t.is(DomainXml.parse(xml).name, 'vm-pf');
  t.truthy(readFileSync(`${file}.persistent`, 'utf8'));
  const d = a.lookupDomain('vm-pf');
  domains.push(d);
  await d.migrateToUri3(hosts.b.uri, { uri: `tcp://${hosts.b.addr}`, destXml: xml }, MigrateFlag.LIVE | MigrateFlag.PEER2PEER);
  const onB = b.lookupDomain('vm-pf');
  domains.push(onB);
  t.is(onB.state().state, 'running');
  onB.destroy();
  d.undefine();
});

stest('a domain whose hostdev this machine does not have: the device checks fail and say why (exit 2)', async (t) => {
  const xml = tinyDomainXml('vm-pf-hostdev').replace(
    '<memballoon',
    "<hostdev mode='subsystem' type='pci' managed='no'><source><address domain='0x0000' bus='0xfe' slot='0x1f' function='0x7'/></source></hostdev>\n    <memballoon",
  );
  const d = a.defineDomain(xml);
  domains.push(d);
  const r = await runCli(['preflight', 'vm-pf-hostdev', '--connect', hosts.a.uri, '--to', hosts.b.uri, '--json']);
  t.is(r.code, 2, r.err);
  const report = JSON.parse(r.out) as PreflightReport;
  t.log(report.checks.filter((c) => c.verdict !== 'pass').map((c) => `${c.verdict} ${c.id} ${c.subject}: ${c.detail} -> ${c.advice}`).join('\n'));
  const cap = byId(report, 'device-capability')[0]!;
  t.is(cap.verdict, 'fail');
  t.regex(cap.detail, /0000:fe:1f\.7 is not a VFIO device on this host/);
  t.is(byId(report, 'qemu-version').find((c) => c.subject === 'source')!.verdict, 'warn', 'not running: its QEMU cannot be asked');
  t.is(byId(report, 'destination-device')[0]!.verdict, 'fail', 'no descriptor of a device that does not exist');
  d.undefine();
});

stest("QEMU's own migration blockers come through the monitor pass-through: an ivshmem device in peer mode (exit 2)", async (t) => {
  // ivshmem-plain without master=on installs a real QEMU migration blocker; no VFIO needed to show the check.
  const xml = tinyDomainXml('vm-pf-blocked').replace('<memballoon', "<shmem name='pfshm'><model type='ivshmem-plain'/><size unit='M'>1</size></shmem>\n    <memballoon");
  const d = a.defineDomain(xml);
  domains.push(d);
  d.start();
  const r = await runCli(['preflight', 'vm-pf-blocked', '--connect', hosts.a.uri, '--to', hosts.b.uri]);
  const lines = r.out.split('\n');
  const at = lines.findIndex((l) => /qemu-blockers/.test(l));
  t.log(lines.slice(at, at + 2).join('\n'));
  t.is(r.code, 2, r.err);
  t.regex(r.out, /FAIL\s+qemu-blockers\s+source\s+QEMU blocks migration: .*ivshmem/);
  d.destroy();
  d.undefine();
});

stest('an unreachable destination fails the destination-libvirt check', async (t) => {
  const r = await runCli(['preflight', 'vm-pf-none', '--connect', hosts.a.uri, '--to', hosts.b.uri]);
  t.is(r.code, 2);
  t.regex(r.err, /vm-pf-none/, 'no such domain: one line on stderr');
  const d = a.defineDomain(tinyDomainXml('vm-pf-2'));
  domains.push(d);
  d.start();
  const bad = await runCli(['preflight', 'vm-pf-2', '--connect', hosts.a.uri, '--to', 'qemu+unix:///system?socket=/nonexistent/libvirt-sock', '--json']);
  t.is(bad.code, 2, bad.err);
  const report = JSON.parse(bad.out) as PreflightReport;
  t.is(byId(report, 'destination-libvirt')[0]!.verdict, 'fail');
  d.destroy();
  d.undefine();
});
