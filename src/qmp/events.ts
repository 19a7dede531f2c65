// QMP events: the envelope every source produces (our own QMP socket, or libvirt's
// monitor-event API) and typed decoders for the events vfio-mig acts on.
//
// Decoders validate the members they type and ignore extra ones; enum members keep values
// this code does not know (QEMU adds states over time: the QMP compatibility rules say
// clients must tolerate that), so a newer QEMU degrades to "unknown state", never to a crash.

/** QEMU's event time: seconds and microseconds since the epoch, host clock. */
export interface QmpTimestamp {
  seconds: number;
  microseconds: number;
}

export interface QmpEvent {
  event: string;
  /** `data` as sent; `{}` when the event has none. */
  data: Record<string, unknown>;
  timestamp: QmpTimestamp;
  /** Receive order on this connection (1, 2, ...), for race-free waits (see QmpClient.waitFor). */
  seq: number;
}

/** A string enum that keeps values this code does not know. */
export type OpenEnum<T extends string> = T | (string & { readonly __unknown?: never });

/** qapi/migration.json MigrationStatus (up to QEMU 10.2). */
export const MIGRATION_STATUSES = [
  'none', 'setup', 'cancelling', 'cancelled', 'active', 'postcopy-active', 'postcopy-paused',
  'postcopy-recover-setup', 'postcopy-recover', 'postcopy-device', 'completed', 'failed', 'colo',
  'pre-switchover', 'device', 'wait-unplug',
] as const;
export type MigrationStatus = OpenEnum<(typeof MIGRATION_STATUSES)[number]>;

/** qapi/vfio.json QapiVfioMigrationState (9.1; pre-copy-p2p-prepare since 11.0). */
export const VFIO_MIGRATION_STATES = [
  'stop', 'running', 'stop-copy', 'resuming', 'running-p2p', 'pre-copy', 'pre-copy-p2p', 'pre-copy-p2p-prepare',
] as const;
export type VfioMigrationState = OpenEnum<(typeof VFIO_MIGRATION_STATES)[number]>;

/** Typed payloads of the events vfio-mig uses (QMP member names kept as on the wire). */
export interface KnownEvents {
  STOP: Record<string, never>;
  RESUME: Record<string, never>;
  MIGRATION: { status: MigrationStatus };
  MIGRATION_PASS: { pass: number };
  VFIO_MIGRATION: { 'device-id': string; 'qom-path': string; 'device-state': VfioMigrationState };
}
export type KnownEventName = keyof KnownEvents;

export interface TypedEvent<K extends KnownEventName> extends QmpEvent {
  event: K;
  typed: KnownEvents[K];
}

type Decoder<K extends KnownEventName> = (data: Record<string, unknown>) => KnownEvents[K] | undefined;

const isStr = (v: unknown): v is string => typeof v === 'string';

const DECODERS: { [K in KnownEventName]: Decoder<K> } = {
  STOP: () => ({}),
  RESUME: () => ({}),
  MIGRATION: (d) => (isStr(d.status) ? { status: d.status } : undefined),
  MIGRATION_PASS: (d) => (Number.isSafeInteger(d.pass) && (d.pass as number) >= 0 ? { pass: d.pass as number } : undefined),
  VFIO_MIGRATION: (d) =>
    isStr(d['device-id']) && isStr(d['qom-path']) && isStr(d['device-state'])
      ? { 'device-id': d['device-id'], 'qom-path': d['qom-path'], 'device-state': d['device-state'] }
      : undefined,
};

export function isKnownEventName(name: string): name is KnownEventName {
  return Object.prototype.hasOwnProperty.call(DECODERS, name);
}

/**
 * The typed view of `ev` if it is the event `name` with a well-formed payload, else undefined
 * (a known event whose payload lacks a typed member is treated as not matching, not as a crash).
 */
export function decodeEvent<K extends KnownEventName>(ev: QmpEvent, name: K): TypedEvent<K> | undefined {
  if (ev.event !== name) return undefined;
  const typed = (DECODERS[name] as Decoder<K>)(ev.data);
  return typed === undefined ? undefined : { ...ev, event: name, typed };
}

/** Is the status one QEMU never leaves (the migration is over, one way or the other)? */
export function isFinalMigrationStatus(status: MigrationStatus): boolean {
  return status === 'completed' || status === 'failed' || status === 'cancelled';
}

/** Milliseconds since the epoch, for timelines that merge both hosts' events. */
export function timestampMs(ts: QmpTimestamp): number {
  return ts.seconds * 1000 + ts.microseconds / 1000;
}

/**
 * Validates an event envelope received from the outside. `event` must be a string, `data`
 * (if present) an object and `timestamp` two integers; anything else is not QMP.
 * Returns an error message, or the event without its seq.
 */
export function parseEventEnvelope(msg: Record<string, unknown>): Omit<QmpEvent, 'seq'> | string {
  if (!isStr(msg.event) || msg.event.length === 0) return 'event name is not a non-empty string';
  let data: Record<string, unknown> = {};
  if (msg.data !== undefined) {
    if (typeof msg.data !== 'object' || msg.data === null || Array.isArray(msg.data)) return `data of ${msg.event} is not an object`;
    data = msg.data as Record<string, unknown>;
  }
  const ts = msg.timestamp as Record<string, unknown> | undefined;
  if (typeof ts !== 'object' || ts === null || !Number.isSafeInteger(ts.seconds) || !Number.isSafeInteger(ts.microseconds)) {
    return `timestamp of ${msg.event} is not {seconds, microseconds}`;
  }
  return { event: msg.event, data, timestamp: { seconds: ts.seconds as number, microseconds: ts.microseconds as number } };
}
