// The vfio-mig state stream (docs/stream-format.md): round trips in any segmentation and
// with interleaved devices; every flipped byte and every truncation of a real stream is
// refused; hand-built bad streams (reordered, duplicated, oversized, a declared length
// that disagrees, an index out of range, data after the trailer, a second descriptor)
// are refused naming the device; reassembly is linear in the input (op counts).
import test from 'ava';
import { createHash } from 'node:crypto';
import { StreamWriter, readStream, StreamError, FrameType, Layout, newReaderStats, type StreamEvent, type ReaderOptions, type ByteInput, type StreamErrorCode } from '../../src/migration/stream.ts';

const A = '0000:01:00.0';
const B = '83b8f4f2-509f-382f-3c1e-e6bfe0fa0001';
const descriptor = { vendor: '1234', device: '11e8', driver: 'edu-vfio-pci', migration_version: 'edu-1' };

async function build(devices: { device: string; chunks: Buffer[] }[], interleave = false, frameSize?: number): Promise<Buffer> {
  const parts: Buffer[] = [];
  const w = new StreamWriter((b) => void parts.push(Buffer.from(b)), frameSize ? { frameSize } : {});
  await w.begin(devices.map((d) => ({ device: d.device, descriptor })));
  if (interleave) {
    const longest = Math.max(...devices.map((d) => d.chunks.length));
    for (let k = 0; k < longest; k++) for (const [i, d] of devices.entries()) if (d.chunks[k]) await w.data(i, d.chunks[k]!);
  } else {
    for (const [i, d] of devices.entries()) for (const c of d.chunks) await w.data(i, c);
  }
  for (const i of devices.keys()) await w.endDevice(i);
  await w.end();
  return Buffer.concat(parts);
}

async function collect(src: ByteInput, opts: ReaderOptions = {}): Promise<StreamEvent[]> {
  const out: StreamEvent[] = [];
  for await (const e of readStream(src, opts)) out.push(e);
  return out;
}

function pieces(b: Buffer, size: number): Buffer[] {
  const out: Buffer[] = [];
  for (let i = 0; i < b.length; i += size) out.push(b.subarray(i, i + size));
  return out;
}

const dataOf = (ev: StreamEvent[], dev: string) => Buffer.concat(ev.flatMap((e) => (e.type === 'data' && e.device === dev ? [e.chunk] : [])));

const sample = () =>
  build(
    [
      { device: A, chunks: [Buffer.from('hello '), Buffer.from('world')] },
      { device: B, chunks: [Buffer.alloc(40, 7), Buffer.alloc(3, 9)] },
    ],
    true,
  );

test('round trip: descriptors first, interleaved data, verification per device, in any segmentation', async (t) => {
  const bytes = await sample();
  for (const size of [1, 3, 17, 64 * 1024, bytes.length]) {
    const ev = await collect(pieces(bytes, size));
    t.is(ev[0]!.type, 'devices');
    t.deepEqual(ev[0]!.type === 'devices' && ev[0]!.devices.map((d) => [d.index, d.device, d.descriptor.driver]), [
      [0, A, 'edu-vfio-pci'],
      [1, B, 'edu-vfio-pci'],
    ]);
    t.is(dataOf(ev, A).toString(), 'hello world');
    t.deepEqual(dataOf(ev, B), Buffer.concat([Buffer.alloc(40, 7), Buffer.alloc(3, 9)]));
    t.deepEqual(ev.filter((e) => e.type === 'device-verified').map((e) => e.type === 'device-verified' && [e.device, e.bytes]), [
      [A, 11],
      [B, 43],
    ]);
    t.like(ev.at(-1), { type: 'end', devices: 2, bytes: 54 });
  }
  // Interleaved: B's first chunk comes before A's last.
  const ev = await collect([bytes]);
  const order = ev.filter((e) => e.type === 'data').map((e) => (e.type === 'data' ? e.device : ''));
  t.deepEqual(order, [A, B, A, B]);
});

test('a chunk larger than the frame size is split; the writer never emits a frame above the limit', async (t) => {
  const big = Buffer.alloc(10_000, 3);
  const bytes = await build([{ device: A, chunks: [big] }], false, 4096);
  const ev = await collect([bytes], { limits: { maxChunk: 4096 } });
  t.deepEqual(ev.filter((e) => e.type === 'data').map((e) => (e.type === 'data' ? e.chunk.length : 0)), [4096, 4096, 1808]);
  t.deepEqual(dataOf(ev, A), big);
});

test('every single flipped byte is refused', async (t) => {
  const bytes = await sample();
  let refused = 0;
  for (let i = 0; i < bytes.length; i++) {
    const bad = Buffer.from(bytes);
    bad[i] = bad[i]! ^ 0x20;
    try {
      await collect([bad]);
    } catch (err) {
      if (err instanceof StreamError) refused++;
      else throw err;
    }
  }
  t.is(refused, bytes.length, 'no corruption passes');
});

test('every truncation is refused, naming what is missing', async (t) => {
  const bytes = await sample();
  for (let n = 0; n < bytes.length; n++) {
    const err = await t.throwsAsync(collect([bytes.subarray(0, n)]), { instanceOf: StreamError });
    t.is(err?.code, 'TRUNCATED', `cut at ${n}: ${err?.message}`);
  }
});

test('a device section whose checksum fails is refused before it is reported verified', async (t) => {
  const bytes = await sample();
  const bad = Buffer.from(bytes);
  bad[bytes.indexOf('world')] = 0x57;
  const seen: string[] = [];
  const err = await t.throwsAsync(
    (async () => {
      for await (const e of readStream([bad])) seen.push(e.type);
    })(),
    { instanceOf: StreamError },
  );
  t.is(err?.device, A);
  t.regex(err?.message ?? '', /checksum mismatch/);
  t.false(seen.includes('device-verified'));
});

// ---- hand-built streams: frames taken apart and put together wrongly ----

interface Frame {
  type: number;
  index: number;
  payload: Buffer;
}

function split(stream: Buffer): { header: Buffer; frames: Frame[] } {
  const header = stream.subarray(0, Layout.HEADER_SIZE);
  const frames: Frame[] = [];
  for (let off = Layout.HEADER_SIZE; off < stream.length; ) {
    const len = stream.readUInt32LE(off + 4);
    frames.push({ type: stream[off]!, index: stream.readUInt16LE(off + 2), payload: stream.subarray(off + 8, off + 8 + len) });
    off += 8 + len;
  }
  return { header, frames };
}

function join(header: Buffer, frames: Frame[]): Buffer {
  return Buffer.concat([
    header,
    ...frames.flatMap((f) => {
      const h = Buffer.alloc(8);
      h[0] = f.type;
      h.writeUInt16LE(f.index, 2);
      h.writeUInt32LE(f.payload.length, 4);
      return [h, f.payload];
    }),
  ]);
}

/** Re-signs the trailer of a hand-built stream, so only the defect under test remains. */
function resign(stream: Buffer): Buffer {
  const { header, frames } = split(stream);
  const h = createHash('sha256').update(header);
  for (const f of frames) {
    const fh = join(Buffer.alloc(0), [{ ...f, payload: Buffer.alloc(0) }]);
    fh.writeUInt32LE(f.payload.length, 4);
    if (f.type === FrameType.Trailer) {
      h.update(fh).update(f.payload.subarray(0, 12));
      f.payload = Buffer.concat([f.payload.subarray(0, 12), h.digest()]);
      break;
    }
    h.update(fh);
    if (f.type !== FrameType.Data) h.update(f.payload);
  }
  return join(header, frames);
}

test('a re-signed stream with legal interleaving still reads (the trailer helper is sound)', async (t) => {
  const { header, frames } = split(await sample());
  // Data frames of different devices may swap: still valid once re-signed.
  const d = frames.findIndex((f) => f.type === FrameType.Data);
  [frames[d], frames[d + 1]] = [frames[d + 1]!, frames[d]!];
  const ev = await collect([resign(join(header, frames))]);
  t.is(dataOf(ev, A).toString(), 'hello world');
});

test('bad streams are refused with the device named', async (t) => {
  const { header, frames } = split(await sample());
  const desc = frames.filter((f) => f.type === FrameType.Descriptor);
  const data = frames.filter((f) => f.type === FrameType.Data);
  const ends = frames.filter((f) => f.type === FrameType.DeviceEnd);
  const trailer = frames.at(-1)!;
  const refuse = async (what: string, frames2: Frame[], code: StreamErrorCode, device: string | undefined, re: RegExp, sign = false) => {
    const s = join(header, frames2);
    const err = await t.throwsAsync(collect(pieces(sign ? resign(s) : s, 5)), { instanceOf: StreamError }, what);
    t.is(err?.code, code, `${what}: ${err?.message}`);
    t.is(err?.device, device, `${what}: ${err?.message}`);
    t.regex(err?.message ?? '', re, what);
  };
  // reordered: A's two data frames swapped (same device) - its digest no longer matches
  await refuse('reordered data of one device', [...desc, data[2]!, data[1]!, data[0]!, data[3]!, ...ends, trailer], 'CORRUPT', A, /checksum mismatch/);
  // reordered: descriptors swapped
  await refuse('reordered descriptors', [desc[1]!, desc[0]!, ...data, ...ends, trailer], 'OUT_OF_ORDER', undefined, /index 1 where index 0/);
  // reordered: data before every descriptor was sent
  await refuse('data before the descriptors', [desc[0]!, data[0]!, desc[1]!, ...data.slice(1), ...ends, trailer], 'OUT_OF_ORDER', undefined, /before any data/);
  // reordered or duplicated: data after its device ended
  await refuse('data after the end', [...desc, ...data, ends[0]!, data[0]!, ends[1]!, trailer], 'OUT_OF_ORDER', A, /after the device ended/);
  // duplicated: a data frame twice
  await refuse('duplicated data', [...desc, data[0]!, data[0]!, ...data.slice(1), ...ends, trailer], 'CORRUPT', A, /declared length 11 disagrees with the 17 bytes/);
  // duplicated: the device end twice
  await refuse('duplicated end', [...desc, ...data, ends[0]!, ends[0]!, ends[1]!, trailer], 'OUT_OF_ORDER', A, /ends twice/);
  // a second descriptor for the same device (after the data began; and by name)
  await refuse('second descriptor', [...desc, data[0]!, desc[0]!, ...data.slice(1), ...ends, trailer], 'OUT_OF_ORDER', A, /second descriptor/);
  const h2 = Buffer.from(header);
  h2.writeUInt32LE(3, 12);
  const dupName = { ...desc[0]!, index: 2 };
  const err = await t.throwsAsync(collect([join(h2, [...desc, dupName])]), { instanceOf: StreamError });
  t.is(err?.device, A);
  t.regex(err?.message ?? '', /second descriptor for the same device/);
  // oversized: a frame above the reader's limit
  const big = join(header, [...desc, { type: FrameType.Data, index: 1, payload: Buffer.alloc(5000) }]);
  const e2 = await t.throwsAsync(collect([big], { limits: { maxChunk: 4096 } }), { instanceOf: StreamError });
  t.is(e2?.code, 'TOO_LARGE');
  t.is(e2?.device, B);
  t.regex(e2?.message ?? '', /5000 bytes exceeds the 4096-byte limit/);
  // a declared length that disagrees: the end frame's byte count altered (and re-signed)
  const endA = Buffer.from(ends[0]!.payload);
  endA.writeBigUInt64LE(12n, 0);
  await refuse('declared length', [...desc, ...data, { ...ends[0]!, payload: endA }, ends[1]!, trailer], 'CORRUPT', A, /declared length 12 disagrees with the 11 bytes/, true);
  // a device index out of range
  await refuse('index out of range', [...desc, { ...data[0]!, index: 7 }], 'CORRUPT', undefined, /device index 7, out of range \(the stream has 2 devices\)/);
  // data after the trailer
  const full = join(header, frames);
  const e3 = await t.throwsAsync(collect([full, Buffer.from('x')]), { instanceOf: StreamError });
  t.regex(e3?.message ?? '', /data after the trailer/);
  // the trailer before a device ended
  await refuse('early trailer', [...desc, ...data, ends[0]!, trailer], 'OUT_OF_ORDER', B, /trailer came before the end of/);
});

test('descriptors are validated: size limit, name, the fields a receiver relies on', async (t) => {
  const w = new StreamWriter(() => undefined, { limits: { maxDescriptor: 200 } });
  await t.throwsAsync(w.begin([{ device: A, descriptor: { blob: 'x'.repeat(300) } }]), { instanceOf: StreamError, message: /exceeds 200/ });
  const bad = async (descriptorJson: string) => {
    const { header, frames } = split(await sample());
    frames[0] = { ...frames[0]!, payload: Buffer.from(descriptorJson) };
    return t.throwsAsync(collect([join(header, frames)]), { instanceOf: StreamError });
  };
  t.regex((await bad('{"device":"a b","descriptor":{}}'))?.message ?? '', /no valid device name/);
  t.regex((await bad(`{"device":"${A}","descriptor":[]}`))?.message ?? '', /not a JSON object/);
  t.regex((await bad(`{"device":"${A}","descriptor":{"driver":7}}`))?.message ?? '', /driver is not a string/);
  t.regex((await bad(`{"device":"${A}","descriptor":{"vendor":{"x":1}}}`))?.message ?? '', /vendor is not a PCI id/);
  t.regex((await bad(`{"device":"${A}","descriptor":{"migration_version":false}}`))?.message ?? '', /migration_version is not a string/);
  const big = await bad(`{"device":"${A}","descriptor":{"x":"${'y'.repeat(70_000)}"}}`);
  t.is(big?.code, 'TOO_LARGE');
});

test("src/compat's descriptor shape passes (nulls, migrationVersion as an object), and travels unchanged", async (t) => {
  // The shape of src/compat's DeviceDescriptor (schema 1), as describeDevice() builds it.
  const compat = {
    schema: 1,
    id: '0000:01:00.0',
    kind: 'pci',
    vendor: '1234',
    device: '11e8',
    subsystemVendor: null,
    subsystemDevice: null,
    revision: '10',
    class: '00ff00',
    physfn: null,
    driver: 'edu_vfio_pci',
    module: 'edu_vfio_pci',
    srcversion: null,
    moduleVersion: null,
    buildId: null,
    firmware: { version: null, psid: null, from: null, note: 'none' },
    migration: { flags: 7, flagNames: ['STOP_COPY', 'P2P', 'PRE_COPY'], dataSize: '4096', source: 'probe' },
    mdev: null,
    kernel: '6.12.0',
    migrationVersion: { present: true, value: 'edu-1' },
    vendorAttrs: {},
    describedAt: '2026-12-05T00:00:00Z',
  };
  const parts: Buffer[] = [];
  const w = new StreamWriter((b) => void parts.push(Buffer.from(b)));
  await w.begin([{ device: A, descriptor: compat, estimate: 4096 }]);
  await w.endDevice(0);
  await w.end();
  const ev = await collect([Buffer.concat(parts)]);
  t.like(ev[0], { type: 'devices', devices: [{ index: 0, device: A, estimate: 4096 }] });
  t.deepEqual(ev[0]!.type === 'devices' && ev[0]!.devices[0]!.descriptor, compat);
  const bad = { ...compat, migrationVersion: { value: 'edu-1' } };
  await t.throwsAsync(new StreamWriter(() => undefined).begin([{ device: A, descriptor: bad }]), { message: /migrationVersion.present is not a boolean/ });
});

test('foreign input, other versions and misuse of the writer are explained', async (t) => {
  await t.throwsAsync(collect([Buffer.from('<domain type="kvm"/>............')]), { message: /not a vfio-mig state stream/ });
  const v3 = await sample();
  v3.writeUInt16LE(3, 8);
  await t.throwsAsync(collect([v3]), { message: /format version 3 is not supported/ });
  const w = new StreamWriter(() => undefined);
  await t.throwsAsync(w.begin([]), { instanceOf: StreamError });
  await t.throwsAsync(w.data(0, Buffer.from('x')), { message: /before begin/ });
  await w.begin([{ device: 'a', descriptor: {} }]);
  await t.throwsAsync(w.data(1, Buffer.from('x')), { message: /no device index 1/ });
  await t.throwsAsync(w.end(), { message: /has not ended/ });
  await w.endDevice(0);
  await t.throwsAsync(w.data(0, Buffer.from('x')), { message: /after the device ended/ });
  await w.end();
  await t.throwsAsync(new StreamWriter(() => undefined).begin([{ device: 'same', descriptor: {} }, { device: 'same', descriptor: {} }]), { message: /named twice/ });
});

test('concurrent writers never split a frame, and a failing sink fails every later call', async (t) => {
  const parts: Buffer[] = [];
  const w = new StreamWriter(async (b) => {
    await new Promise((r) => setImmediate(r));
    parts.push(Buffer.from(b));
  }, { frameSize: 7 });
  await w.begin([{ device: A, descriptor: {} }, { device: B, descriptor: {} }]);
  await Promise.all([w.data(0, Buffer.alloc(50, 1)), w.data(1, Buffer.alloc(50, 2)), w.data(0, Buffer.alloc(10, 3))]);
  await Promise.all([w.endDevice(0), w.endDevice(1)]);
  await w.end();
  const ev = await collect([Buffer.concat(parts)]);
  t.deepEqual(dataOf(ev, B), Buffer.alloc(50, 2));
  t.is(dataOf(ev, A).length, 60);
  let n = 0;
  const f = new StreamWriter(() => {
    if (++n > 3) throw new Error('peer went away'); // header, descriptor frame, descriptor
  });
  await f.begin([{ device: A, descriptor: {} }]);
  await t.throwsAsync(f.data(0, Buffer.alloc(10)), { message: /peer went away/ });
  await t.throwsAsync(f.endDevice(0), { message: /peer went away/ });
});

test('reassembly is linear in the input: byte-at-a-time and 64 KiB pieces, op counts scale with size', async (t) => {
  const stream = async (n: number) => build([{ device: A, chunks: [Buffer.alloc(n, 1)] }, { device: B, chunks: [Buffer.alloc(n, 2)] }], true, 4096);
  const measure = async (bytes: Buffer, size: number) => {
    const stats = newReaderStats();
    const ev = await collect(pieces(bytes, size), { stats });
    t.like(ev.at(-1), { type: 'end' });
    t.is(stats.bytesIn, bytes.length);
    return stats;
  };
  const small = await stream(32 * 1024);
  const large = await stream(4 * 32 * 1024);
  for (const size of [1, 64 * 1024]) {
    const s = await measure(small, size);
    const l = await measure(large, size);
    // Every input byte is copied at most once (only fields that span pieces are copied).
    t.true(s.bytesCopied <= small.length && l.bytesCopied <= large.length, `copied ${s.bytesCopied}/${small.length}, ${l.bytesCopied}/${large.length}`);
    // Four times the input costs at most four times the work (a quadratic reader: sixteen).
    const ratio = l.ops / s.ops;
    t.true(ratio < 4.5, `piece size ${size}: ops ${s.ops} -> ${l.ops} (x${ratio.toFixed(2)})`);
    t.log(`piece size ${size}: ${small.length} B -> ${s.ops} ops, ${s.bytesCopied} B copied; ${large.length} B -> ${l.ops} ops, ${l.bytesCopied} B copied`);
  }
});
