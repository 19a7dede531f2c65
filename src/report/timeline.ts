// The timeline of one migration, in one shape for both ways vfio-mig sees a migration:
//  - `vfio-mig watch` records QEMU's own QMP events (MIGRATION, MIGRATION_PASS, STOP,
//    RESUME, VFIO_MIGRATION) from both ends, with QEMU's timestamps, plus QEMU's figures
//    from query-migrate (a WatchRecord, the JSON `watch --timeline FILE` writes);
//  - the engine's coordinator times every arc it makes itself (Coordinator.toJSON():
//    `{ devices, timeline: TimelineEntry[] }`).
// parseTimeline() turns either into a Timeline: per side, the points the ordering rules
// and the report need, in the order that matters for the rules.
//
// Order, not clocks. Within one QEMU the events reach the monitor in the order QEMU sent
// them (one monitor, one queue), so the receive order of one side is the order things
// happened there; that is what the invariants use. QEMU stamps an event when it sends it,
// not when the state changed (QEMU pauses the vCPUs, runs every device's state handler,
// and only then sends STOP), so timestamps are used only for durations, and the report
// says which instant each duration is bounded by. Comparing timestamps across the two
// sides assumes both hosts share a clock (true for two QEMUs on one host, approximately
// true with NTP).

/** JSON format marker of a watch record. */
export const TIMELINE_FORMAT = 'vfio-mig/timeline';
export const TIMELINE_VERSION = 1;

export type Side = 'source' | 'destination';
export const SIDES: readonly Side[] = ['source', 'destination'];

/** One QMP event as recorded: QEMU's envelope plus our receive order and time. */
export interface RecordedEvent {
  event: string;
  data: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
  /** Receive order on this side, 1, 2, ... */
  seq: number;
  /** Our clock (ms since the epoch) when the event was read; informative only. */
  received?: number;
}

/** A VFIO device as QEMU's QOM tree names it (best effort at the start of a watch). */
export interface RecordedDevice {
  id: string;
  qomPath?: string;
  /** Host side: the PCI address (`host`) or the mdev path (`sysfsdev`). */
  host?: string;
}

export interface SideRecord {
  /** Where the events came from: a QMP socket path, or `libvirt:<uri>/<domain>`. */
  endpoint: string;
  /** query-status at the start (`running`, `inmigrate`, `paused`, ...). */
  initialStatus?: string;
  devices?: RecordedDevice[];
  events: RecordedEvent[];
  /** The last query-migrate answer (QEMU's own figures). */
  migrate?: Record<string, unknown>;
  /** Number of query-migrate polls made. */
  polls?: number;
  /** Why the connection ended early (e.g. the destination QEMU exited after a failed load). */
  closed?: string;
  /**
   * libvirt form only: libvirt's own job statistics as libvirt named them (the finished
   * job's, else the last running one's), kept for bug reports; `migrate` holds the same
   * figures in query-migrate's names.
   */
  libvirtJob?: Record<string, unknown>;
}

/** What `vfio-mig watch --timeline FILE` writes. */
export interface WatchRecord {
  format: typeof TIMELINE_FORMAT;
  version: typeof TIMELINE_VERSION;
  origin: 'watch';
  /** ISO time the watch started. */
  started: string;
  source: SideRecord;
  destination: SideRecord;
  /** Why the watch stopped: `settled`, `timeout`, ... */
  ended?: string;
}

/** The engine's shape (src/migration/coordinator.ts, Coordinator.toJSON()). */
export interface EngineEntry {
  device: string;
  op: 'set' | 'reset' | 'get' | string;
  from?: string;
  to?: string;
  phase: string;
  start: number;
  end: number;
  result: string;
}
export interface EngineRecord {
  devices: string[];
  timeline: EngineEntry[];
}

export type MarkKind = 'device' | 'stop' | 'resume' | 'migration' | 'pass' | 'arc-failed' | 'reset';

/** One point on one side of the timeline. */
export interface Mark {
  side: Side;
  /** Position within its side: the order the ordering rules use. */
  order: number;
  /** ms since the timeline's origin (the earliest point of either side). */
  t: number;
  kind: MarkKind;
  /** The event name for watch marks (`VFIO_MIGRATION`, `STOP`, ...); `arc` for engine arcs. */
  event: string;
  device?: string;
  /** Device state reached, in QEMU's spelling (`running-p2p`). */
  state?: string;
  /** Engine arcs: the state the arc left, and when it was issued (ms, same origin). */
  from?: string;
  tStart?: number;
  /** Engine arcs: `ok`, or the errno / error text of a failed arc. */
  result?: string;
  /** Engine arcs: the coordinator's phase name. */
  phase?: string;
  /** MIGRATION: the status; MIGRATION_PASS: the pass number. */
  status?: string;
  pass?: number;
}

/** A device of the timeline: QEMU's id (the same on both sides) and its host device per side. */
export interface TimelineDevice {
  id: string;
  hosts: Partial<Record<Side, string>>;
}

export interface Timeline {
  origin: 'watch' | 'engine';
  /** Every mark, both sides, sorted by side then order. */
  marks: Mark[];
  /** Device ids in first-seen order, with the host-side name per side where known. */
  devices: TimelineDevice[];
  /** Whether vCPU stop and resume (QMP STOP/RESUME) were recorded: the engine has none. */
  vcpusRecorded: boolean;
  /** query-migrate's final answer per side (watch only). */
  qemu: Partial<Record<Side, Record<string, unknown>>>;
  initialStatus: Partial<Record<Side, string>>;
  closed: Partial<Record<Side, string>>;
  /** Epoch ms of t = 0 (watch only). */
  originEpochMs?: number;
}

export class TimelineError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'TimelineError';
  }
}

/** The engine's upper-case state names ("RUNNING_P2P") in QEMU's spelling ("running-p2p"). */
export function qemuStateName(name: string): string {
  return name.trim().toLowerCase().replace(/_/g, '-');
}

const SOURCE_PHASES = new Set(['pre-copy', 'quiesce', 'stop-copy', 'finish']);
const DEST_PHASES = new Set(['resuming', 'load', 'commit', 'resume-p2p', 'resume']);

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function epochMs(ts: { seconds: number; microseconds: number }): number {
  return ts.seconds * 1000 + ts.microseconds / 1000;
}

function validTimestamp(ts: unknown): ts is { seconds: number; microseconds: number } {
  return isObject(ts) && Number.isFinite(ts.seconds) && Number.isFinite(ts.microseconds) && (ts.seconds as number) >= 0;
}

/** Accepts a watch record or the engine's `{ devices, timeline }` (parsed JSON). */
export function parseTimeline(json: unknown): Timeline {
  if (!isObject(json)) throw new TimelineError('a timeline is a JSON object');
  if (json.format === TIMELINE_FORMAT) return fromWatch(json);
  if (Array.isArray(json.timeline)) return fromEngine(json);
  throw new TimelineError(`not a timeline: expected {"format": "${TIMELINE_FORMAT}", ...} (vfio-mig watch --timeline) or {"devices", "timeline": [...]} (the engine's)`);
}

function fromWatch(json: Record<string, unknown>): Timeline {
  if (json.version !== TIMELINE_VERSION) throw new TimelineError(`timeline version ${String(json.version)} is not supported (this vfio-mig reads version ${TIMELINE_VERSION})`);
  const sides: Partial<Record<Side, SideRecord>> = {};
  for (const side of SIDES) {
    const s = json[side];
    if (!isObject(s)) throw new TimelineError(`timeline: "${side}" is missing`);
    if (!Array.isArray(s.events)) throw new TimelineError(`timeline: ${side}.events is not a list`);
    sides[side] = s as unknown as SideRecord;
  }
  let origin = Infinity;
  for (const side of SIDES) {
    for (const ev of sides[side]!.events) if (isObject(ev) && validTimestamp(ev.timestamp)) origin = Math.min(origin, epochMs(ev.timestamp));
  }
  if (!Number.isFinite(origin)) origin = 0;
  const marks: Mark[] = [];
  const devices = new Map<string, TimelineDevice>();
  const device = (id: string): TimelineDevice => {
    let d = devices.get(id);
    if (!d) devices.set(id, (d = { id, hosts: {} }));
    return d;
  };
  const tl: Timeline = { origin: 'watch', marks, devices: [], vcpusRecorded: true, qemu: {}, initialStatus: {}, closed: {}, originEpochMs: origin };
  for (const side of SIDES) {
    const rec = sides[side]!;
    for (const d of rec.devices ?? []) {
      if (!isObject(d) || typeof d.id !== 'string') continue;
      const td = device(d.id);
      if (typeof d.host === 'string') td.hosts[side] = d.host;
    }
    if (isObject(rec.migrate)) tl.qemu[side] = rec.migrate;
    if (typeof rec.initialStatus === 'string') tl.initialStatus[side] = rec.initialStatus;
    if (typeof rec.closed === 'string') tl.closed[side] = rec.closed;
    // Receive order is the truth within a side; sort by seq in case the file was edited.
    const events = rec.events.filter((e) => isObject(e) && typeof e.event === 'string').slice().sort((a, b) => (a.seq ?? 0) - (b.seq ?? 0));
    let order = 0;
    let lastT = 0;
    for (const ev of events) {
      const data = isObject(ev.data) ? ev.data : {};
      // An event without a usable clock keeps its place and borrows its predecessor's time.
      const t = validTimestamp(ev.timestamp) ? epochMs(ev.timestamp) - origin : lastT;
      lastT = t;
      const base = { side, order: ++order, t, event: ev.event };
      switch (ev.event) {
        case 'VFIO_MIGRATION': {
          const id = data['device-id'];
          const state = data['device-state'];
          if (typeof id !== 'string' || typeof state !== 'string') continue;
          device(id);
          marks.push({ ...base, kind: 'device', device: id, state });
          break;
        }
        case 'STOP':
          marks.push({ ...base, kind: 'stop' });
          break;
        case 'RESUME':
          marks.push({ ...base, kind: 'resume' });
          break;
        case 'MIGRATION':
          if (typeof data.status === 'string') marks.push({ ...base, kind: 'migration', status: data.status });
          break;
        case 'MIGRATION_PASS':
          if (typeof data.pass === 'number') marks.push({ ...base, kind: 'pass', pass: data.pass });
          break;
        default:
          order--; // other events are not part of the timeline
      }
    }
  }
  tl.devices = [...devices.values()];
  return tl;
}

function fromEngine(json: Record<string, unknown>): Timeline {
  const entries = (json.timeline as unknown[]).filter(isObject) as unknown as EngineEntry[];
  for (const e of entries) {
    if (typeof e.device !== 'string' || !Number.isFinite(e.start) || !Number.isFinite(e.end)) throw new TimelineError('engine timeline: every entry needs device, start and end');
  }
  // A coordinator drives one side; a trial migration drives both with different devices.
  // A device's side is the side of the first phase that names one.
  const sideOf = new Map<string, Side>();
  for (const e of [...entries].sort((a, b) => a.start - b.start)) {
    if (sideOf.has(e.device)) continue;
    if (SOURCE_PHASES.has(e.phase)) sideOf.set(e.device, 'source');
    else if (DEST_PHASES.has(e.phase)) sideOf.set(e.device, 'destination');
  }
  const names = Array.isArray(json.devices) ? (json.devices as unknown[]).filter((d): d is string => typeof d === 'string') : [];
  const devices = new Map<string, TimelineDevice>();
  for (const n of [...names, ...entries.map((e) => e.device)]) if (!devices.has(n)) devices.set(n, { id: n, hosts: { [sideOf.get(n) ?? 'source']: n } });
  // The point an arc stands for in the ordering rules: an arc *into* a stopped state counts
  // from when it was issued (the device may stop any time after), every other arc from when
  // it returned (only then is the device known to be there).
  const marks: Mark[] = entries.map((e) => {
    const side = sideOf.get(e.device) ?? 'source';
    const to = e.to === undefined ? undefined : qemuStateName(e.to);
    const ok = e.result === 'ok';
    const kind: MarkKind = !ok ? 'arc-failed' : e.op === 'reset' ? 'reset' : 'device';
    const at = kind === 'device' && to !== undefined && STOPPED.has(to) ? e.start : e.end;
    return {
      side,
      order: 0,
      t: at,
      tStart: e.start,
      kind,
      event: e.op === 'reset' ? 'reset' : 'arc',
      device: e.device,
      // A reset device is RUNNING (the kernel's reset state).
      ...(e.op === 'reset' ? { state: 'running' } : to !== undefined && e.op === 'set' ? { state: to } : {}),
      ...(e.from !== undefined ? { from: qemuStateName(e.from) } : {}),
      result: e.result,
      phase: e.phase,
    };
  });
  // A 'get' re-reads the state; it is not a transition.
  const kept = marks.filter((m, i) => entries[i]!.op !== 'get');
  const sorted: Mark[] = [];
  for (const side of SIDES) {
    const mine = kept.filter((m) => m.side === side).sort((a, b) => a.t - b.t);
    mine.forEach((m, i) => (m.order = i + 1));
    sorted.push(...mine);
  }
  return { origin: 'engine', marks: sorted, devices: [...devices.values()], vcpusRecorded: false, qemu: {}, initialStatus: {}, closed: {} };
}

/** States in which the device no longer runs (the source's downtime states). */
export const STOPPED = new Set(['stop', 'stop-copy']);
/** States in which a device is quiesced but not stopped: the P2P states. */
export const P2P = new Set(['running-p2p', 'pre-copy-p2p']);
/** States in which the device runs freely (the guest can drive it and it can DMA). */
export const RUNNING = new Set(['running', 'pre-copy']);

/** The marks of one side, in order. */
export function sideMarks(tl: Timeline, side: Side): Mark[] {
  return tl.marks.filter((m) => m.side === side).sort((a, b) => a.order - b.order);
}

/** Each device's sequence of states reached on each side (failed arcs excluded). */
export function stateSequences(tl: Timeline): Map<string, Record<Side, string[]>> {
  const out = new Map<string, Record<Side, string[]>>();
  for (const d of tl.devices) out.set(d.id, { source: [], destination: [] });
  for (const side of SIDES) {
    for (const m of sideMarks(tl, side)) {
      if ((m.kind !== 'device' && m.kind !== 'reset') || !m.device || !m.state) continue;
      let seq = out.get(m.device);
      if (!seq) out.set(m.device, (seq = { source: [], destination: [] }));
      seq[side].push(m.state);
    }
  }
  return out;
}
