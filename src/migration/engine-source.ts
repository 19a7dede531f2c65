// The source engine: moves the state of devices vfio-mig holds to a destination engine,
// alone or around a QEMU's own migration of RAM and vCPUs.
//
// With a QEMU (over QMP): `events` and `pause-before-switchover` are enabled, QEMU's
// migration is started (`migrate` with a URI) or joined, and while QEMU iterates over
// RAM the devices that offer PRE_COPY already send their state. When QEMU pauses at
// `pre-switchover` it has stopped the vCPUs (checked with query-status); then every
// device goes to RUNNING_P2P, then STOP_COPY, the rest of every device's state is
// streamed in parallel, the destination verifies and commits it, the source devices go
// to STOP, and `migrate-continue` lets QEMU finish. The destination engine sends `cont`.
//
// Without a QEMU the same runs at once: devices quiesced, saved, streamed.
//
// On any failure (an arc, the stream, the peer, QEMU, a timeout, the caller's signal):
// the stream is torn down (a destination still reading resets its devices), every source
// device is rolled back to RUNNING (Coordinator.rollback, then settled() for a slow arc),
// QEMU's migration is cancelled and the VM continued if it ran before. The outcome names
// the phase and the cause; the record is the timeline `vfio-mig report` renders.

import { Coordinator, CoordinatorError, type MigrationDevice } from './coordinator.ts';
import { writeDevices, readVerdict, TransferError, type Describe, type DeviceSource, type Verdict } from './transfer.ts';
import type { Transport } from './transport.ts';
import type { ProgressSnapshot } from './progress.ts';
import { readAvailable, readToEnd } from '../vfio/data.ts';
import { QmpClient } from '../qmp/client.ts';
import { cont, migrate, migrateCancel, migrateContinue, migrateSetCapabilities, queryMigrate, queryMigrateCapabilities, queryStatus } from '../qmp/commands.ts';
import { EngineError, EngineRecorder, errorText, sleep, untilAborted, vmState, waitMigrationStatus, type EngineOutcome, type EngineTimelineJson } from './engine.ts';

export interface SourceVm {
  /** The QEMU's monitor. */
  qmp: QmpClient;
  /** Opens the monitor again when it closed (recovery still needs migrate_cancel and cont). */
  reconnect?: () => Promise<QmpClient>;
  /** Start QEMU's migration to this URI; without it, join a migration already started (its capabilities must be set). */
  uri?: string;
}

/** Engine milestones a caller (a test injecting faults, a progress line) can hook. */
export type SourcePhase = 'validated' | 'connected' | 'pre-copy' | 'qemu-started' | 'vcpus-stopped' | 'quiesced' | 'stop-copy' | 'destination-committed' | 'source-stopped' | 'completed';

export interface SourceOptions {
  /** Open devices; the engine does not close them. */
  devices: readonly MigrationDevice[];
  describe: Describe;
  /** Opens the connection to the destination engine (connect(), a child's stdio, ...). */
  connect: () => Promise<Transport>;
  vm?: SourceVm;
  /** Use PRE_COPY on devices that offer it while QEMU iterates (default true). */
  preCopy?: boolean;
  estimates?: ReadonlyMap<string, number>;
  onProgress?: (p: ProgressSnapshot) => void;
  /** Awaited at each milestone (tests inject faults here). */
  onPhase?: (phase: SourcePhase) => void | Promise<void>;
  log?: (line: string) => void;
  signal?: AbortSignal;
  /** Longest wait for QEMU to reach pre-switchover (default 300 s). */
  switchoverTimeoutMs?: number;
  /** Longest wait for QEMU to complete after migrate-continue (default 120 s). */
  completeTimeoutMs?: number;
  /** The receiver's verdict after the stream (default 120 s). */
  verdictTimeoutMs?: number;
  arcTimeoutMs?: number;
}

export interface SourceResult {
  outcome: EngineOutcome;
  timeline: EngineTimelineJson;
}

const FINAL = new Set(['completed', 'failed', 'cancelled']);

export async function migrateSource(o: SourceOptions): Promise<SourceResult> {
  const rec = new EngineRecorder('source', o.log);
  const recovery: string[] = [];
  const stop = new AbortController();
  const onCallerAbort = () => stop.abort();
  o.signal?.addEventListener('abort', onCallerAbort, { once: true });
  let qmp = o.vm?.qmp;
  let unwatch: (() => void) | undefined;
  let coord: Coordinator | undefined;
  let transport: Transport | undefined;
  let sending: Promise<unknown> | undefined;
  let wasRunning: boolean | undefined;
  let qemuStarted = false;
  let qemuCompleted = false;
  let bytes: number | undefined;
  /** Monitors recovery opened: closed before returning (the caller's stays the caller's). */
  const reconnected: QmpClient[] = [];
  // The first cause: a refusal from the receiver or a failed stream stops the other waits
  // (they then fail as "cancelled"), and the outcome names the cause, not the echo.
  let refusal: Extract<Verdict, { ok: false }> | undefined;
  let streamError: unknown;
  const refused = (v: Extract<Verdict, { ok: false }>) => new TransferError('REMOTE_REFUSED', `the destination refused the state: ${v.error}`, v.device);
  const hook = async (p: SourcePhase, detail?: string) => {
    rec.enter(p, detail);
    await o.onPhase?.(p);
    if (stop.signal.aborted) throw new EngineError(p, 'cancelled');
  };
  try {
    rec.enter('validate');
    coord = await Coordinator.create(o.devices, { ...(o.arcTimeoutMs !== undefined ? { arcTimeoutMs: o.arcTimeoutMs } : {}), signal: stop.signal, autoRollback: false });
    rec.attach(coord);
    if (qmp) {
      unwatch = rec.watch(qmp);
      const st = await queryStatus(qmp);
      wasRunning = st.running;
      rec.mark('vm-status', st.status);
      if (o.vm!.uri !== undefined) {
        const m = await queryMigrate(qmp);
        if (m.status !== undefined && !FINAL.has(m.status) && m.status !== 'none') throw new EngineError('validate', `QEMU already has a migration in status ${m.status}`);
        await migrateSetCapabilities(qmp, { events: true, 'pause-before-switchover': true });
      } else {
        const caps = new Map((await queryMigrateCapabilities(qmp)).map((c) => [c.capability, c.state]));
        if (!caps.get('pause-before-switchover')) throw new EngineError('validate', 'joining a QEMU migration needs pause-before-switchover set before it started (migrate-set-capabilities)');
      }
    }
    await hook('validated', coord.devices.join(', '));

    transport = await o.connect();
    await hook('connected', transport.peer);
    const link = transport;

    // The receiver answers once, at the end, or early when it refuses: then stop sending.
    const verdict = readVerdict(link.readable).then((v) => {
      if (!v.ok) {
        refusal = v;
        stop.abort();
      }
      return v;
    });
    verdict.catch(() => undefined);

    // Devices that offer PRE_COPY send their initial state while the VM still runs.
    const pre = o.preCopy === false ? new Map() : await coord.preCopy();
    if (pre.size) await hook('pre-copy', [...pre.keys()].join(', '));
    // Pre-copy reads end at the switchover: a read in flight stops at its next chunk (the
    // rest of the data comes from the same fd in STOP_COPY), so no read runs while the
    // device changes state and the downtime does not wait for pre-copy data.
    const switchover = new AbortController();
    const idle: Promise<void>[] = [];
    const drained: Promise<void>[] = [];
    let stopCopyDone!: () => void;
    const stopCopyReady = new Promise<void>((resolve) => (stopCopyDone = resolve));
    const c = coord;
    const sources: DeviceSource[] = [];
    for (const name of c.devices) {
      const estimate = o.estimates?.get(name);
      let quiet!: () => void;
      let empty!: () => void;
      let broken!: (e: unknown) => void;
      idle.push(new Promise<void>((resolve) => (quiet = resolve)));
      const d = new Promise<void>((resolve, reject) => {
        empty = resolve;
        broken = reject;
      });
      d.catch(() => undefined);
      drained.push(d);
      const preFd = pre.get(name);
      if (!preFd) {
        quiet();
        empty();
      }
      sources.push({
        device: name,
        descriptor: await o.describe(name),
        ...(estimate !== undefined ? { estimate } : {}),
        read: async (sink, signal) => {
          let n = 0;
          try {
            const preSignal = AbortSignal.any([signal, switchover.signal]);
            while (preFd && !switchover.signal.aborted) {
              try {
                const got = await readAvailable(preFd, async (chunk) => {
                  n += chunk.length;
                  await sink(chunk);
                }, { signal: preSignal });
                empty();
                if (got === 0) await sleep(20, preSignal);
              } catch (err) {
                if (!switchover.signal.aborted || signal.aborted) throw err;
              }
            }
            empty();
          } catch (err) {
            // QEMU's migration must not start on a stream that already failed.
            broken(err);
            throw err;
          } finally {
            quiet();
          }
          await untilAborted(stopCopyReady, signal, () => new EngineError('stream', 'cancelled'));
          const fd = c.dataFds().get(name);
          if (!fd) throw new EngineError('stream', `${name} has no saving fd after STOP_COPY`);
          return n + (await readToEnd(fd, sink, { signal }));
        },
      });
    }
    const streamed = writeDevices((b) => link.write(b), sources, { signal: stop.signal, ...(o.onProgress ? { onProgress: o.onProgress } : {}) }).then(async (r) => {
      await link.end();
      return r;
    });
    sending = streamed.catch(() => undefined);
    // A stream that fails early (the peer refused, a read failed) stops the wait for QEMU.
    streamed.catch((e: unknown) => {
      streamError ??= e;
      stop.abort();
    });

    if (qmp) {
      if (o.vm!.uri !== undefined) {
        // Like QEMU's switchover-ack: the devices' initial pre-copy data is sent before
        // QEMU's RAM migration starts, so QEMU cannot switch over before it is across.
        if (pre.size) {
          await untilAborted(Promise.all(drained), stop.signal, () => new EngineError('pre-copy', 'cancelled'));
          rec.mark('pre-copy-sent');
        }
        if (stop.signal.aborted) throw new EngineError('pre-copy', 'cancelled');
        // Set before the command: a migrate that reached QEMU must be cancelled on failure.
        qemuStarted = true;
        await migrate(qmp, { uri: o.vm!.uri });
        await hook('qemu-started', o.vm!.uri);
      } else {
        qemuStarted = true;
      }
      await waitMigrationStatus(qmp, ['pre-switchover'], { phase: 'wait-switchover', timeoutMs: o.switchoverTimeoutMs ?? 300_000, signal: stop.signal, fail: ['failed', 'cancelled', 'cancelling', 'completed'] });
      const st = await queryStatus(qmp);
      if (st.running) throw new EngineError('wait-switchover', `QEMU is at pre-switchover but its vCPUs still run (status ${st.status})`);
    }
    await hook('vcpus-stopped', qmp ? 'QEMU at pre-switchover' : 'no VM');
    switchover.abort();
    await Promise.all(idle);
    await c.quiesce();
    await hook('quiesced');
    await c.stopCopy();
    stopCopyDone();
    await hook('stop-copy');
    const r = await streamed.catch((err: unknown) => {
      throw refusal ? refused(refusal) : err;
    });
    bytes = r.bytes;
    const limit = o.verdictTimeoutMs ?? 120_000;
    let timer: NodeJS.Timeout | undefined;
    const v = await Promise.race([
      verdict,
      new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new TransferError('NO_VERDICT', `no verdict from the destination within ${limit} ms`)), limit))),
    ]).finally(() => clearTimeout(timer));
    if (!v.ok) throw refused(v);
    await hook('destination-committed', `${r.bytes} bytes`);
    await c.finishSource();
    await hook('source-stopped');
    if (qmp) {
      await migrateContinue(qmp, 'pre-switchover');
      await waitMigrationStatus(qmp, ['completed'], { phase: 'complete', timeoutMs: o.completeTimeoutMs ?? 120_000 });
      qemuCompleted = true;
    }
    await hook('completed');
    const outcome: EngineOutcome = {
      side: 'source',
      ok: true,
      phase: 'completed',
      recovery,
      devices: c.states(),
      ...(qmp ? { vm: await vmState(qmp) } : {}),
      bytes,
      marks: rec.marks,
      qemuEvents: rec.qemuEvents,
      ...(qmp ? { qemu: (await queryMigrate(qmp).catch(() => undefined)) as Record<string, unknown> | undefined } : {}),
    };
    if (outcome.qemu === undefined) delete outcome.qemu;
    transport.close();
    return { outcome, timeline: rec.json(outcome) };
  } catch (caught) {
    let err = caught;
    const echo = stop.signal.aborted && !o.signal?.aborted;
    if (refusal) err = refused(refusal);
    else if (echo && streamError !== undefined && isCancellation(caught)) err = streamError;
    else if (o.signal?.aborted) err = new EngineError(rec.phase, 'cancelled by the caller');
    const phase = caught instanceof CoordinatorError ? caught.phase : caught instanceof EngineError && caught.message !== 'cancelled' ? caught.phase : rec.phase;
    const cause = describeFailure(err);
    rec.mark('failed', cause);
    stop.abort();
    transport?.close();
    if (transport) recovery.push('closed the connection to the destination (it resets its devices)');
    await sending;
    if (coord) {
      try {
        await coord.rollback();
        recovery.push('every source device rolled back to RUNNING');
      } catch (e) {
        recovery.push(`rollback: ${errorText(e)}`);
      }
      const hung = await coord.settled();
      if (hung.length) recovery.push(`still hung after waiting: ${hung.join(', ')}`);
    }
    if (o.vm && !qemuCompleted) {
      qmp = await liveMonitor(qmp, o.vm, recovery, reconnected);
      if (qmp) {
        if (qemuStarted) {
          try {
            await migrateCancel(qmp);
            await waitMigrationStatus(qmp, ['cancelled', 'failed', 'completed', 'none'], { phase: 'cancel', timeoutMs: 30_000, fail: [] }).catch(() => undefined);
            recovery.push("cancelled QEMU's migration (migrate_cancel)");
          } catch (e) {
            recovery.push(`migrate_cancel: ${errorText(e)}`);
          }
        }
        try {
          const st = await queryStatus(qmp);
          if (wasRunning && !st.running) {
            await cont(qmp);
            recovery.push('the source VM continued (cont)');
          }
        } catch (e) {
          recovery.push(`cont: ${errorText(e)}`);
        }
      }
    }
    const outcome: EngineOutcome = {
      side: 'source',
      ok: false,
      phase,
      cause,
      recovery,
      devices: coord?.states() ?? {},
      ...(o.vm ? { vm: await vmState(qmp) } : {}),
      ...(bytes !== undefined ? { bytes } : {}),
      marks: rec.marks,
      qemuEvents: rec.qemuEvents,
    };
    return { outcome, timeline: rec.json(outcome) };
  } finally {
    unwatch?.();
    o.signal?.removeEventListener('abort', onCallerAbort);
    for (const q of reconnected) await q.close().catch(() => undefined);
  }
}

/** The monitor to recover through: the one we have, or a new connection when it closed. */
async function liveMonitor(qmp: QmpClient | undefined, vm: SourceVm, recovery: string[], opened: QmpClient[]): Promise<QmpClient | undefined> {
  if (qmp && !qmp.closed) return qmp;
  if (!vm.reconnect) {
    recovery.push('the QMP connection closed and there is no way to reconnect: the VM was not checked');
    return undefined;
  }
  try {
    const q = await vm.reconnect();
    opened.push(q);
    recovery.push('reconnected to QMP');
    return q;
  } catch (e) {
    recovery.push(`reconnecting to QMP failed: ${errorText(e)}`);
    return undefined;
  }
}

function isCancellation(err: unknown): boolean {
  const code = (err as { code?: unknown })?.code;
  return (err instanceof EngineError && err.message === 'cancelled') || code === 'ECANCELED' || /cancelled/.test(errorText(err));
}

function describeFailure(err: unknown): string {
  const text = errorText(err);
  if (err instanceof TransferError) return text;
  const code = (err as { code?: unknown })?.code;
  return typeof code === 'string' && !text.includes(code) ? `${text} (${code})` : text;
}

/** Opens a QMP client on a unix socket path, for SourceVm.reconnect. */
export function qmpReconnector(path: string): () => Promise<QmpClient> {
  return () => QmpClient.connect({ path }, { connectTimeoutMs: 10_000, commandTimeoutMs: 30_000 });
}
