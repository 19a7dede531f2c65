// Device qualification: does an idle VFIO device behave as the migration uAPI requires?
// Walks every (from, to) request its flags allow and times it, checks that requests the
// flags forbid are refused with EINVAL, compares MIG_DATA_SIZE with the bytes actually
// saved, checks precopy info and reset, and - given a second device of the same type -
// moves the state from one into the other. What an operator runs before trusting a new
// firmware or driver with live migration.

import { VfioDevice } from '../vfio/device.ts';
import { VfioError } from '../vfio/errors.ts';
import { readToEnd, readAvailable, writeAll } from '../vfio/data.ts';
import { MigState, MIG_STATE_COUNT, stateName, MigrationFlag } from '../vfio/uapi.ts';
import { plan, supportedStates, describeFlags, arcOpensSession } from '../vfio/fsm.ts';
import { saveState, restoreState } from './trial.ts';
import { ensureRunning } from './recover.ts';

/** Back to RUNNING by the one recovery policy (RESUMING is reset, never committed). */
const returnToRunning = (dev: VfioDevice) => ensureRunning(dev);

export interface QualifyCheck {
  /** e.g. "RUNNING->STOP_COPY", "refuse RUNNING_P2P", "MIG_DATA_SIZE". */
  check: string;
  latencyMs?: number;
  /** 'ok', an errno name, or a short mismatch description. */
  result: string;
  ok: boolean;
  /** Passed, but worth the operator's attention (it does not change the verdict). */
  warning?: boolean;
  detail?: string;
}

/** MIG_DATA_SIZE may be exceeded by this factor before qualify warns about it. */
export const DATA_SIZE_WARN_FACTOR = 2;

export interface QualifyReport {
  device: string;
  flags: string[];
  checks: QualifyCheck[];
  verdict: 'pass' | 'fail';
}

/** Short result text: the errno, and the kernel arc that failed when known. */
function errText(err: unknown): string {
  if (err instanceof VfioError) return `${err.code ?? err.message}${err.failedArc ? ` at ${err.failedArc}` : ''}`;
  return err instanceof Error ? err.message : String(err);
}

/** Puts the device into `state` from RUNNING, feeding `stream` when RESUMING must be left later. */
async function enter(dev: VfioDevice, state: MigState, stream: Buffer): Promise<{ close(): void }> {
  await returnToRunning(dev);
  const r = await dev.setState(state);
  if (state === MigState.Resuming && r.dataFd) await writeAll(r.dataFd, stream);
  return { close: () => r.dataFd?.close() };
}

async function timed<T>(fn: () => Promise<T>): Promise<{ value?: T; error?: unknown; ms: number }> {
  const t0 = performance.now();
  try {
    const value = await fn();
    return { value, ms: performance.now() - t0 };
  } catch (error) {
    return { error, ms: performance.now() - t0 };
  }
}

export async function qualifyDevice(dev: VfioDevice, partner?: VfioDevice): Promise<QualifyReport> {
  const checks: QualifyCheck[] = [];
  const add = (c: QualifyCheck) => void checks.push(c);
  let flags: number;
  try {
    flags = await dev.migrationFlags();
    add({ check: 'migration flags', result: describeFlags(flags).join('|'), ok: true });
  } catch (err) {
    add({ check: 'migration flags', result: errText(err), ok: false, detail: (err as Error).message });
    return { device: dev.name, flags: [], checks, verdict: 'fail' };
  }
  await returnToRunning(dev);

  // A valid stream of this very device, to leave RESUMING through STOP.
  const save = await timed(() => saveState(dev));
  if (!save.value) {
    add({ check: 'save RUNNING->STOP_COPY->STOP', latencyMs: save.ms, result: errText(save.error), ok: false, detail: (save.error as Error).message });
    await returnToRunning(dev).catch(() => undefined);
    return { device: dev.name, flags: describeFlags(flags), checks, verdict: 'fail' };
  }
  const stream = save.value;

  // Every request the flags allow: right end state, a data fd exactly when a session opens.
  const states = supportedStates(flags).filter((s) => s !== MigState.Error);
  for (const from of states) {
    for (const to of states) {
      if (from === to) continue;
      const p = plan(from, to, flags);
      if (!p.ok) continue; // STOP_COPY -> PRE_COPY: never sent
      const name = `${stateName(from)}->${stateName(to)}`;
      let setup: { close(): void } | undefined;
      try {
        setup = await enter(dev, from, stream);
      } catch (err) {
        add({ check: name, result: `cannot reach ${stateName(from)}: ${errText(err)}`, ok: false, detail: (err as Error).message });
        await returnToRunning(dev).catch(() => undefined);
        continue;
      }
      const r = await timed(() => dev.setState(to));
      if (r.error) {
        add({ check: name, latencyMs: r.ms, result: errText(r.error), ok: false, detail: (r.error as Error).message });
      } else {
        const last = p.arcs[p.arcs.length - 1]!;
        const wantFd = arcOpensSession(last) !== undefined;
        const gotFd = r.value!.dataFd !== undefined;
        const now = await dev.state();
        const ok = now === to && wantFd === gotFd;
        add({
          check: name,
          latencyMs: r.ms,
          result: ok ? 'ok' : now !== to ? `ended in ${stateName(now)}` : gotFd ? 'unexpected data fd' : 'no data fd',
          ok,
          detail: p.arcs.length > 1 ? `${p.arcs.length} arcs: ${p.arcs.map((a) => stateName(a.to)).join(', ')}` : undefined,
        });
        r.value!.dataFd?.close();
      }
      setup.close();
    }
  }
  await returnToRunning(dev);

  // Requests the flags forbid must be refused by the driver itself.
  const refusals = [MigState.Error, MIG_STATE_COUNT, ...Array.from({ length: MIG_STATE_COUNT }, (_, s) => s).filter((s) => s !== MigState.Error && !states.includes(s))];
  for (const target of refusals) {
    const before = await dev.state();
    const r = await timed(() => dev.probeRefusal(target));
    const after = await dev.state();
    const code = r.value ?? errText(r.error);
    const ok = code === 'EINVAL' && after === before;
    add({ check: `refuse ${stateName(target)}`, latencyMs: r.ms, result: ok ? 'ok' : `${code}${after !== before ? `, moved to ${stateName(after)}` : ''}`, ok });
    await returnToRunning(dev);
  }

  // MIG_DATA_SIZE is the driver's estimate of what STOP_COPY will produce (the uAPI
  // calls it an estimate): reading less is fine, reading far more is worth a warning -
  // preflight and downtime predictions lean on it - but never a failure.
  try {
    const predicted = await dev.dataSize();
    const actual = BigInt((await saveState(dev)).length);
    const over = actual > predicted * BigInt(DATA_SIZE_WARN_FACTOR);
    add({
      check: 'MIG_DATA_SIZE',
      result: over ? `estimate ${predicted} bytes, read ${actual} (more than ${DATA_SIZE_WARN_FACTOR}x the estimate)` : `estimate ${predicted} bytes, read ${actual}`,
      ok: true,
      ...(over ? { warning: true, detail: 'downtime predictions that trust this estimate will be too low for this device' } : {}),
    });
  } catch (err) {
    const absent = err instanceof VfioError && err.code === 'ENOTTY';
    add({ check: 'MIG_DATA_SIZE', result: absent ? 'not offered' : errText(err), ok: absent, detail: (err as Error).message });
    await returnToRunning(dev).catch(() => undefined);
  }

  if (flags & MigrationFlag.PRE_COPY) {
    const r = await timed(async () => {
      const s = await dev.setState(MigState.PreCopy);
      const f = s.dataFd!;
      try {
        const first = await dev.precopyInfo(f);
        await readAvailable(f, () => undefined);
        const after = await dev.precopyInfo(f);
        await dev.setState(MigState.StopCopy);
        await readToEnd(f, () => undefined);
        await dev.setState(MigState.Stop);
        if (after.initialBytes !== 0n) return `initial_bytes ${after.initialBytes} after reading everything offered`;
        return first.initialBytes > 0n ? 'ok' : 'initial_bytes started at 0';
      } finally {
        f.close();
      }
    });
    add({ check: 'PRE_COPY precopy info', latencyMs: r.ms, result: r.value ?? errText(r.error), ok: r.value === 'ok' });
    await returnToRunning(dev).catch(() => undefined);
  }

  // Reset brings the device back to RUNNING.
  {
    const r = await timed(async () => {
      await dev.setState(MigState.Stop);
      await dev.reset();
      return dev.state();
    });
    const ok = r.value === MigState.Running;
    add({ check: 'VFIO_DEVICE_RESET', latencyMs: r.ms, result: ok ? 'ok' : r.error ? errText(r.error) : `ended in ${stateName(r.value!)}`, ok });
    await returnToRunning(dev).catch(() => undefined);
  }

  if (partner) {
    const r = await timed(async () => {
      const partnerFlags = await partner.migrationFlags();
      if (partnerFlags !== flags) return `flags differ (${describeFlags(partnerFlags).join('|')})`;
      const s = await saveState(dev);
      await restoreState(partner, s);
      return (await saveState(partner)).equals(s) ? 'ok' : 'the destination re-saves different bytes';
    });
    add({ check: `state ${dev.name} -> ${partner.name}`, latencyMs: r.ms, result: r.value ?? errText(r.error), ok: r.value === 'ok' });
    await returnToRunning(partner).catch(() => undefined);
    await returnToRunning(dev).catch(() => undefined);
  }

  return { device: dev.name, flags: describeFlags(flags), checks, verdict: checks.every((c) => c.ok) ? 'pass' : 'fail' };
}
