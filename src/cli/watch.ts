// vfio-mig watch --source-qmp PATH --dest-qmp PATH [--json] [--timeout S] [--settle S]
//                [--timeline FILE]
// vfio-mig watch --source-domain NAME --source-uri URI --dest-uri URI [same options]
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
// watch. For a libvirt domain the libvirt form (watch-libvirt.ts) needs no socket: it
// reads QEMU's events through libvirt's monitor events and QEMU's figures through
// libvirt's job statistics.

import { writeFileSync } from 'node:fs';
import { parseArgs, UsageError, type ParsedArgs } from './args.ts';
import { EXIT, timeoutOption, transportFailure } from './qmp.ts';
import { QmpClient } from '../qmp/client.ts';
import type { QmpEvent } from '../qmp/events.ts';
import type { RecordedDevice, RecordedEvent, Side, SideRecord } from '../report/timeline.ts';
import { verdictExitCode } from '../report/analysis.ts';
import { DEFAULT_SETTLE_S, DEFAULT_TIMEOUT_S, FINAL, finishWatch, loopEnd, RECORDED, settled, sleep, type WatchResult } from './watch-common.ts';

export type { WatchResult } from './watch-common.ts';
import { formatSummary, printable } from '../report/summary.ts';
import { LibvirtError } from '../libvirt/errors.ts';
import { LibvirtWatchError, watchLibvirt } from './watch-libvirt.ts';

export const usage =
  'vfio-mig watch (--source-qmp PATH --dest-qmp PATH | --source-domain NAME --source-uri URI --dest-uri URI) [--json] [--timeout S] [--settle S] [--timeline FILE]';

const CONNECT_TIMEOUT_MS = 10_000;
const COMMAND_TIMEOUT_MS = 5_000;
const POLL_MS = 50;

/** Exit code when the ordering rules were broken (0 ok, 1 failed, 2 usage, 3 transport, 4 time limit). */
export const EXIT_VIOLATED = 5;

const HELP = [
  `usage: ${usage}`,
  '',
  'Watches a QEMU-driven migration from both ends and checks it: every device in a P2P state',
  'before any stops (vCPUs already stopped) on the source, every device RUNNING_P2P before',
  'any runs on the destination; prints the phases, the downtime and a verdict.',
  'Start it before the migration and wait for its "watching" line on stderr.',
  '',
  'QEMU processes you run yourself: each QEMU needs a QMP socket of its own for the watch.',
  '  --source-qmp PATH    the source QEMU\'s QMP unix socket',
  '  --dest-qmp PATH      the destination QEMU\'s QMP unix socket',
  '',
  'libvirt domains: QEMU\'s events through libvirt\'s monitor events, QEMU\'s figures',
  'through libvirt\'s job statistics; nothing is added to or changed in the domain.',
  '  --source-domain NAME the domain\'s name on the source host',
  '  --source-uri URI     libvirt on the source host (e.g. qemu:///system)',
  '  --dest-uri URI       libvirt on the destination host (e.g. qemu+ssh://dst/system)',
  '',
  '  --json               print one JSON object (verdict, status, downtimeMs, devices, ...)',
  `  --timeout S          give up after S seconds (default ${DEFAULT_TIMEOUT_S})`,
  `  --settle S           after the final status, wait up to S s for the closing events (default ${DEFAULT_SETTLE_S})`,
  '  --timeline FILE      write the recorded timeline (JSON) for `vfio-mig report`',
  '',
  'exit codes: 0 ok; 1 the migration failed or a device ends up running nowhere;',
  '            2 usage; 3 transport (no socket, not QMP; libvirt unreachable, no such',
  '            domain, domain not running); 4 time limit; 5 ordering rule broken',
  '',
].join('\n');

function one(args: ParsedArgs, name: string): string | undefined {
  const v = args.options.get(name);
  if (!v) return undefined;
  if (v.length > 1) throw new UsageError(`--${name} given more than once`);
  return v[0];
}

/**
 * --source-domain: a libvirt domain name. libvirt itself refuses '/' in names; control
 * characters are refused here too (they would end up on a terminal and in file names).
 */
function domainName(args: ParsedArgs): string {
  const name = one(args, 'source-domain');
  if (name === undefined) throw new UsageError('--source-domain NAME is required with --source-uri/--dest-uri');
  if (name === '') throw new UsageError('--source-domain needs a domain name');
  if (Buffer.byteLength(name) > 255) throw new UsageError('--source-domain: a domain name is at most 255 bytes');
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f/]/.test(name)) throw new UsageError(`--source-domain: not a domain name (control character or '/'): ${JSON.stringify(name)}`);
  return name;
}

/** --source-uri / --dest-uri: a libvirt URI (driver[+transport]://[host][/path][?query]). */
function libvirtUri(args: ParsedArgs, name: string): string {
  const uri = one(args, name);
  if (uri === undefined) throw new UsageError(`--${name} URI is required with --source-domain (e.g. qemu:///system, qemu+ssh://host/system)`);
  if (uri.length > 4096) throw new UsageError(`--${name}: longer than 4096 characters`);
  // eslint-disable-next-line no-control-regex
  if (!/^[A-Za-z][A-Za-z0-9+.-]*:\/\/[^\s\u0000-\u001f\u007f]*$/.test(uri)) throw new UsageError(`--${name}: not a libvirt URI (like qemu:///system or qemu+ssh://host/system): ${JSON.stringify(uri)}`);
  return uri;
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
      const stop = loopEnd(opts.signal, deadline);
      if (stop) {
        ended = stop;
        timedOut = stop === 'timeout';
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
  return finishWatch({ started, source: src.record, destination: dst.record, ended, notes, timedOut, timeoutMs: opts.timeoutMs });
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
  const libvirtForm = args.options.has('source-domain') || args.options.has('source-uri') || args.options.has('dest-uri');
  if (libvirtForm && (args.options.has('source-qmp') || args.options.has('dest-qmp'))) {
    throw new UsageError('give either the QMP sockets (--source-qmp/--dest-qmp) or the libvirt domain (--source-domain/--source-uri/--dest-uri), not both');
  }
  let target: { kind: 'qmp'; sourcePath: string; destPath: string } | { kind: 'libvirt'; domain: string; sourceUri: string; destUri: string };
  if (libvirtForm) {
    const domain = domainName(args);
    const sourceUri = libvirtUri(args, 'source-uri');
    const destUri = libvirtUri(args, 'dest-uri');
    if (sourceUri === destUri) throw new UsageError('--source-uri and --dest-uri name the same libvirt: a migration needs two hosts');
    target = { kind: 'libvirt', domain, sourceUri, destUri };
  } else {
    const sourcePath = socketPath(args, 'source-qmp');
    const destPath = socketPath(args, 'dest-qmp');
    if (sourcePath === destPath) throw new UsageError('--source-qmp and --dest-qmp name the same socket');
    target = { kind: 'qmp', sourcePath, destPath };
  }
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
    const settleMs = Math.round(settleS * 1000);
    if (target.kind === 'qmp') {
      const { sourcePath, destPath } = target;
      const onReady = (): void => void err.write(`vfio-mig watch: watching ${sourcePath} -> ${destPath}\n`);
      result = await watchQmp({ sourcePath, destPath, timeoutMs, settleMs, signal: ac.signal, onReady });
    } else {
      const { domain, sourceUri, destUri } = target;
      const onReady = (): void => void err.write(`vfio-mig watch: watching domain ${printable(domain)}: ${printable(sourceUri)} -> ${printable(destUri)}\n`);
      result = await watchLibvirt({ domain, sourceUri, destUri, timeoutMs, settleMs, signal: ac.signal, onReady });
    }
  } catch (e) {
    if (target.kind === 'libvirt') {
      // Cannot start: libvirt unreachable, no such domain, not running - like a missing socket.
      if (e instanceof LibvirtWatchError || e instanceof LibvirtError) {
        err.write(`vfio-mig watch: ${printable(e.message)}\n`);
        return EXIT.TRANSPORT;
      }
      throw e;
    }
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
