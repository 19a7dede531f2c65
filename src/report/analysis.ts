// What a recorded migration says: the verdict (ok, violated, failed) with the device and the
// phase it concerns, each device's state sequence on each side, the phases and their
// durations, and the downtime - QEMU's own figure and what the events bound it by.
//
// Downtime from events is a bound, not a measurement: QEMU pauses the vCPUs *before* the
// devices' stop events and the QMP STOP, and resumes them *after* RESUME and the devices'
// running events. So "first device event of the stop .. last device event of the resume"
// is a lower bound of the real stop-to-run time, and QMP STOP .. RESUME is shorter still.
// Both need the two hosts' clocks to agree (they do for two QEMUs on one host).

import { checkInvariants, type Violation } from './invariants.ts';
import { P2P, RUNNING, STOPPED, SIDES, sideMarks, stateSequences, type Mark, type Side, type Timeline } from './timeline.ts';

export type Verdict = 'ok' | 'violated' | 'failed';

export interface DeviceReport {
  id: string;
  /** The host device behind it on the source (PCI address or mdev path), where known. */
  host?: string;
  /** The same on the destination. */
  destinationHost?: string;
  source: string[];
  destination: string[];
  /** The state the device ends in on each side (`running` when it never left it). */
  final: Record<Side, string>;
}

export interface Phase {
  name: 'setup' | 'iteration' | 'switchover' | 'resume' | string;
  side: Side;
  start: number;
  end: number;
}

export interface QemuFigures {
  status?: string;
  destinationStatus?: string;
  totalTimeMs?: number;
  setupTimeMs?: number;
  downtimeMs?: number;
  expectedDowntimeMs?: number;
  vfioTransferred?: number;
  ramTransferred?: number;
  dirtySyncCount?: number;
  errorDesc?: string;
}

export interface Analysis {
  origin: Timeline['origin'];
  verdict: Verdict;
  /** One sentence: what happened, naming the device and the phase when it was not ok. */
  reason: string;
  /** The migration's final status (QEMU's, or the engine's outcome). */
  status: string;
  /** QEMU's downtime figure when known, else the event-based bound. */
  downtimeMs?: number;
  devices: DeviceReport[];
  violations: Violation[];
  failure?: { phase: string; devices: string[]; detail: string };
  phases: Phase[];
  events: {
    /** Source QMP STOP -> destination QMP RESUME. */
    stopToResumeMs?: number;
    /** First device event of the stop -> last device event of the resume (lower bound of the vCPU pause). */
    downtimeBoundMs?: number;
    passes: number;
  };
  qemu: QemuFigures;
  notes: string[];
}

const num = (v: unknown): number | undefined => (typeof v === 'number' && Number.isFinite(v) ? v : undefined);
const str = (v: unknown): string | undefined => (typeof v === 'string' ? v : undefined);

function qemuFigures(tl: Timeline): QemuFigures {
  const s = tl.qemu.source ?? {};
  const d = tl.qemu.destination ?? {};
  const ram = (s.ram ?? {}) as Record<string, unknown>;
  const vfio = (s.vfio ?? {}) as Record<string, unknown>;
  const f: QemuFigures = {};
  const set = <K extends keyof QemuFigures>(k: K, v: QemuFigures[K] | undefined): void => {
    if (v !== undefined) f[k] = v;
  };
  set('status', str(s.status));
  set('destinationStatus', str(d.status));
  set('totalTimeMs', num(s['total-time']));
  set('setupTimeMs', num(s['setup-time']));
  set('downtimeMs', num(s.downtime));
  set('expectedDowntimeMs', num(s['expected-downtime']));
  set('vfioTransferred', num(vfio.transferred));
  set('ramTransferred', num(ram.transferred));
  set('dirtySyncCount', num(ram['dirty-sync-count']));
  set('errorDesc', str(s['error-desc']) ?? str(d['error-desc']));
  return f;
}

const FINAL = new Set(['completed', 'failed', 'cancelled']);

/** The last MIGRATION status seen on a side. */
function lastStatus(marks: Mark[]): string | undefined {
  for (let i = marks.length - 1; i >= 0; i--) if (marks[i]!.kind === 'migration') return marks[i]!.status;
  return undefined;
}

function first(marks: Mark[], pred: (m: Mark) => boolean, from = 0): number {
  for (let i = from; i < marks.length; i++) if (pred(marks[i]!)) return i;
  return -1;
}

function last(marks: Mark[], pred: (m: Mark) => boolean): number {
  for (let i = marks.length - 1; i >= 0; i--) if (pred(marks[i]!)) return i;
  return -1;
}

/** The run of device events right before mark `i` (the notifiers that ran before QMP STOP). */
function burstStart(marks: Mark[], i: number): number {
  let j = i;
  while (j > 0 && marks[j - 1]!.kind === 'device') j--;
  return j;
}

function phasesOfWatch(tl: Timeline): { phases: Phase[]; stopToResume?: number; bound?: number; passes: number } {
  const src = sideMarks(tl, 'source');
  const dst = sideMarks(tl, 'destination');
  const phases: Phase[] = [];
  const setup = first(src, (m) => m.kind === 'migration' && m.status === 'setup');
  const active = first(src, (m) => m.kind === 'migration' && m.status === 'active', Math.max(0, setup));
  const stop = first(src, (m) => m.kind === 'stop', Math.max(0, setup));
  const end = first(src, (m) => m.kind === 'migration' && FINAL.has(m.status ?? ''), Math.max(0, setup));
  const passes = src.filter((m) => m.kind === 'pass').length;
  if (setup >= 0 && active >= 0) phases.push({ name: 'setup', side: 'source', start: src[setup]!.t, end: src[active]!.t });
  const stopBurst = stop >= 0 ? burstStart(src, stop) : -1;
  if (active >= 0) {
    const iterEnd = stopBurst >= 0 ? src[stopBurst]!.t : end >= 0 ? src[end]!.t : undefined;
    if (iterEnd !== undefined) phases.push({ name: 'iteration', side: 'source', start: src[active]!.t, end: iterEnd });
  }
  if (stopBurst >= 0 && end >= 0 && end > stop) phases.push({ name: 'switchover', side: 'source', start: src[stopBurst]!.t, end: src[end]!.t });
  const resume = last(dst, (m) => m.kind === 'resume');
  let lastRunning = -1;
  if (resume >= 0) {
    for (let i = resume + 1; i < dst.length && dst[i]!.kind === 'device'; i++) if (dst[i]!.state === 'running') lastRunning = i;
    phases.push({ name: 'resume', side: 'destination', start: dst[resume]!.t, end: (lastRunning >= 0 ? dst[lastRunning]! : dst[resume]!).t });
  }
  const out: { phases: Phase[]; stopToResume?: number; bound?: number; passes: number } = { phases, passes };
  if (stop >= 0 && resume >= 0 && dst[resume]!.t >= src[stop]!.t) {
    out.stopToResume = dst[resume]!.t - src[stop]!.t;
    out.bound = (lastRunning >= 0 ? dst[lastRunning]! : dst[resume]!).t - src[stopBurst]!.t;
  }
  return out;
}

function phasesOfEngine(tl: Timeline): { phases: Phase[]; bound?: number } {
  const spans = new Map<string, Phase>();
  for (const m of tl.marks) {
    if (!m.phase) continue;
    const key = `${m.side}/${m.phase}`;
    const start = m.tStart ?? m.t;
    const p = spans.get(key);
    if (!p) spans.set(key, { name: m.phase, side: m.side, start, end: Math.max(m.t, start) });
    else {
      p.start = Math.min(p.start, start);
      p.end = Math.max(p.end, m.t);
    }
  }
  const phases = [...spans.values()].sort((a, b) => a.start - b.start);
  // Device downtime: the first arc into a stopped state .. the last arc into RUNNING after it.
  // On the destination a device passes through STOP on its way from RUNNING to RESUMING,
  // while the VM still runs on the source: when the source's arcs are recorded, the bound
  // starts at the source's first stop (the vCPUs are stopped by then).
  const deviceStops = tl.marks.filter((m) => m.kind === 'device' && m.state && STOPPED.has(m.state));
  const sourceStops = deviceStops.filter((m) => m.side === 'source');
  const stops = sourceStops.length ? sourceStops : deviceStops;
  const out: { phases: Phase[]; bound?: number } = { phases };
  if (stops.length) {
    const from = Math.min(...stops.map((m) => m.tStart ?? m.t));
    const runs = tl.marks.filter((m) => m.kind === 'device' && m.state === 'running' && m.t > from);
    if (runs.length) out.bound = Math.max(...runs.map((m) => m.t)) - from;
  }
  return out;
}

function deviceReports(tl: Timeline): DeviceReport[] {
  const seqs = stateSequences(tl);
  const hosts = new Map(tl.devices.map((d) => [d.id, d.hosts]));
  return [...seqs.entries()].map(([id, s]) => {
    const h = hosts.get(id) ?? {};
    return {
      id,
      ...(h.source ? { host: h.source } : {}),
      ...(h.destination && tl.origin === 'watch' ? { destinationHost: h.destination } : {}),
      source: s.source,
      destination: s.destination,
      // A device QEMU never reported on the source is where it started there: RUNNING. On the
      // destination it has no state worth the name until it is RESUMING. The engine drives
      // different devices on each side, so there a device has no state on the other side.
      final: {
        source: s.source.at(-1) ?? (tl.origin === 'watch' ? 'running' : 'none'),
        destination: s.destination.at(-1) ?? 'none',
      },
    };
  });
}

const label = (d: DeviceReport): string => (d.host ? `${d.id} (${d.host})` : d.id);

/** The failure phase of a watched migration from the source's events before `failed`. */
function failurePhase(src: Mark[], dst: Mark[]): string {
  const failed = first(src, (m) => m.kind === 'migration' && (m.status === 'failed' || m.status === 'cancelled'));
  const upto = failed >= 0 ? src.slice(0, failed) : src;
  const statuses = upto.filter((m) => m.kind === 'migration').map((m) => m.status);
  if (upto.some((m) => m.kind === 'stop') || statuses.includes('device') || statuses.includes('pre-switchover')) return 'switchover';
  if (statuses.includes('active')) return 'iteration';
  if (statuses.includes('completed') || lastStatus(dst) === 'failed') return 'resume';
  return 'setup';
}

const PHASE_WORDS: Record<string, string> = {
  setup: 'setup (before any data moved)',
  iteration: 'iteration (the VM still running)',
  switchover: 'switchover (vCPUs stopped, device state being saved)',
  resume: 'resume (on the destination)',
};

export function analyze(tl: Timeline): Analysis {
  const violations = checkInvariants(tl);
  const devices = deviceReports(tl);
  const qemu = qemuFigures(tl);
  const notes: string[] = [];
  const src = sideMarks(tl, 'source');
  const dst = sideMarks(tl, 'destination');
  let status: string;
  let phases: Phase[];
  const events: Analysis['events'] = { passes: 0 };
  if (tl.origin === 'watch') {
    status = qemu.status ?? lastStatus(src) ?? 'unknown';
    const p = phasesOfWatch(tl);
    phases = p.phases;
    events.passes = p.passes;
    if (p.stopToResume !== undefined) events.stopToResumeMs = round(p.stopToResume);
    if (p.bound !== undefined) events.downtimeBoundMs = round(p.bound);
    for (const d of devices) if (!d.source.length && !d.destination.length) notes.push(`${label(d)}: no VFIO_MIGRATION event from this device (is migration-events=on set on it?)`);
    if (devices.length === 0) notes.push('no VFIO_MIGRATION event was seen: the devices need migration-events=on (QEMU 9.1+), or the VM has no migratable VFIO device');
    for (const side of SIDES) if (tl.closed[side]) notes.push(`the ${side}'s monitor closed: ${tl.closed[side]}`);
  } else {
    const failedArcs = tl.marks.filter((m) => m.kind === 'arc-failed');
    status = failedArcs.length ? 'failed' : 'completed';
    const p = phasesOfEngine(tl);
    phases = p.phases;
    if (p.bound !== undefined) events.downtimeBoundMs = round(p.bound);
    notes.push("the engine's timeline has no vCPU events: the vCPU rules were not checked");
  }

  let verdict: Verdict = 'ok';
  let reason: string;
  let failure: Analysis['failure'];
  if (violations.length) {
    verdict = 'violated';
    const v = violations[0]!;
    reason = `ordering rule ${v.rule} broken in the ${v.phase} phase by ${labelOf(devices, v.device)}: ${v.message}`;
  } else if (tl.origin === 'engine' && status === 'failed') {
    verdict = 'failed';
    const f = tl.marks.find((m) => m.kind === 'arc-failed')!;
    const notRunning = devices.filter((d) => d.final.source !== 'running' && d.final.destination !== 'running');
    // (after a failed engine phase every device should have been rolled back to RUNNING)
    failure = { phase: f.phase ?? 'unknown', devices: [f.device ?? 'unknown'], detail: `${f.from ?? '?'} -> ${f.state ?? '?'} failed: ${f.result}` };
    reason = `the engine's ${f.phase} phase failed on ${f.device}: arc ${f.from ?? '?'} -> ${f.state ?? '?'} returned ${f.result}`;
    if (notRunning.length) reason += `; left not running: ${notRunning.map((d) => `${d.id} (${d.final.source})`).join(', ')}`;
  } else if (tl.origin === 'watch' && status !== 'completed') {
    verdict = 'failed';
    const phase = FINAL.has(status) ? failurePhase(src, dst) : 'unknown';
    const blamed = blame(devices, qemu.errorDesc, phase);
    const parts: string[] = [];
    if (FINAL.has(status)) parts.push(`the migration ${status} in the ${PHASE_WORDS[phase] ?? phase} phase`);
    else parts.push(`the migration did not finish while watched (last status: ${status})`);
    if (blamed.length) parts.push(`device ${blamed.map((b) => b.text).join('; ')}`);
    if (qemu.errorDesc) parts.push(`QEMU: ${qemu.errorDesc}`);
    const stranded = devices.filter((d) => d.final.source !== 'running');
    if (FINAL.has(status)) {
      if (stranded.length) parts.push(`not running again on the source: ${stranded.map((d) => `${label(d)} (${d.final.source})`).join(', ')}`);
      else if (devices.length) parts.push('every device is running on the source again');
      const stopped = last(src, (m) => m.kind === 'stop');
      const resumed = last(src, (m) => m.kind === 'resume');
      if (stopped >= 0) parts.push(resumed > stopped ? 'the source VM runs again' : 'the source VM stays paused');
    }
    failure = { phase, devices: blamed.map((b) => b.id), detail: parts.join('; ') };
    reason = parts.join('; ');
  } else if (tl.origin === 'watch' && sourcePausedAtStart(tl, src)) {
    // A VM that was paused when the migration started arrives paused: QEMU does not start
    // it on the destination, so its devices stay loaded but not running until someone
    // sends `cont`. That is not a failure; a device that never got its state is.
    const unloaded = devices.filter((d) => (d.source.length || d.destination.length) && !d.destination.length);
    const resumedLater = dst.some((m) => m.kind === 'resume');
    if (unloaded.length && !resumedLater) {
      verdict = 'failed';
      failure = { phase: 'resume', devices: unloaded.map((d) => d.id), detail: 'no state on the destination' };
      reason = `the migration completed but ${unloaded.map(label).join(', ')} reported no state on the destination`;
    } else {
      reason = `the migration completed; the VM was paused before it and stays paused on the destination (devices: ${devices.map((d) => `${d.id} ${d.final.destination}`).join(', ') || 'none'})`;
      notes.push('the source VM was paused when the migration started: the destination keeps it paused (no RESUME expected)');
    }
  } else {
    // After a completed migration the source's copy is stopped for good: each device that
    // QEMU reported on must run on the destination.
    const stranded =
      tl.origin === 'watch'
        ? devices.filter((d) => (d.source.length || d.destination.length) && d.final.destination !== 'running')
        : devices.filter((d) => d.destination.length && d.final.destination !== 'running');
    const resumed = tl.origin === 'engine' || dst.some((m) => m.kind === 'resume');
    if (stranded.length) {
      verdict = 'failed';
      failure = { phase: 'resume', devices: stranded.map((d) => d.id), detail: 'no running copy' };
      reason = `the migration completed but ${stranded.map((d) => `${label(d)} ends in ${d.final.destination} on the destination and ${d.final.source} on the source`).join('; ')}: no running copy of the device`;
    } else if (!resumed) {
      verdict = 'failed';
      failure = { phase: 'resume', devices: [], detail: 'the destination VM was not resumed' };
      reason = 'the migration completed but the destination VM was not resumed while watched (no RESUME)';
    } else {
      reason = devices.length === 0 ? 'the migration completed; no VFIO device reported any state (nothing to check)' : `the migration completed; ${devices.length} device${devices.length === 1 ? '' : 's'} kept the ordering rules and run${devices.length === 1 ? 's' : ''} on the destination`;
    }
  }
  const downtimeMs = qemu.downtimeMs ?? events.downtimeBoundMs;
  return {
    origin: tl.origin,
    verdict,
    reason,
    status,
    ...(downtimeMs !== undefined ? { downtimeMs } : {}),
    devices,
    violations,
    ...(failure ? { failure } : {}),
    phases,
    events,
    qemu,
    notes,
  };
}

/** Was the source VM stopped when its migration began (so the destination stays paused)? */
function sourcePausedAtStart(tl: Timeline, src: Mark[]): boolean {
  const setup = first(src, (m) => m.kind === 'migration' && m.status === 'setup');
  const before = setup >= 0 ? src.slice(0, setup) : [];
  for (let i = before.length - 1; i >= 0; i--) {
    if (before[i]!.kind === 'stop') return true;
    if (before[i]!.kind === 'resume') return false;
  }
  const initial = tl.initialStatus.source;
  return initial !== undefined && initial !== 'running' && initial !== 'inmigrate';
}

function labelOf(devices: DeviceReport[], id: string): string {
  const d = devices.find((x) => x.id === id);
  return d ? label(d) : id;
}

/**
 * Which device a failure concerns: one QEMU's error names (by host name or id), else the
 * devices that did not reach the state the failed phase moves them to.
 */
function blame(devices: DeviceReport[], errorDesc: string | undefined, phase: string): { id: string; text: string }[] {
  if (errorDesc) {
    const named = devices.filter((d) => [d.host, d.destinationHost].some((h) => h && errorDesc.includes(hostName(h))) || new RegExp(`\\b${d.id.replace(/[^A-Za-z0-9]/g, '\\$&')}\\b`).test(errorDesc));
    if (named.length) return named.map((d) => ({ id: d.id, text: `${label(d)} named by QEMU's error (states on the source: ${d.source.join(' -> ') || 'none'})` }));
  }
  const want = phase === 'switchover' ? 'stop-copy' : phase === 'iteration' ? undefined : phase === 'resume' ? 'running' : undefined;
  if (!want) return [];
  const side: Side = phase === 'resume' ? 'destination' : 'source';
  return devices
    .filter((d) => !d[side].includes(want))
    .map((d) => {
      const before = d[side].filter((s) => STOPPED.has(s) || P2P.has(s) || RUNNING.has(s) || s === 'resuming');
      return { id: d.id, text: `${label(d)} did not reach ${want} on the ${side} (states: ${before.join(' -> ') || 'none'})` };
    });
}

/** An mdev path's last component (its UUID) or a PCI address as QEMU names the device. */
function hostName(host: string): string {
  return host.replace(/\/+$/, '').split('/').at(-1) ?? host;
}

function round(ms: number): number {
  return Math.round(ms * 1000) / 1000;
}

/** Exit code for a verdict: 0 ok, 1 failed, 5 violated. */
export function verdictExitCode(v: Verdict): number {
  return v === 'ok' ? 0 : v === 'failed' ? 1 : 5;
}
