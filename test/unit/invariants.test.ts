// The ordering-rule checker (src/report/invariants.ts) and the verdict (analysis.ts) against
// real recorded data - timelines `vfio-mig watch` recorded in the rig from QEMU 10 migrating
// mtty mdevs and an edu device with an injected failure (test/fixtures/timelines/) - and
// against the same data doctored to break each rule, plus the engine's own timeline from a
// coordinator run on the fake kernel. A correct migration must never be a violation.

import test from 'ava';
import { readFileSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseTimeline, type WatchRecord, type RecordedEvent, type EngineRecord } from '../../src/report/timeline.ts';
import { checkInvariants, checkP2PBeforeStop, checkVcpusStopped, checkP2PBeforeRunning, checkRunningAfterResume } from '../../src/report/invariants.ts';
import { analyze } from '../../src/report/analysis.ts';
import { installFake } from '../fake/install.ts';
import { VfioDevice } from '../../src/vfio/device.ts';
import { Coordinator } from '../../src/migration/coordinator.ts';
import { readToEnd, writeAll } from '../../src/vfio/data.ts';

const FIXTURES = join(dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'timelines');
const load = (name: string): WatchRecord => JSON.parse(readFileSync(join(FIXTURES, name), 'utf8')) as WatchRecord;

const isDev = (e: RecordedEvent, id: string, state: string): boolean => e.event === 'VFIO_MIGRATION' && e.data['device-id'] === id && e.data['device-state'] === state;

/** Moves the event matching `what` to just before the one matching `before` (receive order), renumbering seq. */
function moveBefore(events: RecordedEvent[], what: (e: RecordedEvent) => boolean, before: (e: RecordedEvent) => boolean): void {
  const from = events.findIndex(what);
  if (from < 0) throw new Error('event to move not found');
  const [ev] = events.splice(from, 1);
  const to = events.findIndex(before);
  if (to < 0) throw new Error('anchor not found');
  events.splice(to, 0, ev!);
  events.forEach((e, i) => (e.seq = i + 1));
}

function moveAfter(events: RecordedEvent[], what: (e: RecordedEvent) => boolean, after: (e: RecordedEvent) => boolean): void {
  const from = events.findIndex(what);
  const [ev] = events.splice(from, 1);
  const to = events.findIndex(after);
  if (from < 0 || to < 0) throw new Error('event not found');
  events.splice(to + 1, 0, ev!);
  events.forEach((e, i) => (e.seq = i + 1));
}

// --- real recordings ---------------------------------------------------------------------

for (const name of ['mtty-x1.json', 'mtty-x2.json']) {
  test(`real recording ${name}: no rule broken, verdict ok, QEMU's figures kept`, (t) => {
    const tl = parseTimeline(load(name));
    t.deepEqual(checkInvariants(tl), []);
    const a = analyze(tl);
    t.is(a.verdict, 'ok', a.reason);
    t.is(a.status, 'completed');
    t.true(typeof a.downtimeMs === 'number' && a.downtimeMs > 0);
    t.is(a.downtimeMs, a.qemu.downtimeMs);
    t.true(a.events.downtimeBoundMs! >= a.events.stopToResumeMs!, 'the bound starts at the first device event of the stop, before QMP STOP');
    for (const d of a.devices) {
      t.deepEqual(d.source, ['pre-copy', 'pre-copy-p2p', 'stop-copy', 'stop']);
      t.deepEqual(d.destination, ['resuming', 'running-p2p', 'running']);
      t.regex(d.host ?? '', /^\/sys\/bus\/mdev\/devices\/83b8f4f2-/);
      t.not(d.host, d.destinationHost);
    }
    t.deepEqual(a.phases.map((p) => p.name), ['setup', 'iteration', 'switchover', 'resume']);
  });
}

test('real recording of a failed STOP_COPY arc: failed, in the switchover, naming edu0; the source runs again', (t) => {
  const a = analyze(parseTimeline(load('edu-fail-stop-copy.json')));
  t.is(a.verdict, 'failed');
  t.is(a.status, 'failed');
  t.deepEqual(a.violations, []);
  t.is(a.failure?.phase, 'switchover');
  t.deepEqual(a.failure?.devices, ['edu0']);
  t.regex(a.reason, /edu0 \(\/sys\/bus\/pci\/devices\/0000:01:00\.0\)/);
  t.regex(a.reason, /the source VM runs again/);
  t.is(a.devices[0]!.final.source, 'running');
});

test('real recording, two edu devices, the second failing STOP_COPY: failed naming edu1; the reset device does not count against the P2P rule', (t) => {
  const rec = load('edu-x2-fail-stop-copy.json');
  const tl = parseTimeline(rec);
  // QEMU reset edu1 (RUNNING) and then moved edu0 to STOP_COPY: its recovery path keeps no
  // P2P order, so the rule exempts a device QEMU put back to RUNNING outside a VM start.
  t.deepEqual(checkInvariants(tl), []);
  const a = analyze(tl);
  t.is(a.verdict, 'failed');
  t.is(a.failure?.phase, 'switchover');
  t.deepEqual(a.failure?.devices, ['edu1']);
  t.deepEqual(a.devices.find((d) => d.id === 'edu0')!.source, ['pre-copy', 'pre-copy-p2p', 'stop-copy', 'running-p2p', 'running']);
  delete rec.source.migrate!['error-desc'];
  t.deepEqual(analyze(parseTimeline(rec)).failure?.devices, ['edu1'], 'without QEMU naming it: the device that missed stop-copy');
  // Had edu1 still been running normally (no reset: it never left pre-copy), that is a violation.
  const doctored = load('edu-x2-fail-stop-copy.json');
  doctored.source.events = doctored.source.events.filter((e) => !(e.event === 'VFIO_MIGRATION' && e.data['device-id'] === 'edu1' && e.data['device-state'] !== 'pre-copy'));
  t.true(checkP2PBeforeStop(parseTimeline(doctored)).some((v) => v.device === 'edu1'));
});

test('real recording of a migration cancelled while iterating: failed in the iteration phase, the device runs on the source', (t) => {
  const a = analyze(parseTimeline(load('mtty-x1-cancelled.json')));
  t.deepEqual(a.violations, []);
  t.is(a.verdict, 'failed');
  t.is(a.status, 'cancelled');
  t.is(a.failure?.phase, 'iteration');
  t.deepEqual(a.devices[0]!.source, ['pre-copy', 'running']);
  t.is(a.devices[0]!.final.source, 'running');
  t.regex(a.reason, /cancelled in the iteration .* every device is running on the source again/);
});

test('real recording of a VM paused before its migration: ok, the destination stays paused (no RESUME expected)', (t) => {
  const tl = parseTimeline(load('mtty-x1-paused.json'));
  t.deepEqual(checkInvariants(tl), [], 'the device stopped after QMP STOP: the VM was already stopped');
  const a = analyze(tl);
  t.is(a.verdict, 'ok', a.reason);
  t.deepEqual(a.devices[0]!.source, ['running-p2p', 'stop', 'stop-copy', 'stop']);
  t.deepEqual(a.devices[0]!.destination, ['resuming']);
  t.regex(a.reason, /paused before it and stays paused on the destination/);
  // The same recording without the pause is a migration whose destination never ran.
  const rec = load('mtty-x1-paused.json');
  rec.source.events = rec.source.events.filter((e) => e.event !== 'STOP');
  rec.source.initialStatus = 'running';
  const b = analyze(parseTimeline(rec));
  t.not(b.verdict, 'ok');
});

test('timestamps do not matter within a side, only the order: shuffled clocks stay ok', (t) => {
  const rec = load('mtty-x2.json');
  // Reverse every timestamp of the source (receive order kept).
  const stamps = rec.source.events.map((e) => e.timestamp).reverse();
  rec.source.events.forEach((e, i) => (e.timestamp = stamps[i]!));
  t.deepEqual(checkInvariants(parseTimeline(rec)), []);
});

// --- doctored recordings: each rule broken once ---------------------------------------------

test('source: a device stops while the other is still pre-copy -> p2p-before-stop names the running one', (t) => {
  const rec = load('mtty-x2.json');
  moveBefore(rec.source.events, (e) => isDev(e, 'dev1', 'stop-copy'), (e) => isDev(e, 'dev0', 'pre-copy-p2p'));
  const tl = parseTimeline(rec);
  const v = checkP2PBeforeStop(tl);
  t.is(v.length, 1);
  t.is(v[0]!.device, 'dev0');
  t.is(v[0]!.phase, 'switchover');
  t.regex(v[0]!.message, /dev0 was still pre-copy on the source when dev1 reached stop-copy/);
  const a = analyze(tl);
  t.is(a.verdict, 'violated');
  t.regex(a.reason, /p2p-before-stop .* switchover .* dev0/);
});

test('source: with two devices a device skipping P2P is a violation; a single device may skip it', (t) => {
  const two = load('mtty-x2.json');
  two.source.events = two.source.events.filter((e) => !isDev(e, 'dev1', 'pre-copy-p2p'));
  const v = checkP2PBeforeStop(parseTimeline(two));
  t.true(v.some((x) => x.device === 'dev1' && /without a P2P state/.test(x.message)));
  const one = load('mtty-x1.json');
  one.source.events = one.source.events.filter((e) => !isDev(e, 'dev0', 'pre-copy-p2p'));
  t.deepEqual(checkInvariants(parseTimeline(one)), [], 'QEMU allows one device without P2P');
});

test('source: a device stopping with the vCPUs running (STOP after another event) -> vcpus-stopped', (t) => {
  const rec = load('mtty-x1.json');
  moveAfter(rec.source.events, (e) => e.event === 'STOP', (e) => e.event === 'MIGRATION' && e.data.status === 'device');
  const v = checkVcpusStopped(parseTimeline(rec));
  t.is(v.length, 1);
  t.is(v[0]!.device, 'dev0');
  t.regex(v[0]!.message, /while the vCPUs ran.*MIGRATION device came next/);
});

test('source: a device stopping after STOP (VM already stopped) is fine; so is a VM that started paused', (t) => {
  const rec = load('mtty-x1.json');
  // STOP first, then the devices: the VM was already stopped.
  moveBefore(rec.source.events, (e) => e.event === 'STOP', (e) => isDev(e, 'dev0', 'pre-copy-p2p'));
  t.deepEqual(checkVcpusStopped(parseTimeline(rec)), []);
  const paused = load('mtty-x1.json');
  paused.source.events = paused.source.events.filter((e) => e.event !== 'STOP');
  paused.source.initialStatus = 'paused';
  t.deepEqual(checkVcpusStopped(parseTimeline(paused)), []);
  paused.source.initialStatus = 'running';
  t.is(checkVcpusStopped(parseTimeline(paused)).length, 1, 'running and no STOP at all');
});

test('destination: a device running before the other is running-p2p -> p2p-before-running', (t) => {
  const rec = load('mtty-x2.json');
  moveBefore(rec.destination.events, (e) => isDev(e, 'dev0', 'running'), (e) => isDev(e, 'dev1', 'running-p2p'));
  const v = checkP2PBeforeRunning(parseTimeline(rec));
  t.is(v.length, 1);
  t.is(v[0]!.device, 'dev1');
  t.is(v[0]!.phase, 'resume');
  t.regex(v[0]!.message, /dev1 was resuming on the destination when dev0 reached running/);
});

test('destination: a device running before RESUME -> running-after-resume', (t) => {
  const rec = load('mtty-x1.json');
  moveAfter(rec.destination.events, (e) => e.event === 'RESUME', (e) => isDev(e, 'dev0', 'running'));
  const v = checkRunningAfterResume(parseTimeline(rec));
  t.is(v.length, 1);
  t.regex(v[0]!.message, /outside a VM start/);
});

test('completed but a device never reached running on the destination -> failed, naming it', (t) => {
  const rec = load('mtty-x2.json');
  rec.destination.events = rec.destination.events.filter((e) => !isDev(e, 'dev1', 'running'));
  const a = analyze(parseTimeline(rec));
  t.is(a.verdict, 'failed');
  t.deepEqual(a.failure?.devices, ['dev1']);
  t.regex(a.reason, /dev1 .* ends in running-p2p on the destination .* no running copy/);
});

test('a failed migration without an error naming the device blames the device that missed stop-copy', (t) => {
  const rec = load('edu-fail-stop-copy.json');
  delete rec.source.migrate!['error-desc'];
  const a = analyze(parseTimeline(rec));
  t.is(a.failure?.phase, 'switchover');
  t.deepEqual(a.failure?.devices, ['edu0']);
  t.regex(a.reason, /edu0 .* did not reach stop-copy on the source/);
});

test('not a timeline: a clear error', (t) => {
  t.throws(() => parseTimeline({ hello: 1 }), { message: /not a timeline/ });
  t.throws(() => parseTimeline([]), { message: /JSON object/ });
  t.throws(() => parseTimeline({ format: 'vfio-mig/timeline', version: 99 }), { message: /version 99/ });
});

// --- the engine's timeline ------------------------------------------------------------------

const fake = installFake(test);
const SRC = ['0000:60:00.0', '0000:60:00.1'];
const DST = ['0000:61:00.0', '0000:61:00.1'];
for (const [i, id] of [...SRC, ...DST].entries()) fake.addDevice({ id, flags: 7, seed: (i % 2) + 1, stateSize: 512 });

async function engineRun(): Promise<EngineRecord> {
  const src = SRC.map((id) => VfioDevice.open(id));
  const dst = DST.map((id) => VfioDevice.open(id));
  try {
    const s = await Coordinator.create(src);
    const d = await Coordinator.create(dst);
    await s.quiesce();
    const out = await s.stopCopy();
    const data = new Map<string, Buffer[]>();
    for (const [name, fd] of out) {
      const chunks: Buffer[] = [];
      await readToEnd(fd, (b) => void chunks.push(Buffer.from(b)));
      data.set(name, chunks);
    }
    await s.finishSource();
    const inFds = await d.beginResume();
    for (const [i, name] of DST.entries()) await writeAll(inFds.get(name)!, Buffer.concat(data.get(SRC[i]!)!));
    await d.completeResume();
    const sj = s.toJSON();
    const dj = d.toJSON();
    return { devices: [...sj.devices, ...dj.devices], timeline: [...sj.timeline, ...dj.timeline] };
  } finally {
    for (const dev of [...src, ...dst]) await dev.close();
  }
}

test.serial("engine timeline (Coordinator.toJSON) from the fake kernel: rules hold, verdict ok; broken order is violated", async (t) => {
  const rec = await engineRun();
  const tl = parseTimeline(rec);
  t.is(tl.origin, 'engine');
  t.false(tl.vcpusRecorded);
  t.deepEqual(checkInvariants(tl), []);
  const a = analyze(tl);
  t.is(a.verdict, 'ok', a.reason);
  t.deepEqual(a.devices.map((d) => d.id), [...SRC, ...DST]);
  t.is(a.devices[0]!.final.source, 'stop');
  t.is(a.devices[2]!.final.destination, 'running');
  t.true(a.notes.some((n) => /no vCPU events/.test(n)));
  // Doctor it: the second source device's stop-copy arc issued before the first finished quiescing.
  const doctored = structuredClone(rec);
  const quiesce0 = doctored.timeline.find((e) => e.device === SRC[0] && e.phase === 'quiesce')!;
  const stop1 = doctored.timeline.find((e) => e.device === SRC[1] && e.phase === 'stop-copy')!;
  stop1.start = quiesce0.end - 0.001;
  const v = checkInvariants(parseTimeline(doctored));
  t.true(v.length >= 1);
  t.true(v.every((x) => x.rule === 'p2p-before-stop'));
  t.true(v.some((x) => x.device === SRC[0]! && /was still running on the source when/.test(x.message)));
  t.is(analyze(parseTimeline(doctored)).verdict, 'violated');
});

test.serial('engine timeline with a failed arc: failed, naming the device and the phase', (t) => {
  const rec: EngineRecord = {
    devices: ['a', 'b'],
    timeline: [
      { device: 'a', op: 'set', from: 'RUNNING', to: 'RUNNING_P2P', phase: 'quiesce', start: 0, end: 1, result: 'ok' },
      { device: 'b', op: 'set', from: 'RUNNING', to: 'RUNNING_P2P', phase: 'quiesce', start: 0, end: 1, result: 'ok' },
      { device: 'a', op: 'set', from: 'RUNNING_P2P', to: 'STOP_COPY', phase: 'stop-copy', start: 2, end: 3, result: 'ok' },
      { device: 'b', op: 'set', from: 'RUNNING_P2P', to: 'STOP_COPY', phase: 'stop-copy', start: 2, end: 4, result: 'EIO' },
      { device: 'a', op: 'set', from: 'STOP_COPY', to: 'RUNNING_P2P', phase: 'rollback', start: 5, end: 6, result: 'ok' },
      { device: 'a', op: 'set', from: 'RUNNING_P2P', to: 'RUNNING', phase: 'rollback', start: 7, end: 8, result: 'ok' },
      { device: 'b', op: 'set', from: 'RUNNING_P2P', to: 'RUNNING', phase: 'rollback', start: 7, end: 8, result: 'ok' },
    ],
  };
  const a = analyze(parseTimeline(rec));
  t.is(a.verdict, 'failed');
  t.deepEqual(a.failure?.devices, ['b']);
  t.is(a.failure?.phase, 'stop-copy');
  t.regex(a.reason, /stop-copy phase failed on b: arc running-p2p -> stop-copy returned EIO/);
});
