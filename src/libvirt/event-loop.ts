// libvirt's event loop, run without blocking Node: needed for QEMU monitor events (see
// monitor-events.ts) and, once registered, carrying every connection's I/O and keepalive.

import { isNeg, lib, sync } from './calls.ts';

/**
 * Runs libvirt's default event loop (virEventRunDefaultImpl, one iteration per call) on a
 * libuv worker via koffi `.async`, re-queued after each iteration, so Node's own loop never
 * blocks. libvirt calls our JS callbacks from that worker; koffi relays them to the main
 * thread. The pump runs while at least one connection opened after the loop was registered
 * is open (libvirt routes those connections' I/O and keepalive through it); when the last
 * one closes, a zero-delay libvirt timer wakes the blocked iteration and the pump stops, so
 * the process can exit. It holds one libuv worker thread while it runs.
 */
export class EventPump {
  private registered = false;
  private refs = 0;
  private running = false;
  private idle: Promise<void> = Promise.resolve();
  private markIdle: () => void = () => {};

  /** Must run before the connection that wants events is opened. */
  register(): void {
    if (this.registered) return;
    const n = lib();
    sync('virEventRegisterDefaultImpl', () => n.eventRegisterDefaultImpl(), isNeg);
    this.registered = true;
  }

  get isRegistered(): boolean {
    return this.registered;
  }

  acquire(): void {
    this.refs++;
    if (this.running) return;
    this.running = true;
    this.idle = new Promise((resolve) => (this.markIdle = resolve));
    this.iterate();
  }

  release(): void {
    if (this.refs === 0) return;
    this.refs--;
    if (this.refs === 0 && this.running) {
      // Wake the iteration blocked in poll(); its timer callback removes itself.
      const n = lib();
      n.eventAddTimeout(0, n.wakeTimeoutCb, null, null);
    }
  }

  /** Resolves when the pump has stopped (no iteration in flight). */
  stopped(): Promise<void> {
    return this.idle;
  }

  private iterate(): void {
    const n = lib();
    n.eventRunDefaultImpl.async((err: Error | null) => {
      if (err || this.refs === 0) {
        this.running = false;
        this.markIdle();
        return;
      }
      this.iterate();
    });
  }
}

/** The process's one pump (libvirt has one default event loop per process). */
export const pump = new EventPump();
