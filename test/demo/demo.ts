// npm run demo, inside the rig guest (the real 6.12 kernel): binds the edu devices to our
// test variant driver through the driver table, lists them, runs a spare-device trial,
// then migrates a VM pair with the engine - two nested QEMU processes (no OS, no VFIO
// device: vfio-mig holds two edu devices next to each VM) - QEMU moving RAM and vCPUs,
// vfio-mig moving several MiB of device state per device at QEMU's pre-switchover pause.
// It proves the destination devices hold the source's state, prints the downtime by
// phase, and writes the timeline and its SVG report to a results folder. Last, the
// production path: two QEMU processes migrate a VM with an mtty mdev (QEMU drives the
// device), `vfio-mig watch` checks it, and its report is written next to the engine's.
import { mkdirSync, writeFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { trialMigrate } from '../../src/migration/trial.ts';
import { VfioDevice } from '../../src/vfio/device.ts';
import { formatDowntime, writeTimeline } from '../../src/migration/engine.ts';
import { modprobe, eduDevices, eduKnob, EDU_DRIVER, driverOf, prepareMtty } from '../rig/guest.ts';
import { startVmPair, runEngines } from '../rig/engine-vms.ts';
import { cleanupList, inb, ioBars, migrate, mttyDevice, SCRATCH, startPair, writeUntilRead } from '../rig/qemu-pair.ts';
import { watchQmp } from '../../src/cli/watch.ts';
import { formatSummary } from '../../src/report/summary.ts';

// main.ts runs itself when it is the process's entry script - which the bundle is: hide
// our argv from that check, then load it.
process.argv[1] = '';
const { main } = await import('../../src/cli/main.ts');

const MIB = 1 << 20;
const STATE_MIB = Number(process.env.VFIO_MIG_DEMO_STATE_MIB ?? 8);
// Written to the rig's results dir (the guest's one writable host folder); run.sh copies
// it to $VFIO_MIG_DEMO_RESULTS on the host and names that folder.
const results = join(process.env.VFIO_MIG_RIG_RESULTS ?? tmpdir(), 'demo');
const shown = (p: string): string => (process.env.VFIO_MIG_DEMO_RESULTS ? p.replace(results, process.env.VFIO_MIG_DEMO_RESULTS) : p);
mkdirSync(results, { recursive: true });

const say = (text = ''): void => void process.stdout.write(`${text}\n`);
const quiet = { write: () => true } as unknown as NodeJS.WritableStream;
let ok = true;
const check = (what: string, good: boolean): void => {
  say(`  ${good ? 'ok  ' : 'FAIL'} ${what}`);
  ok &&= good;
};

// 1. Binding through the driver table: one rule for QEMU's edu device.
const work = mkdtempSync(join(tmpdir(), 'vfio-mig-demo-'));
process.env.VFIO_MIG_STATE_DIR = join(work, 'state');
process.env.VFIO_MIG_CONFIG = join(work, 'config.json');
writeFileSync(
  process.env.VFIO_MIG_CONFIG,
  JSON.stringify({ version: 1, aliasPolicy: 'off', rules: [{ vendor: '1234', device: '11e8', driver: EDU_DRIVER, comment: 'QEMU edu: the rig test variant driver' }] }, null, 2),
);
say('== 1. Bind: the driver table has one rule, edu (1234:11e8) -> edu-vfio-pci ==');
modprobe('vfio_iommu_type1'); // busybox modprobe ignores vfio's softdep
await main(['bind', '--all']);
const edu = eduDevices();
check(`${edu.length} edu devices bound to ${EDU_DRIVER}`, edu.length >= 4 && edu.every((b) => driverOf(b) === EDU_DRIVER));
say();
say('== 2. Inventory: vfio-mig devices ==');
await main(['devices']);
say();

// 2. A trial: does a spare device take this device's state?
say(`== 3. Trial: the state of ${edu[0]} loaded into the spare ${edu[3]} ==`);
try {
  const r = await trialMigrate(edu[0]!, edu[3]!);
  say(`  ${r.bytes} bytes via ${r.via}; save ${r.saveMs.toFixed(1)} ms, load ${r.restoreMs.toFixed(1)} ms`);
  check('the spare device re-saves exactly the state it was given', r.verified);
} catch (err) {
  check(`trial: ${(err as Error).message}`, false);
}
say();

// 3. The VM pair and the engine.
const [s0, s1, d0, d1] = edu as [string, string, string, string];
say(`== 4. Live migration of a VM with two devices: {${s0}, ${s1}} -> {${d0}, ${d1}} ==`);
for (const b of [s0, s1]) eduKnob(b, 'blob_size', STATE_MIB * MIB);
const before = { [s0]: eduKnob(s0, 'state_digest'), [s1]: eduKnob(s1, 'state_digest') };
say(`  device state: ${STATE_MIB} MiB per device (edu blob_size); source digests ${before[s0]}, ${before[s1]}`);
say(`  destination digests before: ${eduKnob(d0, 'state_digest')}, ${eduKnob(d1, 'state_digest')} (different devices, different state)`);
const dir = mkdtempSync(join(tmpdir(), 'vfio-mig-demo-vms-'));
const vms = await startVmPair(dir);
say('  two QEMU 10 processes: "src" running, "dst" waiting with -incoming defer (64 MiB, no OS, no VFIO device:');
say('  vfio-mig holds the devices; QEMU moves RAM and vCPUs, vfio-mig moves the device state)');
const src = [VfioDevice.open(s0), VfioDevice.open(s1)];
const dst = [VfioDevice.open(d0), VfioDevice.open(d1)];
try {
  const t0 = performance.now();
  const run = await runEngines({ dir, source: src, destination: dst, vms, log: (l) => say(`    ${l}`) });
  const wall = performance.now() - t0;
  const so = run.source.outcome;
  const de = run.destination.outcome;
  say(`  migration took ${(wall / 1000).toFixed(1)} s wall time; source: ${so.ok ? 'completed' : `FAILED in ${so.phase}: ${so.cause}`}; destination: ${de.ok ? 'completed' : `FAILED in ${de.phase}: ${de.cause}`}`);
  check('the engines completed on both sides', so.ok && de.ok);
  const srcStatus = (await vms.src.qmp.execute('query-status')) as { status: string };
  const dstStatus = (await vms.dst.qmp.execute('query-status')) as { status: string; running: boolean };
  check(`the VM runs on the destination (dst: ${dstStatus.status}; src: ${srcStatus.status})`, dstStatus.running && srcStatus.status === 'postmigrate');
  check(`destination devices RUNNING: ${Object.entries(de.devices).map(([d, s]) => `${d} ${s}`).join(', ')}`, Object.values(de.devices).every((s) => s === 'RUNNING'));
  const after = [eduKnob(d0, 'state_digest'), eduKnob(d1, 'state_digest')];
  check(`destination devices hold the source's state: ${d0} ${after[0]}, ${d1} ${after[1]}`, after[0] === before[s0] && after[1] === before[s1]);
  check(`${de.bytes ?? 0} bytes of device state streamed (about ${((de.bytes ?? 0) / MIB).toFixed(1)} MiB)`, (de.bytes ?? 0) >= 2 * STATE_MIB * MIB);
  say();
  say('  downtime (vCPU stop on the source -> cont on the destination), by phase:');
  if (run.merged.engine.downtime) say(formatDowntime(run.merged.engine.downtime));
  else check('downtime measured', false);
  const qemuDowntime = so.qemu?.downtime;
  if (typeof qemuDowntime === 'number') say(`  (QEMU's own downtime figure for its part: ${qemuDowntime} ms)`);
  say();
  // The report: the engine's timeline, summarised and drawn by `vfio-mig report`.
  const timeline = join(results, 'timeline.json');
  const svg = join(results, 'report.svg');
  writeTimeline(timeline, run.merged);
  writeTimeline(join(results, 'source-timeline.json'), run.source.timeline);
  writeTimeline(join(results, 'destination-timeline.json'), run.destination.timeline);
  say(`== 5. vfio-mig report ${shown(timeline)} -o ${shown(svg)} ==`);
  const code = await main(['report', timeline, '-o', svg]);
  check('the report says ok', code === 0);
  say("  (the report's \"events bound\" is the devices' own downtime: the source's first STOP_COPY arc to the last");
  say('  RUNNING arc on the destination; the VM\'s downtime is the vCPU stop -> cont figure above)');
  // The source's copy is stale now: closing the devices hands them back to the kernel.
  say(`  source devices released: closed after the handover (their state now lives on ${d0}, ${d1})`);
} catch (err) {
  check(`migration: ${(err as Error).stack ?? String(err)}`, false);
} finally {
  for (const d of [...src, ...dst]) await d.close();
  await vms.src.stop();
  await vms.dst.stop();
  rmSync(dir, { recursive: true, force: true });
  await main(['unbind'], quiet, quiet).catch(() => 1);
  rmSync(work, { recursive: true, force: true });
}
say();

// 6. The production path: QEMU itself drives the device's migration; vfio-mig watches.
say('== 6. QEMU-driven migration of an mtty mdev (the kernel\'s sample driver), watched by vfio-mig watch ==');
say('  In production QEMU >= 8.2 owns the VFIO device and moves its state; vfio-mig watches both ends,');
say('  checks the ordering rules (all devices quiesced before any stops; all RUNNING_P2P before any runs)');
say('  and measures the downtime.');
const cleanup = cleanupList();
try {
  const [srcUuid, dstUuid] = prepareMtty(2) as [string, string];
  const pair = await startPair(cleanup, [mttyDevice(srcUuid, 'serial0')], [mttyDevice(dstUuid, 'serial0')]);
  say(`  two QEMU 10 processes, each with one mtty mdev (source ${srcUuid}, destination ${dstUuid})`);
  // The UART scratch register of each port: written on the source, read on the destination.
  const ports: Array<[number, number]> = [];
  let value = 0x5a;
  for (const bar of await ioBars(pair.src, 'serial0')) {
    const port = bar.address + SCRATCH;
    await writeUntilRead(pair.src, port, value);
    ports.push([port, value]);
    value += 0x11;
  }
  say(`  wrote ${ports.map(([p, v]) => `0x${v.toString(16)} to port 0x${p.toString(16)}`).join(', ')} on the source`);
  let ready!: () => void;
  const watching = new Promise<void>((r) => (ready = r));
  const watched = watchQmp({ sourcePath: pair.srcWatch, destPath: pair.dstWatch, timeoutMs: 300_000, settleMs: 10_000, onReady: () => ready() });
  await Promise.race([watching, watched]);
  await migrate(pair);
  const w = await watched;
  say(`  vfio-mig watch: ${formatSummary(w.analysis).trimEnd().split('\n').join('\n    ')}`);
  check(`the watch verdict is ok (${w.analysis.reason})`, w.analysis.verdict === 'ok');
  const st = (await pair.dst.qmp.execute('query-status')) as { status: string };
  check(`the VM runs on the destination (${st.status})`, st.status === 'running');
  const back = await Promise.all(ports.map(async ([p]) => inb(pair.dst, p)));
  check(`the destination's mdev holds the source's registers (${back.map((v) => `0x${v.toString(16)}`).join(', ')})`, back.every((v, i) => v === ports[i]![1]));
  const wtl = join(results, 'watch-timeline.json');
  const wsvg = join(results, 'watch-report.svg');
  writeFileSync(wtl, `${JSON.stringify(w.record, null, 1)}\n`);
  say(`  vfio-mig report ${shown(wtl)} -o ${shown(wsvg)}`);
  check('the watch report renders', (await main(['report', wtl, '-o', wsvg], quiet)) === 0);
} catch (err) {
  check(`QEMU-driven migration: ${(err as Error).stack ?? String(err)}`, false);
} finally {
  await cleanup.run();
}
say();
say(`results: ${shown(results)} (timeline.json, report.svg, source-/destination-timeline.json; watch-timeline.json, watch-report.svg)`);
say(ok ? 'demo: the VM and its two devices moved with vfio-mig\'s engine, and a QEMU-driven mtty migration was watched and verified; the destination devices hold the source state' : 'demo: FAILED');
process.exitCode = ok ? 0 : 1;
