// The coordinator against the real kernel: edu devices with a long delay in every arc move
// in parallel (a phase of N devices takes about one arc's time, not N), an injected
// failure rolls every device back to RUNNING, and the same holds with the upstream mtty
// sample in the set.
import test, { type ExecutionContext } from 'ava';
import { prewarm } from '../../src/host/sys.ts';
import { VfioDevice } from '../../src/vfio/device.ts';
import { Coordinator, CoordinatorError } from '../../src/migration/coordinator.ts';
import { readToEnd, writeAll } from '../../src/vfio/data.ts';
import { MigState } from '../../src/vfio/uapi.ts';
import { requireRig, prepareEdu, prepareMtty, eduKnob, eduInject, eduArcLog } from './guest.ts';

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

/**
 * Moves `ids` through quiesce (RUNNING -> RUNNING_P2P) and stop-copy (-> STOP -> STOP_COPY)
 * with every arc delayed `delayMs` in the kernel, and checks that the arcs of different
 * devices ran at the same time. The edu driver sleeps the full delay inside every arc
 * (holding only its own device's mutex), so one after the other a phase of N devices
 * cannot take less than N x arcs x delay. The check is on wall time against that sum: a
 * phase must take less than `factor` x arcs x delay, with factor < N, so it fails when the
 * calls queue behind too few threads (VFIO_MIG_SYS_THREADS=1 makes it fail; so would
 * libuv's 4-thread pool with 12 devices).
 */
async function arcsOverlap(t: ExecutionContext, ids: string[], delayMs: number, factor: number): Promise<void> {
  t.true(factor < ids.length, 'the bound must be below the sequential time');
  for (const id of ids) {
    eduKnob(id, 'arc_delay_us', delayMs * 1000);
    eduKnob(id, 'arc_log', 'clear');
  }
  try {
    await opened(ids, async (devs) => {
      await prewarm(ids.length);
      const c = await Coordinator.create(devs);
      let t0 = performance.now();
      await c.quiesce();
      const quiesceMs = performance.now() - t0;
      t0 = performance.now();
      const fds = await c.stopCopy();
      const stopCopyMs = performance.now() - t0;
      t.is(fds.size, ids.length);
      for (const f of fds.values()) t.true((await readToEnd(f, () => undefined)) > 0);
      await c.finishSource();
      for (const [phase, ms, arcs] of [['quiesce', quiesceMs, 1], ['stop-copy', stopCopyMs, 2]] as const) {
        const sequentialMs = ids.length * arcs * delayMs;
        t.log(`${phase}: ${ids.length} devices x ${arcs} arc(s) of ${delayMs} ms took ${ms.toFixed(0)} ms (one after the other: >= ${sequentialMs} ms; bound ${factor * arcs * delayMs} ms)`);
        t.true(ms >= arcs * delayMs, `${phase} cannot beat the kernel's own delay`);
        t.true(ms < factor * arcs * delayMs, `${phase} of ${ids.length} devices took ${ms.toFixed(0)} ms: their arcs did not run in parallel`);
      }
      // The kernel ran exactly these arcs on every device (no retries, nothing skipped),
      // finishSource's STOP_COPY -> STOP included.
      for (const id of ids) {
        t.deepEqual(
          eduArcLog(id).map((a) => `${a.from}>${a.to} ${a.errno}`),
          [[MigState.Running, MigState.RunningP2P], [MigState.RunningP2P, MigState.Stop], [MigState.Stop, MigState.StopCopy], [MigState.StopCopy, MigState.Stop]].map(([a, b]) => `${a}>${b} 0`),
          `${id}: arc log`,
        );
      }
      await c.rollback();
      for (const d of devs) t.is(await d.state(), MigState.Running);
    });
  } finally {
    for (const id of ids) eduKnob(id, 'arc_delay_us', 0);
  }
}

// Long arcs, so that what TCG adds per call (tens of ms, hundreds on a loaded host) stays
// well inside the margin between the bound and the sequential time.
test.serial('four edu devices with 1 s arcs quiesce and stop-copy in parallel', async (t) => {
  t.true(edu.length >= 4, `the rig provides ${edu.length} edu devices`);
  await arcsOverlap(t, edu.slice(0, 4), 1000, 2.5);
});

test.serial('twelve edu devices (VFIO_MIG_RIG_EDU=12) move in parallel, not four at a time', async (t) => {
  if (edu.length < 12) {
    // Loud, not silent: the default rig has 4 edu devices.
    t.log(`NOT RUN with 12: the rig has ${edu.length} edu devices; run with VFIO_MIG_RIG_EDU=12. Checking all ${edu.length} instead.`);
  }
  const ids = edu.slice(0, 12);
  // Bound: 2.5 arcs' time; four threads at a time (libuv's pool) would need >= 3.
  await arcsOverlap(t, ids, 800, Math.min(2.5, ids.length - 1));
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
