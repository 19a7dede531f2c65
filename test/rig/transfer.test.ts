// The vfio-mig state stream with the real kernel: mtty validates nothing it is given, so
// a flipped byte would be restored silently; through the stream it is refused before the
// commit, and the destination device keeps its state and runs. An edu + mtty set also
// travels over a unix-socket transport (one-time token) from one coordinator to another.
import test from 'ava';
import { VfioDevice } from '../../src/vfio/device.ts';
import { Coordinator } from '../../src/migration/coordinator.ts';
import { saveSet, loadSet, sendDevices, receiveDevices, type Accept } from '../../src/migration/transfer.ts';
import { StreamError, Layout } from '../../src/migration/stream.ts';
import { listen, connect, newToken } from '../../src/migration/transport.ts';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { saveState } from '../../src/migration/trial.ts';
import { MigState } from '../../src/vfio/uapi.ts';
import { requireRig, prepareEdu, prepareMtty } from './guest.ts';

requireRig(test);
const acceptAll: Accept = () => ({ ok: true });
const describe = (device: string) => ({ name: device });
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
    await saveSet(c, describe, (b) => void parts.push(Buffer.from(b)));
    await c.rollback();
    return Buffer.concat(parts);
  });
}

test.serial('an edu + mtty set travels through one stream and is restored', async (t) => {
  const stream = await saveStream([edu[0]!, mtty[0]!]);
  const route = new Map([[edu[0]!, edu[1]!], [mtty[0]!, mtty[2]!]]);
  const r = await withSet([edu[1]!, mtty[2]!], (c) => loadSet(c, [stream], (s) => route.get(s)!, acceptAll));
  t.is(r.devices, 2);
  await withSet([mtty[0]!, mtty[2]!], async (_c, [a, b]) => {
    t.deepEqual(await saveState(b!), await saveState(a!), 'the mtty destination equals its source');
  });
});

test.serial('a corrupted stream is refused before mtty commits it; the destination keeps its state', async (t) => {
  const stream = await saveStream([mtty[1]!]);
  const before = await withSet([mtty[3]!], async (_c, [d]) => saveState(d!));
  const bad = Buffer.from(stream);
  // The stream ends with the device end (8 + 40 bytes) and the trailer (8 + 44): flip a
  // byte just before them, inside mtty's own data, which mtty never checks.
  const at = bad.length - (Layout.FRAME_HEADER_SIZE + Layout.DEVICE_END_SIZE) - (Layout.FRAME_HEADER_SIZE + Layout.TRAILER_SIZE) - 20;
  bad[at] = bad[at]! ^ 0x01;
  const err = await t.throwsAsync(
    withSet([mtty[3]!], (c) => loadSet(c, [bad], () => mtty[3]!, acceptAll)),
    { instanceOf: StreamError },
  );
  t.regex(err?.message ?? '', /checksum mismatch/);
  await withSet([mtty[3]!], async (_c, [d]) => {
    t.is(await d!.state(), MigState.Running);
    t.deepEqual(await saveState(d!), before, 'nothing of the corrupted state was committed');
  });
});

test.serial('an edu + mtty set travels over a unix socket (token) from one coordinator to another', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'vfio-mig-rig-transport-'));
  try {
    const token = newToken();
    const listener = await listen({ path: join(dir, 'recv.sock') }, { token });
    const route = new Map([[edu[2]!, edu[3]!], [mtty[1]!, mtty[3]!]]);
    const receiving = withSet([edu[3]!, mtty[3]!], async (c) => receiveDevices(c, await listener.accept(), (s) => route.get(s)!, acceptAll));
    const sent = await withSet([edu[2]!, mtty[1]!], async (c) => {
      await c.quiesce();
      await c.stopCopy();
      const r = await sendDevices(c, describe, await connect(listener.endpoint, { token }));
      t.deepEqual(c.states(), { [edu[2]!]: 'STOP', [mtty[1]!]: 'STOP' }, 'the source stays stopped: the receiver committed');
      await c.rollback(); // the source VM keeps running in this test
      return r;
    });
    const received = await receiving;
    t.true(sent.receiver.ok);
    t.is(received.devices, 2);
    t.is(received.bytes, sent.bytes);
    await withSet([mtty[1]!, mtty[3]!], async (_c, [a, b]) => {
      t.deepEqual(await saveState(b!), await saveState(a!), 'the mtty destination equals its source');
    });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
