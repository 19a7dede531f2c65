// What the source and destination engines (engine-source.ts, engine-destination.ts)
// share: the record of one side of a migration (the coordinator's arcs, the engine's own
// milestones, QEMU's events), its JSON (the engine timeline `vfio-mig report` renders),
// the outcome, merging two sides into one timeline, the downtime breakdown, and the QMP
// waits both sides make.
//
// Clocks. Arcs are timed by the coordinator from its own origin; the record keeps that
// origin as an epoch time (performance.timeOrigin based) so that the two sides, written
// by two processes on hosts that share a clock, merge into one timeline. QEMU stamps its
// events with the host's real-time clock, which is the same epoch.

import { writeFileSync, mkdirSync } from 'node:fs';
import { dirname } from 'node:path';
import type { Coordinator, TimelineEntry } from './coordinator.ts';
import type { QmpClient } from '../qmp/client.ts';
import type { QmpEvent } from '../qmp/events.ts';
import { queryMigrate, queryStatus } from '../qmp/commands.ts';

export type EngineSide = 'source' | 'destination';

/** A milestone of the engine, in epoch ms. */
export interface EngineMark {
  name: string;
  at: number;
  detail?: string;
}

/** A QMP event as the engine saw it: QEMU's timestamp (epoch ms). */
export interface EngineQemuEvent {
  event: string;
  at: number;
  status?: string;
}

export interface DowntimeBreakdown {
  /** vCPU stop on the source (QMP STOP) to the destination's `cont` (QMP RESUME), ms. */
  totalMs: number;
  /** Consecutive phases that add up to totalMs. */
  phases: { name: string; ms: number }[];
}

export interface EngineOutcome {
  side: EngineSide;
  ok: boolean;
  /** The last phase reached (the failed one when !ok). */
  phase: string;
  /** Why it failed, naming the device, the peer or QEMU. */
  cause?: string;
  /** What was done to recover (source: rollback, migrate_cancel, cont; destination: reset). */
  recovery: string[];
  /** Device states at the end, as the coordinator knows them. */
  devices: Record<string, string>;
  /** The VM's run state at the end (when a QEMU was driven). */
  vm?: { status: string; running: boolean } | { status: 'unknown'; error: string };
  bytes?: number;
  /** source device -> destination device (destination side). */
  routes?: Record<string, string>;
  marks: EngineMark[];
  qemuEvents: EngineQemuEvent[];
  /** QEMU's query-migrate at the end (source: total-time, downtime, ram; destination: status). */
  qemu?: Record<string, unknown>;
}

/** The JSON every engine migration writes; `vfio-mig report` reads devices + timeline. */
export interface EngineTimelineJson {
  devices: string[];
  /** Coordinator arcs, ms since `engine.epochMs` (or since the earlier side's, merged). */
  timeline: TimelineEntry[];
  engine: {
    format: 'vfio-mig/engine';
    version: 1;
    epochMs: number;
    sides: Partial<Record<EngineSide, Omit<EngineOutcome, 'marks' | 'qemuEvents'> & { marks: EngineMark[]; qemuEvents: EngineQemuEvent[] }>>;
    downtime?: DowntimeBreakdown;
  };
}

export class EngineError extends Error {
  readonly phase: string;
  constructor(phase: string, message: string, cause?: unknown) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = 'EngineError';
    this.phase = phase;
  }
}

export const nowEpoch = (): number => performance.timeOrigin + performance.now();

/** One side's record while it runs. */
export class EngineRecorder {
  readonly side: EngineSide;
  readonly marks: EngineMark[] = [];
  readonly qemuEvents: EngineQemuEvent[] = [];
  phase = 'start';
  #coordinator: Coordinator | undefined;
  #coordinatorEpoch = nowEpoch();
  #log: ((line: string) => void) | undefined;

  constructor(side: EngineSide, log?: (line: string) => void) {
    this.side = side;
    this.#log = log;
  }

  /** Call right after Coordinator.create(): its arcs are timed from (about) now. */
  attach(c: Coordinator): void {
    this.#coordinator = c;
    this.#coordinatorEpoch = nowEpoch();
  }

  enter(phase: string, detail?: string): void {
    this.phase = phase;
    this.mark(phase, detail);
  }

  mark(name: string, detail?: string, at = nowEpoch()): void {
    this.marks.push({ name, at, ...(detail !== undefined ? { detail } : {}) });
    this.#log?.(`${this.side}: ${name}${detail ? ` (${detail})` : ''}`);
  }

  /** Records the QMP events that make the timeline (STOP, RESUME, MIGRATION). */
  watch(qmp: QmpClient): () => void {
    return qmp.onEvent((ev: QmpEvent) => {
      if (ev.event !== 'STOP' && ev.event !== 'RESUME' && ev.event !== 'MIGRATION') return;
      const at = ev.timestamp.seconds * 1000 + ev.timestamp.microseconds / 1000;
      const status = typeof ev.data?.status === 'string' ? ev.data.status : undefined;
      this.qemuEvents.push({ event: ev.event, at, ...(status ? { status } : {}) });
    });
  }

  lastEvent(event: string, status?: string): EngineQemuEvent | undefined {
    return this.qemuEvents.filter((e) => e.event === event && (status === undefined || e.status === status)).at(-1);
  }

  json(outcome: EngineOutcome): EngineTimelineJson {
    const c = this.#coordinator;
    const record = c?.toJSON() ?? { devices: [], timeline: [] };
    const { marks, qemuEvents, ...rest } = outcome;
    return {
      devices: record.devices,
      timeline: record.timeline.map((e) => ({ ...e })),
      engine: { format: 'vfio-mig/engine', version: 1, epochMs: this.#coordinatorEpoch, sides: { [this.side]: { ...rest, marks, qemuEvents } } },
    };
  }
}

/** Merges the two sides' records (written by two processes) into one timeline. */
export function mergeTimelines(a: EngineTimelineJson, b: EngineTimelineJson): EngineTimelineJson {
  const epoch = Math.min(a.engine.epochMs, b.engine.epochMs);
  const shift = (r: EngineTimelineJson) => r.timeline.map((e) => ({ ...e, start: e.start + r.engine.epochMs - epoch, end: e.end + r.engine.epochMs - epoch }));
  const merged: EngineTimelineJson = {
    devices: [...a.devices, ...b.devices.filter((d) => !a.devices.includes(d))],
    timeline: [...shift(a), ...shift(b)].sort((x, y) => x.start - y.start),
    engine: { format: 'vfio-mig/engine', version: 1, epochMs: epoch, sides: { ...a.engine.sides, ...b.engine.sides } },
  };
  const d = downtimeBreakdown(merged);
  if (d) merged.engine.downtime = d;
  return merged;
}

/**
 * The downtime from the source's vCPU stop to the destination's `cont`, broken into the
 * engine's phases. Needs both sides (a merged timeline) of a migration with QEMU.
 */
export function downtimeBreakdown(t: EngineTimelineJson): DowntimeBreakdown | undefined {
  const src = t.engine.sides.source;
  const dst = t.engine.sides.destination;
  if (!src || !dst) return undefined;
  const m = (side: typeof src, name: string) => side.marks.find((x) => x.name === name)?.at;
  const stop = src.qemuEvents.find((e) => e.event === 'STOP')?.at ?? m(src, 'vcpus-stopped');
  const resume = dst.qemuEvents.filter((e) => e.event === 'RESUME').at(-1)?.at ?? m(dst, 'vm-continued');
  if (stop === undefined || resume === undefined) return undefined;
  // Milestones in the order they happen during the downtime; a missing one is skipped.
  const points: [string, number | undefined][] = [
    ['vCPU stop -> pre-switchover seen', m(src, 'vcpus-stopped')],
    ['quiesce (all RUNNING_P2P)', m(src, 'quiesced')],
    ['stop-copy (all STOP_COPY)', m(src, 'stop-copy')],
    ['device state streamed and loaded', m(src, 'destination-committed')],
    ['source devices to STOP', m(src, 'source-stopped')],
    ['QEMU finishes RAM/vCPU state', m(dst, 'ram-arrived')],
    ['destination cont', resume],
  ];
  const phases: { name: string; ms: number }[] = [];
  let prev = stop;
  for (const [name, at] of points) {
    // Clocks of two processes (and QEMU's) are compared: a milestone outside the window
    // or out of order is left out rather than shown as a negative phase.
    if (at === undefined || at < prev || (at > resume && name !== 'destination cont')) continue;
    phases.push({ name, ms: round(at - prev) });
    prev = at;
  }
  return { totalMs: round(resume - stop), phases };
}

export function formatDowntime(d: DowntimeBreakdown): string {
  const w = Math.max(...d.phases.map((p) => p.name.length));
  return [...d.phases.map((p) => `  ${p.name.padEnd(w)} ${p.ms.toFixed(1).padStart(9)} ms`), `  ${'downtime (vCPU stop -> cont)'.padEnd(w)} ${d.totalMs.toFixed(1).padStart(9)} ms`].join('\n');
}

export function writeTimeline(path: string, t: EngineTimelineJson): void {
  mkdirSync(dirname(path), { recursive: true });
  writeFileSync(path, `${JSON.stringify(t, null, 1)}\n`);
}

const round = (ms: number): number => Math.round(ms * 1000) / 1000;

export const errorText = (err: unknown): string => (err instanceof Error ? err.message : String(err));

/** Resolves after `ms`, or rejects when `signal` aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(new EngineError('cancelled', 'cancelled'));
    const onAbort = () => {
      clearTimeout(timer);
      reject(new EngineError('cancelled', 'cancelled'));
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/**
 * Waits until QEMU's migration status is one of `want`; throws when it is one of `fail`,
 * when the monitor closes, on `signal`, or after `timeoutMs`. MIGRATION events answer at
 * once; query-migrate is polled as well (an event may have come before we listened).
 */
export async function waitMigrationStatus(
  qmp: QmpClient,
  want: readonly string[],
  opts: { timeoutMs: number; signal?: AbortSignal; fail?: readonly string[]; pollMs?: number; phase: string; check?: () => Promise<boolean> },
): Promise<string> {
  const fail = opts.fail ?? ['failed', 'cancelled', 'cancelling'];
  const deadline = Date.now() + opts.timeoutMs;
  let wake: (() => void) | undefined;
  let seen: string | undefined;
  const off = qmp.onEvent((ev) => {
    if (ev.event === 'MIGRATION' && typeof ev.data?.status === 'string') {
      const s = ev.data.status;
      if (want.includes(s) || fail.includes(s)) seen = s;
      wake?.();
    }
  });
  try {
    for (;;) {
      if (opts.signal?.aborted) throw new EngineError(opts.phase, 'cancelled');
      let status = seen;
      if (status === undefined) {
        if (qmp.closed) throw new EngineError(opts.phase, 'the QMP connection to QEMU closed');
        const info = await queryMigrate(qmp).catch((e: unknown) => {
          throw new EngineError(opts.phase, `QEMU: ${errorText(e)}`, e);
        });
        status = info.status;
        if (status !== undefined && fail.includes(status)) throw new EngineError(opts.phase, `QEMU's migration ${status}${info['error-desc'] ? `: ${info['error-desc']}` : ''}`);
      }
      if (status !== undefined && want.includes(status)) return status;
      if (status !== undefined && fail.includes(status)) {
        const info = await queryMigrate(qmp).catch(() => ({}) as Record<string, unknown>);
        throw new EngineError(opts.phase, `QEMU's migration ${status}${info['error-desc'] ? `: ${String(info['error-desc'])}` : ''}`);
      }
      if (opts.check && (await opts.check())) return status ?? 'checked';
      const left = deadline - Date.now();
      if (left <= 0) throw new EngineError(opts.phase, `QEMU's migration did not reach ${want.join('/')} within ${opts.timeoutMs} ms (status ${status ?? 'none'})`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, Math.min(opts.pollMs ?? 200, left));
        wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      wake = undefined;
    }
  } finally {
    off();
  }
}

/** query-status, never throwing: the VM part of an outcome. */
export async function vmState(qmp: QmpClient | undefined): Promise<EngineOutcome['vm']> {
  if (!qmp) return undefined;
  try {
    const s = await queryStatus(qmp, { timeoutMs: 10_000 });
    return { status: s.status, running: s.running };
  } catch (err) {
    return { status: 'unknown', error: errorText(err) };
  }
}

/** Races `p` against `signal` (the operation itself keeps running). */
export function untilAborted<T>(p: Promise<T>, signal: AbortSignal, reason: () => unknown): Promise<T> {
  if (signal.aborted) return Promise.reject(reason());
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(reason());
    signal.addEventListener('abort', onAbort, { once: true });
    p.then(
      (v) => {
        signal.removeEventListener('abort', onAbort);
        resolve(v);
      },
      (e: unknown) => {
        signal.removeEventListener('abort', onAbort);
        reject(e);
      },
    );
  });
}
