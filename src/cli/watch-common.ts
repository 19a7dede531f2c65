// What both forms of `vfio-mig watch` share (QMP sockets in watch.ts, libvirt in
// watch-libvirt.ts): the result type, the events recorded, when the closing events of a
// migration are in, and turning the two side records into a WatchRecord and its Analysis.

import { parseTimeline, TIMELINE_FORMAT, TIMELINE_VERSION, type SideRecord, type WatchRecord } from '../report/timeline.ts';
import { analyze, type Analysis } from '../report/analysis.ts';

export interface WatchResult {
  record: WatchRecord;
  analysis: Analysis;
  notes: string[];
  timedOut: boolean;
}

/** The QMP events a watch records (everything else QEMU says is left out). */
export const RECORDED = new Set(['MIGRATION', 'MIGRATION_PASS', 'STOP', 'RESUME', 'VFIO_MIGRATION']);
/** Final migration statuses. */
export const FINAL = new Set(['completed', 'failed', 'cancelled']);

export const DEFAULT_TIMEOUT_S = 600;
export const DEFAULT_SETTLE_S = 10;

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Why a watch's polling loop must end now - the caller interrupted it, or its time is up - if it must. */
export function loopEnd(signal: AbortSignal | undefined, deadline: number): 'interrupted' | 'timeout' | undefined {
  if (signal?.aborted) return 'interrupted';
  if (Date.now() >= deadline) return 'timeout';
  return undefined;
}

/** One end as the settle rule sees it: what was recorded, and whether the VM is still there. */
export interface WatchedEnd {
  readonly record: SideRecord;
  readonly alive: boolean;
}

/**
 * Is every closing event in? After a completed migration: the destination resumed with its
 * devices running (or is gone), the source's devices stopped (or the source is gone); a VM
 * paused before the migration stays paused, so then only the destination's final status
 * counts. After a failure: the source runs again with its devices.
 */
export function settled(src: WatchedEnd, dst: WatchedEnd, status: string): boolean {
  const devStates = (end: WatchedEnd): Map<string, string> => {
    const m = new Map<string, string>();
    for (const ev of end.record.events) {
      if (ev.event === 'VFIO_MIGRATION' && typeof ev.data['device-id'] === 'string' && typeof ev.data['device-state'] === 'string') m.set(ev.data['device-id'], ev.data['device-state']);
    }
    return m;
  };
  const lastRunstate = (end: WatchedEnd): string | undefined => end.record.events.filter((e) => e.event === 'STOP' || e.event === 'RESUME').at(-1)?.event;
  const srcStates = devStates(src);
  // A VM paused when its migration began stays paused on the destination: no RESUME comes.
  const setupAt = src.record.events.findIndex((e) => e.event === 'MIGRATION' && e.data.status === 'setup');
  const runstateBefore = src.record.events.slice(0, Math.max(0, setupAt)).filter((e) => e.event === 'STOP' || e.event === 'RESUME').at(-1)?.event;
  const pausedAtStart = runstateBefore ? runstateBefore === 'STOP' : src.record.initialStatus !== undefined && src.record.initialStatus !== 'running';
  if (status === 'completed' && pausedAtStart) return !dst.alive || dst.record.migrate?.status === 'completed';
  if (status === 'completed') {
    const dstStates = devStates(dst);
    const dstDone = !dst.alive || (lastRunstate(dst) === 'RESUME' && [...dstStates.values()].every((s) => s === 'running') && dst.record.migrate?.status === 'completed');
    const srcDone = !src.alive || [...srcStates.values()].every((s) => s === 'stop');
    return dstDone && srcDone;
  }
  // failed or cancelled: the source runs again with its devices.
  const srcDevicesBack = [...srcStates.values()].every((s) => s === 'running');
  const srcVmBack = lastRunstate(src) !== 'STOP';
  return !src.alive || (srcDevicesBack && srcVmBack);
}

/** The WatchRecord of two sides and its analysis, with the watch's own notes first. */
export function finishWatch(p: { started: number; source: SideRecord; destination: SideRecord; ended: string; notes: string[]; timedOut: boolean; timeoutMs: number }): WatchResult {
  const record: WatchRecord = {
    format: TIMELINE_FORMAT,
    version: TIMELINE_VERSION,
    origin: 'watch',
    started: new Date(p.started).toISOString(),
    source: p.source,
    destination: p.destination,
    ended: p.ended,
  };
  // Analysed from its JSON form: exactly what `vfio-mig report` reads back from the file.
  const analysis = analyze(parseTimeline(JSON.parse(JSON.stringify(record))));
  const notes = [...new Set(p.notes)];
  analysis.notes.unshift(...notes);
  if (p.timedOut) analysis.notes.push(`the watch reached its time limit (${Math.round(p.timeoutMs / 1000)} s)`);
  return { record, analysis, notes, timedOut: p.timedOut };
}
