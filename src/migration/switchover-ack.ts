// QEMU's `switchover-ack` migration capability, set through extra QMP sockets.
//
// What it does: with `switchover-ack` (and the `return-path` it needs) on BOTH QEMUs, a
// source VFIO device that supports PRE_COPY marks the end of its initial pre-copy data in
// the stream, the destination acknowledges once it has loaded that data, and the source
// does not stop the VM for the switchover before every such device is acknowledged. So
// the initial data never travels (or is loaded) inside the downtime.
//
// libvirt 11.3 ALREADY DOES THIS ITSELF (observed, test/libvirt/switchover-ack.test.ts):
// for a non-tunnelled migration whose two QEMUs support the capability it sends
// return-path + switchover-ack = true in its own migrate-set-capabilities on both ends
// ("optional" capability negotiated through the migration cookie), and turns them off
// again on the destination after the migration. For --tunnelled it sends both false,
// overriding anything set here. So with libvirt 11.3 this module changes nothing, and
// `vfio-mig migrate --switchover-ack` (src/cli/migrate-switchover.ts) only requires and
// verifies what libvirt negotiates. This module is kept for libvirt versions whose
// capability list does not include switchover-ack: libvirt sends only the capabilities it
// knows, so a value set here then survives (inferred from that mechanism; only 11.3 was
// run). Measured effect and the libvirt observations: docs/performance.md.
//
// How: through an extra QMP socket of each QEMU (the domain XML carries
// <qemu:commandline> -qmp unix:PATH,server=on,wait=off; QEMU serves one client per socket,
// libvirt keeps its own monitor). This module only talks to those sockets.
//
// Contract for a caller (a tool that sets the capability itself beside an older libvirt):
//  1. Before starting the libvirt migration: `enableOnSource(sourceSocket)`. It sets
//     return-path + switchover-ack, reads them back and fails (SwitchoverAckError) if QEMU
//     lacks the capability (QEMU < 8.1) or an outgoing migration already runs.
//  2. At the same time as the libvirt migration call (the destination QEMU only exists once
//     libvirt's Prepare has started it): `armDestination(destinationSocket)`. It waits for
//     the socket to appear and accept, then sets the same two capabilities while the
//     destination's incoming migration is still `none` or `setup` (no stream yet) and
//     checks that it still is afterwards; a later state is an error, because the
//     destination reads the capability when the stream starts. The destination socket must
//     be reachable from where this runs (the same host, or a forwarded socket).
//  3. If armDestination fails, ABORT the migration (virDomainAbortJob): a source with
//     switchover-ack whose destination does not ack never switches over (QEMU cannot change
//     capabilities of a running migration).
//  4. close() both handles when the migration has ended (either way). The capabilities
//     stay set in QEMU unless libvirt itself resets them.
// Errors: SwitchoverAckError names the side, the socket and the cause; a QMP error from QEMU
// is its `cause`.

import { existsSync } from 'node:fs';
import { QmpClient, type QmpEndpoint } from '../qmp/client.ts';
import { migrateSetCapabilities, queryMigrate, queryMigrateCapabilities, type MigrationCapability } from '../qmp/commands.ts';

export type Side = 'source' | 'destination';

export class SwitchoverAckError extends Error {
  readonly side: Side;
  readonly socket: string;
  constructor(side: Side, socket: string, cause: string, options?: { cause?: unknown }) {
    super(`switchover-ack on the ${side} (QMP ${socket}): ${cause}`, options);
    this.name = 'SwitchoverAckError';
    this.side = side;
    this.socket = socket;
  }
}

export const SWITCHOVER_ACK_CAPS: readonly MigrationCapability[] = ['return-path', 'switchover-ack'];

export interface Enabled {
  /** The connection to the extra socket (kept open: QEMU serves one client per socket). */
  qmp: QmpClient;
  /** Every capability that is on after the change, sorted. */
  enabled: string[];
  /** Migration status (outgoing on the source, incoming on the destination) read right after the change. */
  status: string;
  close(): Promise<void>;
}

export interface Armed extends Enabled {
  /** Date.now() when the destination's socket accepted a connection. */
  socketSeenAt: number;
  /** Date.now() when the capabilities were confirmed. */
  setAt: number;
  /** The incoming status before the change: `none` (libvirt has not sent migrate-incoming yet) or `setup`. */
  incomingStatus: string;
}

export interface Limits {
  connectTimeoutMs?: number;
  commandTimeoutMs?: number;
}

const describe = (e: QmpEndpoint): string => ('path' in e ? e.path : `${e.host}:${e.port}`);
const why = (err: unknown): string => (err instanceof Error ? err.message : String(err));

/** Statuses in which a QEMU has no migration stream yet (outgoing `none` or finished; incoming `none`/`setup`). */
const SOURCE_IDLE = new Set(['none', 'completed', 'failed', 'cancelled']);
const DESTINATION_EARLY = new Set(['none', 'setup']);

async function setAndVerify(side: Side, q: QmpClient, socket: string, idle: Set<string>): Promise<{ enabled: string[]; before: string; after: string }> {
  let before: string;
  let after: string;
  let enabled: string[];
  try {
    before = (await queryMigrate(q)).status ?? 'none';
    if (!idle.has(before)) throw new SwitchoverAckError(side, socket, `too late: the migration is already "${before}"; the capability must be set before the ${side === 'source' ? 'migration starts' : 'source connects'}`);
    const known = await queryMigrateCapabilities(q);
    const missing = SWITCHOVER_ACK_CAPS.filter((c) => !known.some((k) => k.capability === c));
    if (missing.length) throw new SwitchoverAckError(side, socket, `this QEMU has no ${missing.join(', ')} capability (switchover-ack needs QEMU 8.1 or later)`);
    await migrateSetCapabilities(q, { 'return-path': true, 'switchover-ack': true });
    enabled = (await queryMigrateCapabilities(q)).filter((c) => c.state).map((c) => c.capability).sort();
    after = (await queryMigrate(q)).status ?? 'none';
  } catch (err) {
    if (err instanceof SwitchoverAckError) throw err;
    throw new SwitchoverAckError(side, socket, why(err), { cause: err });
  }
  const off = SWITCHOVER_ACK_CAPS.filter((c) => !enabled.includes(c));
  if (off.length) throw new SwitchoverAckError(side, socket, `QEMU accepted the change but reports ${off.join(', ')} off`);
  // The capability is read when the stream starts: if the stream started while we were
  // setting it, whether it took effect is unknown.
  if (!idle.has(after)) throw new SwitchoverAckError(side, socket, `raced: the migration became "${after}" while the capability was being set; it may not apply`);
  return { enabled, before, after };
}

/** Step 1: turn on return-path + switchover-ack on the source QEMU before the migration starts. */
export async function enableOnSource(endpoint: QmpEndpoint, limits: Limits = {}): Promise<Enabled> {
  const socket = describe(endpoint);
  let q: QmpClient;
  try {
    q = await QmpClient.connect(endpoint, { connectTimeoutMs: limits.connectTimeoutMs ?? 10_000, commandTimeoutMs: limits.commandTimeoutMs ?? 10_000 });
  } catch (err) {
    throw new SwitchoverAckError('source', socket, `cannot connect: ${why(err)} (does the domain have the extra -qmp socket?)`, { cause: err });
  }
  try {
    const r = await setAndVerify('source', q, socket, SOURCE_IDLE);
    return { qmp: q, enabled: r.enabled, status: r.after, close: () => q.close() };
  } catch (err) {
    await q.close();
    throw err;
  }
}

export interface ArmOptions extends Limits {
  /** How long to wait for the destination QEMU's socket (libvirt starts it in Prepare). Default 120 s. */
  timeoutMs?: number;
  /** Poll interval while waiting. Default 10 ms: libvirt sends migrate-incoming soon after start. */
  pollMs?: number;
  signal?: AbortSignal;
}

export interface ArmHandle {
  /** Resolves once the destination is armed; rejects with SwitchoverAckError. */
  ready: Promise<Armed>;
  /** Stops waiting (ready rejects) or closes the connection if armed. */
  cancel(): void;
}

/** Step 2: wait for the destination QEMU's extra socket, then turn the capabilities on before the stream arrives. */
export function armDestination(endpoint: QmpEndpoint, opts: ArmOptions = {}): ArmHandle {
  const socket = describe(endpoint);
  const timeoutMs = opts.timeoutMs ?? 120_000;
  const pollMs = opts.pollMs ?? 10;
  let cancelled = false;
  let client: QmpClient | undefined;
  const cancel = (): void => {
    cancelled = true;
    void client?.close();
  };
  opts.signal?.addEventListener('abort', cancel, { once: true });
  const ready = (async (): Promise<Armed> => {
    const deadline = Date.now() + timeoutMs;
    let last = 'the socket does not exist';
    for (;;) {
      if (cancelled) throw new SwitchoverAckError('destination', socket, 'cancelled before the destination QEMU was armed');
      if (Date.now() > deadline) throw new SwitchoverAckError('destination', socket, `no destination QEMU within ${timeoutMs} ms (${last})`);
      // A unix socket path exists once QEMU listens; a stale file from an earlier QEMU
      // refuses connections, so a refused connect is retried too.
      if (!('path' in endpoint) || existsSync(endpoint.path)) {
        try {
          client = await QmpClient.connect(endpoint, { connectTimeoutMs: Math.max(1, Math.min(opts.connectTimeoutMs ?? 10_000, deadline - Date.now())), commandTimeoutMs: opts.commandTimeoutMs ?? 10_000 });
          break;
        } catch (err) {
          last = why(err);
        }
      }
      await new Promise((r) => setTimeout(r, pollMs));
    }
    const q = client;
    if (cancelled) {
      await q.close();
      throw new SwitchoverAckError('destination', socket, 'cancelled before the destination QEMU was armed');
    }
    const socketSeenAt = Date.now();
    try {
      const r = await setAndVerify('destination', q, socket, DESTINATION_EARLY);
      return { qmp: q, enabled: r.enabled, status: r.after, incomingStatus: r.before, socketSeenAt, setAt: Date.now(), close: () => q.close() };
    } catch (err) {
      await q.close();
      throw err;
    }
  })();
  ready.catch(() => undefined).finally(() => opts.signal?.removeEventListener('abort', cancel));
  return { ready, cancel };
}
