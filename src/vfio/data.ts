// The migration data fd: reading a saving session, writing a resuming one.
//
// The fd is an anonymous-inode stream (read/write only, no offsets). All I/O runs off
// the event loop through the syscall seam's async read/write, so one slow device never
// stalls the others or QMP traffic.

import { sys, SysError } from '../host/sys.ts';
import { VfioError } from './errors.ts';
import { Errno } from '../host/errno.ts';
import { OwnedFd } from './owned-fd.ts';

export type SessionKind = 'saving' | 'resuming';

export const DEFAULT_CHUNK = 4 << 20;

/**
 * Ownership of one data fd handed out by a SET MIG_DEVICE_STATE. Close it exactly once;
 * a close while a read or write is in flight is deferred until that call returned, so
 * the number can never be reused under it (see OwnedFd).
 */
export class DataFd {
  readonly kind: SessionKind;
  readonly device: string;
  /** Bytes read (saving) or written (resuming) through this object. */
  bytes = 0;
  readonly #owned: OwnedFd;
  #onClose: ((f: DataFd) => void) | undefined;

  constructor(fd: number, kind: SessionKind, device: string, onClose?: (f: DataFd) => void) {
    this.kind = kind;
    this.device = device;
    this.#owned = new OwnedFd(fd, `${kind} data fd`, device);
    this.#onClose = onClose;
  }

  /** The fd number, for logs and tests. */
  get fd(): number {
    return this.#owned.number;
  }

  get closed(): boolean {
    return this.#owned.closed;
  }

  /** Closed, but a read/write/ioctl on it has not returned yet, so the number is held. */
  get closePending(): boolean {
    return this.#owned.closePending;
  }

  /** Resolves once the fd number went back to the kernel. */
  get released(): Promise<void> {
    return this.#owned.released;
  }

  assertOpen(operation: string): void {
    this.#owned.useSync(operation, () => undefined);
  }

  /** A synchronous ioctl on the data fd (precopy info). */
  useSync<T>(operation: string, call: (fd: number) => T): T {
    return this.#owned.useSync(operation, call);
  }

  /** An asynchronous call on the data fd, counted while it is in flight. */
  use<T>(operation: string, call: (fd: number) => Promise<T>): Promise<T> {
    return this.#owned.use(operation, call);
  }

  close(): void {
    if (this.#owned.closed) return;
    this.#onClose?.(this);
    this.#owned.close();
  }
}

function ioError(err: unknown, operation: string, f: DataFd): VfioError {
  if (err instanceof VfioError) return err;
  if (!(err instanceof SysError)) return new VfioError({ operation, device: f.device, hint: String(err), cause: err });
  const hints: Record<string, string> = {
    ENODEV: 'the migration session was ended (state changed, device reset or closed) - the stream cannot be resumed',
    EINVAL: 'the driver rejected the data (wrong device type, bad header or a corrupted stream)',
    EFAULT: 'the driver rejected the stream header (magic, version or layout differ)',
    ENOMEM: 'more data than the device state can hold - the stream does not belong to this device type',
    EFBIG: 'more data than the device state can hold - the stream does not belong to this device type',
    ESPIPE: 'data fds are streams; positioned I/O is not allowed',
  };
  return new VfioError({ operation, device: f.device, errno: err.errno, hint: hints[err.code], cause: err });
}

export type Sink = (chunk: Buffer) => void | Promise<void>;

export interface ReadOptions {
  chunkSize?: number;
  signal?: AbortSignal;
}

async function readOnce(f: DataFd, buf: Buffer, operation: string): Promise<number | 'nothing-now'> {
  for (;;) {
    try {
      // use() checks the fd on every iteration: a close between two reads stops the loop.
      return await f.use(operation, (fd) => sys().read(fd, buf, buf.length));
    } catch (err) {
      if (err instanceof SysError) {
        if (err.code === 'EINTR') continue;
        if (err.code === 'ENOMSG') return 'nothing-now';
        if (err.code === 'EAGAIN') {
          await f.use(operation, (fd) => sys().poll(fd, 1 /* POLLIN */, 1000));
          continue;
        }
      }
      throw ioError(err, operation, f);
    }
  }
}

/**
 * Reads chunks into `sink` until the stream ends for now. In STOP_COPY a 0-byte read
 * is the permanent end of the device state, and ENOMSG is a uAPI violation. In PRE_COPY
 * both ENOMSG (mlx5 and most drivers) and 0 (mtty) mean "nothing now, maybe more later".
 */
async function readLoop(f: DataFd, sink: Sink, opts: ReadOptions, phase: 'STOP_COPY' | 'PRE_COPY'): Promise<number> {
  const operation = `read ${phase} data`;
  f.assertOpen(operation);
  if (f.kind !== 'saving') throw new VfioError({ operation, device: f.device, errno: Errno.EBADF, hint: 'this is a resuming fd' });
  const chunk = opts.chunkSize ?? DEFAULT_CHUNK;
  let total = 0;
  for (;;) {
    if (opts.signal?.aborted) throw new VfioError({ operation, device: f.device, errno: Errno.ECANCELED, hint: 'cancelled' });
    const buf = Buffer.allocUnsafe(chunk);
    const n = await readOnce(f, buf, operation);
    if (n === 'nothing-now' && phase === 'STOP_COPY') {
      throw new VfioError({ operation, device: f.device, errno: Errno.ENOMSG, hint: 'the driver returned ENOMSG in STOP_COPY, which the uAPI forbids' });
    }
    if (n === 'nothing-now' || n === 0) return total;
    total += n;
    f.bytes += n;
    await sink(buf.subarray(0, n));
  }
}

/** STOP_COPY: reads until read() returns 0, the end of the device state. */
export function readToEnd(f: DataFd, sink: Sink, opts: ReadOptions = {}): Promise<number> {
  return readLoop(f, sink, opts, 'STOP_COPY');
}

/** PRE_COPY: reads what the device has now. */
export function readAvailable(f: DataFd, sink: Sink, opts: ReadOptions = {}): Promise<number> {
  return readLoop(f, sink, opts, 'PRE_COPY');
}

/** RESUMING: writes every byte, looping over short writes. */
export async function writeAll(f: DataFd, data: Buffer | Iterable<Buffer> | AsyncIterable<Buffer>, opts: { signal?: AbortSignal } = {}): Promise<number> {
  const operation = 'write RESUMING data';
  f.assertOpen(operation);
  if (f.kind !== 'resuming') throw new VfioError({ operation, device: f.device, errno: Errno.EBADF, hint: 'this is a saving fd' });
  let total = 0;
  const chunks = Buffer.isBuffer(data) ? [data] : data;
  for await (const chunk of chunks) {
    let off = 0;
    while (off < chunk.length) {
      if (opts.signal?.aborted) throw new VfioError({ operation, device: f.device, errno: Errno.ECANCELED, hint: 'cancelled' });
      let piece = chunk.subarray(off, Math.min(chunk.length, off + DEFAULT_CHUNK));
      // The blocking-call thread gets the bytes through a SharedArrayBuffer, and V8 copies
      // into shared memory element by element unless the source is 8-byte aligned (8x
      // slower on the host, far worse under emulation). Stream pieces sit at any offset
      // of the socket's buffers: an aligned copy first is a plain memcpy.
      if (piece.byteOffset % 8 !== 0 && piece.length >= 4096) piece = Buffer.from(piece);
      let n: number;
      try {
        n = await f.use(operation, (fd) => sys().write(fd, piece, piece.length));
      } catch (err) {
        if (err instanceof SysError && err.code === 'EINTR') continue;
        if (err instanceof SysError && err.code === 'EAGAIN') {
          await f.use(operation, (fd) => sys().poll(fd, 4 /* POLLOUT */, 1000));
          continue;
        }
        throw ioError(err, operation, f);
      }
      if (n === 0) throw new VfioError({ operation, device: f.device, hint: 'the driver accepted 0 bytes; the stream cannot progress' });
      off += n;
      total += n;
      f.bytes += n;
    }
  }
  return total;
}
