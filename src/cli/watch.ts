// vfio-mig watch --source-qmp PATH --dest-qmp PATH [--json] [--timeout S] [--settle S]
//                [--timeline FILE]
//
// The companion to a QEMU-driven migration: QEMU (>= 8.2) owns the device fds and drives
// the VFIO state machine; vfio-mig watches. It records QEMU's own events from both ends
// (MIGRATION, MIGRATION_PASS, STOP, RESUME, VFIO_MIGRATION, with QEMU's timestamps) into
// one timeline, polls query-migrate for QEMU's figures (downtime, setup time, VFIO bytes),
// and at the end checks the ordering rules for every device (src/report/invariants.ts) and
// prints a verdict: ok, violated or failed, naming the device and the phase.
//
// Start it before the migration: events QEMU sent before the watch connected are lost.
// It waits for a migration to start on the source (one already running is picked up), then
// for its final status, then up to --settle seconds for the closing events (the source's
// devices reaching STOP in cleanup, the destination's RESUME and RUNNING; after a failure,
// the source's devices back to RUNNING).
//
// QEMU serves one client per QMP socket: give each QEMU a second -qmp socket for the
// watch. The libvirt form (--source-domain, through libvirt's monitor events) is not built
// yet and says so.

import { writeFileSync } from 'node:fs';
import { parseArgs, UsageError, type ParsedArgs } from './args.ts';
import { EXIT, timeoutOption, transportFailure } from './qmp.ts';
import { QmpClient } from '../qmp/client.ts';
import type { QmpEvent } from '../qmp/events.ts';
import { parseTimeline, TIMELINE_FORMAT, TIMELINE_VERSION, type RecordedDevice, type RecordedEvent, type Side, type SideRecord, type WatchRecord } from '../report/timeline.ts';
import { analyze, verdictExitCode, type Analysis } from '../report/analysis.ts';
import { formatSummary } from '../report/summary.ts';

export const usage =
  'vfio-mig watch --source-qmp PATH --dest-qmp PATH [--json] [--timeout S] [--settle S] [--timeline FILE]';

const DEFAULT_TIMEOUT_S = 600;
const DEFAULT_SETTLE_S = 10;
const CONNECT_TIMEOUT_MS = 10_000;
const COMMAND_TIMEOUT_MS = 5_000;
const POLL_MS = 50;
const RECORDED = new Set(['MIGRATION', 'MIGRATION_PASS', 'STOP', 'RESUME', 'VFIO_MIGRATION']);
const FINAL = new Set(['completed', 'failed', 'cancelled']);

/** Exit code when the ordering rules were broken (0 ok, 1 failed, 2 usage, 3 transport, 4 time limit). */
export const EXIT_VIOLATED = 5;

const HELP = [
  `usage: ${usage}`,
  '',
  'Watches a QEMU-driven migration from both ends and checks it: every device in a P2P state',
  'before any stops (vCPUs already stopped) on the source, every device RUNNING_P2P before',
  'any runs on the destination; prints the phases, the downtime and a verdict.',
  'Start it before the migration. Each QEMU needs a QMP socket of its own for the watch.',
  '',
  '  --source-qmp PATH  the source QEMU\'s QMP unix socket',
  '  --dest-qmp PATH    the destination QEMU\'s QMP unix socket',
  '  --json             print one JSON object (verdict, status, downtimeMs, devices, ...)',
  `  --timeout S        give up after S seconds (default ${DEFAULT_TIMEOUT_S})`,
  `  --settle S         after the final status, wait up to S s for the closing events (default ${DEFAULT_SETTLE_S})`,
  '  --timeline FILE    write the recorded timeline (JSON) for `vfio-mig report`',
  '',
  'libvirt domains (--source-domain NAME --source-uri URI --dest-uri URI): not yet.',
  '',
  'exit codes: 0 ok; 1 the migration failed or a device ends up running nowhere;',
  '            2 usage; 3 transport (no socket, not QMP); 4 time limit; 5 ordering rule broken',
  '',
].join('\n');

function one(args: ParsedArgs, name: string): string | undefined {
  const v = args.options.get(name);
  if (!v) return undefined;
  if (v.length > 1) throw new UsageError(`--${name} given more than once`);
  return v[0];
}

function socketPath(args: ParsedArgs, name: string): string {
  const path = one(args, name);
  if (path === undefined) throw new UsageError(`--${name} PATH is required`);
  if (path === '' || path.includes('\0')) throw new UsageError(`--${name} needs a path`);
  if (Buffer.byteLength(path) > 107) throw new UsageError(`--${name} path is longer than 107 bytes (the unix socket limit): ${path}`);
  return path;
}

/** One end of the watch: a QMP connection and what was recorded from it. */
class End {
  readonly record: SideRecord;
  private lastStatus: string | undefined;
  private unsubscribe: (() => void) | undefined;
  alive = true;

  constructor(
    readonly side: Side,
    readonly client: QmpClient,
    path: string,
  ) {
    this.record = { endpoint: path, events: [] };
  }

  /** Records the backlog and every later event; call once, right after connecting. */
  listen(): void {
    const take = (ev: QmpEvent): void => {
      if (!RECORDED.has(ev.event)) return;
      const rec: RecordedEvent = { event: ev.event, data: ev.data, timestamp: ev.timestamp, seq: ev.seq, received: Date.now() };
      this.record.events.push(rec);
    };
    for (const ev of this.client.recentEvents()) take(ev);
    this.unsubscribe = this.client.onEvent(take);
    void this.client.done.then((reason) => {
      this.alive = false;
      if (reason) this.record.closed = reason.message.replace(/\s*\n\s*/g, ' ');
    });
  }

  async exec(command: string, args?: Record<string, unknown>): Promise<unknown> {
    return this.client.execute(command, args, { timeoutMs: COMMAND_TIMEOUT_MS });
  }

  /** query-migrate; remembers the answer as the side's latest figures. */
  async poll(): Promise<string | undefined> {
    if (!this.alive) return this.lastStatus;
    try {
      const info = (await this.exec('query-migrate')) as Record<string, unknown>;
      this.record.polls = (this.record.polls ?? 0) + 1;
      if (info && typeof info === 'object') {
        // An empty answer ({}): no migration since start. Keep the last real one.
        if (typeof info.status === 'string') {
          this.record.migrate = info;
          this.lastStatus = info.status;
        }
      }
    } catch {
      // The connection may just have closed (the destination exits after a failed load).
    }
    return this.lastStatus;
  }

  /** query-status, the VFIO devices of the QOM tree, and the `events` migration capability. */
  async survey(notes: string[]): Promise<void> {
    try {
      const st = (await this.exec('query-status')) as { status?: unknown };
      if (typeof st?.status === 'string') this.record.initialStatus = st.status;
    } catch {
      /* older or odd QEMU: the vCPU rule then relies on STOP/RESUME only */
    }
    this.record.devices = await this.vfioDevices(notes);
    try {
      const caps = (await this.exec('query-migrate-capabilities')) as Array<{ capability: string; state: boolean }>;
      const ev = Array.isArray(caps) ? caps.find((c) => c.capability === 'events') : undefined;
      if (ev && !ev.state) {
        try {
          await this.exec('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
          notes.push(`turned on the 'events' migration capability on the ${this.side} (MIGRATION events)`);
        } catch (e) {
          notes.push(`the ${this.side} has the 'events' migration capability off and refused to turn it on (${(e as Error).message}): phases come from query-migrate only`);
        }
      }
    } catch {
      /* not fatal */
    }
  }

  private async vfioDevices(notes: string[]): Promise<RecordedDevice[]> {
    const out: RecordedDevice[] = [];
    let list: Array<{ name?: unknown; type?: unknown }>;
    try {
      list = (await this.exec('qom-list', { path: '/machine/peripheral' })) as typeof list;
    } catch {
      return out;
    }
    for (const item of Array.isArray(list) ? list : []) {
      if (typeof item.name !== 'string' || item.type !== 'child<vfio-pci>') continue;
      const qomPath = `/machine/peripheral/${item.name}`;
      const dev: RecordedDevice = { id: item.name, qomPath };
      for (const prop of ['sysfsdev', 'host']) {
        try {
          const v = await this.exec('qom-get', { path: qomPath, property: prop });
          if (typeof v === 'string' && v !== '' && !dev.host) dev.host = v;
        } catch {
          /* property absent in this QEMU */
        }
      }
      try {
        if ((await this.exec('qom-get', { path: qomPath, property: 'migration-events' })) === false) {
          notes.push(`${item.name} on the ${this.side} has migration-events=off: QEMU sends no VFIO_MIGRATION events for it`);
        }
      } catch {
        notes.push(`${item.name} on the ${this.side}: QEMU has no migration-events property (QEMU < 9.1): no VFIO_MIGRATION events`);
      }
      out.push(dev);
    }
    return out;
  }

  async close(): Promise<void> {
    this.unsubscribe?.();
    await this.client.close();
  }
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export interface WatchResult {
  record: WatchRecord;
  analysis: Analysis;
  notes: string[];
  timedOut: boolean;
}

/** Is every closing event in? (see the header comment) */
function settled(src: End, dst: End, status: string): boolean {
  const devStates = (end: End): Map<string, string> => {
    const m = new Map<string, string>();
    for (const ev of end.record.events) {
      if (ev.event === 'VFIO_MIGRATION' && typeof ev.data['device-id'] === 'string' && typeof ev.data['device-state'] === 'string') m.set(ev.data['device-id'], ev.data['device-state']);
    }
    return m;
  };
  const lastRunstate = (end: End): string | undefined => end.record.events.filter((e) => e.event === 'STOP' || e.event === 'RESUME').at(-1)?.event;
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

/** Watches one migration between two QMP sockets; resolves with the record and its analysis. */
export async function watchQmp(opts: { sourcePath: string; destPath: string; timeoutMs: number; settleMs: number; signal?: AbortSignal; onReady?: () => void }): Promise<WatchResult> {
  const started = Date.now();
  const deadline = started + opts.timeoutMs;
  const notes: string[] = [];
  const connect = (path: string): Promise<QmpClient> =>
    QmpClient.connect({ path }, { connectTimeoutMs: Math.max(1, Math.min(CONNECT_TIMEOUT_MS, opts.timeoutMs)), commandTimeoutMs: COMMAND_TIMEOUT_MS, eventBacklog: 1024 });
  const [sc, dc] = await Promise.allSettled([connect(opts.sourcePath), connect(opts.destPath)]);
  if (sc.status === 'rejected' || dc.status === 'rejected') {
    if (sc.status === 'fulfilled') await sc.value.close();
    if (dc.status === 'fulfilled') await dc.value.close();
    const which = sc.status === 'rejected' ? 'source' : 'destination';
    const err = (sc.status === 'rejected' ? sc.reason : (dc as PromiseRejectedResult).reason) as unknown;
    throw Object.assign(new Error(`${which}: ${err instanceof Error ? err.message : String(err)}`), { name: err instanceof Error ? err.name : 'Error' });
  }
  const src = new End('source', sc.value, opts.sourcePath);
  const dst = new End('destination', dc.value, opts.destPath);
  src.listen();
  dst.listen();
  let timedOut = false;
  let ended = 'settled';
  try {
    await Promise.all([src.survey(notes), dst.survey(notes)]);
    // A migration that is already over belongs to the past: wait for a new one.
    const initial = await src.poll();
    let armed = initial !== undefined && initial !== 'none' && !FINAL.has(initial);
    const seqAtStart = src.record.events.at(-1)?.seq ?? 0;
    if (!armed && initial !== undefined && FINAL.has(initial)) delete src.record.migrate;
    opts.onReady?.();
    let status: string | undefined;
    let settleUntil: number | undefined;
    for (;;) {
      if (opts.signal?.aborted) {
        ended = 'interrupted';
        break;
      }
      if (Date.now() >= deadline) {
        timedOut = true;
        ended = 'timeout';
        break;
      }
      const [s] = await Promise.all([src.poll(), dst.poll()]);
      if (!armed) {
        const startedEv = src.record.events.some((e) => e.seq > seqAtStart && e.event === 'MIGRATION' && e.data.status === 'setup');
        if (startedEv || (s !== undefined && s !== 'none' && !FINAL.has(s))) armed = true;
        else if (s !== undefined && FINAL.has(s) && s !== initial) armed = true; // started and ended between two polls
      }
      if (armed && s !== undefined && FINAL.has(s)) {
        status = s;
        settleUntil ??= Math.min(deadline, Date.now() + opts.settleMs);
        if (settled(src, dst, s)) break;
        if (Date.now() >= settleUntil) {
          ended = 'settle-limit';
          break;
        }
      }
      if (!src.alive && !armed) {
        ended = 'source-closed';
        break;
      }
      if (!src.alive && status === undefined) {
        ended = 'source-closed';
        break;
      }
      await sleep(POLL_MS);
    }
    // QEMU's final figures (the loop may have ended before the last poll caught them).
    await Promise.all([src.poll(), dst.poll()]);
    if (status === undefined && !timedOut) notes.push('the migration did not reach a final status');
  } finally {
    await Promise.all([src.close(), dst.close()]);
  }
  const record: WatchRecord = {
    format: TIMELINE_FORMAT,
    version: TIMELINE_VERSION,
    origin: 'watch',
    started: new Date(started).toISOString(),
    source: src.record,
    destination: dst.record,
    ended,
  };
  const analysis = analyze(parseTimeline(JSON.parse(JSON.stringify(record))));
  analysis.notes.unshift(...notes);
  if (timedOut) analysis.notes.push(`the watch reached its time limit (${Math.round(opts.timeoutMs / 1000)} s)`);
  return { record, analysis, notes, timedOut };
}

export async function run(argv: string[], out: NodeJS.WritableStream, err: NodeJS.WritableStream = process.stderr): Promise<number> {
  const args = parseArgs(argv, {
    flags: ['help', 'json'],
    options: ['source-qmp', 'dest-qmp', 'timeout', 'settle', 'timeline', 'source-domain', 'source-uri', 'dest-uri'],
  });
  if (args.flags.has('help')) {
    out.write(HELP);
    return EXIT.OK;
  }
  if (args.positional.length) throw new UsageError(`unexpected argument ${JSON.stringify(args.positional[0])}`);
  if (args.options.has('source-domain') || args.options.has('source-uri') || args.options.has('dest-uri')) {
    err.write('vfio-mig watch: watching libvirt domains (--source-domain/--source-uri/--dest-uri) is not implemented yet; give each QEMU a QMP socket of its own and use --source-qmp/--dest-qmp\n');
    return EXIT.USAGE;
  }
  const sourcePath = socketPath(args, 'source-qmp');
  const destPath = socketPath(args, 'dest-qmp');
  if (sourcePath === destPath) throw new UsageError('--source-qmp and --dest-qmp name the same socket');
  const timeoutMs = timeoutOption(args, DEFAULT_TIMEOUT_S * 1000)!;
  const settleRaw = one(args, 'settle');
  const settleS = settleRaw === undefined ? DEFAULT_SETTLE_S : /^\d+(\.\d+)?$/.test(settleRaw) ? Number(settleRaw) : NaN;
  if (!(settleS >= 0 && settleS <= 3600)) throw new UsageError(`--settle must be a number of seconds from 0 to 3600, got ${JSON.stringify(settleRaw)}`);
  const timelineFile = one(args, 'timeline');
  if (timelineFile === '') throw new UsageError('--timeline needs a file name');

  const ac = new AbortController();
  const onSignal = (): void => ac.abort();
  process.once('SIGINT', onSignal);
  let result: WatchResult;
  try {
    // One line once both ends are connected and surveyed: a script can start the migration then.
    const onReady = (): void => void err.write(`vfio-mig watch: watching ${sourcePath} -> ${destPath}\n`);
    result = await watchQmp({ sourcePath, destPath, timeoutMs, settleMs: Math.round(settleS * 1000), signal: ac.signal, onReady });
  } catch (e) {
    const f = transportFailure(e);
    err.write(`vfio-mig watch: ${f.message}\n`);
    return f.code;
  } finally {
    process.off('SIGINT', onSignal);
  }
  if (timelineFile !== undefined) {
    try {
      writeFileSync(timelineFile, `${JSON.stringify(result.record, null, 1)}\n`);
    } catch (e) {
      err.write(`vfio-mig watch: cannot write the timeline to ${timelineFile}: ${(e as Error).message}\n`);
    }
  }
  const a = result.analysis;
  out.write(args.flags.has('json') ? `${JSON.stringify(a)}\n` : formatSummary(a));
  if (result.timedOut && a.verdict !== 'violated') return EXIT.TIMEOUT;
  return verdictExitCode(a.verdict);
}
