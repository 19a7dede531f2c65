// Live migrations of a domain holding an mtty mdev between two real libvirtd 11.3 daemons
// inside the rig guest (test/rig/libvirt-guest.ts: hosts A and B, each in its own network,
// mount and UTS namespace, vfio-mig installed on each by its own installer, hooks
// included). Both "hosts" share one kernel, so the destination must give the domain a
// different mdev: that is the destination's `migrate` hook's job, from the vfio-mig
// metadata (each hostdev's compatibility descriptor) the source side embeds in the XML.
//
// Two ways, each from a fresh domain on A: `vfio-mig migrate <dom> --to <B> --json` as
// installed on A (preflight, destination XMLs, libvirt p2p migration, verdict), and the
// same by hand (`vfio-mig preflight --print-xml`, then virDomainMigrateToURI3 through the
// project's binding). Proved each time, on the real 6.12 VFIO/mdev kernel, QEMU 10 and
// libvirt 11.3:
// - the migration completes (the command's verdict is ok) and the domain runs on B, shut
//   off on A;
// - B's hook rewrote the hostdev to a free mdev of its own (its hooks.log says which);
// - the mtty registers written through A's QEMU read back the same through B's QEMU (the
//   device state travelled in the migration stream);
// - nothing is left: daemons, QEMUs, namespaces and the mdevs this file created go
//   (checked after the last test).
import test, { type ExecutionContext } from 'ava';
import { execFile, execFileSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Connection, MigrateFlag, type Domain } from '../../src/libvirt/binding.ts';
import { MTTY_UUIDS, modprobe, requireRig } from './guest.ts';
import { mttyDomainXml, startGuestHosts, vfioMigOn, type GuestHost, type GuestHosts } from './libvirt-guest.ts';

requireRig(test);

const inRig = Boolean(process.env.VFIO_MIG_IN_RIG);
const MDEV = '/sys/bus/mdev/devices';
const CREATE = '/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2/create';
// The source's mdev, and one more the destination can pick.
const [SRC_UUID, SPARE_UUID] = [MTTY_UUIDS[0]!, MTTY_UUIDS[1]!];
const created: string[] = [];
let hosts: GuestHosts | undefined;

test.before(async (t) => {
  if (!inRig) return;
  modprobe('vfio', 'vfio_iommu_type1', 'mdev', 'mtty');
  for (const u of [SRC_UUID, SPARE_UUID]) {
    if (existsSync(join(MDEV, u))) continue;
    writeFileSync(CREATE, u);
    created.push(u);
  }
  hosts = await startGuestHosts({
    vfio: true,
    config: {
      // The daemon hook runs `vfio-mig bind --all` at each daemon start: keep it off the
      // rig's edu devices, which other rig files own.
      rules: [{ vendor: '1234', device: '11e8', exclude: true, comment: 'rig: edu devices belong to other rig tests' }],
      // Node under nested TCG starts in seconds, not milliseconds: room for the hooks.
      hooks: { timeouts: { prepareSeconds: 300, migrateSeconds: 300, releaseSeconds: 300 } },
    },
  });
  t.log(`hosts up: A ${hosts.timings.startA} ms, A's QEMU probe ${hosts.timings.probeA} ms, B ${hosts.timings.startB} ms`);
  // What an operator does on each host for a device no `vfio-mig bind` handled (mdevs are
  // created, not bound): record its migration capability while it is idle. Preflight
  // refuses a device without a record (device-capability).
  for (const h of [hosts.a, hosts.b]) {
    const r = await runArgv([...vfioMigOn(h), 'probe', SRC_UUID, SPARE_UUID, '--json']);
    if (r.code !== 0) throw new Error(`vfio-mig probe on ${h.name} failed (${r.code}): ${r.stdout}${r.stderr}`);
    t.log(`vfio-mig probe of both mdevs on ${h.name}: ${r.ms} ms`);
  }
});

test.after.always(async () => {
  const base = hosts?.base;
  const netns = hosts ? [hosts.a.netns, hosts.b.netns] : [];
  await hosts?.stop();
  for (const u of created) {
    try {
      writeFileSync(join(MDEV, u, 'remove'), '1');
    } catch {
      // already gone
    }
  }
  // The rig runs every file in one boot: prove nothing of ours outlives this file.
  const left: string[] = [];
  if (base) {
    for (const pid of readdirSync('/proc').filter((p) => /^\d+$/.test(p))) {
      try {
        if (readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(base)) left.push(`process ${pid}`);
      } catch {
        // exited meanwhile
      }
    }
    if (existsSync(base)) left.push(base);
  }
  const namespaces = execFileSync('ip', ['netns', 'list'], { encoding: 'utf8' });
  for (const ns of netns) if (namespaces.includes(ns)) left.push(`netns ${ns}`);
  for (const u of created) if (existsSync(join(MDEV, u))) left.push(`mdev ${u}`);
  if (left.length) throw new Error(`left behind after the libvirt rig: ${left.join(', ')}`);
});

interface Run {
  code: number;
  stdout: string;
  stderr: string;
  ms: number;
}

function runArgv(argv: string[], env: NodeJS.ProcessEnv = process.env, timeoutMs = 600_000): Promise<Run> {
  const t0 = Date.now();
  return new Promise((resolve) =>
    execFile(argv[0]!, argv.slice(1), { encoding: 'utf8', env, timeout: timeoutMs, maxBuffer: 16 << 20 }, (err, stdout, stderr) =>
      resolve({ code: err ? Number((err as { code?: number }).code ?? 1) : 0, stdout, stderr, ms: Date.now() - t0 }),
    ),
  );
}

async function hmp(dom: Domain, command: string): Promise<string> {
  return String(await dom.execute('human-monitor-command', { 'command-line': command }));
}

interface PciDev {
  qdev_id?: string;
  regions?: Array<{ type: string; address: number }>;
  pci_bridge?: { devices?: PciDev[] };
}

/** Every device of query-pci, including those behind bridges (libvirt puts hostdevs on a root port). */
function allDevices(devs: PciDev[]): PciDev[] {
  return devs.flatMap((d) => [d, ...allDevices(d.pci_bridge?.devices ?? [])]);
}

/** The I/O BARs of hostdev0 once SeaBIOS has placed them. */
async function ioPorts(dom: Domain, timeoutMs = 120_000): Promise<number[]> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const buses = (await dom.execute('query-pci')) as Array<{ devices: PciDev[] }>;
    const io = (allDevices(buses.flatMap((b) => b.devices)).find((d) => d.qdev_id === 'hostdev0')?.regions ?? []).filter((r) => r.type === 'io');
    // Unplaced BARs read 0 or -1 (QEMU's PCI_BAR_UNMAPPED).
    if (io.length && io.every((r) => r.address > 0)) return io.map((r) => r.address);
    if (Date.now() > deadline) throw new Error(`hostdev0 has no placed I/O BARs after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

async function inb(dom: Domain, port: number): Promise<number> {
  const text = await hmp(dom, `i /b 0x${port.toString(16)}`);
  const m = /=\s*(0x[0-9a-f]+)/i.exec(text);
  if (!m) throw new Error(`unexpected answer to i /b: ${text}`);
  return Number(m[1]);
}

function hookLog(h: GuestHost): Array<Record<string, unknown>> {
  const f = join(h.dir, 'vfio-mig-log', 'hooks.log');
  return existsSync(f) ? readFileSync(f, 'utf8').trim().split('\n').filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>) : [];
}

const SCR = 7; // UART scratch register: read/write, no side effects; mtty migrates it.

/**
 * Defines and starts `name` on A with SRC_UUID, then writes the scratch register of both
 * mtty ports through A's QEMU, retrying until SeaBIOS has turned on I/O decoding (a write
 * before that is lost). Returns the domain and what was written where.
 */
async function startOnA(t: ExecutionContext, connA: Connection, name: string, first: number): Promise<{ src: Domain; written: Map<number, number> }> {
  const h = hosts!;
  const t0 = Date.now();
  const src = connA.defineDomain(mttyDomainXml({ name, uuid: SRC_UUID }));
  src.start();
  t.log(`define + start on A (hooks included): ${Date.now() - t0} ms`);
  t.is(src.state().state, 'running');
  t.true(hookLog(h.a).some((e) => e.domain === name && e.operation === 'prepare'), `A's prepare hook ran: ${JSON.stringify(hookLog(h.a))}`);
  const written = new Map<number, number>();
  let value = first;
  for (const bar of await ioPorts(src)) {
    const port = bar + SCR;
    const deadline = Date.now() + 60_000;
    for (;;) {
      await hmp(src, `o /b 0x${port.toString(16)} 0x${value.toString(16)}`);
      if ((await inb(src, port)) === value) break;
      if (Date.now() > deadline) throw new Error(`port 0x${port.toString(16)} on A does not keep 0x${value.toString(16)}`);
      await new Promise((r) => setTimeout(r, 250));
    }
    written.set(port, value);
    value += 0x10;
  }
  t.is(written.size, 2, 'mtty-2 has two ports');
  return { src, written };
}

/** After A -> B: the domain runs on B on an mdev B's hook picked, with A's register values. */
async function checkOnB(t: ExecutionContext, connB: Connection, src: Domain, name: string, written: Map<number, number>): Promise<void> {
  const h = hosts!;
  const dst = connB.lookupDomain(name);
  try {
    t.is(dst.state().state, 'running', 'the domain runs on B');
    t.is(src.state().state, 'shutoff', 'and no longer on A');
    const live = dst.xml();
    const uuid = /<hostdev[^>]*type=['"]mdev['"][\s\S]*?<address uuid=['"]([0-9a-f-]+)['"]/.exec(live)?.[1];
    t.truthy(uuid, live);
    t.not(uuid, SRC_UUID, "B's hook gave the domain another mdev (A's is held by A's QEMU until the switch-over)");
    t.true(MTTY_UUIDS.includes(uuid!));
    const picked = hookLog(h.b).filter((e) => e.domain === name && e.event === 'picked');
    t.is(picked.length, 1, JSON.stringify(hookLog(h.b)));
    // The XML B's hook got names A's mdev, or the free one preflight assigned on B (then the
    // hook keeps it: the address an XML names is tried first).
    t.like(picked[0], { operation: 'migrate', target: uuid });
    t.true([SRC_UUID, uuid].includes((picked[0] as { source?: string }).source ?? ''), JSON.stringify(picked[0]));
    t.true(hookLog(h.a).some((e) => e.domain === name && e.operation === 'release'), "A's release hook ran after the migration");
    for (const [port, v] of written) t.is(await inb(dst, port), v, `port 0x${port.toString(16)} on B`);
    t.is(((await dst.execute('query-status')) as { status: string }).status, 'running');
  } finally {
    dst.dispose();
  }
}

/**
 * Connections to both hosts; at the end of the test (passed or not) the domain is gone from
 * both, so its release hooks drop its reservations and the next test finds the mdevs free.
 */
function connect(t: ExecutionContext, name: string): { connA: Connection; connB: Connection } {
  const connA = Connection.open(hosts!.a.uri);
  const connB = Connection.open(hosts!.b.uri);
  t.teardown(() => {
    for (const conn of [connB, connA]) {
      let dom: Domain | undefined;
      try {
        dom = conn.lookupDomain(name);
      } catch {
        continue; // not there
      }
      for (const step of [() => dom.destroy(), () => dom.undefine()]) {
        try {
          step();
        } catch {
          // not running / not persistent
        }
      }
      dom.dispose();
    }
    connA.close();
    connB.close();
  });
  return { connA, connB };
}

// The operator's steps on host A with A's own vfio-mig; the destination's facts come from
// B's own vfio-mig, run in B's namespaces (VFIO_MIG_PEER_COMMAND).
const peerEnv = (): NodeJS.ProcessEnv => ({ ...process.env, VFIO_MIG_PEER_COMMAND: JSON.stringify(vfioMigOn(hosts!.b)) });

test.serial('vfio-mig migrate moves a running domain with an mtty mdev from A to B: verdict ok, B remaps the mdev, the registers arrive, B runs it', async (t) => {
  const h = hosts!;
  const name = 'lv-mtty-cli';
  const { connA, connB } = connect(t, name);
  const { src, written } = await startOnA(t, connA, name, 0x5a);
  const timeline = join(h.base, `${name}.timeline.json`);
  const r = await runArgv([...vfioMigOn(h.a), 'migrate', name, '--to', h.b.uri, '--live', '--json', '--timeline', timeline, '--timeout', '600'], peerEnv());
  t.log(`vfio-mig migrate on A: exit ${r.code}, ${r.ms} ms`);
  if (r.stderr.trim()) t.log(r.stderr.trim());
  const res = JSON.parse(r.stdout || 'null') as { blocking?: unknown; verdict: string; exitCode: number; started: boolean; sourceState?: string; destinationState?: string; libvirtError?: string; notes: string[]; actions: string[]; preflight?: { checks: Array<{ id: string; verdict: string; detail: string }> }; analysis?: { verdict: string; downtimeMs?: number | null; devices: Array<{ id: string; source: string[]; destination: string[] }> } };
  for (const c of res.preflight?.checks.filter((x) => x.verdict !== 'pass') ?? []) t.log(`  preflight ${c.verdict} ${c.id}: ${c.detail}`);
  for (const n of [...res.actions, ...res.notes]) t.log(`  ${n}`);
  t.truthy(res.analysis, 'the libvirt watch ran (its analysis is in the result)');
  t.log(`  watch: ${res.analysis?.verdict}, downtime ${res.analysis?.downtimeMs ?? '?'} ms`);
  t.is(res.analysis?.verdict, 'ok', 'the events from both QEMUs keep the ordering rules');
  // The watch saw the device move through libvirt's monitor events, on both hosts.
  const dev = res.analysis?.devices.find((d) => d.id === 'hostdev0');
  t.log(`  hostdev0: ${dev?.source.join(' -> ')} | ${dev?.destination.join(' -> ')}`);
  t.true(dev?.source.includes('stop-copy'), 'the source QEMU reported hostdev0 in stop-copy');
  t.deepEqual(dev?.destination.slice(-2), ['running-p2p', 'running'], 'the destination QEMU reported hostdev0 running-p2p, then running');
  t.is(res.verdict, 'ok', JSON.stringify({ blocking: res.blocking, libvirtError: res.libvirtError, notes: res.notes, sourceState: res.sourceState, destinationState: res.destinationState }) + r.stderr);
  t.is(r.code, 0);
  t.true(res.started);
  t.is(res.destinationState, 'running');
  await checkOnB(t, connB, src, name, written);
  // The persistent definition travels with the migration past B's hook (libvirt passes only
  // the live XML through it): vfio-mig migrate rewrote it to the same mdev as the live one.
  const onB = connB.lookupDomain(name);
  const mdevOf = (xml: string): string | undefined => /<hostdev[^>]*type=['"]mdev['"][\s\S]*?<address uuid=['"]([0-9a-f-]+)['"]/.exec(xml)?.[1];
  t.is(mdevOf(onB.xml({ inactive: true })), mdevOf(onB.xml()), "B's persistent definition names the mdev the domain runs on");
  onB.dispose();
});

test.serial('libvirt API (preflight --print-xml, virDomainMigrateToURI3 p2p) with the vfio-mig hooks: the same migration without the migrate command', async (t) => {
  const h = hosts!;
  const name = 'lv-mtty-api';
  const { connA, connB } = connect(t, name);
  const { src, written } = await startOnA(t, connA, name, 0x3b);
  const xmlFile = join(h.base, `${name}.dest.xml`);
  const pre = await runArgv([...vfioMigOn(h.a), 'preflight', name, '--to', h.b.uri, '--print-xml', xmlFile, '--json', '--timeout', '300'], peerEnv());
  t.log(`preflight on A: exit ${pre.code}, ${pre.ms} ms`);
  if (pre.stderr.trim()) t.log(pre.stderr.trim());
  const report = JSON.parse(pre.stdout || 'null') as { verdict: string; checks: Array<{ id: string; verdict: string; detail: string }> };
  for (const c of report.checks.filter((x) => x.verdict !== 'pass')) t.log(`  ${c.verdict} ${c.id}: ${c.detail}`);
  t.not(report.verdict, 'fail', pre.stdout + pre.stderr);
  const destXml = readFileSync(xmlFile, 'utf8');
  t.regex(destXml, /https:\/\/vfio-mig\.org\/xmlns\/domain\/1/, 'preflight embedded the vfio-mig metadata');
  const t0 = Date.now();
  await src.migrateToUri3(h.b.uri, { destXml }, MigrateFlag.LIVE | MigrateFlag.PEER2PEER);
  t.log(`libvirt p2p live migration A -> B (hooks on both): ${Date.now() - t0} ms`);
  await checkOnB(t, connB, src, name, written);
});
