// vfio-mig migrate: the downtime limit (QEMU's downtime-limit, set through libvirt's
// virDomainMigrateSetMaxDowntime).
//
// --downtime auto derives it from what must move while the guest is stopped: the devices'
// stop-copy estimates (MIG_DATA_SIZE, recorded at bind time) plus guest RAM where it moves
// in stop-copy (a pinned device without dirty tracking under avail-switchover-bandwidth
// makes all of it dirty), at the link rate, x1.25 + 50 ms; never below the limit in force.
// Before the start the rate is --link-gbps (or an assumed 10 Gbit/s). Once QEMU has
// measured the migration's throughput (libvirt's job statistics, memory_bps) the limit is
// derived again with that rate and raised if needed (refineLimit).

import { formatBytes, type PreflightReport } from '../compat/preflight/types.ts';
import type { Domain } from '../libvirt/binding.ts';

/** QEMU's default downtime-limit (ms). */
const QEMU_DEFAULT_LIMIT_MS = 300;
/** QEMU's largest downtime-limit (ms): 2000 s. */
export const MAX_LIMIT_MS = 2_000_000;
/** How often libvirt's job statistics are read for QEMU's measured throughput. */
const REFINE_POLL_MS = 250;

export interface DowntimeAutoInput {
  /** The devices' stop-copy estimates summed (bytes). */
  deviceBytes: number;
  /** Devices without an estimate (counted as 0, said so). */
  unknownDevices: string[];
  /** Guest RAM that QEMU must fit in the limit too (all of it with a pinned all-dirty device under avail-switchover-bandwidth), else 0. */
  ramBytes: number;
  rateBytesPerSec: number;
  rateSource: 'measured' | 'given' | 'assumed';
  /** The limit in force now. */
  currentLimitMs: number;
}

export interface DowntimeDecision {
  limitMs: number;
  /** True when the limit must be set (it differs from the one in force). */
  change: boolean;
  /** How the value was derived, one line. */
  derivation: string;
}

/** Margin on the estimate, and a floor for RAM left over and the devices' state transitions. */
const AUTO_FACTOR = 1.25;
const AUTO_ROOM_MS = 50;

export const rateText = (bps: number): string => (bps >= 1e9 ? `${(bps / 1e9).toFixed(2)} GB/s` : `${(bps / 1e6).toFixed(1)} MB/s`);

/** --downtime auto: the limit the devices' state (and RAM that moves while stopped) needs at this rate. */
export function downtimeAuto(i: DowntimeAutoInput): DowntimeDecision {
  if (!(i.rateBytesPerSec > 0)) throw new RangeError('the link rate must be above 0');
  const bytes = i.deviceBytes + i.ramBytes;
  const stopCopyMs = (bytes / i.rateBytesPerSec) * 1000;
  const needed = Math.min(MAX_LIMIT_MS, Math.ceil(stopCopyMs * AUTO_FACTOR + AUTO_ROOM_MS));
  const parts = [`devices ${formatBytes(i.deviceBytes)} (MIG_DATA_SIZE estimates${i.unknownDevices.length ? `; none for ${i.unknownDevices.join(', ')}` : ''})`];
  if (i.ramBytes > 0) parts.push(`guest RAM ${formatBytes(i.ramBytes)} (moves while stopped)`);
  const rate = `${rateText(i.rateBytesPerSec)} ${i.rateSource === 'measured' ? "(QEMU's measured throughput)" : i.rateSource === 'given' ? '(--link-gbps)' : '(assumed 10 Gbit/s; --link-gbps)'}`;
  const base = `${parts.join(' + ')} at ${rate} = ${Math.round(stopCopyMs * 10) / 10} ms; x${AUTO_FACTOR} + ${AUTO_ROOM_MS} ms = ${needed} ms`;
  if (needed <= i.currentLimitMs) return { limitMs: i.currentLimitMs, change: false, derivation: `${base}; the limit in force (${i.currentLimitMs} ms) covers it: kept` };
  return { limitMs: needed, change: true, derivation: `${base}; raised from ${i.currentLimitMs} ms` };
}

/**
 * The inputs of downtimeAuto for one domain, from preflight's downtime prediction and the
 * guest's memory: only whether RAM counts, the rate and the limit in force vary.
 */
export function autoInputs(predicted: PreflightReport['downtime'], memoryBytes: number): (ramInLimit: boolean, rate: number, rateSource: DowntimeAutoInput['rateSource'], current: number) => DowntimeAutoInput {
  return (ramInLimit, rate, rateSource, current) => ({
    deviceBytes: predicted?.deviceBytes ?? 0,
    unknownDevices: predicted?.unknownDevices ?? [],
    ramBytes: ramInLimit ? memoryBytes : 0,
    rateBytesPerSec: rate,
    rateSource,
    currentLimitMs: current,
  });
}

/**
 * The limit set before the start, or undefined to leave the one in force: --downtime MS as
 * given; else derived (auto) when --downtime auto or a check needs it (preflight's
 * downtime-limit, the pinned-convergence fix). Only a derived limit is refined later with
 * the measured throughput.
 */
export function limitBeforeStart(downtime: 'auto' | number | undefined, needsLimit: boolean, limitNow: number, auto: () => DowntimeDecision): { decision: DowntimeDecision; derived: boolean } | undefined {
  if (typeof downtime === 'number') return { decision: { limitMs: downtime, change: downtime !== limitNow, derivation: `--downtime ${downtime}` }, derived: false };
  if (downtime === 'auto' || needsLimit) return { decision: auto(), derived: true };
  return undefined;
}

/** The downtime-limit in force: preflight's reading, else QEMU's parameters, else QEMU's default. */
export async function currentLimit(dom: Domain, fromPreflight: number | undefined): Promise<number> {
  if (fromPreflight !== undefined) return fromPreflight;
  try {
    const p = (await dom.execute('query-migrate-parameters')) as Record<string, unknown>;
    const v = p['downtime-limit'];
    if (typeof v === 'number' && Number.isFinite(v) && v > 0) return v;
  } catch {
    // QEMU's default below.
  }
  return QEMU_DEFAULT_LIMIT_MS;
}

/**
 * Polls libvirt's job statistics while the migration runs; once QEMU reports a measured
 * throughput, recomputes the limit with it, raises it if needed, and reports the decision
 * (once).
 */
export function refineLimit(dom: Domain, decide: (rate: number) => DowntimeDecision, decided: (d: DowntimeDecision, rate: number) => void): { stop(): void; done: Promise<void> } {
  let stopped = false;
  let wake: () => void = () => {};
  const done = (async () => {
    while (!stopped) {
      await new Promise<void>((r) => {
        wake = r;
        setTimeout(r, REFINE_POLL_MS);
      });
      if (stopped) break;
      let bps: number | undefined;
      try {
        bps = dom.jobStats().memoryBps;
      } catch {
        continue;
      }
      if (bps === undefined || !(bps > 0)) continue;
      const d = decide(bps);
      if (d.change) {
        try {
          dom.migrateSetMaxDowntime(d.limitMs);
        } catch {
          return; // The migration may be over already; the limit then no longer matters.
        }
      }
      decided(d, bps);
      return;
    }
  })();
  return {
    stop: () => {
      stopped = true;
      wake();
    },
    done,
  };
}
