// Moving a device set's state through a vfio-mig state stream (docs/stream-format.md).
//
// Source: every device's saving fd is read at once and the chunks interleave in one
// stream, so the data phase lasts as long as the largest device, not the sum. Each read
// waits for the sink (a socket that drained, a pipe), so a device state is never held
// whole in memory.
//
// Destination: the stream's descriptors come first; each is routed to a destination
// device and put to `accept` (the compatibility check) while every device is still
// RUNNING. Only when all were accepted do the devices go to RESUMING; each device's data
// is written to its RESUMING fd as it arrives (devices in parallel, a bounded queue per
// device), and the devices commit (RESUMING -> STOP -> RUNNING) only after every
// device's length and digest and the trailer matched. A refused, corrupted or truncated
// stream therefore never reaches a commit: the destination devices are reset to RUNNING
// (Coordinator.rollback: RESUMING is reset, never committed).
//
// sendDevices/receiveDevices run the same over a Transport (transport.ts) and add the
// receiver's verdict: after the trailer the receiver answers one frame saying whether it
// committed, so the source knows whether to stay stopped or roll back to RUNNING.

import type { Coordinator } from './coordinator.ts';
import { StreamWriter, readStream, StreamError, type CompatDescriptor, type StreamDevice, type StreamEvent, type Sink, type ByteInput, type StreamLimits, type ReaderStats } from './stream.ts';
import { readToEnd, writeAll, type DataFd } from '../vfio/data.ts';
import { ProgressMeter, type ProgressSnapshot } from './progress.ts';
import { TransportError, type Transport } from './transport.ts';

/** The compatibility descriptor of a source device (src/compat builds it). */
export type Describe = (device: string) => CompatDescriptor | Promise<CompatDescriptor>;

/** Which destination device takes the state of a source device. */
export type Route = (sourceDevice: string, descriptor: CompatDescriptor) => string;

export type AcceptVerdict = { ok: true } | { ok: false; reason: string };

/**
 * The receiver's compatibility check of one incoming device against the destination
 * device it was routed to, before any device leaves RUNNING. Refuse a foreign stream here
 * (other vendor/device/driver, an incompatible migration_version).
 */
export type Accept = (descriptor: CompatDescriptor, destinationDevice: string, incoming: StreamDevice) => AcceptVerdict | Promise<AcceptVerdict>;

export interface SendOptions {
  /** Read size on the data fds (default 4 MiB). */
  chunkSize?: number;
  /** DATA frame payload size (default 4 MiB). */
  frameSize?: number;
  /** Each source device's expected state size (MIG_DATA_SIZE), for progress and ETA. */
  estimates?: ReadonlyMap<string, number>;
  onProgress?: (p: ProgressSnapshot) => void;
  progressIntervalMs?: number;
  /** Cancels the transfer (the source is rolled back). */
  signal?: AbortSignal;
}

export interface SendResult {
  bytes: number;
  devices: { device: string; bytes: number }[];
}

/** One device for writeDevices: its descriptor and how to read its state. */
export interface DeviceSource {
  device: string;
  descriptor: CompatDescriptor;
  estimate?: number;
  /** Reads the whole state into `sink`, awaiting it for every chunk; returns the bytes read. */
  read: (sink: (chunk: Buffer) => Promise<void>, signal: AbortSignal) => Promise<number>;
}

/**
 * Writes one stream from several sources read all at once (their chunks interleave).
 * The first failure cancels the other reads and is thrown. saveSet's core, usable with
 * any source (tests stream generated data through it).
 */
export async function writeDevices(out: Sink, sources: readonly DeviceSource[], opts: SendOptions = {}): Promise<SendResult> {
  const w = new StreamWriter(out, opts.frameSize !== undefined ? { frameSize: opts.frameSize } : {});
  const meter = new ProgressMeter(
    'send',
    sources.map((s) => ({ device: s.device, ...(s.estimate !== undefined ? { total: s.estimate } : {}) })),
    { ...(opts.onProgress ? { onProgress: opts.onProgress } : {}), ...(opts.progressIntervalMs !== undefined ? { intervalMs: opts.progressIntervalMs } : {}) },
  );
  await w.begin(sources.map((s) => ({ device: s.device, descriptor: s.descriptor, ...(s.estimate !== undefined ? { estimate: s.estimate } : {}) })));
  const stop = new AbortController();
  const onAbort = () => stop.abort();
  opts.signal?.addEventListener('abort', onAbort, { once: true });
  let first: unknown;
  const bytes: number[] = sources.map(() => 0);
  try {
    await Promise.all(
      sources.map(async (s, i) => {
        try {
          bytes[i] = await s.read(async (chunk) => {
            await w.data(i, chunk);
            meter.add(i, chunk.length);
          }, stop.signal);
          await w.endDevice(i);
          meter.deviceDone(i);
        } catch (err) {
          first ??= err;
          stop.abort();
        }
      }),
    );
    if (first !== undefined) throw first;
    if (opts.signal?.aborted) throw new StreamError('MISUSE', 'the transfer was cancelled');
    await w.end();
  } finally {
    opts.signal?.removeEventListener('abort', onAbort);
  }
  meter.finish();
  return { bytes: bytes.reduce((a, b) => a + b, 0), devices: sources.map((s, i) => ({ device: s.device, bytes: bytes[i]! })) };
}

/**
 * Source, after coordinator.stopCopy(): streams every device's data (all devices read at
 * once, chunks interleaved), then moves the devices to STOP. `describe` supplies each
 * device's compatibility descriptor. On any error every source device is rolled back to
 * RUNNING and the error thrown.
 */
export async function saveSet(source: Coordinator, describe: Describe, out: Sink, opts: SendOptions = {}): Promise<SendResult> {
  const fds = source.dataFds();
  if (fds.size !== source.devices.length) throw new Error(`only ${fds.size} of ${source.devices.length} devices have a saving fd: call stopCopy() first`);
  let result: SendResult;
  try {
    const sources: DeviceSource[] = [];
    for (const name of source.devices) {
      const fd = fds.get(name)!;
      const estimate = opts.estimates?.get(name);
      sources.push({
        device: name,
        descriptor: await describe(name),
        ...(estimate !== undefined ? { estimate } : {}),
        read: (sink, signal) => readToEnd(fd, sink, { signal, ...(opts.chunkSize !== undefined ? { chunkSize: opts.chunkSize } : {}) }),
      });
    }
    result = await writeDevices(out, sources, opts);
  } catch (err) {
    // A failed read or a sink that gave up: the source devices are still stopped, so
    // they go back to RUNNING before the error reaches the caller.
    await source.rollback().catch(() => undefined);
    throw err;
  }
  await source.finishSource();
  return result;
}

export interface ReceiveOptions {
  limits?: Partial<StreamLimits>;
  /** Bytes queued per device while its RESUMING fd is written (default 8 MiB). */
  queueBytes?: number;
  /** Bytes queued over all devices (default 32 MiB). */
  totalQueueBytes?: number;
  onProgress?: (p: ProgressSnapshot) => void;
  progressIntervalMs?: number;
  signal?: AbortSignal;
  /** Longest wait for the next piece of the stream (default: none for loadSet, 60 s for receiveDevices). */
  idleTimeoutMs?: number;
  /** Filled in by the reader (tests). */
  stats?: ReaderStats;
}

export interface ReceiveResult {
  bytes: number;
  devices: number;
  /** source device -> destination device */
  routes: Record<string, string>;
}

/** Bytes received and not yet written, over all devices; the reader waits above `limit`. */
interface QueueBudget {
  total: number;
  limit: number;
  waiters: (() => void)[];
  /** Every device's queue, so a reader that waits on the shared budget can start them all. */
  queues: DeviceSinkQueue[];
}

/**
 * Writes one device's chunks to its RESUMING fd in order, in the background. The stream
 * reader waits in push() while this device holds more than `limit` bytes or all devices
 * together more than the shared budget, so memory stays bounded however many devices.
 *
 * Writes are batched: each write is a hop to a blocking-call thread and a syscall, and
 * the stream hands data on as the socket delivers it (64 KiB pieces from Node's sockets
 * when the receiver keeps up). One write per piece cost more than the data itself in the
 * TCG rig, so a device's pieces wait until a batch (1 MiB, or the queue limit if smaller)
 * is queued, the stream pauses for LINGER_MS, the reader has to wait for room, or the
 * device's data ended (flush).
 */
class DeviceSinkQueue {
  readonly #fd: DataFd;
  readonly #limit: number;
  readonly #batch: number;
  readonly #budget: QueueBudget;
  readonly #signal: AbortSignal;
  readonly #onWritten: (n: number) => void;
  #queue: Buffer[] = [];
  #head = 0;
  #queued = 0;
  #pump: Promise<void> | undefined;
  /** Write what is queued even below a batch (flush, linger, a reader waiting for room). */
  #force = false;
  #linger: NodeJS.Timeout | undefined;
  error: unknown;

  constructor(fd: DataFd, limit: number, budget: QueueBudget, signal: AbortSignal, onWritten: (n: number) => void) {
    this.#fd = fd;
    this.#limit = limit;
    this.#batch = Math.max(1, Math.min(limit, MIN_WRITE));
    this.#budget = budget;
    this.#signal = signal;
    this.#onWritten = onWritten;
  }

  async push(chunk: Buffer): Promise<void> {
    if (this.error !== undefined) throw this.error;
    this.#queue.push(chunk);
    this.#queued += chunk.length;
    this.#budget.total += chunk.length;
    if (this.#queued >= this.#batch) this.#start(false);
    else if (!this.#pump && !this.#linger) {
      this.#linger = setTimeout(() => {
        this.#linger = undefined;
        this.#start(true);
      }, LINGER_MS);
    }
    // Above the limit this pump runs (the limit is at least a batch); above the shared
    // budget every queue is started, so each wait ends.
    while ((this.#queued > this.#limit || this.#budget.total > this.#budget.limit) && this.error === undefined) {
      if (this.#budget.total > this.#budget.limit) for (const q of this.#budget.queues) q.#start(true);
      await new Promise<void>((r) => this.#budget.waiters.push(r));
    }
    if (this.error !== undefined) throw this.error;
  }

  #start(force: boolean): void {
    if (force) this.#force = true;
    // Only when #run will write (and so await): a #run that returned at once would clear
    // #pump before it is assigned.
    if (this.error !== undefined || this.#queued === 0 || this.#pump || !(this.#queued >= this.#batch || this.#force)) return;
    clearTimeout(this.#linger);
    this.#linger = undefined;
    this.#pump = this.#run();
  }

  async #run(): Promise<void> {
    try {
      while (this.#head < this.#queue.length && (this.#queued >= this.#batch || this.#force)) {
        // Everything queued so far (up to MAX_WRITE) goes down in one write.
        const parts: Buffer[] = [];
        let size = 0;
        while (this.#head < this.#queue.length && (size === 0 || size + this.#queue[this.#head]!.length <= MAX_WRITE)) {
          const chunk = this.#queue[this.#head]!;
          this.#queue[this.#head++] = EMPTY;
          parts.push(chunk);
          size += chunk.length;
        }
        // One copy into a fresh buffer costs far less than the writes it saves.
        await writeAll(this.#fd, parts.length === 1 ? parts[0]! : Buffer.concat(parts, size), { signal: this.#signal });
        this.#queued -= size;
        this.#budget.total -= size;
        this.#onWritten(size);
        if (this.#head > 1024) {
          this.#queue = this.#queue.slice(this.#head);
          this.#head = 0;
        }
        this.#wake();
      }
    } catch (err) {
      this.error = err;
      // The device failed: what it still holds will never be written; give the budget back.
      this.#budget.total -= this.#queued;
      this.#queued = 0;
      this.#queue = [];
      this.#head = 0;
    } finally {
      this.#pump = undefined;
      if (this.#queued === 0) this.#force = false;
      // A remainder below a batch waits for more, or for the linger time.
      else if (this.error === undefined && !this.#linger) {
        this.#linger = setTimeout(() => {
          this.#linger = undefined;
          this.#start(true);
        }, LINGER_MS);
      }
      this.#wake();
    }
  }

  #wake(): void {
    for (const w of this.#budget.waiters.splice(0)) w();
  }

  /** Writes everything queued and resolves when it was written; throws the device's write error. */
  async flush(): Promise<void> {
    this.#start(true);
    while (this.#pump) {
      await this.#pump;
      if (this.error === undefined) this.#start(true);
    }
    clearTimeout(this.#linger);
    this.#linger = undefined;
    if (this.error !== undefined) throw this.error;
  }
}

const EMPTY = Buffer.alloc(0);
/** Largest single write to a RESUMING fd when several queued pieces are merged. */
const MAX_WRITE = 4 << 20;
/** A device's pieces are written once this much is queued (or its queue limit, if smaller). */
const MIN_WRITE = 1 << 20;
/** ...or once the stream paused this long with less queued (pre-copy trickles). */
const LINGER_MS = 5;

/**
 * Destination: loads a stream into the coordinator's devices. `route` maps each source
 * device to a destination device of `destination`; `accept` checks each descriptor
 * against its destination device. Every descriptor is routed and accepted before any
 * device moves to RESUMING (a refusal leaves every device RUNNING, untouched); each
 * device's digest and the trailer are verified before the commit. On any error after
 * RESUMING began every destination device is reset to RUNNING and the error thrown.
 */
export async function loadSet(destination: Coordinator, src: ByteInput, route: Route, accept: Accept, opts: ReceiveOptions = {}): Promise<ReceiveResult> {
  const watch = new ReadWatch(opts.idleTimeoutMs, opts.signal);
  try {
    return await loadWatched(destination, src, route, accept, opts, watch);
  } finally {
    watch.dispose();
  }
}

/**
 * Bounds every wait for the next stream event by the idle time and the caller's signal,
 * so a sender that stalls or a caller that gives up does not leave the devices in
 * RESUMING. One timer and one abort listener serve the whole transfer (a timer, a
 * listener and a promise race per event cost more than the event itself under emulation);
 * the timer counts only while a read is waiting, not while the devices are written.
 */
class ReadWatch {
  readonly #signal: AbortSignal | undefined;
  readonly #timer: NodeJS.Timeout | undefined;
  readonly #onAbort = () => this.#fail(new StreamError('MISUSE', 'the transfer was cancelled'));
  #failed: unknown;
  #waiting: ((err: unknown) => void) | undefined;

  constructor(idleMs: number | undefined, signal: AbortSignal | undefined) {
    this.#signal = signal;
    if (idleMs !== undefined) {
      this.#timer = setTimeout(() => {
        if (this.#waiting) this.#fail(new StreamError('TRUNCATED', `no data for ${idleMs} ms: the sender stalled`));
        else this.#timer!.refresh();
      }, idleMs);
    }
    signal?.addEventListener('abort', this.#onAbort, { once: true });
  }

  #fail(err: unknown): void {
    this.#failed ??= err;
    const w = this.#waiting;
    this.#waiting = undefined;
    w?.(this.#failed);
  }

  /** The next event (undefined at the end), or the idle/cancel error. */
  next(events: AsyncGenerator<StreamEvent, void, undefined>): Promise<StreamEvent | undefined> {
    if (this.#signal?.aborted) this.#fail(new StreamError('MISUSE', 'the transfer was cancelled'));
    if (this.#failed !== undefined) return Promise.reject(this.#failed);
    return new Promise<StreamEvent | undefined>((resolve, reject) => {
      let settled = false;
      const settle = (f: () => void) => {
        if (settled) return;
        settled = true;
        this.#waiting = undefined;
        f();
      };
      this.#waiting = (err) => settle(() => reject(err));
      this.#timer?.refresh();
      events.next().then(
        (r) => settle(() => resolve(r.done ? undefined : r.value)),
        (err: unknown) => settle(() => reject(err)),
      );
    });
  }

  dispose(): void {
    clearTimeout(this.#timer);
    this.#signal?.removeEventListener('abort', this.#onAbort);
  }
}

async function loadWatched(destination: Coordinator, src: ByteInput, route: Route, accept: Accept, opts: ReceiveOptions, watch: ReadWatch): Promise<ReceiveResult> {
  const events = readStream(src, { ...(opts.limits ? { limits: opts.limits } : {}), ...(opts.stats ? { stats: opts.stats } : {}) });
  const next = () => watch.next(events);

  // 1. Descriptors, routes and the compatibility check, every device still RUNNING.
  let incoming: StreamDevice[];
  const targets: string[] = [];
  try {
    const first = await next();
    if (first?.type !== 'devices') throw new StreamError('CORRUPT', 'the stream did not start with its descriptors');
    incoming = first.devices;
    const members = new Set(destination.devices);
    for (const d of incoming) {
      let dst: string;
      try {
        dst = route(d.device, d.descriptor);
      } catch (err) {
        throw new StreamError('REFUSED', `no destination device: ${err instanceof Error ? err.message : String(err)}`, d.device);
      }
      if (!members.has(dst)) throw new StreamError('REFUSED', `no destination device ${JSON.stringify(dst)} in this set`, d.device);
      if (targets.includes(dst)) throw new StreamError('REFUSED', `two source devices map to ${dst}`, d.device);
      targets.push(dst);
      const verdict = await accept(d.descriptor, dst, d);
      if (!verdict.ok) throw new StreamError('REFUSED', `refused by ${dst}: ${verdict.reason}`, d.device);
    }
    const missing = destination.devices.filter((d) => !targets.includes(d));
    if (missing.length) throw new StreamError('REFUSED', `the stream has no state for ${missing.join(', ')}`);
    if (opts.signal?.aborted) throw new StreamError('MISUSE', 'the transfer was cancelled');
  } catch (err) {
    // Not awaited: a read may be pending (an idle timeout), and a generator returns only
    // after it; it ends when the input does (receiveDevices closes the transport).
    void events.return(undefined).catch(() => undefined);
    throw err;
  }

  // 2. RESUMING, then the data, written to each device as it arrives.
  let fds: Map<string, DataFd>;
  try {
    fds = await destination.beginResume(); // on failure the coordinator rolled back
  } catch (err) {
    void events.return(undefined).catch(() => undefined);
    throw err;
  }
  const stop = new AbortController();
  const onAbort = () => stop.abort();
  opts.signal?.addEventListener('abort', onAbort, { once: true });
  const meter = new ProgressMeter(
    'receive',
    incoming.map((d) => ({ device: d.device, ...(d.estimate !== undefined ? { total: d.estimate } : {}) })),
    { ...(opts.onProgress ? { onProgress: opts.onProgress } : {}), ...(opts.progressIntervalMs !== undefined ? { intervalMs: opts.progressIntervalMs } : {}) },
  );
  const budget: QueueBudget = { total: 0, limit: opts.totalQueueBytes ?? 32 << 20, waiters: [], queues: [] };
  const queues = incoming.map((_, i) => new DeviceSinkQueue(fds.get(targets[i]!)!, opts.queueBytes ?? 8 << 20, budget, stop.signal, (n) => meter.add(i, n)));
  budget.queues.push(...queues);
  let result: ReceiveResult | undefined;
  try {
    for (;;) {
      if (stop.signal.aborted) throw new StreamError('MISUSE', 'the transfer was cancelled');
      const e = await next();
      if (!e) throw new StreamError('TRUNCATED', 'the stream ended without its trailer');
      if (e.type === 'data') {
        await queues[e.index]!.push(e.chunk);
      } else if (e.type === 'device-verified') {
        // The digest matched; the data may still be on its way into the device.
        void queues[e.index]!.flush().then(
          () => meter.deviceDone(e.index),
          () => undefined,
        );
      } else if (e.type === 'end') {
        await Promise.all(queues.map((q) => q.flush()));
        result = { bytes: e.bytes, devices: e.devices, routes: Object.fromEntries(incoming.map((d, i) => [d.device, targets[i]!])) };
        break;
      }
    }
  } catch (err) {
    stop.abort();
    // No write is left running on a fd when the devices are reset.
    await Promise.allSettled(queues.map((q) => q.flush()));
    void events.return(undefined).catch(() => undefined);
    await destination.rollback().catch(() => undefined);
    throw err;
  } finally {
    opts.signal?.removeEventListener('abort', onAbort);
  }
  // 3. Every digest and the trailer matched: commit.
  await destination.completeResume();
  meter.finish();
  return result;
}

/** The migration version a descriptor carries: migration_version, or migrationVersion (a string or src/compat's { present, value }). */
export function migrationVersionOf(d: CompatDescriptor): string | undefined {
  if (typeof d.migration_version === 'string') return d.migration_version;
  const mv = d.migrationVersion;
  if (typeof mv === 'string') return mv;
  if (typeof mv === 'object' && mv !== null && typeof (mv as { value?: unknown }).value === 'string') return (mv as { value: string }).value;
  return undefined;
}

/**
 * A simple `accept`: the incoming descriptor must name the same vendor, device and
 * driver as the destination's (where both know them), and the same migration version
 * when either has one. src/compat decides real compatibility (checkCompatibility: the
 * driver's own migration_version answer, vendor rules); this is the strict fallback.
 */
export function acceptSameIdentity(describeDestination: (device: string) => CompatDescriptor | Promise<CompatDescriptor>): Accept {
  return async (incoming, dst) => {
    const mine = await describeDestination(dst);
    for (const key of ['vendor', 'device', 'driver']) {
      const a = incoming[key];
      const b = mine[key];
      if (a === undefined || a === null || b === undefined || b === null) continue;
      if (String(a).toLowerCase() !== String(b).toLowerCase()) return { ok: false, reason: `${key} ${JSON.stringify(a)} does not match ${JSON.stringify(b)}` };
    }
    const a = migrationVersionOf(incoming);
    const b = migrationVersionOf(mine);
    if ((a !== undefined || b !== undefined) && a !== b) return { ok: false, reason: `migration_version ${JSON.stringify(a ?? null)} does not match ${JSON.stringify(b ?? null)}` };
    return { ok: true };
  };
}

// ------------------------------------------------------------------ over a transport --

const VERDICT_MAGIC = Buffer.from('VFMIGRES');
const MAX_VERDICT = 64 << 10;

/** The receiver's answer after the stream: committed, or why not. */
export type Verdict = { ok: true; bytes: number; devices: number; routes: Record<string, string> } | { ok: false; error: string; code?: string; device?: string };

export class TransferError extends Error {
  readonly code: 'REMOTE_REFUSED' | 'NO_VERDICT';
  readonly device: string | undefined;
  constructor(code: 'REMOTE_REFUSED' | 'NO_VERDICT', message: string, device?: string) {
    super(message);
    this.name = 'TransferError';
    this.code = code;
    this.device = device;
  }
}

function encodeVerdict(v: Verdict): Buffer {
  const json = Buffer.from(JSON.stringify(v), 'utf8');
  const len = Buffer.alloc(4);
  len.writeUInt32LE(json.length, 0);
  return Buffer.concat([VERDICT_MAGIC, len, json]);
}

/** Reads the receiver's verdict frame from `input` (bounded in size); the engine reads it itself while it streams pre-copy data. */
export async function readVerdict(input: AsyncIterable<Buffer>): Promise<Verdict> {
  const parts: Buffer[] = [];
  let have = 0;
  let need = 12;
  const it = input[Symbol.asyncIterator]();
  for (;;) {
    let r: IteratorResult<Buffer>;
    try {
      r = await it.next();
    } catch (err) {
      throw new TransferError('NO_VERDICT', `the connection to the receiver failed before its verdict: ${(err as Error).message ?? String(err)}`);
    }
    if (r.done) break;
    const piece = r.value;
    parts.push(piece);
    have += piece.length;
    if (have >= 12 && need === 12) {
      const head = Buffer.concat(parts).subarray(0, 12);
      if (!head.subarray(0, 8).equals(VERDICT_MAGIC)) throw new TransferError('NO_VERDICT', 'the receiver answered something that is not a vfio-mig verdict');
      const len = head.readUInt32LE(8);
      if (len > MAX_VERDICT) throw new TransferError('NO_VERDICT', `the receiver's verdict declares ${len} bytes`);
      need = 12 + len;
    }
    if (have >= need && need > 12) break;
    if (have > 12 + MAX_VERDICT) break;
  }
  const all = Buffer.concat(parts);
  if (all.length < need || need === 12) throw new TransferError('NO_VERDICT', 'the receiver closed the connection without a verdict (it may have refused the connection or crashed)');
  try {
    const v = JSON.parse(all.subarray(12, need).toString('utf8')) as Verdict;
    if (typeof v !== 'object' || v === null || typeof v.ok !== 'boolean') throw new Error('shape');
    return v;
  } catch {
    throw new TransferError('NO_VERDICT', "the receiver's verdict is not valid JSON");
  }
}

export interface SendDevicesOptions extends SendOptions {
  /** Longest wait for the receiver's verdict after the trailer (default 120 s). */
  verdictTimeoutMs?: number;
}

/**
 * Source, after coordinator.stopCopy(): streams the set through `transport`, ends the
 * sending side, and waits for the receiver's verdict. A receiver that refuses (at its
 * descriptor check, or anywhere later) stops the transfer at once; then, as after any
 * failure, the source devices are rolled back to RUNNING and the receiver's reason is
 * thrown. On success the source devices are in STOP (the VM may be handed over).
 */
export async function sendDevices(coordinator: Coordinator, describe: Describe, transport: Transport, opts: SendDevicesOptions = {}): Promise<SendResult & { receiver: Verdict }> {
  const stop = new AbortController();
  const onAbort = () => stop.abort();
  opts.signal?.addEventListener('abort', onAbort, { once: true });
  let early: Verdict | undefined;
  const verdict = readVerdict(transport.readable).then((v) => {
    if (!v.ok) {
      early = v;
      stop.abort(); // a refusal arrives while we still send: stop reading the devices
    }
    return v;
  });
  verdict.catch(() => undefined);
  const refused = (v: Extract<Verdict, { ok: false }>) => new TransferError('REMOTE_REFUSED', `the receiver refused the state: ${v.error}`, v.device);
  try {
    let result: SendResult;
    try {
      result = await saveSet(coordinator, describe, (b) => transport.write(b), { ...opts, signal: stop.signal });
    } catch (err) {
      // saveSet rolled the source back. When the connection broke, the receiver may have
      // said why: prefer its reason over a broken pipe. Then the connection is torn down,
      // so a receiver still reading sees the stream cut and resets its devices.
      let v = early;
      if (!v && err instanceof TransportError) v = await Promise.race([verdict.catch(() => undefined), new Promise<undefined>((r) => setTimeout(() => r(undefined), 2000).unref())]);
      transport.close();
      if (v && !v.ok) throw refused(v);
      throw err;
    }
    // The source devices are in STOP now. Anything but the receiver's "committed" rolls
    // them back to RUNNING: a refusal, a lost connection, no answer in time. (If the
    // answer was lost after the receiver committed, the destination devices run the
    // state too; the caller, which has not handed the VM over, decides - see the docs.)
    try {
      await transport.end();
      let timer: NodeJS.Timeout | undefined;
      const limit = opts.verdictTimeoutMs ?? 120_000;
      const v = await Promise.race([
        verdict,
        new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new TransferError('NO_VERDICT', `no verdict from the receiver within ${limit} ms`)), limit);
        }),
      ]).finally(() => clearTimeout(timer));
      if (!v.ok) throw refused(v);
      return { ...result, receiver: v };
    } catch (err) {
      transport.close();
      await coordinator.rollback().catch(() => undefined);
      if (err instanceof TransferError) throw err;
      throw new TransferError('NO_VERDICT', `no verdict from the receiver: ${(err as Error).message ?? String(err)}`);
    }
  } finally {
    opts.signal?.removeEventListener('abort', onAbort);
  }
}

export interface ReceiveDevicesOptions extends ReceiveOptions {
  /** After a refusal, how long the sender's remaining bytes are drained (default 5 s) so the verdict is not lost to a reset connection. */
  drainMs?: number;
}

/**
 * Destination: receives a stream from `transport` into the coordinator's devices (see
 * loadSet: descriptors checked by `accept` before RESUMING, digests before the commit),
 * then answers the sender with a verdict and ends the connection. Throws what loadSet
 * threw, after telling the sender.
 */
export async function receiveDevices(coordinator: Coordinator, transport: Transport, route: Route, accept: Accept, opts: ReceiveDevicesOptions = {}): Promise<ReceiveResult & { verdictSent: boolean }> {
  let result: ReceiveResult;
  try {
    result = await loadSet(coordinator, transport.readable, route, accept, { idleTimeoutMs: 60_000, ...opts });
  } catch (err) {
    const e = err as { message?: string; code?: unknown; device?: unknown };
    const v: Verdict = { ok: false, error: String(e?.message ?? err), ...(typeof e?.code === 'string' ? { code: e.code } : {}), ...(typeof e?.device === 'string' ? { device: e.device } : {}) };
    try {
      await transport.write(encodeVerdict(v));
      await drain(transport.readable, opts.drainMs ?? 5000);
      await transport.end();
    } catch {
      // the sender is gone; nothing more to tell
    }
    transport.close();
    throw err;
  }
  // Committed. A sender that is gone by now does not undo that; the caller learns it
  // from verdictSent (the sender then rolled its source back, see sendDevices).
  let verdictSent = true;
  try {
    await transport.write(encodeVerdict({ ok: true, ...result }));
    await transport.end();
  } catch {
    verdictSent = false;
    transport.close();
  }
  return { ...result, verdictSent };
}

/** Reads and drops what the peer still sends, until it ends or `ms` passed. */
async function drain(input: AsyncIterable<Buffer>, ms: number): Promise<void> {
  const it = input[Symbol.asyncIterator]();
  const deadline = Date.now() + ms;
  for (;;) {
    const left = deadline - Date.now();
    if (left <= 0) break;
    let timer: NodeJS.Timeout | undefined;
    const r = await Promise.race([
      it.next(),
      new Promise<'timeout'>((res) => {
        timer = setTimeout(() => res('timeout'), left);
      }),
    ]).finally(() => clearTimeout(timer));
    if (r === 'timeout' || r.done) break;
  }
}
