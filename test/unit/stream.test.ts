// The vfio-mig state stream: round trips in any segmentation, and every single flipped
// byte and every truncation of a real stream is refused with a StreamError.
import test from 'ava';
import { StreamWriter, readStream, StreamError, type StreamEvent } from '../../src/migration/stream.ts';

async function build(devices: { device: string; chunks: Buffer[] }[]): Promise<Buffer> {
  const parts: Buffer[] = [];
  const w = new StreamWriter((b) => void parts.push(b));
  await w.begin(devices.length);
  for (const d of devices) {
    await w.beginDevice({ device: d.device, driver: 'edu-vfio-pci', flags: ['STOP_COPY', 'P2P'] });
    for (const c of d.chunks) await w.data(c);
    await w.endDevice();
  }
  await w.end();
  return Buffer.concat(parts);
}

async function collect(src: Iterable<Buffer>): Promise<StreamEvent[]> {
  const out: StreamEvent[] = [];
  for await (const e of readStream(src)) out.push(e);
  return out;
}

const sample = () =>
  build([
    { device: '0000:01:00.0', chunks: [Buffer.from('hello '), Buffer.from('world')] },
    { device: '83b8f4f2-509f-382f-3c1e-e6bfe0fa0001', chunks: [Buffer.alloc(40, 7)] },
  ]);

test('round trip: descriptors, data and verification per device, in any segmentation', async (t) => {
  const bytes = await sample();
  for (const size of [1, 3, 17, bytes.length]) {
    const pieces: Buffer[] = [];
    for (let i = 0; i < bytes.length; i += size) pieces.push(bytes.subarray(i, i + size));
    const ev = await collect(pieces);
    const data = (dev: string) => Buffer.concat(ev.flatMap((e) => (e.type === 'data' && e.device === dev ? [e.chunk] : [])));
    t.is(data('0000:01:00.0').toString(), 'hello world');
    t.deepEqual(data('83b8f4f2-509f-382f-3c1e-e6bfe0fa0001'), Buffer.alloc(40, 7));
    t.deepEqual(ev.filter((e) => e.type === 'device-verified').map((e) => e.type === 'device-verified' && e.bytes), [11, 40]);
    t.like(ev.at(-1), { type: 'end', devices: 2 });
    t.like(ev[0], { type: 'device', descriptor: { device: '0000:01:00.0', driver: 'edu-vfio-pci' } });
  }
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
    t.regex(err?.message ?? '', /truncated|stream ended/);
  }
  await t.throwsAsync(collect([bytes, Buffer.from('x')]), { message: /trailing bytes/ });
});

test('a device section whose checksum fails is refused before it is reported verified', async (t) => {
  const bytes = await sample();
  const bad = Buffer.from(bytes);
  const at = bytes.indexOf('world');
  bad[at] = 0x57;
  const seen: string[] = [];
  const err = await t.throwsAsync(
    (async () => {
      for await (const e of readStream([bad])) seen.push(e.type);
    })(),
    { instanceOf: StreamError },
  );
  t.is(err?.device, '0000:01:00.0');
  t.regex(err?.message ?? '', /checksum mismatch/);
  t.false(seen.includes('device-verified'));
});

test('foreign input, other versions and misuse of the writer are explained', async (t) => {
  await t.throwsAsync(collect([Buffer.from('<domain type="kvm"/>............')]), { message: /not a vfio-mig state stream/ });
  const v2 = await sample();
  v2.writeUInt16LE(2, 8);
  await t.throwsAsync(collect([v2]), { message: /format version 2 is not supported/ });
  const w = new StreamWriter(() => undefined);
  await t.throwsAsync(w.begin(0), { instanceOf: StreamError });
  await w.begin(1);
  await t.throwsAsync(w.data(Buffer.from('x')), { message: /outside a device section/ });
  await w.beginDevice({ device: 'a' });
  await t.throwsAsync(w.end(), { message: /inside a device section/ });
  await w.endDevice();
  await t.throwsAsync(w.beginDevice({ device: 'b' }), { message: /more devices than/ });
  const twice = await build([{ device: 'same', chunks: [] }, { device: 'same', chunks: [] }]);
  await t.throwsAsync(collect([twice]), { message: /appears twice/ });
});
