// `vfio-mig watch` against real QEMU-driven VFIO migrations inside the rig guest: two
// nested QEMU 10 processes migrate a VM holding the upstream mtty mdev (one and two devices)
// or the project's edu device with a failure injected on the source's STOP_COPY arc. The
// watch must say `ok` (with a downtime) for the good runs, `failed` naming the device and
// the phase for the injected one (and the source VM keeps running), and a real recorded
// timeline with its order broken must be `violated`.
//
// The recorded timelines are written to VFIO_MIG_WATCH_SAVE, else to timelines/ in the rig's
// results dir (kept with VFIO_MIG_RIG_KEEP=1): that is how test/fixtures/timelines/ was made.

import test from 'ava';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { main } from '../../src/cli/main.ts';
import type { Analysis } from '../../src/report/analysis.ts';
import type { WatchRecord } from '../../src/report/timeline.ts';
import { MTTY_UUIDS, eduInject, eduKnob, prepareEdu, prepareMtty, requireRig } from './guest.ts';
import { eduDevice, inb, ioBars, migrate, mttyDevice, SCRATCH, startPair, writeUntilRead, type Pair } from './qemu-pair.ts';

requireRig(test);
test.serial.before(() => {
  prepareMtty(4);
});

const save = process.env.VFIO_MIG_WATCH_SAVE ?? (process.env.VFIO_MIG_RIG_RESULTS ? join(process.env.VFIO_MIG_RIG_RESULTS, 'timelines') : undefined);
if (save) mkdirSync(save, { recursive: true });

function sink(): { stream: NodeJS.WritableStream; text: () => string } {
  const chunks: string[] = [];
  return { stream: { write: (c: string) => (chunks.push(String(c)), true) } as unknown as NodeJS.WritableStream, text: () => chunks.join('') };
}

interface Watched {
  code: number;
  analysis: Analysis;
  record: WatchRecord;
  timelineFile: string;
  stderr: string;
}

/**
 * Starts `vfio-mig watch --json` on the pair's second sockets. `ready` resolves once the
 * watch says it is watching (both ends connected); `done` when it ends.
 */
function startWatch(p: Pair, name: string): { ready: Promise<void>; done: Promise<Watched> } {
  const timelineFile = join(p.dir, `${name}.json`);
  const out = sink();
  const chunks: string[] = [];
  let onReady!: () => void;
  const ready = new Promise<void>((r) => (onReady = r));
  const err = {
    write: (c: string) => {
      chunks.push(String(c));
      if (/watching/.test(String(c))) onReady();
      return true;
    },
  } as unknown as NodeJS.WritableStream;
  const done = main(['watch', '--source-qmp', p.srcWatch, '--dest-qmp', p.dstWatch, '--json', '--timeout', '120', '--settle', '10', '--timeline', timelineFile], out.stream, err).then((code) => {
    onReady();
    const record = JSON.parse(readFileSync(timelineFile, 'utf8')) as WatchRecord;
    if (save) writeFileSync(join(save, `${name}.json`), `${JSON.stringify(record, null, 1)}\n`);
    return { code, analysis: JSON.parse(out.text()) as Analysis, record, timelineFile, stderr: chunks.join('') };
  });
  return { ready, done };
}


for (const n of [1, 2]) {
  test.serial(`mtty x${n}: watch says ok with a downtime, device registers arrive intact`, async (t) => {
    const ids = Array.from({ length: n }, (_, i) => `dev${i}`);
    const p = await startPair(
      t,
      ids.map((id, i) => mttyDevice(MTTY_UUIDS[i]!, id)),
      ids.map((id, i) => mttyDevice(MTTY_UUIDS[n + i]!, id)),
    );
    // Write each port's scratch register on the source once SeaBIOS has placed the BARs
    // and turned I/O decoding on (until then a write is lost: retry until it reads back).
    const written = new Map<number, number>();
    let value = n === 1 ? 0x5a : 0x3b;
    for (const id of ids) {
      for (const bar of await ioBars(p.src, id)) {
        const port = bar.address + SCRATCH;
        const tries = await writeUntilRead(p.src, port, value);
        if (tries > 1) t.log(`${id} bar${bar.bar}: the scratch register took ${tries} writes`);
        written.set(port, value);
        value += 0x10;
      }
    }
    const watch = startWatch(p, `mtty-x${n}`);
    await watch.ready;
    await migrate(p);
    const w = await watch.done;
    t.log(`verdict ${w.analysis.verdict}: ${w.analysis.reason}`);
    t.log(`downtime: QEMU ${w.analysis.qemu.downtimeMs} ms, events bound ${w.analysis.events.downtimeBoundMs} ms, STOP->RESUME ${w.analysis.events.stopToResumeMs} ms; total ${w.analysis.qemu.totalTimeMs} ms; vfio ${w.analysis.qemu.vfioTransferred} B`);
    for (const d of w.analysis.devices) t.log(`${d.id} (${d.host}): ${d.source.join(' -> ')} | ${d.destination.join(' -> ')}`);
    t.is(w.code, 0, w.stderr);
    t.is(w.analysis.verdict, 'ok');
    t.is(w.analysis.status, 'completed');
    t.true(typeof w.analysis.downtimeMs === 'number' && w.analysis.downtimeMs >= 0);
    t.deepEqual(w.analysis.violations, []);
    t.deepEqual(w.analysis.devices.map((d) => d.id).sort(), ids);
    for (const d of w.analysis.devices) {
      t.true(d.source.includes('stop-copy'), `${d.id} went through stop-copy on the source`);
      t.is(d.final.source, 'stop');
      t.deepEqual(d.destination.slice(-2), ['running-p2p', 'running']);
    }
    t.is(w.analysis.qemu.vfioTransferred, 96 * n); // struct mtty_data of a dual-port mdev
    // The registers read back the same on the destination.
    const status = (await p.dst.qmp.execute('query-status')) as { status: string };
    t.is(status.status, 'running');
    for (const [port, v] of written) t.is(await inb(p.dst, port), v, `port 0x${port.toString(16)} on the destination`);

    // `vfio-mig report` renders the same recording.
    const out = sink();
    const svgFile = join(p.dir, 'report.svg');
    t.is(await main(['report', w.timelineFile, '-o', svgFile], out.stream, sink().stream), 0);
    t.regex(out.text(), /^verdict: ok/);
    t.regex(readFileSync(svgFile, 'utf8'), /<svg [^>]*xmlns="http:\/\/www.w3.org\/2000\/svg"/);

    if (n === 2) {
      // The same real recording with the source's order broken: dev1 reaches stop-copy
      // before dev0 is quiesced. The checker must call that a violation.
      const doctored = structuredClone(w.record);
      const ev = doctored.source.events;
      const isDev = (e: (typeof ev)[number], id: string, state: string): boolean => e.event === 'VFIO_MIGRATION' && e.data['device-id'] === id && e.data['device-state'] === state;
      const p2p = ev.findIndex((e) => isDev(e, 'dev0', 'pre-copy-p2p'));
      const stopCopy = ev.findIndex((e) => isDev(e, 'dev1', 'stop-copy'));
      t.true(p2p >= 0 && stopCopy >= 0);
      const [moved] = ev.splice(stopCopy, 1);
      ev.splice(Math.min(p2p, stopCopy), 0, moved!);
      ev.forEach((e, i) => (e.seq = i + 1));
      const file = join(p.dir, 'doctored.json');
      writeFileSync(file, JSON.stringify(doctored));
      const rep = sink();
      t.is(await main(['report', file, '--json'], rep.stream, sink().stream), 5);
      const a = JSON.parse(rep.text()) as Analysis;
      t.is(a.verdict, 'violated');
      t.true(a.violations.some((v) => v.rule === 'p2p-before-stop' && v.device === 'dev0'));
    }
  });
}

test.serial('edu with a failed STOP_COPY arc on the source: watch says failed, names the device and the phase; the source keeps running', async (t) => {
  const [srcBdf, dstBdf] = prepareEdu();
  const p = await startPair(t, [eduDevice(srcBdf!, 'edu0')], [eduDevice(dstBdf!, 'edu0')]);
  eduInject(srcBdf!, '*>STOP_COPY', { mode: 'always' });
  const watch = startWatch(p, 'edu-fail-stop-copy');
  await watch.ready;
  await migrate(p);
  const w = await watch.done;
  t.log(`verdict ${w.analysis.verdict}: ${w.analysis.reason}`);
  for (const d of w.analysis.devices) t.log(`${d.id} (${d.host}): ${d.source.join(' -> ')} | ${d.destination.join(' -> ')}`);
  const fired = Number(eduKnob(srcBdf!, 'fail_count'));
  t.log(`edu arc_log: ${eduKnob(srcBdf!, 'arc_log').split('\n').join(', ')}; fail_count ${fired}`);
  eduKnob(srcBdf!, 'fail_arc', 'none');
  t.is(w.code, 1, w.stderr);
  t.is(w.analysis.verdict, 'failed');
  t.is(w.analysis.status, 'failed');
  t.is(w.analysis.failure?.phase, 'switchover');
  t.deepEqual(w.analysis.failure?.devices, ['edu0']);
  t.regex(w.analysis.reason, /edu0/);
  t.regex(w.analysis.reason, /switchover/);
  t.true(fired >= 1, 'the injected failure fired');
  // The source VM runs again, and its device with it.
  const st = (await p.src.qmp.execute('query-status')) as { status: string };
  t.is(st.status, 'running');
  t.is(w.analysis.devices[0]?.final.source, 'running');
});

test.serial('mtty x1, VM paused before the migration: ok, the destination stays paused; cont then runs the device', async (t) => {
  const p = await startPair(t, [mttyDevice(MTTY_UUIDS[0]!, 'dev0')], [mttyDevice(MTTY_UUIDS[2]!, 'dev0')]);
  await ioBars(p.src, 'dev0');
  const watch = startWatch(p, 'mtty-x1-paused');
  await watch.ready;
  await p.src.qmp.execute('stop');
  await migrate(p);
  const w = await watch.done;
  t.log(`verdict ${w.analysis.verdict}: ${w.analysis.reason}`);
  for (const d of w.analysis.devices) t.log(`${d.id}: ${d.source.join(' -> ')} | ${d.destination.join(' -> ')}`);
  t.is(w.code, 0, w.stderr);
  t.is(w.analysis.verdict, 'ok');
  t.deepEqual(w.analysis.violations, []);
  const d = w.analysis.devices[0]!;
  t.true(d.source.includes('stop-copy'));
  t.is(((await p.dst.qmp.execute('query-status')) as { status: string }).status, 'paused');
  // `cont` on the destination starts the VM and its device, in the P2P order.
  const since = p.dst.qmp.lastSeq;
  await p.dst.qmp.execute('cont');
  const ev = await p.dst.qmp.waitFor('VFIO_MIGRATION', (e) => e.data['device-state'] === 'running', 30_000, { since });
  t.truthy(ev);
});

test.serial('two edu devices, the second one failing STOP_COPY on the source: failed, naming that device, not the other', async (t) => {
  const edus = prepareEdu();
  if (edus.length < 4) return t.fail(`needs 4 edu devices (VFIO_MIG_RIG_EDU=4), found ${edus.length}`);
  const [a, b, c, d] = edus as [string, string, string, string];
  const p = await startPair(t, [eduDevice(a, 'edu0'), eduDevice(b, 'edu1')], [eduDevice(c, 'edu0'), eduDevice(d, 'edu1')]);
  eduInject(b, '*>STOP_COPY', { mode: 'always' });
  const watch = startWatch(p, 'edu-x2-fail-stop-copy');
  await watch.ready;
  await migrate(p);
  const w = await watch.done;
  const fired = Number(eduKnob(b, 'fail_count'));
  eduKnob(b, 'fail_arc', 'none');
  t.log(`verdict ${w.analysis.verdict}: ${w.analysis.reason}`);
  for (const dev of w.analysis.devices) t.log(`${dev.id} (${dev.host}): ${dev.source.join(' -> ')} | ${dev.destination.join(' -> ')}`);
  for (const v of w.analysis.violations) t.log(`violation: ${v.message}`);
  t.true(fired >= 1, 'the injected failure fired');
  t.is(w.code, 1, w.stderr);
  t.is(w.analysis.verdict, 'failed');
  t.is(w.analysis.failure?.phase, 'switchover');
  t.deepEqual(w.analysis.failure?.devices, ['edu1']);
  t.is(((await p.src.qmp.execute('query-status')) as { status: string }).status, 'running');
  for (const dev of w.analysis.devices) t.is(dev.final.source, 'running', `${dev.id} runs again on the source`);
});

test.serial('mtty x1, migration cancelled while iterating: failed in the iteration phase, the device runs on the source again', async (t) => {
  const p = await startPair(t, [mttyDevice(MTTY_UUIDS[0]!, 'dev0')], [mttyDevice(MTTY_UUIDS[3]!, 'dev0')]);
  // 1 KiB/s: the RAM never gets through, so the migration stays in its iteration phase.
  await p.src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 1024 });
  const watch = startWatch(p, 'mtty-x1-cancelled');
  await watch.ready;
  const since = p.src.qmp.lastSeq;
  await migrate(p);
  await p.src.qmp.waitFor('MIGRATION', (e) => e.data.status === 'active', 60_000, { since });
  await p.src.qmp.waitFor('VFIO_MIGRATION', (e) => e.data['device-state'] === 'pre-copy', 60_000, { since });
  await p.src.qmp.execute('migrate_cancel');
  const w = await watch.done;
  t.log(`verdict ${w.analysis.verdict}: ${w.analysis.reason}`);
  for (const d of w.analysis.devices) t.log(`${d.id}: ${d.source.join(' -> ')} | ${d.destination.join(' -> ')}`);
  t.is(w.code, 1, w.stderr);
  t.is(w.analysis.verdict, 'failed');
  t.is(w.analysis.status, 'cancelled');
  t.is(w.analysis.failure?.phase, 'iteration');
  t.deepEqual(w.analysis.violations, []);
  t.is(w.analysis.devices[0]?.final.source, 'running');
  t.is(((await p.src.qmp.execute('query-status')) as { status: string }).status, 'running');
});
