// Moving a device set's state through the vfio-mig stream on the fake kernel: a clean
// transfer restores every device; a corrupted or truncated one is refused before any
// commit, even for drivers that would accept garbage (like mtty), and the destination
// devices are reset to RUNNING with their state untouched.
import test from 'ava';
import { installFake } from '../fake/install.ts';
import { VfioDevice } from '../../src/vfio/device.ts';
import { Coordinator } from '../../src/migration/coordinator.ts';
import { saveSet, loadSet } from '../../src/migration/transfer.ts';
import { StreamError } from '../../src/migration/stream.ts';
import { MigState } from '../../src/vfio/uapi.ts';

const fake = installFake(test);
const SRC = ['0000:90:00.0', '0000:90:00.1'];
const DST = ['0000:91:00.0', '0000:91:00.1'];
for (const [i, id] of [...SRC, ...DST].entries()) fake.addDevice({ id, flags: 7, seed: 10 + i, stateSize: 3000, validatesData: false });
const route = (src: string) => DST[SRC.indexOf(src)]!;

async function saveSource(): Promise<Buffer> {
  const devs = SRC.map((id) => VfioDevice.open(id));
  try {
    const c = await Coordinator.create(devs);
    await c.quiesce();
    await c.stopCopy();
    const parts: Buffer[] = [];
    await saveSet(c, (device) => ({ device, driver: 'edu-vfio-pci' }), (b) => void parts.push(b));
    await c.rollback(); // the source VM keeps running in these tests
    return Buffer.concat(parts);
  } finally {
    for (const d of devs) await d.close();
  }
}

async function load(stream: Buffer[]): Promise<{ bytes: number; devices: number }> {
  const devs = DST.map((id) => VfioDevice.open(id));
  try {
    return await loadSet(await Coordinator.create(devs), stream, route);
  } finally {
    for (const d of devs) await d.close();
  }
}

test.serial('a set is saved into one stream and restored device by device', async (t) => {
  const stream = await saveSource();
  const r = await load([stream]);
  t.is(r.devices, 2);
  for (const [i, id] of DST.entries()) {
    t.is(fake.device(id).digest(), fake.device(SRC[i]!).digest());
    t.is(fake.device(id).state, MigState.Running);
  }
  t.is(fake.openFdCount(), 0);
});

test.serial('a corrupted stream never reaches a commit: destinations reset, state untouched', async (t) => {
  fake.resetAll();
  const before = DST.map((id) => fake.device(id).digest());
  for (const id of DST) fake.device(id).payload = Buffer.alloc(3000, 1); // a known "old" state
  const old = DST.map((id) => fake.device(id).digest());
  t.notDeepEqual(old, before);
  const stream = await saveSource();
  const bad = Buffer.from(stream);
  const at = Math.floor(bad.length / 3);
  bad[at] = bad[at]! ^ 0x40;
  const err = await t.throwsAsync(load([bad]), { instanceOf: StreamError });
  t.regex(err?.message ?? '', /checksum mismatch|corrupted/);
  t.deepEqual(DST.map((id) => fake.device(id).digest()), old, 'the unvalidating driver was never told to commit');
  for (const id of DST) t.is(fake.device(id).state, MigState.Running);
  t.true(fake.events.some((e) => e.kind === 'reset'), 'RESUMING was aborted with a reset');
  t.is(fake.openFdCount(), 0);
});

test.serial('a truncated stream and a stream for other devices are refused', async (t) => {
  fake.resetAll();
  const stream = await saveSource();
  await t.throwsAsync(load([stream.subarray(0, stream.length - 40)]), { message: /truncated/ });
  const devs = DST.map((id) => VfioDevice.open(id));
  try {
    await t.throwsAsync(loadSet(await Coordinator.create(devs), [stream], () => '0000:99:00.0'), { message: /no destination device/ });
  } finally {
    for (const d of devs) await d.close();
  }
  for (const id of DST) t.is(fake.device(id).state, MigState.Running);
});
