// The coordinator against the real kernel: four edu devices with a 20 ms delay in every
// arc move in parallel (their arcs overlap in time instead of running one after another),
// an injected failure rolls every device back to RUNNING, and the same holds with the
// upstream mtty sample in the set.
import test from 'ava';
import { VfioDevice } from '../../src/vfio/device.ts';
import { Coordinator, CoordinatorError, type TimelineEntry } from '../../src/migration/coordinator.ts';
import { readToEnd, writeAll } from '../../src/vfio/data.ts';
import { MigState } from '../../src/vfio/uapi.ts';
import { requireRig, prepareEdu, prepareMtty, eduKnob, eduInject } from './guest.ts';

requireRig(test);
const inRig = Boolean(process.env.VFIO_MIG_IN_RIG);
const edu = inRig ? prepareEdu() : [];
const mtty = inRig ? prepareMtty(4) : [];

async function opened<T>(ids: string[], fn: (devs: VfioDevice[]) => Promise<T>): Promise<T> {
  const devs: VfioDevice[] = [];
  try {
    for (const id of ids) devs.push(VfioDevice.open(id));
    return await fn(devs);
  } finally {
    for (const d of devs) await d.close();
  }
}

/** Every device's arc in `phase` started before any device's arc in it ended. */
function overlapping(timeline: TimelineEntry[], phase: string, from: string, to: string): { overlap: boolean; spanMs: number; sumMs: number } {
  const arcs = timeline.filter((e) => e.phase === phase && e.from === from && e.to === to);
  const lastStart = Math.max(...arcs.map((e) => e.start));
  const firstEnd = Math.min(...arcs.map((e) => e.end));
  const span = Math.max(...arcs.map((e) => e.end)) - Math.min(...arcs.map((e) => e.start));
  return { overlap: arcs.length > 1 && lastStart < firstEnd, spanMs: span, sumMs: arcs.reduce((s, e) => s + e.end - e.start, 0) };
}

test.serial('four edu devices with 20 ms arcs quiesce and stop-copy in parallel', async (t) => {
  t.true(edu.length >= 4, `the rig provides ${edu.length} edu devices`);
  const four = edu.slice(0, 4);
  for (const id of four) eduKnob(id, 'arc_delay_us', 20_000);
  try {
    await opened(four, async (devs) => {
      const c = await Coordinator.create(devs);
      await c.quiesce();
      const fds = await c.stopCopy();
      t.is(fds.size, 4);
      for (const f of fds.values()) t.true((await readToEnd(f, () => undefined)) > 0);
      await c.finishSource();
      for (const [phase, from, to] of [['quiesce', 'RUNNING', 'RUNNING_P2P'], ['stop-copy', 'RUNNING_P2P', 'STOP'], ['stop-copy', 'STOP', 'STOP_COPY']] as const) {
        const o = overlapping(c.timeline, phase, from, to);
        t.log(`${phase} ${from}->${to}: 4 devices took ${o.spanMs.toFixed(1)} ms together, ${o.sumMs.toFixed(1)} ms of arcs in sum`);
        t.true(o.overlap, `${from}->${to} arcs of the four devices overlap in time`);
      }
      await c.rollback();
      for (const d of devs) t.is(await d.state(), MigState.Running);
    });
  } finally {
    for (const id of four) eduKnob(id, 'arc_delay_us', 0);
  }
});

test.serial('an injected failure on device 3 during STOP_COPY leaves all four RUNNING', async (t) => {
  const four = edu.slice(0, 4);
  eduInject(four[2]!, 'STOP>STOP_COPY', { outcome: 'error' });
  try {
    await opened(four, async (devs) => {
      const c = await Coordinator.create(devs);
      await c.quiesce();
      const err = await t.throwsAsync(c.stopCopy(), { instanceOf: CoordinatorError });
      t.deepEqual(err?.failures.map((f) => f.device), [four[2]]);
      t.is(err?.failures[0]?.errno, 'EIO');
      for (const d of devs) t.is(await d.state(), MigState.Running, `${d.name} is RUNNING after the rollback`);
      t.true(c.timeline.some((e) => e.op === 'reset' && e.device === four[2]), 'the device left in ERROR was reset');
    });
  } finally {
    eduKnob(four[2]!, 'fail_arc', 'none');
  }
});

test.serial('mtty and edu in one set: a failing edu rolls the mtty devices back too', async (t) => {
  const set = [mtty[0]!, mtty[1]!, edu[0]!, edu[1]!];
  // With PRE_COPY the save continues PRE_COPY_P2P -> STOP_COPY on the same fd.
  eduInject(edu[1]!, 'PRE_COPY_P2P>STOP_COPY', { outcome: 'stay' });
  try {
    await opened(set, async (devs) => {
      const c = await Coordinator.create(devs);
      try {
        await c.preCopy(); // mtty and edu both offer PRE_COPY
        await c.quiesce();
        const err = await t.throwsAsync(c.stopCopy(), { instanceOf: CoordinatorError });
        t.deepEqual(err?.failures.map((f) => f.device), [edu[1]]);
        for (const d of devs) t.is(await d.state(), MigState.Running, `${d.name} is RUNNING after the rollback`);
      } finally {
        await c.rollback(); // mtty keeps its state across close: never leave it mid-migration
      }
    });
  } finally {
    eduKnob(edu[1]!, 'fail_arc', 'none');
  }
});

test.serial('mtty devices: source to destination through the coordinator, and a corrupted load rolls back', async (t) => {
  const saved = new Map<string, Buffer>();
  await opened(mtty.slice(0, 2), async (devs) => {
    const c = await Coordinator.create(devs);
    await c.preCopy();
    await c.quiesce();
    for (const [name, f] of await c.stopCopy()) {
      const chunks: Buffer[] = [];
      await readToEnd(f, (x) => void chunks.push(Buffer.from(x)));
      saved.set(name, Buffer.concat(chunks));
    }
    await c.finishSource();
    await c.rollback();
  });
  const plan = new Map([[mtty[2]!, saved.get(mtty[0]!)!], [mtty[3]!, saved.get(mtty[1]!)!]]);
  await opened(mtty.slice(2, 4), async (devs) => {
    const c = await Coordinator.create(devs);
    await c.resume(async (name, f) => void (await writeAll(f, plan.get(name)!)));
    for (const d of devs) t.is(await d.state(), MigState.Running);
  });
  const corrupt = Buffer.from(saved.get(mtty[0]!)!);
  corrupt.writeUInt32LE(0xdeadbeef, 0); // mtty checks the header magic
  await opened(mtty.slice(2, 4), async (devs) => {
    const c = await Coordinator.create(devs);
    const bad = new Map([[mtty[2]!, corrupt], [mtty[3]!, saved.get(mtty[1]!)!]]);
    const err = await t.throwsAsync(c.resume(async (name, f) => void (await writeAll(f, bad.get(name)!))), { instanceOf: CoordinatorError });
    t.is(err?.phase, 'load');
    for (const d of devs) t.is(await d.state(), MigState.Running, `${d.name} is RUNNING after the rollback`);
  });
});
