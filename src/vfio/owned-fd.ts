// One owner per file descriptor. Linux hands out the lowest free fd number, so an fd
// closed while a call on it is still queued or running can be reused by the next open:
// the late call would then reach a different file (another device, a data session, a
// socket). OwnedFd counts the calls in flight; a close marks the fd closed at once (no
// new call starts) and releases the number only when the last call has returned. An
// arc that never returns keeps its fd open on purpose, and `closePending` says so.

import { sys } from '../host/sys.ts';
import { Errno } from '../host/errno.ts';
import { VfioError } from './errors.ts';

export class OwnedFd {
  readonly #fd: number;
  /** What the fd is, for errors: "device fd", "saving data fd". */
  readonly what: string;
  readonly device: string;
  #inFlight = 0;
  #closed = false;
  #released = false;
  #onRelease: (() => void)[] = [];
  #whenReleased: Promise<void>;
  #resolveReleased!: () => void;

  constructor(fd: number, what: string, device: string) {
    this.#fd = fd;
    this.what = what;
    this.device = device;
    this.#whenReleased = new Promise((resolve) => (this.#resolveReleased = resolve));
  }

  /** The number, for logs and tests only: calls go through use()/useSync(). */
  get number(): number {
    return this.#fd;
  }

  /** Closed by its owner (new calls are refused), even if the number is still held. */
  get closed(): boolean {
    return this.#closed;
  }

  /** Calls running or queued in the kernel on this fd right now. */
  get inFlight(): number {
    return this.#inFlight;
  }

  /** Closed by the owner but kept open because a call on it has not returned. */
  get closePending(): boolean {
    return this.#closed && !this.#released;
  }

  /** Resolves once the fd number was given back to the kernel. */
  get released(): Promise<void> {
    return this.#whenReleased;
  }

  /** Runs something once the number is released (a group fd closes after its device fd). */
  afterRelease(fn: () => void): void {
    if (this.#released) fn();
    else this.#onRelease.push(fn);
  }

  #check(operation: string): void {
    if (this.#closed) {
      throw new VfioError({ operation, device: this.device, errno: Errno.EBADF, hint: `the ${this.what} was already closed` });
    }
  }

  /** A synchronous call on the fd (cannot overlap a close: both run on this thread). */
  useSync<T>(operation: string, call: (fd: number) => T): T {
    this.#check(operation);
    return call(this.#fd);
  }

  /**
   * An asynchronous call on the fd: counted from before it is queued until it settled,
   * so a close in between cannot release the number under it.
   */
  async use<T>(operation: string, call: (fd: number) => Promise<T>): Promise<T> {
    this.#check(operation);
    this.#inFlight++;
    try {
      return await call(this.#fd);
    } finally {
      this.#inFlight--;
      if (this.#closed && this.#inFlight === 0) this.#release();
    }
  }

  /** Closes now, or as soon as the calls in flight return. Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#inFlight === 0) this.#release();
  }

  #release(): void {
    if (this.#released) return;
    this.#released = true;
    try {
      sys().close(this.#fd);
    } catch {
      // The kernel may already have torn the file down; the number is released anyway.
    }
    this.#resolveReleased();
    for (const fn of this.#onRelease.splice(0)) {
      try {
        fn();
      } catch {
        // release hooks are best-effort teardown
      }
    }
  }
}
