// The koffi libvirt binding against two real libvirt 11.3 daemons (fake hosts A and B in
// their own network + mount namespaces, see hosts.ts) running TCG QEMU 10 guests.
// Needs root; test/libvirt/setup.sh installs the packages. Serial: one pair of daemons.
import test from 'ava';
import { execFile } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Connection, Domain, ErrorCode, LibvirtError, ListDomainsFlag, ListNodeDevicesFlag, MigrateFlag, typedParams } from '../../src/libvirt/binding.ts';
import { DomainXml } from '../../src/libvirt/domain-xml.ts';
import * as qmp from '../../src/qmp/commands.ts';
import { QmpError } from '../../src/qmp/errors.ts';
import { cannotRun, startHosts, tinyDomainXml, type Hosts } from './hosts.ts';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const why = cannotRun();

let hosts: Hosts;
let a: Connection;
let b: Connection;
const domains: Domain[] = [];

if (why) {
  // Loud: on CI machines (root, libvirt installed by setup.sh) this suite must run.
  test('libvirt suite prerequisites', (t) => t.fail(`LIBVIRT SUITE CANNOT RUN: ${why}`));
} else {
  test.before(async () => {
    hosts = await startHosts();
    a = Connection.open(hosts.a.uri, { events: true });
    b = Connection.open(hosts.b.uri, { events: true });
  });
  test.after.always(async () => {
    for (const d of domains) d.dispose();
    a?.close();
    b?.close();
    await hosts?.stop();
  });
}

const stest = why ? test.skip : test.serial;

function define(conn: Connection, name: string): Domain {
  const d = conn.defineDomain(tinyDomainXml(name));
  domains.push(d);
  return d;
}

stest('connect: library and hypervisor versions, domain listing and look-up', (t) => {
  t.regex(a.libVersion(), /^(1[1-9]|[2-9]\d)\.\d+\.\d+$/);
  const [maj, min] = a.hypervisorVersion().split('.').map(Number);
  t.true(maj! > 9 || (maj === 9 && min! >= 1), `QEMU ${a.hypervisorVersion()}`);
  t.log(`libvirt ${a.libVersion()}, QEMU ${a.hypervisorVersion()}`);
  const d = define(a, 'vm-list');
  t.true(a.listDomains(ListDomainsFlag.INACTIVE).some((x) => x.name === 'vm-list'));
  t.is(a.lookupDomain('vm-list').uuid, d.uuid);
  t.is(a.lookupDomainByUuid(d.uuid).name, 'vm-list');
  d.undefine();
});

stest("errors keep libvirt's code, domain and message", (t) => {
  const e = t.throws(() => a.lookupDomain('no-such-domain'), { instanceOf: LibvirtError });
  t.is(e!.code, ErrorCode.NO_DOMAIN);
  t.is(e!.codeName, 'NO_DOMAIN');
  t.is(e!.domainName, 'QEMU');
  t.regex(e!.libvirtMessage, /no-such-domain/);
  const x = t.throws(() => a.defineDomain('<domain type="qemu"><name>broken'), { instanceOf: LibvirtError });
  t.true(['XML_ERROR', 'XML_DETAIL'].includes(x!.codeName), x!.message);
  const conn = t.throws(() => Connection.open('qemu+unix:///system?socket=/nonexistent/libvirt-sock'), { instanceOf: LibvirtError });
  t.regex(conn!.message, /nonexistent/);
});

stest('libvirt prints nothing to stderr on errors (default handler replaced)', async (t) => {
  const code = [
    `import { Connection } from ${JSON.stringify(join(root, 'src/libvirt/binding.ts'))};`,
    `const c = Connection.open(${JSON.stringify(hosts.a.uri)});`,
    `try { c.lookupDomain('no-such-domain'); } catch (e) { console.log(e.codeName); }`,
    `c.close();`,
  ].join('\n');
  const { stdout, stderr } = await new Promise<{ stdout: string; stderr: string }>((resolve, reject) =>
    execFile(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', code], { cwd: root }, (err, stdout, stderr) => (err ? reject(err) : resolve({ stdout, stderr }))),
  );
  t.is(stdout.trim(), 'NO_DOMAIN');
  t.notRegex(stderr, /libvirt/i, stderr);
});

stest('define and start a TCG domain; state, live and inactive XML, suspend and resume', (t) => {
  const d = define(a, 'vm-life');
  t.is(d.state().state, 'shutoff');
  t.is(d.id, undefined);
  d.start();
  t.is(d.state().state, 'running');
  t.true((d.id ?? 0) > 0);
  const live = DomainXml.parse(d.xml());
  t.is(live.name, 'vm-life');
  t.regex(d.xml(), /^<domain type='qemu' id='\d+'>/);
  t.regex(d.xml({ inactive: true }), /^<domain type='qemu'>/, 'no id in the inactive definition');
  d.suspend();
  t.is(d.state().state, 'paused');
  d.resume();
  t.is(d.state().state, 'running');
  t.true(a.listDomains(ListDomainsFlag.ACTIVE).some((x) => x.name === 'vm-life'));
  d.destroy();
  t.is(d.state().state, 'shutoff');
  d.undefine();
});

stest('QMP pass-through: typed commands work through libvirt; a QMP error becomes QmpError', async (t) => {
  const d = define(a, 'vm-qmp');
  d.start();
  const st = await qmp.queryStatus(d);
  t.true(st.running);
  t.is(st.status, 'running');
  const v = await qmp.queryVersion(d);
  t.is(`${v.qemu.major}.${v.qemu.minor}.${v.qemu.micro}`, a.hypervisorVersion());
  const caps = await qmp.queryMigrateCapabilities(d);
  t.true(caps.some((c) => c.capability === 'pause-before-switchover'));
  const e = await t.throwsAsync(d.execute('no-such-command'), { instanceOf: QmpError });
  t.is(e!.class, 'CommandNotFound');
  const bad = await t.throwsAsync(qmp.migrateContinue(d), { instanceOf: QmpError });
  t.is(bad!.class, 'GenericError');
  d.destroy();
  const off = await t.throwsAsync(qmp.queryStatus(d), { instanceOf: LibvirtError });
  t.is(off!.code, ErrorCode.OPERATION_INVALID);
  d.undefine();
});

stest('QMP events of a libvirt-managed domain: STOP and RESUME with data and timestamp', async (t) => {
  const d = define(a, 'vm-events');
  const sub = a.qemuMonitorEvents({ domain: d });
  const all = a.qemuMonitorEvents({ event: 'STOP|RESUME', regex: true });
  t.teardown(() => (sub.close(), all.close()));
  d.start();
  const mark = sub.lastSeq;
  d.suspend();
  const stop = await sub.waitFor('STOP', undefined, 30_000, { since: mark });
  d.resume();
  const resume = await sub.waitFor('RESUME', undefined, 30_000, { since: stop.seq });
  t.is(stop.domain, 'vm-events');
  t.deepEqual(stop.data, {});
  t.true(Math.abs(stop.timestamp.seconds - Date.now() / 1000) < 120);
  t.true(resume.seq > stop.seq);
  const filtered = await all.waitFor('RESUME', (e) => e.domain === 'vm-events', 30_000, { since: 0 });
  t.is(filtered.event, 'RESUME');
  t.true(all.recentEvents().every((e) => e.event === 'STOP' || e.event === 'RESUME'));
  d.destroy();
  d.undefine();
});

stest('typed migration parameters are built as virTypedParameter values', (t) => {
  t.deepEqual(typedParams({ uri: 'tcp://10.77.77.2', bandwidth: 100, parallelConnections: 2 }), [
    { field: 'migrate_uri', type: 7, value: { s: 'tcp://10.77.77.2' } },
    { field: 'bandwidth', type: 4, value: { ul: 100n } },
    { field: 'parallel.connections', type: 1, value: { i: 2 } },
  ]);
  t.throws(() => typedParams({ bandwidth: -1 }), { instanceOf: RangeError });
  t.throws(() => typedParams({ uri: 'a\0b' }), { instanceOf: TypeError });
});

stest('live migration A -> B with virDomainMigrateToURI3 (peer to peer), off the event loop', async (t) => {
  const d = define(a, 'vm-mig');
  d.start();
  const events = a.qemuMonitorEvents({ domain: d });
  t.teardown(() => events.close());
  const mark = events.lastSeq;
  let ticks = 0;
  const ticker = setInterval(() => ticks++, 10);
  const t0 = Date.now();
  try {
    await d.migrateToUri3(
      `qemu+unix:///system?socket=${hosts.b.dir}/run/libvirt-sock`,
      // Typed parameters of all three kinds reach libvirt: the domain is renamed on B.
      { uri: `tcp://${hosts.b.addr}`, destName: 'vm-mig-on-b', bandwidth: 1024 },
      MigrateFlag.LIVE | MigrateFlag.PEER2PEER,
    );
  } finally {
    clearInterval(ticker);
  }
  const ms = Date.now() - t0;
  t.log(`migration took ${ms} ms; the Node event loop ran ${ticks} timer ticks meanwhile`);
  t.true(ticks >= Math.min(5, Math.floor(ms / 40)), 'the Node event loop was not blocked during the migration');

  // libvirt always sets pause-before-switchover on the source: the events show it.
  const done = await events.waitFor('MIGRATION', (e) => e.typed.status === 'completed', 30_000, { since: mark });
  const statuses = events.recentEvents().filter((e) => e.seq > mark && e.event === 'MIGRATION').map((e) => e.data.status);
  t.log(`source MIGRATION events: ${statuses.join(' -> ')}`);
  t.true(statuses.includes('pre-switchover'));
  t.is(done.domain, 'vm-mig');

  const onB = b.lookupDomain('vm-mig-on-b');
  domains.push(onB);
  t.is(onB.state().state, 'running');
  t.true((await qmp.queryStatus(onB)).running);
  t.is(d.state().state, 'shutoff', 'the persistent source definition stays, inactive');
  onB.destroy();
  d.undefine();
});

stest('a failing async migration rejects with the LibvirtError raised on the worker thread; the source keeps running', async (t) => {
  const d = define(a, 'vm-mig-fail');
  d.start();
  const e = await t.throwsAsync(d.migrateToUri3('qemu+unix:///system?socket=/nonexistent/libvirt-sock', {}, MigrateFlag.LIVE | MigrateFlag.PEER2PEER), { instanceOf: LibvirtError });
  t.regex(e!.message, /nonexistent/);
  t.not(e!.code, ErrorCode.INTERNAL_ERROR);
  t.regex(e!.operation, /virDomainMigrateToURI3 vm-mig-fail/);
  t.is(d.state().state, 'running');
  t.true((await qmp.queryStatus(d)).running);
  // The next async call is unaffected by the previous failure.
  const e2 = await t.throwsAsync(d.migrateToUri3(undefined, {}, MigrateFlag.LIVE), { instanceOf: LibvirtError });
  t.log(`without PEER2PEER: ${e2!.message}`);
  d.destroy();
  d.undefine();
});

stest('node devices: listing, filtering by capability, XML', (t) => {
  const all = b.listNodeDevices();
  t.true(all.includes('computer'));
  const pci = b.listNodeDevices(ListNodeDevicesFlag.CAP_PCI_DEV);
  t.true(pci.length > 0 && pci.every((n) => n.startsWith('pci_')), pci.join(' '));
  const dev = b.nodeDevice(pci[0]!);
  t.regex(dev.xml, /<capability type='pci'>/);
  t.regex(dev.xml, new RegExp(`<name>${pci[0]}</name>`));
  t.is(t.throws(() => b.nodeDevice('pci_ffff_ff_1f_7'), { instanceOf: LibvirtError })!.code, ErrorCode.NO_NODE_DEVICE);
});

stest('closing every connection stops the libvirt event loop (the process can exit)', async (t) => {
  const extra = Connection.open(hosts.b.uri, { events: true });
  extra.close();
  t.true(extra.isOpen === false);
  t.throws(() => extra.listDomains(), { instanceOf: LibvirtError });
  a.close();
  b.close();
  await Promise.race([Connection.eventLoopStopped(), new Promise((_r, rej) => setTimeout(() => rej(new Error('event loop still running after 10 s')), 10_000))]);
  t.pass();
});
