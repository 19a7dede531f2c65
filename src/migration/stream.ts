// The vfio-mig state stream: how the device states of one migration travel between hosts.
//
// Drivers' own streams are opaque and some carry no checksum at all (mtty accepts a
// flipped byte and restores garbage). So every device section here carries a descriptor
// (which device, driver, ids, flags, compatibility string), its data in length-prefixed
// chunks (data is forwarded while it is read, never buffered whole), and a SHA-256 over
// descriptor and data. The reader verifies each section before the caller may commit it
// (RESUMING -> STOP), and a truncated or corrupted stream is an error naming the device,
// never a silent short restore.
//
// Layout (little endian):
//   stream header : "VFMIGSTR" u16 version=1 u16 flags=0 u32 deviceCount
//   per device    : "VFMIGDEV" u32 descriptorLength, descriptor JSON (UTF-8),
//                   chunks: u32 length + bytes ... , u32 0 (end of data),
//                   sha256(descriptor JSON || data) (32 bytes)
//   trailer       : "VFMIGEND" u32 deviceCount, sha256 of every byte before it

import { createHash, type Hash } from 'node:crypto';

export const STREAM_VERSION = 1;
const MAGIC = Buffer.from('VFMIGSTR');
const DEV_MAGIC = Buffer.from('VFMIGDEV');
const END_MAGIC = Buffer.from('VFMIGEND');
const MAX_DESCRIPTOR = 64 * 1024;
const MAX_CHUNK = 64 * 1024 * 1024;
const MAX_DEVICES = 1024;

export interface DeviceDescriptor {
  /** PCI address or mdev UUID on the source. */
  device: string;
  driver?: string;
  vendor?: string;
  deviceId?: string;
  /** Migration flags names, e.g. ["STOP_COPY","P2P"]. */
  flags?: string[];
  /** The driver's compatibility string (migration_version), when it has one. */
  compat?: string;
}

export class StreamError extends Error {
  readonly device: string | undefined;
  constructor(message: string, device?: string) {
    super(device ? `state stream, device ${device}: ${message}` : `state stream: ${message}`);
    this.name = 'StreamError';
    this.device = device;
  }
}

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(n >>> 0, 0);
  return b;
}

/**
 * Produces the stream as Buffers handed to `out` (a socket, a file, a test array).
 * Use: begin(n), then per device beginDevice(d), data(chunk)..., endDevice(), then end().
 */
export class StreamWriter {
  readonly #out: (b: Buffer) => void | Promise<void>;
  readonly #total: Hash = createHash('sha256');
  #device: { d: DeviceDescriptor; hash: Hash } | undefined;
  #expected = 0;
  #written = 0;

  constructor(out: (b: Buffer) => void | Promise<void>) {
    this.#out = out;
  }

  async #emit(b: Buffer): Promise<void> {
    this.#total.update(b);
    await this.#out(b);
  }

  async begin(deviceCount: number): Promise<void> {
    if (!Number.isInteger(deviceCount) || deviceCount < 1 || deviceCount > MAX_DEVICES) throw new StreamError(`device count ${deviceCount} out of range 1..${MAX_DEVICES}`);
    this.#expected = deviceCount;
    const h = Buffer.alloc(16);
    MAGIC.copy(h, 0);
    h.writeUInt16LE(STREAM_VERSION, 8);
    h.writeUInt32LE(deviceCount, 12);
    await this.#emit(h);
  }

  async beginDevice(d: DeviceDescriptor): Promise<void> {
    if (this.#device) throw new StreamError('beginDevice before the previous device ended', this.#device.d.device);
    if (this.#written >= this.#expected) throw new StreamError(`more devices than the ${this.#expected} announced`);
    const json = Buffer.from(JSON.stringify(d), 'utf8');
    if (json.length > MAX_DESCRIPTOR) throw new StreamError('descriptor too large', d.device);
    const hash = createHash('sha256').update(json);
    this.#device = { d, hash };
    await this.#emit(Buffer.concat([DEV_MAGIC, u32(json.length), json]));
  }

  async data(chunk: Buffer): Promise<void> {
    if (!this.#device) throw new StreamError('data outside a device section');
    for (let off = 0; off < chunk.length; off += MAX_CHUNK) {
      const piece = chunk.subarray(off, Math.min(chunk.length, off + MAX_CHUNK));
      this.#device.hash.update(piece);
      await this.#emit(Buffer.concat([u32(piece.length), piece]));
    }
  }

  async endDevice(): Promise<void> {
    if (!this.#device) throw new StreamError('endDevice without beginDevice');
    const digest = this.#device.hash.digest();
    this.#device = undefined;
    this.#written++;
    await this.#emit(Buffer.concat([u32(0), digest]));
  }

  async end(): Promise<void> {
    if (this.#device) throw new StreamError('end inside a device section', this.#device.d.device);
    if (this.#written !== this.#expected) throw new StreamError(`${this.#written} devices written, ${this.#expected} announced`);
    const head = Buffer.concat([END_MAGIC, u32(this.#written)]);
    this.#total.update(head);
    await this.#out(Buffer.concat([head, this.#total.digest()]));
  }
}

export type StreamEvent =
  | { type: 'device'; descriptor: DeviceDescriptor }
  | { type: 'data'; device: string; chunk: Buffer }
  /** The device's data matched its checksum: now it may be committed. */
  | { type: 'device-verified'; device: string; bytes: number }
  | { type: 'end'; devices: number };

/** Pulls exact byte counts out of an async sequence of Buffers. */
class ByteSource {
  readonly #it: AsyncIterator<Buffer>;
  #buf: Buffer = Buffer.alloc(0);
  #done = false;
  constructor(src: AsyncIterable<Buffer> | Iterable<Buffer>) {
    this.#it = (Symbol.asyncIterator in src ? src[Symbol.asyncIterator]() : (async function* () {
      yield* src as Iterable<Buffer>;
    })()) as AsyncIterator<Buffer>;
  }
  async take(n: number, what: string, device?: string): Promise<Buffer> {
    while (this.#buf.length < n) {
      if (this.#done) throw new StreamError(`truncated: the stream ended inside ${what} (${this.#buf.length} of ${n} bytes)`, device);
      const r = await this.#it.next();
      if (r.done) this.#done = true;
      else this.#buf = this.#buf.length ? Buffer.concat([this.#buf, r.value]) : r.value;
    }
    const out = this.#buf.subarray(0, n);
    this.#buf = this.#buf.subarray(n);
    return out;
  }
  async atEnd(): Promise<boolean> {
    if (this.#buf.length) return false;
    while (!this.#done) {
      const r = await this.#it.next();
      if (r.done) this.#done = true;
      else if (r.value.length) {
        this.#buf = r.value;
        return false;
      }
    }
    return true;
  }
}

function parseDescriptor(json: Buffer): DeviceDescriptor {
  let d: unknown;
  try {
    d = JSON.parse(json.toString('utf8'));
  } catch {
    throw new StreamError('the device descriptor is not valid JSON');
  }
  if (typeof d !== 'object' || d === null || typeof (d as DeviceDescriptor).device !== 'string' || !(d as DeviceDescriptor).device) {
    throw new StreamError('the device descriptor has no device name');
  }
  return d as DeviceDescriptor;
}

/**
 * Reads and verifies a stream, yielding descriptors, data chunks and a
 * `device-verified` event after each device's checksum matched. Anything malformed,
 * truncated or corrupted throws StreamError; data already yielded for a device that then
 * fails verification must not be committed (the caller resets that device).
 */
export async function* readStream(src: AsyncIterable<Buffer> | Iterable<Buffer>): AsyncGenerator<StreamEvent> {
  const s = new ByteSource(src);
  const total = createHash('sha256');
  const take = async (n: number, what: string, device?: string) => {
    const b = await s.take(n, what, device);
    total.update(b);
    return b;
  };
  const head = await take(16, 'the stream header');
  if (!head.subarray(0, 8).equals(MAGIC)) throw new StreamError('not a vfio-mig state stream (bad magic)');
  const version = head.readUInt16LE(8);
  if (version !== STREAM_VERSION) throw new StreamError(`format version ${version} is not supported (this vfio-mig reads ${STREAM_VERSION})`);
  const count = head.readUInt32LE(12);
  if (count < 1 || count > MAX_DEVICES) throw new StreamError(`device count ${count} out of range`);
  const seen = new Set<string>();
  for (let i = 0; i < count; i++) {
    const dh = await take(12, `device section ${i + 1}`);
    if (!dh.subarray(0, 8).equals(DEV_MAGIC)) throw new StreamError(`device section ${i + 1} has a bad magic (corrupted or misframed)`);
    const len = dh.readUInt32LE(8);
    if (len === 0 || len > MAX_DESCRIPTOR) throw new StreamError(`device section ${i + 1}: descriptor length ${len} out of range`);
    const json = await take(len, `device section ${i + 1}'s descriptor`);
    const descriptor = parseDescriptor(json);
    const name = descriptor.device;
    if (seen.has(name)) throw new StreamError('the device appears twice in the stream', name);
    seen.add(name);
    const hash = createHash('sha256').update(json);
    yield { type: 'device', descriptor };
    let bytes = 0;
    for (;;) {
      const n = (await take(4, 'a chunk length', name)).readUInt32LE(0);
      if (n === 0) break;
      if (n > MAX_CHUNK) throw new StreamError(`chunk length ${n} exceeds ${MAX_CHUNK} (corrupted)`, name);
      const chunk = await take(n, 'a data chunk', name);
      hash.update(chunk);
      bytes += n;
      yield { type: 'data', device: name, chunk };
    }
    const digest = await take(32, 'the checksum', name);
    if (!digest.equals(hash.digest())) throw new StreamError('checksum mismatch: the device state was corrupted in transit; it must not be committed', name);
    yield { type: 'device-verified', device: name, bytes };
  }
  const tail = await s.take(12, 'the trailer');
  if (!tail.subarray(0, 8).equals(END_MAGIC) || tail.readUInt32LE(8) !== count) throw new StreamError('bad trailer (corrupted, or more data than announced)');
  total.update(tail);
  const digest = await s.take(32, 'the trailer checksum');
  if (!digest.equals(total.digest())) throw new StreamError('stream checksum mismatch');
  if (!(await s.atEnd())) throw new StreamError('trailing bytes after the end of the stream');
  yield { type: 'end', devices: count };
}
