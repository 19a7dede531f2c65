// The destination engine: receives the device state the source engine streams into
// devices vfio-mig holds, alone or next to a QEMU receiving the VM's RAM and vCPUs.
//
// With a QEMU (started with `-incoming`): the engine checks the VM is `inmigrate`, turns
// on `events`, and sends `stop`, which during an incoming migration turns QEMU's
// autostart off - so when the RAM has arrived the VM stays paused (libvirt gets the
// same with -S). It may start the incoming side itself (`migrate-incoming` with a URI).
// The devices receive their state (descriptors checked by `accept` while every device is
// RUNNING; RESUMING; the data; every digest verified; STOP, all RUNNING_P2P, all
// RUNNING), QEMU's incoming migration completes, and only then the engine sends `cont`.
//
// On any failure (the stream refused, corrupt or cut, QEMU's incoming migration failing,
// its monitor closing, a timeout): the source is told (receiveDevices' verdict), devices
// still RESUMING are reset (never committed), devices that already committed the state of
// a migration that did not finish are reset too, and the VM is not continued.

import { Coordinator, CoordinatorError, type MigrationDevice } from './coordinator.ts';
import { receiveDevices, type Accept, type Route } from './transfer.ts';
import type { Transport } from './transport.ts';
import type { ProgressSnapshot } from './progress.ts';
import type { QmpClient } from '../qmp/client.ts';
import { stateName } from '../vfio/uapi.ts';
import { cont, migrateIncoming, migrateSetCapabilities, queryMigrate, queryStatus, stop as stopVm } from '../qmp/commands.ts';
import { EngineError, EngineRecorder, errorText, vmState, waitMigrationStatus, type EngineOutcome, type EngineTimelineJson } from './engine.ts';

export interface DestinationVm {
  qmp: QmpClient;
  /** Start the incoming side with migrate-incoming on this URI (QEMU started with `-incoming defer`). */
  uri?: string;
  /** Leave the VM paused after the migration instead of sending `cont`. */
  noCont?: boolean;
}

export type DestinationPhase = 'validated' | 'connected' | 'devices-running' | 'ram-arrived' | 'vm-continued';

export interface DestinationOptions {
  /** Open devices; the engine does not close them. */
  devices: readonly MigrationDevice[];
  /** Waits for the source engine's connection. */
  accept: () => Promise<Transport>;
  route: Route;
  check: Accept;
  vm?: DestinationVm;
  onProgress?: (p: ProgressSnapshot) => void;
  onPhase?: (phase: DestinationPhase) => void | Promise<void>;
  log?: (line: string) => void;
  signal?: AbortSignal;
  /** Bytes queued per device while its RESUMING fd is written (default 1 MiB). */
  queueBytes?: number;
  /** Longest pause in the stream (default 60 s). */
  idleTimeoutMs?: number;
  /** Longest wait for QEMU's incoming migration to complete once the devices run (default 300 s). */
  completeTimeoutMs?: number;
  arcTimeoutMs?: number;
}

export interface DestinationResult {
  outcome: EngineOutcome;
  timeline: EngineTimelineJson;
}

export async function receiveDestination(o: DestinationOptions): Promise<DestinationResult> {
  const rec = new EngineRecorder('destination', o.log);
  const recovery: string[] = [];
  const abort = new AbortController();
  const onCallerAbort = () => abort.abort();
  o.signal?.addEventListener('abort', onCallerAbort, { once: true });
  const qmp = o.vm?.qmp;
  let unwatch: (() => void) | undefined;
  let coord: Coordinator | undefined;
  let transport: Transport | undefined;
  let committed = false;
  let result: Awaited<ReturnType<typeof receiveDevices>> | undefined;
  const hook = async (p: DestinationPhase, detail?: string) => {
    rec.enter(p, detail);
    await o.onPhase?.(p);
    if (abort.signal.aborted) throw new EngineError(p, 'cancelled');
  };
  // QEMU's incoming migration, watched from the start: a failure there stops the receive.
  let incoming: Promise<string> | undefined;
  try {
    rec.enter('validate');
    coord = await Coordinator.create(o.devices, { ...(o.arcTimeoutMs !== undefined ? { arcTimeoutMs: o.arcTimeoutMs } : {}), signal: abort.signal, autoRollback: false });
    rec.attach(coord);
    if (qmp) {
      unwatch = rec.watch(qmp);
      const st = await queryStatus(qmp);
      rec.mark('vm-status', st.status);
      if (st.status !== 'inmigrate') throw new EngineError('validate', `the destination QEMU is ${st.status}, not waiting for a migration: start it with -incoming defer (or -incoming URI)`);
      await migrateSetCapabilities(qmp, { events: true });
      // During an incoming migration `stop` clears QEMU's autostart: the VM stays paused
      // after its RAM arrived, until the devices are loaded and the engine sends `cont`.
      await stopVm(qmp);
      if (o.vm!.uri !== undefined) await migrateIncoming(qmp, { uri: o.vm!.uri });
      incoming = waitMigrationStatus(qmp, ['completed'], {
        phase: 'qemu-incoming',
        timeoutMs: 24 * 3600_000,
        signal: abort.signal,
        pollMs: 500,
        // After the RAM arrived QEMU leaves inmigrate (paused, autostart off).
        check: async () => (await queryStatus(qmp)).status !== 'inmigrate',
      });
      incoming.catch(() => abort.abort());
    }
    await hook('validated', coord.devices.join(', '));
    transport = await o.accept();
    await hook('connected', transport.peer);
    const c = coord;
    const receiving = receiveDevices(c, transport, o.route, o.check, {
      signal: abort.signal,
      idleTimeoutMs: o.idleTimeoutMs ?? 60_000,
      // A short queue per device: the sender's pre-copy reads wait for the devices here,
      // so "pre-copy data sent" means nearly "loaded" and the downtime does not pay for
      // megabytes still queued when the vCPUs stop.
      queueBytes: o.queueBytes ?? 1 << 20,
      ...(o.onProgress ? { onProgress: o.onProgress } : {}),
    });
    result = await (incoming ? Promise.race([receiving, incoming.then(() => receiving)]) : receiving).catch(async (err: unknown) => {
      // QEMU's failure is the cause even when the receive then stopped as cancelled.
      // When QEMU's incoming migration failed, the receive stopped as cancelled: then
      // QEMU's failure is the cause. A stream that failed on its own keeps its cause.
      if (incoming && abort.signal.aborted && !o.signal?.aborted && /cancelled/.test(errorText(err))) {
        const qemuFailure = await Promise.race([incoming.then(() => undefined, (qe: unknown) => qe), new Promise<undefined>((r) => setTimeout(() => r(undefined), 300))]);
        if (qemuFailure !== undefined) throw qemuFailure;
      }
      throw err;
    });
    committed = true;
    await hook('devices-running', `${result.bytes} bytes from ${Object.keys(result.routes).length} devices`);
    if (qmp && incoming) {
      const limit = o.completeTimeoutMs ?? 300_000;
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([incoming, new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new EngineError('qemu-incoming', `QEMU's incoming migration did not complete within ${limit} ms`)), limit)))]).finally(() => clearTimeout(timer));
      const st = await queryStatus(qmp);
      await hook('ram-arrived', st.status);
      if (st.running) throw new EngineError('qemu-incoming', 'the destination VM started before its devices were loaded (it must not autostart)');
      if (!o.vm!.noCont) {
        await cont(qmp);
        await hook('vm-continued');
      }
    }
    const outcome: EngineOutcome = {
      side: 'destination',
      ok: true,
      phase: 'completed',
      recovery,
      devices: c.states(),
      ...(qmp ? { vm: await vmState(qmp) } : {}),
      bytes: result.bytes,
      routes: result.routes,
      marks: rec.marks,
      qemuEvents: rec.qemuEvents,
    };
    if (qmp) {
      const q = (await queryMigrate(qmp).catch(() => undefined)) as Record<string, unknown> | undefined;
      if (q) outcome.qemu = q;
    }
    transport.close();
    return { outcome, timeline: rec.json(outcome) };
  } catch (err) {
    const phase = err instanceof CoordinatorError ? err.phase : err instanceof EngineError ? err.phase : rec.phase;
    const cause = errorText(err);
    rec.mark('failed', cause);
    abort.abort();
    transport?.close();
    if (coord) {
      if (committed) {
        // The state of a migration that did not finish must not stay in the devices.
        for (const d of o.devices) {
          try {
            await d.reset();
          } catch (e) {
            recovery.push(`reset ${d.name}: ${errorText(e)}`);
          }
        }
        recovery.push('every destination device reset (it had committed the state of a migration that did not finish)');
      } else {
        try {
          await coord.rollback();
          recovery.push('every destination device back to RUNNING (RESUMING reset, never committed)');
        } catch (e) {
          recovery.push(`rollback: ${errorText(e)}`);
        }
      }
      const hung = await coord.settled();
      if (hung.length) recovery.push(`still hung after waiting: ${hung.join(', ')}`);
    }
    if (qmp) recovery.push('the destination VM was not continued');
    const outcome: EngineOutcome = {
      side: 'destination',
      ok: false,
      phase,
      cause,
      recovery,
      devices: await finalStates(o.devices, coord),
      ...(qmp ? { vm: await vmState(qmp) } : {}),
      marks: rec.marks,
      qemuEvents: rec.qemuEvents,
    };
    return { outcome, timeline: rec.json(outcome) };
  } finally {
    unwatch?.();
    o.signal?.removeEventListener('abort', onCallerAbort);
  }
}

async function finalStates(devices: readonly MigrationDevice[], coord: Coordinator | undefined): Promise<Record<string, string>> {
  const known = coord?.states() ?? {};
  for (const d of devices) {
    try {
      known[d.name] = stateName(await d.state());
    } catch {
      // keep what the coordinator knows
    }
  }
  return known;
}
