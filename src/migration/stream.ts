// The vfio-mig state stream: how the device states of one migration travel between hosts.
// The byte layout and its rules are specified in docs/stream-format.md; this file is the
// one implementation of both ends.
//
// Drivers' own streams are opaque and some carry no checksum at all (mtty accepts a
// flipped byte and restores garbage). So each device's data is bound to its descriptor by
// a SHA-256 that the reader checks before the caller may commit (RESUMING -> STOP), and a
// trailer covers every byte the per-device digests do not (framing included). Every
// descriptor comes before any data: the receiver decides whether it accepts the stream -
// and refuses a foreign one - before any device is moved to RESUMING. Data travels in
// frames tagged with the device index, so all devices are read and sent at once and their
// chunks interleave. Nothing is ever held whole: the writer forwards each chunk as it is
// read, the reader hands each piece on as it arrives, and reassembly is linear in the
// input (a list of received pieces and an offset, never a re-concatenated buffer).
//
// Layout (little endian; docs/stream-format.md):
//   header (16)       : "VFMIGSTR" u16 version=2 u16 flags=0 u32 deviceCount
//   frame header (8)  : u8 type, u8 reserved=0, u16 device index, u32 payload length
//   DESCRIPTOR (1)    : one per device, index 0..n-1 in order, before any other frame;
//                       payload: JSON {"device": name, "descriptor": {...}, "estimate"?: n}
//   DATA (2)          : 1..maxChunk bytes of one device's state
//   DEVICE_END (3)    : u64 data bytes, sha256(descriptor payload || data) (40 bytes)
//   TRAILER (4)       : index 0; u32 deviceCount, u64 total data bytes,
//                       sha256 of every stream byte except DATA payloads (44 bytes)
//   and then the end of the input.

import { createHash, type Hash } from 'node:crypto';

export const STREAM_VERSION = 2;
const MAGIC = Buffer.from('VFMIGSTR');
const HEADER_SIZE = 16;
const FRAME_HEADER_SIZE = 8;
const DEVICE_END_SIZE = 40;
const TRAILER_SIZE = 44;

export const FrameType = { Descriptor: 1, Data: 2, DeviceEnd: 3, Trailer: 4 } as const;

/** Limits a reader enforces (and a writer respects). */
export interface StreamLimits {
  /** Largest DATA payload accepted (default 16 MiB; the writer sends 4 MiB). */
  maxChunk: number;
  /** Largest descriptor JSON (default 64 KiB). */
  maxDescriptor: number;
  /** Most devices in one stream (default 1024; the index is a u16). */
  maxDevices: number;
}

export const DEFAULT_LIMITS: Readonly<StreamLimits> = { maxChunk: 16 << 20, maxDescriptor: 64 << 10, maxDevices: 1024 };
/** DATA payload size the writer uses unless told otherwise. */
export const DEFAULT_FRAME = 4 << 20;

/**
 * The compatibility descriptor of a device as the stream carries it: an opaque JSON
 * object (src/compat builds it). The stream checks only the fields a receiver relies on,
 * when present and not null: the PCI ids (vendor, device, subsystem ids: strings or
 * integers), driver, and the migration version (migration_version, or migrationVersion
 * as a string or src/compat's { present, value }).
 */
export type CompatDescriptor = Readonly<Record<string, unknown>>;

/** One device as announced at the start of a stream. */
export interface StreamDevice {
  /** Position in the stream (the DATA frames' device index). */
  index: number;
  /** The source device's name: PCI address or mdev UUID. */
  device: string;
  descriptor: CompatDescriptor;
  /** The sender's estimate of the state size in bytes (MIG_DATA_SIZE), for progress only. */
  estimate?: number;
}

export type StreamErrorCode =
  | 'TRUNCATED' // the input ended early
  | 'CORRUPT' // a digest, magic, reserved field or declared length disagrees
  | 'TOO_LARGE' // a limit was exceeded
  | 'OUT_OF_ORDER' // a frame where it may not be (reordered, duplicated, after the trailer)
  | 'UNSUPPORTED' // not a vfio-mig stream, or another format version
  | 'REFUSED' // the receiver refused a device (accept/route said no)
  | 'MISUSE'; // the writer was called out of order

export class StreamError extends Error {
  readonly code: StreamErrorCode;
  /** The device concerned (source name), when there is one. */
  readonly device: string | undefined;
  constructor(code: StreamErrorCode, message: string, device?: string) {
    super(device ? `state stream, device ${device}: ${message}` : `state stream: ${message}`);
    this.name = 'StreamError';
    this.code = code;
    this.device = device;
  }
}

function frameHeader(type: number, index: number, length: number): Buffer {
  const h = Buffer.alloc(FRAME_HEADER_SIZE);
  h.writeUInt8(type, 0);
  h.writeUInt16LE(index, 2);
  h.writeUInt32LE(length, 4);
  return h;
}

export type Sink = (b: Buffer) => void | Promise<void>;

export interface WriterOptions {
  /** DATA payload size (default 4 MiB); larger chunks are split. */
  frameSize?: number;
  limits?: Partial<StreamLimits>;
}

interface WriterDevice {
  name: string;
  hash: Hash;
  bytes: number;
  ended: boolean;
}

/**
 * Produces a stream into `out` (a transport, a file, a test array). Use: begin(devices),
 * then data(index, chunk) and endDevice(index) for every device - devices may interleave,
 * and several devices may call data() concurrently: frames are emitted whole and in call
 * order - then end(). `out` is awaited for every buffer, so a slow consumer slows the
 * producers down (backpressure) instead of buffering.
 */
export class StreamWriter {
  readonly #out: Sink;
  readonly #frame: number;
  readonly #limits: StreamLimits;
  /** Everything but DATA payloads, for the trailer. */
  readonly #total: Hash = createHash('sha256');
  #devices: WriterDevice[] = [];
  #began = false;
  #ended = false;
  #failed: unknown;
  #lock: Promise<void> = Promise.resolve();
  #dataBytes = 0;

  constructor(out: Sink, opts: WriterOptions = {}) {
    this.#out = out;
    this.#limits = { ...DEFAULT_LIMITS, ...opts.limits };
    this.#frame = Math.min(opts.frameSize ?? DEFAULT_FRAME, this.#limits.maxChunk);
    if (!Number.isInteger(this.#frame) || this.#frame < 1) throw new StreamError('MISUSE', `frame size ${opts.frameSize} is not a positive integer`);
  }

  /** Runs `fn` with the output to itself, so concurrent callers never split a frame. */
  #serial(fn: () => Promise<void>): Promise<void> {
    const run = this.#lock.then(async () => {
      if (this.#failed !== undefined) throw this.#failed;
      try {
        await fn();
      } catch (err) {
        this.#failed ??= err;
        throw err;
      }
    });
    this.#lock = run.catch(() => undefined);
    return run;
  }

  async #meta(b: Buffer): Promise<void> {
    this.#total.update(b);
    await this.#out(b);
  }

  /** Header and every device's descriptor. */
  async begin(devices: readonly { device: string; descriptor: CompatDescriptor; estimate?: number }[]): Promise<void> {
    if (this.#began) throw new StreamError('MISUSE', 'begin called twice');
    const n = devices.length;
    if (n < 1 || n > this.#limits.maxDevices) throw new StreamError('MISUSE', `device count ${n} out of range 1..${this.#limits.maxDevices}`);
    const payloads = devices.map((d) => {
      if (!isPlainObject(d.descriptor)) throw new StreamError('MISUSE', 'the descriptor is not a JSON object', d.device);
      const envelope: Record<string, unknown> = { device: d.device, descriptor: d.descriptor };
      if (d.estimate !== undefined) envelope.estimate = d.estimate;
      const json = Buffer.from(JSON.stringify(envelope), 'utf8');
      if (json.length > this.#limits.maxDescriptor) throw new StreamError('TOO_LARGE', `descriptor of ${json.length} bytes exceeds ${this.#limits.maxDescriptor}`, d.device);
      // The writer checks what the reader will check, so a bad descriptor fails here.
      parseEnvelope(json, 0, this.#limits);
      return json;
    });
    const names = new Set(devices.map((d) => d.device));
    if (names.size !== n) throw new StreamError('MISUSE', 'a device is named twice');
    this.#began = true;
    this.#devices = devices.map((d, i) => ({ name: d.device, hash: createHash('sha256').update(payloads[i]!), bytes: 0, ended: false }));
    return this.#serial(async () => {
      const h = Buffer.alloc(HEADER_SIZE);
      MAGIC.copy(h, 0);
      h.writeUInt16LE(STREAM_VERSION, 8);
      h.writeUInt32LE(n, 12);
      await this.#meta(h);
      for (const [i, json] of payloads.entries()) {
        await this.#meta(frameHeader(FrameType.Descriptor, i, json.length));
        await this.#meta(json);
      }
    });
  }

  #device(index: number, what: string): WriterDevice {
    if (!this.#began) throw new StreamError('MISUSE', `${what} before begin`);
    const d = this.#devices[index];
    if (!d) throw new StreamError('MISUSE', `${what}: no device index ${index}`);
    if (d.ended) throw new StreamError('MISUSE', `${what} after the device ended`, d.name);
    return d;
  }

  /** Device `index`'s next bytes, in DATA frames of at most the frame size. */
  async data(index: number, chunk: Buffer): Promise<void> {
    const d = this.#device(index, 'data');
    for (let off = 0; off < chunk.length; off += this.#frame) {
      const piece = chunk.subarray(off, Math.min(chunk.length, off + this.#frame));
      await this.#serial(async () => {
        d.hash.update(piece);
        d.bytes += piece.length;
        this.#dataBytes += piece.length;
        await this.#meta(frameHeader(FrameType.Data, index, piece.length));
        await this.#out(piece);
      });
    }
  }

  /** Device `index` has no more data: its length and digest. */
  async endDevice(index: number): Promise<void> {
    const d = this.#device(index, 'endDevice');
    d.ended = true;
    return this.#serial(async () => {
      const p = Buffer.alloc(DEVICE_END_SIZE);
      p.writeBigUInt64LE(BigInt(d.bytes), 0);
      d.hash.digest().copy(p, 8);
      await this.#meta(frameHeader(FrameType.DeviceEnd, index, p.length));
      await this.#meta(p);
    });
  }

  /** The trailer; every device must have ended. */
  async end(): Promise<void> {
    if (!this.#began) throw new StreamError('MISUSE', 'end before begin');
    if (this.#ended) throw new StreamError('MISUSE', 'end called twice');
    const open = this.#devices.filter((d) => !d.ended);
    if (open.length) throw new StreamError('MISUSE', `end while ${open.map((d) => d.name).join(', ')} has not ended`, open[0]!.name);
    this.#ended = true;
    return this.#serial(async () => {
      const p = Buffer.alloc(TRAILER_SIZE);
      p.writeUInt32LE(this.#devices.length, 0);
      p.writeBigUInt64LE(BigInt(this.#dataBytes), 4);
      const fh = frameHeader(FrameType.Trailer, 0, TRAILER_SIZE);
      this.#total.update(fh).update(p.subarray(0, 12));
      this.#total.digest().copy(p, 12);
      await this.#out(fh);
      await this.#out(p);
    });
  }
}

export type StreamEvent =
  /** Every descriptor was read: decide now, before any data is read. */
  | { type: 'devices'; devices: StreamDevice[] }
  /** A piece of one device's data; not verified yet: never commit on it alone. */
  | { type: 'data'; index: number; device: string; chunk: Buffer }
  /** The device's data matched its length and digest: it may be committed once the stream ends. */
  | { type: 'device-verified'; index: number; device: string; bytes: number }
  /** The trailer matched and nothing followed it. */
  | { type: 'end'; devices: number; bytes: number };

/** Work the reader did, for tests that show reassembly is linear in the input. */
export interface ReaderStats {
  /** Input pieces pulled from the source. */
  pieces: number;
  /** Bytes received. */
  bytesIn: number;
  /** Bytes copied while reassembling fields that spanned pieces. */
  bytesCopied: number;
  /** Buffer operations: pieces stored, fields sliced or assembled, pieces handed on. */
  ops: number;
}

export type ByteInput = AsyncIterable<Buffer | Uint8Array> | Iterable<Buffer | Uint8Array>;

/**
 * Pulls exact byte counts out of a sequence of pieces. Pieces are kept in a list with
 * an offset into the first; a field within one piece is a zero-copy view, a field that
 * spans pieces is copied once, when all its bytes are there. Each input byte is thus
 * copied at most once, whatever the segmentation.
 */
class ByteSource {
  readonly #it: AsyncIterator<Buffer | Uint8Array> | Iterator<Buffer | Uint8Array>;
  readonly #pieces: Buffer[] = [];
  #head = 0;
  #offset = 0;
  #available = 0;
  #done = false;
  readonly stats: ReaderStats;

  constructor(src: ByteInput, stats: ReaderStats) {
    this.#it = Symbol.asyncIterator in src ? src[Symbol.asyncIterator]() : src[Symbol.iterator]();
    this.stats = stats;
  }

  /** One more piece into the list; false at the end of the input. */
  async #pull(): Promise<boolean> {
    while (!this.#done) {
      const r = await this.#it.next();
      if (r.done) {
        this.#done = true;
        break;
      }
      const b = Buffer.isBuffer(r.value) ? r.value : Buffer.from(r.value.buffer, r.value.byteOffset, r.value.byteLength);
      this.stats.pieces++;
      if (b.length === 0) continue;
      this.stats.bytesIn += b.length;
      this.stats.ops++;
      // Drop consumed pieces now and then (amortised O(1) per piece).
      if (this.#head > 64 && this.#head * 2 > this.#pieces.length) {
        this.#pieces.splice(0, this.#head);
        this.#head = 0;
      }
      this.#pieces.push(b);
      this.#available += b.length;
      return true;
    }
    return false;
  }

  /** Exactly `n` bytes; a truncated input is a StreamError naming `what`. */
  async take(n: number, what: string, device?: string): Promise<Buffer> {
    while (this.#available < n) {
      if (!(await this.#pull())) throw new StreamError('TRUNCATED', `truncated: the stream ended inside ${what} (${this.#available} of ${n} bytes)`, device);
    }
    this.stats.ops++;
    const first = this.#pieces[this.#head]!;
    if (first.length - this.#offset >= n) {
      const out = first.subarray(this.#offset, this.#offset + n);
      this.#advance(n);
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    while (filled < n) {
      const p = this.#pieces[this.#head]!;
      const k = Math.min(n - filled, p.length - this.#offset);
      p.copy(out, filled, this.#offset, this.#offset + k);
      filled += k;
      this.#advance(k);
    }
    this.stats.bytesCopied += n;
    return out;
  }

  /** Between 1 and `max` bytes, as a view of one piece (no copy). */
  async some(max: number, what: string, device?: string): Promise<Buffer> {
    if (this.#available === 0 && !(await this.#pull())) throw new StreamError('TRUNCATED', `truncated: the stream ended inside ${what}`, device);
    this.stats.ops++;
    const p = this.#pieces[this.#head]!;
    const k = Math.min(max, p.length - this.#offset);
    const out = p.subarray(this.#offset, this.#offset + k);
    this.#advance(k);
    return out;
  }

  #advance(k: number): void {
    this.#offset += k;
    this.#available -= k;
    if (this.#offset === this.#pieces[this.#head]!.length) {
      this.#pieces[this.#head] = EMPTY; // let it be collected
      this.#head++;
      this.#offset = 0;
    }
  }

  /** Bytes received and not consumed yet. */
  get buffered(): number {
    return this.#available;
  }

  /** Whether the input ends here (pulls until a non-empty piece or the end). */
  async atEnd(): Promise<boolean> {
    if (this.#available) return false;
    return !(await this.#pull());
  }
}

const EMPTY = Buffer.alloc(0);

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

const NAME = /^[\x21-\x7e]{1,256}$/; // printable ASCII, no space: a BDF, a UUID, a test name

function parseEnvelope(json: Buffer, index: number, limits: StreamLimits): StreamDevice {
  const where = `descriptor ${index}`;
  let v: unknown;
  try {
    v = JSON.parse(json.toString('utf8'));
  } catch {
    throw new StreamError('CORRUPT', `${where} is not valid JSON`);
  }
  if (!isPlainObject(v)) throw new StreamError('CORRUPT', `${where} is not a JSON object`);
  if (typeof v.device !== 'string' || !NAME.test(v.device)) throw new StreamError('CORRUPT', `${where} has no valid device name`);
  const device = v.device;
  const d = v.descriptor;
  if (!isPlainObject(d)) throw new StreamError('CORRUPT', 'the compatibility descriptor is not a JSON object', device);
  // src/compat's DeviceDescriptor uses null for "not known"; older or other senders may
  // leave a field out. Both are fine; a present value must have the expected shape.
  for (const key of ['vendor', 'device', 'deviceId', 'subsystemVendor', 'subsystemDevice', 'subsystem_vendor', 'subsystem_device']) {
    const x = d[key];
    if (x === undefined || x === null) continue;
    const ok = (typeof x === 'string' && x.length <= 64) || (Number.isSafeInteger(x) && (x as number) >= 0);
    if (!ok) throw new StreamError('CORRUPT', `descriptor field ${key} is not a PCI id`, device);
  }
  const text = (key: string, x: unknown, max: number) => {
    if (x !== undefined && x !== null && !(typeof x === 'string' && x.length <= max)) throw new StreamError('CORRUPT', `descriptor field ${key} is not a string of at most ${max} characters`, device);
  };
  text('driver', d.driver, 256);
  text('migration_version', d.migration_version, limits.maxDescriptor);
  // migrationVersion: a string, or src/compat's { present, value? | error? }.
  const mv = d.migrationVersion;
  if (isPlainObject(mv)) {
    if (typeof mv.present !== 'boolean') throw new StreamError('CORRUPT', 'descriptor field migrationVersion.present is not a boolean', device);
    text('migrationVersion.value', mv.value, limits.maxDescriptor);
  } else {
    text('migrationVersion', mv, limits.maxDescriptor);
  }
  const out: StreamDevice = { index, device, descriptor: d };
  if (v.estimate !== undefined) {
    if (!Number.isSafeInteger(v.estimate) || (v.estimate as number) < 0) throw new StreamError('CORRUPT', 'the size estimate is not a byte count', device);
    out.estimate = v.estimate as number;
  }
  return out;
}

export interface ReaderOptions {
  limits?: Partial<StreamLimits>;
  /** Filled in while reading (tests of linear reassembly). */
  stats?: ReaderStats;
}

export function newReaderStats(): ReaderStats {
  return { pieces: 0, bytesIn: 0, bytesCopied: 0, ops: 0 };
}

interface ReaderDevice {
  info: StreamDevice;
  hash: Hash;
  bytes: number;
  ended: boolean;
}

/**
 * Reads and verifies a stream. It yields one `devices` event with every descriptor
 * before it reads any data (the caller decides then, and may stop), then data pieces as
 * they arrive, `device-verified` after each device's length and digest matched, and
 * `end` after the trailer matched and the input ended right after it. Anything
 * malformed, truncated, reordered, duplicated, oversized or corrupted throws a
 * StreamError naming the device when there is one; data already yielded for a device
 * that then fails must not be committed (the caller resets that device).
 */
export async function* readStream(src: ByteInput, opts: ReaderOptions = {}): AsyncGenerator<StreamEvent, void, undefined> {
  const limits: StreamLimits = { ...DEFAULT_LIMITS, ...opts.limits };
  const s = new ByteSource(src, opts.stats ?? newReaderStats());
  const total = createHash('sha256');
  const meta = async (n: number, what: string, device?: string) => {
    const b = await s.take(n, what, device);
    total.update(b);
    return b;
  };

  const head = await meta(HEADER_SIZE, 'the stream header');
  if (!head.subarray(0, 8).equals(MAGIC)) throw new StreamError('UNSUPPORTED', 'not a vfio-mig state stream (bad magic)');
  const version = head.readUInt16LE(8);
  if (version !== STREAM_VERSION) throw new StreamError('UNSUPPORTED', `format version ${version} is not supported (this vfio-mig reads version ${STREAM_VERSION})`);
  if (head.readUInt16LE(10) !== 0) throw new StreamError('UNSUPPORTED', `unknown header flags 0x${head.readUInt16LE(10).toString(16)}`);
  const count = head.readUInt32LE(12);
  if (count < 1 || count > limits.maxDevices) throw new StreamError('TOO_LARGE', `device count ${count} out of range 1..${limits.maxDevices}`);

  const frame = async (what: string) => {
    const h = await meta(FRAME_HEADER_SIZE, what);
    if (h.readUInt8(1) !== 0) throw new StreamError('CORRUPT', `a frame has a non-zero reserved byte (corrupted or misframed)`);
    return { type: h.readUInt8(0), index: h.readUInt16LE(2), length: h.readUInt32LE(4) };
  };

  // Descriptors: all of them, in index order, before anything else.
  const devices: ReaderDevice[] = [];
  const names = new Set<string>();
  for (let i = 0; i < count; i++) {
    const f = await frame(`descriptor ${i}'s frame`);
    if (f.type !== FrameType.Descriptor) {
      throw new StreamError('OUT_OF_ORDER', `frame type ${f.type} where descriptor ${i} of ${count} was expected: every descriptor comes before any data (reordered or truncated header)`);
    }
    if (f.index !== i) throw new StreamError('OUT_OF_ORDER', `descriptor for device index ${f.index} where index ${i} was expected (reordered or duplicated)`, devices[f.index]?.info.device);
    if (f.length === 0 || f.length > limits.maxDescriptor) throw new StreamError('TOO_LARGE', `descriptor ${i} declares ${f.length} bytes (limit ${limits.maxDescriptor})`);
    const json = await meta(f.length, `descriptor ${i}`);
    const info = parseEnvelope(json, i, limits);
    if (names.has(info.device)) throw new StreamError('OUT_OF_ORDER', 'a second descriptor for the same device', info.device);
    names.add(info.device);
    devices.push({ info, hash: createHash('sha256').update(json), bytes: 0, ended: false });
  }
  yield { type: 'devices', devices: devices.map((d) => ({ ...d.info })) };

  let dataBytes = 0;
  let ended = 0;
  const deviceAt = (index: number, what: string): ReaderDevice => {
    const d = devices[index];
    if (!d) throw new StreamError('CORRUPT', `${what} for device index ${index}, out of range (the stream has ${count} devices)`);
    return d;
  };
  for (;;) {
    const f = await frame('a frame header (no trailer)');
    if (f.type === FrameType.Data) {
      const d = deviceAt(f.index, 'data');
      const name = d.info.device;
      if (d.ended) throw new StreamError('OUT_OF_ORDER', 'data after the device ended (reordered or duplicated)', name);
      if (f.length === 0) throw new StreamError('CORRUPT', 'an empty data frame', name);
      if (f.length > limits.maxChunk) throw new StreamError('TOO_LARGE', `a data frame of ${f.length} bytes exceeds the ${limits.maxChunk}-byte limit`, name);
      for (let left = f.length; left > 0; ) {
        const piece = await s.some(left, 'a data frame', name);
        left -= piece.length;
        d.hash.update(piece);
        d.bytes += piece.length;
        dataBytes += piece.length;
        yield { type: 'data', index: f.index, device: name, chunk: piece };
      }
    } else if (f.type === FrameType.DeviceEnd) {
      const d = deviceAt(f.index, 'a device end');
      const name = d.info.device;
      if (d.ended) throw new StreamError('OUT_OF_ORDER', 'the device ends twice (duplicated frame)', name);
      if (f.length !== DEVICE_END_SIZE) throw new StreamError('CORRUPT', `a device end of ${f.length} bytes (expected ${DEVICE_END_SIZE})`, name);
      const p = await meta(DEVICE_END_SIZE, 'the device end', name);
      const declared = p.readBigUInt64LE(0);
      if (declared !== BigInt(d.bytes)) throw new StreamError('CORRUPT', `declared length ${declared} disagrees with the ${d.bytes} bytes received (data lost or duplicated)`, name);
      if (!p.subarray(8).equals(d.hash.digest())) throw new StreamError('CORRUPT', 'checksum mismatch: the device state was corrupted in transit; it must not be committed', name);
      d.ended = true;
      ended++;
      yield { type: 'device-verified', index: f.index, device: name, bytes: d.bytes };
    } else if (f.type === FrameType.Trailer) {
      const open = devices.filter((d) => !d.ended).map((d) => d.info.device);
      if (open.length) throw new StreamError('OUT_OF_ORDER', `the trailer came before the end of ${open.join(', ')} (truncated or reordered)`, open[0]);
      if (f.index !== 0 || f.length !== TRAILER_SIZE) throw new StreamError('CORRUPT', `bad trailer frame (index ${f.index}, ${f.length} bytes)`);
      const p = await s.take(TRAILER_SIZE, 'the trailer');
      total.update(p.subarray(0, 12));
      if (p.readUInt32LE(0) !== count) throw new StreamError('CORRUPT', `the trailer counts ${p.readUInt32LE(0)} devices, the header ${count}`);
      if (p.readBigUInt64LE(4) !== BigInt(dataBytes)) throw new StreamError('CORRUPT', `the trailer declares ${p.readBigUInt64LE(4)} data bytes, ${dataBytes} were received`);
      if (!p.subarray(12).equals(total.digest())) throw new StreamError('CORRUPT', 'stream checksum mismatch (framing or descriptors corrupted)');
      if (!(await s.atEnd())) throw new StreamError('OUT_OF_ORDER', 'data after the trailer');
      yield { type: 'end', devices: ended, bytes: dataBytes };
      return;
    } else if (f.type === FrameType.Descriptor) {
      const name = devices[f.index]?.info.device;
      throw new StreamError('OUT_OF_ORDER', name ? 'a second descriptor for the same device' : `a descriptor for device index ${f.index} after the data began`, name);
    } else {
      throw new StreamError('CORRUPT', `unknown frame type ${f.type} (corrupted or misframed)`, devices[f.index]?.info.device);
    }
  }
}

/** The frame layout, for tests and tools that build or inspect streams by hand. */
export const Layout = { HEADER_SIZE, FRAME_HEADER_SIZE, DEVICE_END_SIZE, TRAILER_SIZE, MAGIC } as const;
