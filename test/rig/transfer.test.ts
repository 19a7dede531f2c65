// The vfio-mig state stream with the real kernel: mtty validates nothing it is given, so
// a flipped byte would be restored silently; through the stream it is refused before the
// commit, and the destination device keeps its state and runs.
import test from 'ava';
import { VfioDevice } from '../../src/vfio/device.ts';
import { Coordinator } from '../../src/migration/coordinator.ts';
import { saveSet, loadSet } from '../../src/migration/transfer.ts';
import { StreamError } from '../../src/migration/stream.ts';
import { saveState } from '../../src/migration/trial.ts';
import { MigState } from '../../src/vfio/uapi.ts';
import { requireRig, prepareEdu, prepareMtty } from './guest.ts';

requireRig(test);
const inRig = Boolean(process.env.VFIO_MIG_IN_RIG);
const edu = inRig ? prepareEdu() : [];
const mtty = inRig ? prepareMtty(4) : [];

async function withSet<T>(ids: string[], fn: (c: Coordinator, devs: VfioDevice[]) => Promise<T>): Promise<T> {
  const devs = ids.map((id) => VfioDevice.open(id));
  try {
    return await fn(await Coordinator.create(devs), devs);
  } finally {
    for (const d of devs) await d.close();
  }
}

async function saveStream(ids: string[]): Promise<Buffer> {
  return withSet(ids, async (c) => {
    await c.quiesce();
    await c.stopCopy();
    const parts: Buffer[] = [];
    await saveSet(c, (device) => ({ device }), (b) => void parts.push(b));
    await c.rollback();
    return Buffer.concat(parts);
  });
}

test.serial('an edu + mtty set travels through one stream and is restored', async (t) => {
  const stream = await saveStream([edu[0]!, mtty[0]!]);
  const route = new Map([[edu[0]!, edu[1]!], [mtty[0]!, mtty[2]!]]);
  const r = await withSet([edu[1]!, mtty[2]!], (c) => loadSet(c, [stream], (s) => route.get(s)!));
  t.is(r.devices, 2);
  await withSet([mtty[0]!, mtty[2]!], async (_c, [a, b]) => {
    t.deepEqual(await saveState(b!), await saveState(a!), 'the mtty destination equals its source');
  });
});

test.serial('a corrupted stream is refused before mtty commits it; the destination keeps its state', async (t) => {
  const stream = await saveStream([mtty[1]!]);
  const before = await withSet([mtty[3]!], async (_c, [d]) => saveState(d!));
  const bad = Buffer.from(stream);
  bad[bad.length - 60] = bad[bad.length - 60]! ^ 0x01; // inside the port state, which mtty never checks
  const err = await t.throwsAsync(
    withSet([mtty[3]!], (c) => loadSet(c, [bad], () => mtty[3]!)),
    { instanceOf: StreamError },
  );
  t.regex(err?.message ?? '', /checksum mismatch/);
  await withSet([mtty[3]!], async (_c, [d]) => {
    t.is(await d!.state(), MigState.Running);
    t.deepEqual(await saveState(d!), before, 'nothing of the corrupted state was committed');
  });
});
