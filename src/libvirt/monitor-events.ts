// QEMU monitor events of libvirt-managed domains (virConnectDomainQemuMonitorEventRegister):
// libvirt forwards every QMP event of a domain, with QEMU's data and timestamp, through its
// event loop (event-loop.ts). See docs/qmp-libvirt.md for why this and not a second QMP
// socket in the domain.

import { parseEventEnvelope, type QmpEvent } from '../qmp/events.ts';
import { EventHub, type EventFor, type WaitOptions } from '../qmp/event-hub.ts';
import { nativeHandlers, type Ptr } from './ffi.ts';
import { checkString, isNeg, lib, quiet, sync } from './calls.ts';
import type { Connection } from './connection.ts';

/** A QMP event of a libvirt-managed domain. */
export interface DomainQmpEvent extends QmpEvent {
  /** Name of the domain that sent it. */
  domain: string;
  /** Its UUID (stays the same across a migration, unlike a name that may change). */
  uuid?: string;
}

const subscriptions = new Map<number, (ev: Omit<DomainQmpEvent, 'seq'>) => void>();
let nextSubscription = 1;

nativeHandlers.monitorEvent = (dom, event, seconds, micros, details, opaque): void => {
  const deliver = subscriptions.get(Number(opaque));
  if (!deliver || !event) return;
  const n = lib();
  const domain = quiet(() => n.domainGetName(dom) as string | null) ?? '';
  const uuidBuf = Buffer.alloc(37);
  const uuid = Number(quiet(() => n.domainGetUUIDString(dom, uuidBuf))) === 0 ? uuidBuf.toString('latin1', 0, 36) : undefined;
  let data: unknown = {};
  if (details) {
    try {
      data = JSON.parse(details);
    } catch {
      return; // libvirt serialized it; unparsable details mean a broken daemon, drop the event
    }
  }
  const parsed = parseEventEnvelope({ event, data, timestamp: { seconds: Number(seconds), microseconds: Number(micros) } });
  if (typeof parsed === 'string') return;
  deliver(uuid ? { ...parsed, domain, uuid } : { ...parsed, domain });
};

/** A live subscription to QEMU monitor events; also an event source with waitFor. */
export class QemuMonitorEvents {
  private readonly hub: EventHub<DomainQmpEvent>;
  private closedFlag = false;

  constructor(
    private readonly conn: Connection,
    private readonly callbackId: number,
    private readonly subscriptionId: number,
    hub: EventHub<DomainQmpEvent>,
  ) {
    this.hub = hub;
  }

  get lastSeq(): number {
    return this.hub.lastSeq;
  }

  recentEvents(): DomainQmpEvent[] {
    return this.hub.recent();
  }

  onEvent(listener: (ev: DomainQmpEvent) => void): () => void {
    return this.hub.onEvent(listener);
  }

  waitFor<N extends string>(name: N, predicate?: (ev: EventFor<N> & DomainQmpEvent) => boolean, timeoutMs?: number, options?: WaitOptions): Promise<EventFor<N> & DomainQmpEvent> {
    return this.hub.waitFor(name, predicate, timeoutMs, options);
  }

  /** Deregisters; pending waits reject. */
  close(): void {
    if (this.closedFlag) return;
    this.closedFlag = true;
    subscriptions.delete(this.subscriptionId);
    this.conn.dropSubscription(this);
    if (this.conn.isOpen) {
      const n = lib();
      try {
        sync('virConnectDomainQemuMonitorEventDeregister', () => n.qemuMonitorEventDeregister(this.conn.handle, this.callbackId), isNeg);
      } catch {
        // The daemon may be gone already; the subscription is dead either way.
      }
    }
    this.hub.close((what) => new Error(`${what}: the QEMU monitor event subscription is closed`));
  }
}

export interface MonitorEventOptions {
  /** Only this domain's events (all domains when undefined). */
  domain?: { readonly handle: Ptr; readonly conn: Connection };
  /** Only events with this name (a regex when `regex`). */
  event?: string;
  regex?: boolean;
  /** Recent events kept for waitFor(..., { since }). */
  backlog?: number;
  defaultTimeoutMs?: number;
}

/** Registers a subscription on an open, event-pumped connection (see Connection.qemuMonitorEvents). */
export function subscribeMonitorEvents(conn: Connection, opts: MonitorEventOptions): QemuMonitorEvents {
  if (opts.event !== undefined) checkString('event filter', opts.event, 256);
  if (opts.domain && opts.domain.conn !== conn) throw new TypeError('the domain belongs to another connection');
  const n = lib();
  const id = nextSubscription++;
  const hub = new EventHub<DomainQmpEvent>({
    backlog: opts.backlog ?? 256,
    defaultTimeoutMs: opts.defaultTimeoutMs ?? 30_000,
    onListenerError: (err) => process.emitWarning(`libvirt QMP event listener threw: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`),
  });
  subscriptions.set(id, (ev) => hub.publish(ev));
  let callbackId: number;
  try {
    const flags = opts.regex ? 1 : 0; // VIR_CONNECT_DOMAIN_QEMU_MONITOR_EVENT_REGISTER_REGEX
    // The opaque pointer carries our subscription id; no memory behind it.
    callbackId = sync('virConnectDomainQemuMonitorEventRegister', () => n.qemuMonitorEventRegister(conn.live(), opts.domain?.handle ?? null, opts.event ?? null, n.monitorEventCb, BigInt(id), null, flags), isNeg) as number;
  } catch (err) {
    subscriptions.delete(id);
    throw err;
  }
  return new QemuMonitorEvents(conn, callbackId, id, hub);
}
