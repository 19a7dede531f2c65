// Moving a device set's state through the vfio-mig stream on the fake kernel: a clean
// transfer restores every device; devices are read at once (chunks interleave); a
// foreign stream is refused BEFORE RESUMING (no arc, no write on the destination); a
// corrupted or truncated one is refused before any commit, even for drivers that would
// accept garbage (like mtty), and the destination devices are reset to RUNNING with
// their state untouched. Progress: snapshots, a bar on a TTY, JSON lines otherwise.
import test from 'ava';
import { installFake } from '../fake/install.ts';
import { VfioDevice } from '../../src/vfio/device.ts';
import { Coordinator } from '../../src/migration/coordinator.ts';
import { saveSet, loadSet, acceptSameIdentity, type Accept } from '../../src/migration/transfer.ts';
import { StreamError, readStream, Layout, FrameType } from '../../src/migration/stream.ts';
import { ProgressMeter, progressPrinter, type ProgressSnapshot } from '../../src/migration/progress.ts';
import { MigState } from '../../src/vfio/uapi.ts';

const fake = installFake(test);
const SRC = ['0000:90:00.0', '0000:90:00.1'];
const DST = ['0000:91:00.0', '0000:91:00.1'];
const SIZES = [3000, 9000];
for (const [i, id] of [...SRC, ...DST].entries()) fake.addDevice({ id, flags: 7, seed: 10 + i, stateSize: SIZES[i % 2]!, validatesData: false });
const route = (src: string) => DST[SRC.indexOf(src)]!;
const identity = { vendor: '1234', device: '11e8', driver: 'edu-vfio-pci', migration_version: 'edu-1' };
const describe = () => identity;
const accept: Accept = acceptSameIdentity(() => identity);

// Count what reaches the fake kernel's data fds.
let writes = 0;
let readsInFlight = 0;
let maxReadsInFlight = 0;
const realWrite = fake.write.bind(fake);
const realRead = fake.read.bind(fake);
fake.write = async (fd, buf, len) => {
  writes++;
  return realWrite(fd, buf, len);
};
fake.read = async (fd, buf, len) => {
  readsInFlight++;
  maxReadsInFlight = Math.max(maxReadsInFlight, readsInFlight);
  try {
    return await realRead(fd, buf, len);
  } finally {
    readsInFlight--;
  }
};

test.afterEach.always(() => {
  fake.resetAll();
  writes = 0;
  maxReadsInFlight = 0;
});

async function saveSource(opts: Parameters<typeof saveSet>[3] = {}): Promise<Buffer> {
  const devs = SRC.map((id) => VfioDevice.open(id));
  try {
    const c = await Coordinator.create(devs);
    await c.quiesce();
    await c.stopCopy();
    const parts: Buffer[] = [];
    await saveSet(c, describe, (b) => void parts.push(Buffer.from(b)), opts);
    await c.rollback(); // the source VM keeps running in these tests
    return Buffer.concat(parts);
  } finally {
    for (const d of devs) await d.close();
  }
}

async function load(stream: Buffer[], acc: Accept = accept, opts: Parameters<typeof loadSet>[4] = {}) {
  const devs = DST.map((id) => VfioDevice.open(id));
  try {
    return await loadSet(await Coordinator.create(devs), stream, route, acc, opts);
  } finally {
    for (const d of devs) await d.close();
  }
}

const dstArcs = () => fake.events.filter((e) => DST.includes(e.device));

test.serial('a set is saved into one stream and restored device by device', async (t) => {
  const stream = await saveSource();
  const r = await load([stream]);
  t.is(r.devices, 2);
  t.is(r.bytes, SIZES.reduce((a, s) => a + s + 56, 0), 'each fake state: 24-byte header + payload + 32-byte trailer');
  t.deepEqual(r.routes, { [SRC[0]!]: DST[0], [SRC[1]!]: DST[1] });
  for (const [i, id] of DST.entries()) {
    t.is(fake.device(id).digest(), fake.device(SRC[i]!).digest());
    t.is(fake.device(id).state, MigState.Running);
  }
  t.is(fake.openFdCount(), 0);
});

test.serial('saveSet reads every device at once: chunks interleave and reads overlap', async (t) => {
  const stream = await saveSource({ chunkSize: 512 });
  t.is(maxReadsInFlight, 2, 'both saving fds were read at the same time');
  const order: number[] = [];
  for await (const e of readStream([stream])) if (e.type === 'data') order.push(e.index);
  const firstOf1 = order.indexOf(1);
  const lastOf0 = order.lastIndexOf(0);
  t.true(firstOf1 < lastOf0, `device 1 began before device 0 ended: ${order.join('')}`);
  // The data phase costs the largest device: device 0 (3 KB) ends long before device 1 (9 KB).
  t.true(order.slice(lastOf0 + 1).every((i) => i === 1));
  const r = await load([stream]);
  t.is(r.devices, 2);
  for (const [i, id] of DST.entries()) t.is(fake.device(id).digest(), fake.device(SRC[i]!).digest());
});

test.serial('a foreign stream is refused before RESUMING: no arc, no write on the destination', async (t) => {
  const stream = await saveSource();
  for (const [field, value] of [
    ['vendor', '15b3'],
    ['device', '101e'],
    ['driver', 'mlx5_vfio_pci'],
    ['migration_version', 'edu-2'],
  ] as const) {
    fake.events.length = 0;
    const err = await t.throwsAsync(load([stream], acceptSameIdentity(() => ({ ...identity, [field]: value }))), { instanceOf: StreamError });
    t.is(err?.code, 'REFUSED');
    t.is(err?.device, SRC[0]);
    t.regex(err?.message ?? '', new RegExp(`${field} "${identity[field]}" does not match "${value}"`));
    t.deepEqual(dstArcs(), [], `${field}: no destination device left RUNNING`);
    t.is(writes, 0);
  }
  // src/compat's shape: migrationVersion { present, value }; null fields are not compared.
  fake.events.length = 0;
  const compatShaped = acceptSameIdentity(() => ({ vendor: '1234', device: null, driver: 'edu-vfio-pci', migrationVersion: { present: true, value: 'edu-9' } }));
  const e2 = await t.throwsAsync(load([stream], compatShaped), { instanceOf: StreamError });
  t.regex(e2?.message ?? '', /migration_version "edu-1" does not match "edu-9"/);
  t.deepEqual(dstArcs(), []);
  // A callback that refuses the second device: the first is not moved either.
  fake.events.length = 0;
  const err = await t.throwsAsync(load([stream], (_d, dst) => (dst === DST[1] ? { ok: false, reason: 'no P2P on this slot' } : { ok: true })), { instanceOf: StreamError });
  t.is(err?.device, SRC[1]);
  t.regex(err?.message ?? '', /refused by 0000:91:00.1: no P2P on this slot/);
  t.deepEqual(dstArcs(), []);
  t.is(writes, 0);
  for (const id of DST) t.is(fake.device(id).state, MigState.Running);
});

test.serial('a corrupted stream never reaches a commit: destinations reset, state untouched', async (t) => {
  for (const id of DST) fake.device(id).payload = Buffer.alloc(fake.device(id).spec.stateSize, 1); // a known "old" state
  const old = DST.map((id) => fake.device(id).digest());
  const stream = await saveSource();
  const bad = Buffer.from(stream);
  const at = Math.floor(bad.length / 2);
  bad[at] = bad[at]! ^ 0x40;
  const err = await t.throwsAsync(load([bad]), { instanceOf: StreamError });
  t.regex(err?.message ?? '', /checksum mismatch|corrupted/);
  t.deepEqual(DST.map((id) => fake.device(id).digest()), old, 'the unvalidating driver was never told to commit');
  for (const id of DST) t.is(fake.device(id).state, MigState.Running);
  t.true(fake.events.some((e) => e.kind === 'reset'), 'RESUMING was aborted with a reset');
  t.false(dstArcs().some((e) => e.from === MigState.Resuming && e.kind === 'arc' && e.errno === 0), 'RESUMING was never left by an arc (never committed)');
  t.is(fake.openFdCount(), 0);
});

test.serial('a truncated stream, one with data after the trailer, and a stream for other devices are refused', async (t) => {
  const stream = await saveSource();
  await t.throwsAsync(load([stream.subarray(0, stream.length - 40)]), { message: /truncated/ });
  await t.throwsAsync(load([stream, Buffer.from('more')]), { message: /data after the trailer/ });
  const devs = DST.map((id) => VfioDevice.open(id));
  fake.events.length = 0;
  try {
    await t.throwsAsync(loadSet(await Coordinator.create(devs), [stream], () => '0000:99:00.0', accept), { message: /no destination device/ });
    t.deepEqual(dstArcs(), [], 'refused before RESUMING');
  } finally {
    for (const d of devs) await d.close();
  }
  for (const id of DST) t.is(fake.device(id).state, MigState.Running);
});

test.serial('the destination writes a device in batches, not one write per piece of the stream', async (t) => {
  const stream = await saveSource();
  const pieces: Buffer[] = [];
  for (let i = 0; i < stream.length; i += 64) pieces.push(stream.subarray(i, i + 64));
  // A 4 KiB queue: each device's pieces go down in writes of about 4 KiB.
  writes = 0;
  await load(pieces, accept, { queueBytes: 4096 });
  const perDevice = SIZES.map((n) => Math.ceil(n / 4096));
  t.log(`${pieces.length} pieces of 64 B -> ${writes} writes`);
  t.true(writes <= perDevice.reduce((a, b) => a + b, 0) + SIZES.length, `${writes} writes for ${SIZES.join(' + ')} bytes`);
  for (const [i, id] of DST.entries()) t.is(fake.device(id).digest(), fake.device(SRC[i]!).digest());
  // A stream that pauses with less than a batch queued is still written (after the linger time).
  writes = 0;
  let wrote = -1;
  // Cut right after the first DATA frame: no device has ended yet, so only the linger
  // time can start a write during the pause.
  let cut = Layout.HEADER_SIZE;
  while (stream.readUInt8(cut) !== FrameType.Data) cut += Layout.FRAME_HEADER_SIZE + stream.readUInt32LE(cut + 4);
  cut += Layout.FRAME_HEADER_SIZE + stream.readUInt32LE(cut + 4);
  const slow = (async function* () {
    yield stream.subarray(0, cut);
    await new Promise((r) => setTimeout(r, 200));
    wrote = writes;
    yield stream.subarray(cut);
  })();
  await load(slow as unknown as Buffer[], accept);
  t.true(wrote >= 1, `data was written while the stream paused (${wrote} writes)`);
});

test.serial('the destination holds a bounded amount: the reader waits while devices are behind', async (t) => {
  const stream = await saveSource();
  let written = 0;
  let maxAhead = 0;
  const w = fake.write;
  fake.write = async (fd, buf, len) => {
    await new Promise((r) => setTimeout(r, 1)); // a slow device
    const n = await w(fd, buf, Math.min(len, 256));
    written += n;
    return n;
  };
  try {
    let pulled = 0;
    const input = (function* () {
      for (let i = 0; i < stream.length; i += 128) {
        const piece = stream.subarray(i, i + 128);
        pulled += piece.length;
        maxAhead = Math.max(maxAhead, pulled - written);
        yield piece;
      }
    })();
    await load(input as unknown as Buffer[], accept, { queueBytes: 1024, totalQueueBytes: 1536 });
  } finally {
    fake.write = w;
  }
  // Received but not yet in a device: at most the shared budget, one piece and the framing read ahead.
  t.log(`${stream.length} bytes streamed; received and not yet written at most ${maxAhead} bytes (budget 1536)`);
  t.true(maxAhead <= 1536 + 128 + 1024, `ahead by at most ${maxAhead} bytes`);
  for (const [i, id] of DST.entries()) t.is(fake.device(id).digest(), fake.device(SRC[i]!).digest());
});

test.serial('progress: snapshots on both sides, with the estimates the sender announced', async (t) => {
  const sent: ProgressSnapshot[] = [];
  const estimates = new Map(SRC.map((id, i) => [id, SIZES[i]! + 56]));
  const stream = await saveSource({ chunkSize: 1024, estimates, onProgress: (p) => sent.push(p), progressIntervalMs: 0 });
  const got: ProgressSnapshot[] = [];
  // The destination reports bytes as they are written, in batches of 1 MiB or its queue
  // size if smaller: a small queue gives this 12 KiB stream several snapshots.
  await load([stream], accept, { onProgress: (p) => got.push(p), progressIntervalMs: 0, queueBytes: 1024 });
  for (const list of [sent, got]) {
    const last = list.at(-1)!;
    t.true(last.done);
    t.is(last.bytes, 12_112);
    t.is(last.total, 12_112);
    t.true(last.devices.every((d) => d.done));
    t.true(list.length > 5);
    t.true(list.every((p, i) => i === 0 || p.bytes >= list[i - 1]!.bytes));
  }
});

test('progress meter: rate over a window, ETA from the estimates; a bar on a TTY, JSON lines otherwise', (t) => {
  let now = 0;
  const seen: ProgressSnapshot[] = [];
  const m = new ProgressMeter('send', [{ device: 'a', total: 1000 }, { device: 'b', total: 1000 }], { now: () => now, intervalMs: 100, onProgress: (s) => seen.push(s) });
  for (let i = 1; i <= 10; i++) {
    now = i * 100;
    m.add(i % 2, 100); // 1000 B/s
  }
  const s = m.snapshot();
  t.is(s.bytes, 1000);
  t.is(s.rate, 1000);
  t.is(Math.round(s.eta!), 1);
  m.add(0, 50); // within the interval: no callback
  t.is(seen.length, 10);
  const tty: string[] = [];
  progressPrinter({ isTTY: true, columns: 100, write: (x) => tty.push(x) })(s);
  t.regex(tty[0]!, /^\r\[#{10,}\.+\]\s+50%\s+sent 1000 B of 2.0 KiB\s+1000 B\/s\s+ETA 1s\s+0\/2 devices/);
  t.true(tty[0]!.endsWith('\u001b[K'), 'clears to the end of the line');
  const lines: string[] = [];
  progressPrinter({ write: (x) => lines.push(x) })(s);
  t.like(JSON.parse(lines[0]!), { event: 'progress', phase: 'send', bytes: 1000, total: 2000, rate: 1000, eta: 1 });
  t.true(lines[0]!.endsWith('\n'));
  m.deviceDone(0);
  m.deviceDone(1);
  m.finish();
  t.true(seen.at(-1)!.done);
  t.is(seen.at(-1)!.eta, 0);
});
