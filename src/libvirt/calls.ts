// How a libvirt call is made and its error captured.
//
// Calls are synchronous (short RPCs to the local daemon, milliseconds) except migration,
// which takes seconds and runs on a libuv worker through koffi's `.async` (callAsync).
//
// libvirt keeps the last error per thread. Synchronous calls read it on the main thread
// right after the call. For `.async` calls the error lives on the worker thread, so it is
// captured by the error callback (virSetErrorFunc), which libvirt invokes on that thread
// before the call returns and koffi relays to the main thread; async API calls run one at a
// time so a captured error always belongs to the call in flight. The callback also silences
// libvirt's default handler, which would print every error to stderr.

import { decodeVirError, libvirt, nativeHandlers, type KFn, type Natives } from './ffi.ts';
import { ErrorCode, LibvirtError } from './errors.ts';

/** True while a synchronous libvirt call runs on the main thread (see onLibvirtError). */
let inSyncCall = false;
/** The error of the async API call in flight, captured by the error callback. */
let asyncError: LibvirtError | undefined;

function toLibvirtError(ptr: unknown, operation: string): LibvirtError | undefined {
  const e = decodeVirError(ptr);
  return e && new LibvirtError(operation, e.code, e.domain, e.message ?? 'unknown libvirt error');
}

/**
 * libvirt's error callback (virSetErrorFunc). Runs for every failing API call. During a
 * synchronous call it runs inline on the main thread: ignored, the caller reads the error.
 * Otherwise it was relayed from the worker thread of the async call in flight: keep it.
 */
nativeHandlers.error = (error: unknown): void => {
  if (inSyncCall) return;
  asyncError = toLibvirtError(error, 'libvirt') ?? asyncError;
};

/** The declared libvirt functions (loads libvirt on first use). */
export function lib(): Natives {
  return libvirt();
}

function lastError(operation: string): LibvirtError {
  const n = libvirt();
  const e = toLibvirtError(n.getLastError(), operation) ?? new LibvirtError(operation, ErrorCode.INTERNAL_ERROR, 0, 'failed without an error message');
  n.resetLastError();
  return e;
}

/** Runs one synchronous call; `failed` says whether its result means failure. */
export function sync<T>(operation: string, fn: () => T, failed: (r: T) => boolean): T {
  libvirt();
  inSyncCall = true;
  let r: T;
  try {
    r = fn();
  } finally {
    inSyncCall = false;
  }
  if (failed(r)) throw lastError(operation);
  return r;
}

/** A call whose failure is not reported (frees, getters that cannot fail): keeps the error callback out of it. */
export function quiet<T>(fn: () => T): T {
  inSyncCall = true;
  try {
    return fn();
  } finally {
    inSyncCall = false;
  }
}

export const isNull = (p: unknown): boolean => p === null || p === undefined || p === 0n;
export const isNeg = (r: unknown): boolean => Number(r) < 0;

let asyncChain: Promise<unknown> = Promise.resolve();

/** Runs an API call on a worker; one at a time, so the captured error is this call's. */
export function callAsync(operation: string, fn: KFn, args: unknown[]): Promise<number> {
  const run = (): Promise<number> =>
    new Promise<number>((resolve, reject) => {
      asyncError = undefined;
      fn.async(...args, (err: Error | null, res: unknown) => {
        if (err) return reject(err);
        const rc = Number(res);
        if (rc < 0) {
          const e = asyncError;
          asyncError = undefined;
          return reject(e ? new LibvirtError(operation, e.code, e.domain, e.libvirtMessage) : new LibvirtError(operation, ErrorCode.INTERNAL_ERROR, 0, 'failed (no error detail reached this thread)'));
        }
        resolve(rc);
      });
    });
  const p = asyncChain.then(run, run);
  asyncChain = p.catch(() => undefined);
  return p;
}

/** Strings passed to libvirt: non-empty, bounded, no NUL (it would cut the C string short). */
export function checkString(what: string, v: string, max = 65536): void {
  if (typeof v !== 'string' || v.length === 0 || v.length > max || v.includes('\0')) throw new TypeError(`${what} must be a non-empty string without NUL (at most ${max} chars)`);
}
