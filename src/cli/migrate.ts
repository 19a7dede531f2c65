// vfio-mig migrate <domain> --to <libvirt-uri>: a checked, watched live migration through
// libvirt, for an operator who does not want to assemble preflight, XML rewriting, the
// downtime limit, virsh migrate and the watch by hand.
//
//  1. preflight (src/compat/preflight): every check; a failed check stops here unless
//     --force. Two failures are known traps and get an exact remedy:
//       - dirty-tracking: device dirty tracking fails on a kernel without
//         CONFIG_IOMMUFD_DRIVER (Debian's 6.12) at RAM setup. The remedy is a device
//         property of the *running* QEMU, so it cannot be set now: `vfio-mig enable-events
//         <domain> --fix` and a restart. It blocks.
//       - pinned-convergence: a pinned device without dirty tracking makes all guest RAM
//         dirty at every pass, pre-copy never ends. With --fix we set the migration
//         parameter avail-switchover-bandwidth (the link rate) through the monitor and a
//         downtime limit that holds all guest RAM, so QEMU switches over.
//     A downtime-limit failure (device state larger than the limit allows) is fixed by
//     --fix or --downtime.
//  2. the downtime limit: --downtime MS, or auto = the devices' stop-copy estimates
//     (MIG_DATA_SIZE, recorded at bind time) plus RAM where it moves in stop-copy, at the
//     link rate, x1.25 + 50 ms; never below the limit in force. Before the start the rate
//     is --link-gbps (or an assumed 10 Gbit/s); once QEMU has measured the migration's
//     throughput (libvirt's job statistics, memory_bps) the limit is recomputed with it
//     and raised if needed, through virDomainMigrateSetMaxDowntime.
//  3. the XMLs for the destination: the live one and the persistent one rewritten for the
//     destination's devices (preflight's rewriteXml: addresses, embedded descriptors), with
//     migration-events=on (destination QEMU >= 9.1) and, with --fix, the trap properties, so
//     the VM on the destination is fixed. The destination's migrate hook only ever sees the
//     live XML; the persistent one reaches it only this way (VIR_MIGRATE_PARAM_PERSIST_XML).
//  4. the watch (src/cli/watch-libvirt.ts) starts first; the migration starts once it is
//     ready (virDomainMigrateToURI3 runs on a worker, so events keep flowing).
//  5. the verdict: libvirt's result, the watch's analysis (devices, phases, ordering
//     rules), the downtime predicted and measured, the timeline and its SVG. On failure:
//     which device, which phase, what QEMU reported, and the state of the source devices
//     and domain.

import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { parseArgs, UsageError } from './args.ts';
import { DIRTY_TRACKING_FIX, editDefinition, PINNED_FIX, trapFixes, type PropertyEdit } from './enable-events.ts';
import { formatBytes, type Check, type PreflightReport } from '../compat/preflight/types.ts';
import type { PreflightDeps, PreflightResult } from '../compat/preflight/run.ts';
import type { HostFacts } from '../compat/preflight/facts.ts';
import type { Answer } from '../compat/preflight/qmp-facts.ts';
import type { Analysis } from '../report/analysis.ts';
import type { WatchRecord } from '../report/timeline.ts';
import type { WatchResult } from './watch-common.ts';
import type { LibvirtWatchOptions } from './watch-libvirt.ts';
import { atLeast, parseVersion } from '../compat/preflight/versions.ts';

export const usage = [
  'vfio-mig migrate <domain> --to <libvirt-uri> [--from URI] [--live] [--json] [--force] [--fix]',
  '                 [--downtime auto|MS] [--link-gbps N] [--timeline FILE] [--report FILE.svg]',
  '                 [--timeout S] [--bandwidth MIB] [--migrate-uri URI] [--undefine-source]',
].join('\n');

export const MIGRATE_SCHEMA = 'vfio-mig/migrate/1';

/** Exit codes (also in --help). */
export const EXIT = { OK: 0, FAILED: 1, USAGE: 2, NOT_STARTED: 3, TIMEOUT: 4, VIOLATED: 5 } as const;

const DEFAULT_TIMEOUT_S = 1800;
const DEFAULT_LINK_BYTES_PER_SEC = 10e9 / 8;
/** QEMU's default downtime-limit (ms). */
const QEMU_DEFAULT_LIMIT_MS = 300;
/** QEMU's largest downtime-limit (ms): 2000 s. */
const MAX_LIMIT_MS = 2_000_000;
const SETTLE_MS = 10_000;
const READY_TIMEOUT_MS = 60_000;
/** How long the watch may still collect events after libvirt reported a failure. */
const FAILED_GRACE_MS = 5_000;
/** How often libvirt's job statistics are read for QEMU's measured throughput. */
const REFINE_POLL_MS = 250;

const HELP = `usage: ${usage}

Migrates a running domain to another libvirt host, checked before and watched during:

  1. preflight (as vfio-mig preflight): a failed check stops the migration unless --force.
     Two traps are recognised and their remedy named:
       dirty-tracking      device dirty tracking fails on a kernel without
                           CONFIG_IOMMUFD_DRIVER (Debian 6.12): the migration would fail at
                           RAM setup. The remedy is a device property, fixed when QEMU starts:
                           run \`vfio-mig enable-events <domain> --fix\`, then shut the domain
                           down and start it. --fix cannot change a running QEMU: it blocks.
       pinned-convergence  a pinned device without dirty tracking: pre-copy never converges.
                           --fix sets avail-switchover-bandwidth (the link rate) on the running
                           QEMU and a downtime limit that holds all guest RAM.
     A failed downtime-limit check is fixed by --fix or --downtime.
  2. the downtime limit (virDomainMigrateSetMaxDowntime), with --downtime:
       MS    that many milliseconds
       auto  (device stop-copy data + RAM that moves while stopped) / link rate x 1.25
             + 50 ms, never below the limit in force. Device data: the MIG_DATA_SIZE
             recorded for each device (vfio-mig bind/probe). Link rate: --link-gbps, else
             10 Gbit/s assumed until QEMU has measured the migration's throughput (libvirt
             job statistics); then the limit is recomputed with the measured rate and
             raised if needed. The output says how the value was derived.
  3. the destination XMLs: live and persistent, each hostdev pointed at the destination
     device preflight found, migration-events=on (destination QEMU >= 9.1), and with --fix
     the trap properties (the VM is fixed on the destination).
  4. libvirt migrates (peer to peer; --persistent with the rewritten persistent XML when the
     domain is persistent) while both ends are watched (QEMU's events through libvirt).
  5. the verdict, the downtime (predicted, QEMU's figure, the events' bound), the timeline
     and the SVG. On failure: the device, the phase, QEMU's error, and the state the source
     domain and its devices were left in.

  --to URI          destination libvirt URI
  --from URI        source libvirt URI (default $LIBVIRT_DEFAULT_URI, else qemu:///system)
  --live            keep the guest running while RAM is copied (else libvirt pauses it)
  --json            one JSON object (schema ${MIGRATE_SCHEMA}) instead of text
  --force           migrate even when preflight fails
  --fix             set what the traps need where it can be set now (see above)
  --downtime V      auto, or a limit in ms (1..${MAX_LIMIT_MS})
  --link-gbps N     migration link rate for the estimates (default: 10, assumed)
  --timeline FILE   where the timeline goes (default $VFIO_MIG_STATE_DIR/migrations/<domain>-<time>.json)
  --report FILE     where the SVG goes (default: the timeline's name with .svg)
  --timeout S       abort the migration after S seconds (default ${DEFAULT_TIMEOUT_S}); the domain stays on the source
  --bandwidth MIB   cap the migration stream at MIB MiB/s (VIR_MIGRATE_PARAM_BANDWIDTH)
  --migrate-uri URI where QEMU's stream goes (VIR_MIGRATE_PARAM_URI), e.g. tcp://10.0.0.2
  --undefine-source undefine the domain on the source once it runs on the destination

Source device events: QEMU reports a device's migration states only with
migration-events=on, set when the domain started. Without it the source side of the
timeline has no device events; \`vfio-mig enable-events <domain>\` sets it for the next start.

exit codes: 0 migrated, verdict ok; 1 the migration failed (the domain stays on the source);
            2 usage; 3 not started (preflight failed, a trap, no such running domain);
            4 time limit reached, migration aborted; 5 migrated, but an ordering rule was broken
details: docs/operations.md
`;

// --- options -----------------------------------------------------------------------------

export interface MigrateOptions {
  domain: string;
  to: string;
  from: string;
  live: boolean;
  json: boolean;
  force: boolean;
  fix: boolean;
  /** undefined: leave the limit alone (unless --fix needs it). */
  downtime: 'auto' | number | undefined;
  linkBytesPerSec: number;
  linkAssumed: boolean;
  timeline: string | undefined;
  report: string | undefined;
  timeoutMs: number;
  migrateUri: string | undefined;
  /** MiB/s cap on the stream, when given. */
  bandwidthMiB: number | undefined;
  undefineSource: boolean;
}

function positive(name: string, raw: string, max: number, integer = false): number {
  const n = integer ? (/^\d+$/.test(raw) ? Number(raw) : NaN) : /^\d+(\.\d+)?$/.test(raw) ? Number(raw) : NaN;
  if (!Number.isFinite(n) || n <= 0 || n > max) throw new UsageError(`--${name} must be ${integer ? 'an integer' : 'a number'} above 0 and at most ${max}, got ${JSON.stringify(raw)}`);
  return n;
}

export function parseMigrateArgs(argv: string[], env: NodeJS.ProcessEnv = process.env): MigrateOptions | 'help' {
  const args = parseArgs(argv, {
    flags: ['help', 'live', 'json', 'force', 'fix', 'undefine-source'],
    options: ['to', 'from', 'downtime', 'link-gbps', 'timeline', 'report', 'timeout', 'migrate-uri', 'bandwidth'],
  });
  if (args.flags.has('help')) return 'help';
  const one = (name: string): string | undefined => {
    const v = args.options.get(name);
    if (v && v.length > 1) throw new UsageError(`--${name} given more than once`);
    if (v?.[0] === '') throw new UsageError(`--${name} needs a value`);
    return v?.[0];
  };
  const [domain, ...extra] = args.positional;
  if (!domain) throw new UsageError('which domain?');
  if (extra.length) throw new UsageError(`unexpected argument ${JSON.stringify(extra[0])}`);
  const to = one('to');
  if (!to) throw new UsageError('--to <libvirt-uri> is required (the destination)');
  const from = one('from') ?? env.LIBVIRT_DEFAULT_URI ?? 'qemu:///system';
  if (from === to) throw new UsageError(`--to and --from are the same URI (${to})`);
  const d = one('downtime');
  const downtime = d === undefined ? undefined : d === 'auto' ? 'auto' : positive('downtime', d, MAX_LIMIT_MS, true);
  const gbps = one('link-gbps');
  const timeout = one('timeout');
  const timeline = one('timeline');
  const report = one('report');
  if (report !== undefined && !report.endsWith('.svg')) throw new UsageError(`--report names an SVG file (FILE.svg), got ${JSON.stringify(report)}`);
  if (timeline !== undefined && report !== undefined && timeline === report) throw new UsageError('--timeline and --report name the same file');
  const migrateUri = one('migrate-uri');
  const bw = one('bandwidth');
  if (migrateUri !== undefined && !/^[a-z][a-z0-9+.-]*:\/\/\S+$/i.test(migrateUri)) throw new UsageError(`--migrate-uri must be a URI like tcp://HOST[:PORT], got ${JSON.stringify(migrateUri)}`);
  return {
    domain,
    to,
    from,
    live: args.flags.has('live'),
    json: args.flags.has('json'),
    force: args.flags.has('force'),
    fix: args.flags.has('fix'),
    downtime,
    linkBytesPerSec: gbps === undefined ? DEFAULT_LINK_BYTES_PER_SEC : (positive('link-gbps', gbps, 10000) * 1e9) / 8,
    linkAssumed: gbps === undefined,
    timeline,
    report,
    timeoutMs: (timeout === undefined ? DEFAULT_TIMEOUT_S : positive('timeout', timeout, 7 * 86400)) * 1000,
    migrateUri,
    bandwidthMiB: bw === undefined ? undefined : positive('bandwidth', bw, 1 << 30, true),
    undefineSource: args.flags.has('undefine-source'),
  };
}

// --- downtime ----------------------------------------------------------------------------

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

const rateText = (bps: number): string => (bps >= 1e9 ? `${(bps / 1e9).toFixed(2)} GB/s` : `${(bps / 1e6).toFixed(1)} MB/s`);

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

// --- traps and the preflight verdict -----------------------------------------------------

export interface TrapPlan {
  /** Failed checks nothing here can fix: the migration stops on them unless --force. */
  blocking: Check[];
  /** Set avail-switchover-bandwidth (bytes/s) on the running source QEMU. */
  availSwitchoverBandwidth: number | undefined;
  /** All guest RAM counts against the limit (pinned device under avail-switchover-bandwidth). */
  ramInLimit: boolean;
  /** The limit must be derived (as --downtime auto) because a check asks for it. */
  needsLimit: boolean;
  /** What to set, for the operator (without --fix: what --fix would do). */
  remedies: string[];
}

/** Decides, from the preflight report, what stops the migration and what --fix/--downtime resolve. */
export function planTraps(report: PreflightReport, o: Pick<MigrateOptions, 'fix' | 'downtime' | 'linkBytesPerSec' | 'domain'>, downtimeNeededMs?: number): TrapPlan {
  const failed = report.checks.filter((c) => c.verdict === 'fail');
  const plan: TrapPlan = { blocking: [], availSwitchoverBandwidth: undefined, ramInLimit: false, needsLimit: false, remedies: [] };
  const pinned = failed.some((c) => c.id === 'pinned-convergence');
  const bw = Math.round(o.linkBytesPerSec);
  // An avail-switchover-bandwidth already in force: QEMU fits all of RAM into the limit too.
  if (report.checks.some((c) => c.id === 'pinned-convergence' && c.verdict === 'pass' && /avail-switchover-bandwidth/.test(c.detail))) plan.ramInLimit = true;
  for (const c of failed) {
    switch (c.id) {
      case 'dirty-tracking':
        plan.blocking.push(c);
        plan.remedies.push(`${c.subject}: needs ${DIRTY_TRACKING_FIX.map((p) => `${p.name}=${p.value}`).join(' and ')}, a device property of the running QEMU: run "vfio-mig enable-events ${o.domain} --fix", shut ${o.domain} down and start it, then migrate`);
        break;
      case 'pinned-convergence':
        if (o.fix) {
          plan.availSwitchoverBandwidth = bw;
          plan.ramInLimit = true;
          plan.needsLimit = true;
          plan.remedies.push(`pinned devices: avail-switchover-bandwidth=${bw} B/s set on the running QEMU and a downtime limit that holds all guest RAM (--fix); for the next start: vfio-mig enable-events ${o.domain} --fix (${PINNED_FIX.name}=off)`);
        } else {
          plan.blocking.push(c);
          plan.remedies.push(`pinned devices without dirty tracking: set avail-switchover-bandwidth (${bw} B/s) and a downtime limit holding all guest RAM (--fix does both), or "vfio-mig enable-events ${o.domain} --fix" (${PINNED_FIX.name}=off) and a restart`);
        }
        break;
      case 'downtime-prediction':
        // "No switchover" follows from the pinned trap and goes with its fix; otherwise it blocks.
        if (!(pinned && o.fix)) plan.blocking.push(c);
        break;
      case 'downtime-limit': {
        const covered = o.downtime === 'auto' || o.fix || (typeof o.downtime === 'number' && downtimeNeededMs !== undefined && o.downtime >= downtimeNeededMs);
        if (covered) {
          plan.needsLimit = true;
        } else {
          plan.blocking.push(c);
          plan.remedies.push(`the devices' state does not fit the downtime limit: --downtime auto (or --fix) raises it${downtimeNeededMs !== undefined ? ` to at least ${downtimeNeededMs} ms` : ''}`);
        }
        break;
      }
      default:
        plan.blocking.push(c);
    }
  }
  return plan;
}

// --- the verdict -------------------------------------------------------------------------

export type MigrateVerdict = 'ok' | 'failed' | 'violated' | 'timeout' | 'not-started';

export interface Outcome {
  /** libvirt reported the migration done. */
  migrated: boolean;
  /** libvirt's error when it did not. */
  libvirtError?: string;
  /** The migration was aborted by us. */
  aborted?: 'timeout' | 'interrupted';
  watch?: WatchResult;
  /** Why there is no watch result. */
  watchError?: string;
  /** The domain's state on each host afterwards (undefined: not there). */
  sourceState?: string;
  destinationState?: string;
}

export function verdictOf(o: Outcome): { verdict: MigrateVerdict; exitCode: number } {
  if (!o.migrated) {
    if (o.aborted === 'timeout') return { verdict: 'timeout', exitCode: EXIT.TIMEOUT };
    return { verdict: 'failed', exitCode: EXIT.FAILED };
  }
  if (o.watch?.analysis.verdict === 'violated') return { verdict: 'violated', exitCode: EXIT.VIOLATED };
  return { verdict: 'ok', exitCode: EXIT.OK };
}

const ms = (v: number | undefined): string => (v === undefined ? '-' : `${Math.round(v * 10) / 10} ms`);

/** The lines after the watch's summary: what failed and where things were left, the downtime, the files. */
export function outcomeLines(o: Outcome, ctx: { domain: string; hostdevs?: number; predicted?: PreflightReport['downtime']; limitMs?: number; timeline?: string; report?: string }): string[] {
  const { verdict } = verdictOf(o);
  const a: Analysis | undefined = o.watch?.analysis;
  const lines: string[] = [];
  if (verdict === 'ok' || verdict === 'violated') {
    lines.push(`verdict: ${verdict} - ${ctx.domain} runs on the destination${o.destinationState ? ` (${o.destinationState})` : ''}${verdict === 'violated' && a ? `; ${a.reason}` : ''}`);
    if (a && a.verdict === 'failed') lines.push(`note: libvirt reports the migration done but the watch saw a failure (${a.reason}); check the timeline`);
  } else {
    const why = o.aborted === 'timeout' ? 'the time limit was reached and the migration aborted' : o.aborted === 'interrupted' ? 'interrupted; the migration aborted' : 'the migration failed';
    lines.push(`verdict: ${verdict} - ${why}; ${ctx.domain} ${o.sourceState ? `is ${o.sourceState} on the source` : 'is not on the source any more'}${o.destinationState ? `, and ${o.destinationState} on the destination` : ''}`);
    if (o.libvirtError) lines.push(`libvirt: ${o.libvirtError}`);
    // No phase, no RAM sent, no device moved: QEMU had not begun (libvirt or the destination refused first, or the abort came first).
    const neverBegan = a !== undefined && a.phases.length === 0 && !((a.qemu.ramTransferred ?? 0) > 0) && !a.devices.some((d) => d.source.length > 1);
    if (neverBegan) lines.push('QEMU had not started migrating: nothing on the source was touched');
    else if (a?.failure) lines.push(`failed in phase ${a.failure.phase}${a.failure.devices.length ? `, device ${a.failure.devices.join(', ')}` : ''}: ${a.failure.detail}`);
    if (a?.qemu.errorDesc) lines.push(`QEMU reported: ${a.qemu.errorDesc}`);
    if (ctx.hostdevs === 0) lines.push('source devices: none (the domain has no VFIO hostdevs)');
    else if (a && a.devices.length) lines.push(`source devices left in: ${a.devices.map((d) => `${d.id} ${d.final.source}`).join(', ')}`);
    else if (a) lines.push('source devices left in: unknown (no VFIO_MIGRATION events; migration-events is off on the source)');
    else lines.push('source devices left in: unknown (not watched)');
  }
  const d = ctx.predicted;
  lines.push('downtime:');
  if (d) lines.push(`  predicted:        ~${d.totalMs} ms (devices ${d.deviceMs} ms + RAM ${d.ramMs} ms; ${formatBytes(d.deviceBytes)} of device state at ${rateText(d.linkBytesPerSec)})`);
  if (ctx.limitMs !== undefined) lines.push(`  limit:            ${ctx.limitMs} ms`);
  lines.push(`  QEMU's figure:    ${ms(a?.qemu.downtimeMs)}`);
  lines.push(`  STOP -> RESUME:   ${ms(a?.events.stopToResumeMs)}`);
  lines.push(`  events bound:     ${ms(a?.events.downtimeBoundMs)}`);
  if (o.watchError) lines.push(`watch: ${o.watchError}`);
  if (ctx.timeline) lines.push(`timeline: ${ctx.timeline}`);
  if (ctx.report) lines.push(`report: ${ctx.report}`);
  return lines;
}

// --- dependencies (the seams tests replace) ------------------------------------------------

export interface MigrateDeps {
  preflight: PreflightDeps;
  /** Watches the migration through libvirt; undefined when this build has no libvirt watch. */
  watch: ((opts: LibvirtWatchOptions) => Promise<WatchResult>) | undefined;
}

let depsOverride: MigrateDeps | undefined;

/** Tests: replace preflight's host/peer access and the watch. */
export function setMigrateDeps(deps: MigrateDeps | undefined): void {
  depsOverride = deps;
}

/** The real dependencies (tests wrap them to replace one part). */
export async function defaultMigrateDeps(timeoutMs: number): Promise<MigrateDeps> {
  const { compatPort } = await import('../compat/preflight/compat-port.ts');
  const { collectHostFacts } = await import('../compat/preflight/collect.ts');
  const { destinationFacts } = await import('../compat/preflight/peer.ts');
  const compat = await compatPort();
  return {
    preflight: {
      compat,
      localFacts: (queries, uri, role) => collectHostFacts({ compat, queries, ...(uri ? { libvirtUri: uri } : {}), ...(role === 'source' ? { groupInUse: () => null } : {}) }),
      destinationFacts: (req) => destinationFacts({ timeoutMs, ...req }),
    },
    watch: await loadWatch(),
  };
}

/** The libvirt watch (src/cli/watch-libvirt.ts). */
async function loadWatch(): Promise<MigrateDeps['watch']> {
  const { watchLibvirt } = await import('./watch-libvirt.ts');
  return watchLibvirt;
}

// --- the command -------------------------------------------------------------------------

function answer<T>(f: () => T): Answer<T> {
  try {
    return { ok: true, value: f() };
  } catch (err) {
    return { ok: false, error: err instanceof Error ? err.message : String(err) };
  }
}

function defaultTimelinePath(domain: string): string {
  const dir = process.env.VFIO_MIG_STATE_DIR || '/var/lib/vfio-mig';
  const stamp = new Date().toISOString().replace(/[:.]/g, '-');
  return join(dir, 'migrations', `${domain.replace(/[^A-Za-z0-9_.-]/g, '_')}-${stamp}.json`);
}

interface JsonResult {
  schema: typeof MIGRATE_SCHEMA;
  domain: string;
  from: string;
  to: string;
  verdict: MigrateVerdict;
  exitCode: number;
  started: boolean;
  preflight?: PreflightReport;
  blocking?: Array<{ id: string; subject: string; detail: string; advice: string }>;
  remedies: string[];
  actions: string[];
  /** derivation: before the start; measured: the decision once QEMU measured the throughput. */
  downtime?: { limitMs?: number; derivation?: string; measured?: { bytesPerSec: number; derivation: string }; predicted?: PreflightReport['downtime'] };
  libvirtError?: string;
  sourceState?: string;
  destinationState?: string;
  analysis?: Analysis;
  timeline?: string;
  report?: string;
  notes: string[];
}

export async function run(argv: string[], out: NodeJS.WritableStream, err: NodeJS.WritableStream): Promise<number> {
  const parsed = parseMigrateArgs(argv);
  if (parsed === 'help') {
    out.write(HELP);
    return EXIT.OK;
  }
  const o = parsed;
  const deps = depsOverride ?? (await defaultMigrateDeps(Math.min(120_000, o.timeoutMs)));
  const text: string[] = [];
  const say = (line: string): void => {
    if (o.json) return;
    text.push(line);
    out.write(`${line}\n`);
  };
  const result: JsonResult = { schema: MIGRATE_SCHEMA, domain: o.domain, from: o.from, to: o.to, verdict: 'not-started', exitCode: EXIT.NOT_STARTED, started: false, remedies: [], actions: [], notes: [] };
  const finish = (verdict: MigrateVerdict, code: number): number => {
    result.verdict = verdict;
    result.exitCode = code;
    if (o.json) out.write(`${JSON.stringify(result, null, 2)}\n`);
    return code;
  };
  const stop = (why: string): number => {
    err.write(`vfio-mig migrate: ${why}\n`);
    result.notes.push(why);
    return finish('not-started', EXIT.NOT_STARTED);
  };

  const { Connection, ListDomainsFlag, MigrateFlag } = await import('../libvirt/binding.ts');
  type Conn = import('../libvirt/binding.ts').Connection;
  let src: Conn;
  try {
    src = Connection.open(o.from);
  } catch (e) {
    return stop(`cannot reach the source's libvirt at ${o.from}: ${(e as Error).message}`);
  }
  let dom: Dom | undefined;
  let destToClose: Conn | undefined;
  try {
    try {
      dom = src.lookupDomain(o.domain);
    } catch (e) {
      return stop(`${o.domain}: ${(e as Error).message} (virsh -c ${o.from} list --all)`);
    }
    const state = dom.state().state;
    if (state !== 'running' && state !== 'paused') return stop(`${o.domain} is ${state}: migrate moves a running domain (start it, or use virsh migrate --offline)`);
    say(`migrate ${o.domain}: ${o.from} -> ${o.to}`);

    // 1. preflight, recording the source's facts for the trap fixes.
    let sourceFacts: HostFacts | undefined;
    const pfDeps: PreflightDeps = {
      ...deps.preflight,
      localFacts: async (q, uri, role) => {
        const f = await deps.preflight.localFacts(q, uri, role);
        if (role === 'source') sourceFacts = f;
        return f;
      },
    };
    const destConn = answer(() => Connection.open(o.to));
    if (destConn.ok) destToClose = destConn.value;
    let destQemu: string | undefined;
    const destination = {
      uri: o.to,
      libvirt: destConn.ok ? answer(() => destConn.value.libVersion()) : destConn,
      qemu: destConn.ok ? answer(() => destConn.value.hypervisorVersion()) : destConn,
    };
    if (destination.qemu.ok) destQemu = destination.qemu.value;
    const pfRun = await import('../compat/preflight/run.ts');
    let pf: PreflightResult;
    try {
      pf = await pfRun.preflightDomain(
        {
          name: o.domain,
          xml: dom.xml(),
          running: true,
          qmp: dom,
          sourceLibvirt: answer(() => src.libVersion()),
          destination,
          options: { postcopy: false, parallel: false, linkBytesPerSec: o.linkBytesPerSec, linkAssumed: o.linkAssumed },
        },
        pfDeps,
      );
    } catch (e) {
      if (destConn.ok) destConn.value.close();
      return stop(`preflight could not run: ${(e as Error).message}`);
    }
    result.preflight = pf.report;
    const counts = (['fail', 'warn', 'pass'] as const).map((v) => `${pf.report.checks.filter((c) => c.verdict === v).length} ${v}`).join(', ');
    say(`preflight: ${pf.report.verdict.toUpperCase()} (${counts})`);
    for (const c of pf.report.checks.filter((x) => x.verdict !== 'pass')) say(`  ${c.verdict.toUpperCase()} ${c.id} ${c.subject}: ${c.detail}\n       -> ${c.advice}`);

    // The limit in force and what the devices need at the link rate.
    const limitNow = await currentLimit(dom, pf.report.downtime?.limitMs);
    const memoryBytes = pf.view.memoryBytes ?? 0;
    const autoInput = (ramInLimit: boolean, rate: number, rateSource: DowntimeAutoInput['rateSource'], current: number): DowntimeAutoInput => ({
      deviceBytes: pf.report.downtime?.deviceBytes ?? 0,
      unknownDevices: pf.report.downtime?.unknownDevices ?? [],
      ramBytes: ramInLimit ? memoryBytes : 0,
      rateBytesPerSec: rate,
      rateSource,
      currentLimitMs: current,
    });
    const rateSource: DowntimeAutoInput['rateSource'] = o.linkAssumed ? 'assumed' : 'given';
    const neededNoRam = downtimeAuto(autoInput(false, o.linkBytesPerSec, rateSource, 0)).limitMs;
    const plan = planTraps(pf.report, o, neededNoRam);
    result.remedies = plan.remedies;
    result.blocking = plan.blocking.map((c) => ({ id: c.id, subject: c.subject, detail: c.detail, advice: c.advice }));
    for (const r of plan.remedies) say(`remedy: ${r}`);
    if (plan.blocking.length > 0) {
      if (!o.force) {
        if (destConn.ok) destConn.value.close();
        say(`not started: ${plan.blocking.length} failed check${plan.blocking.length > 1 ? 's' : ''} (${plan.blocking.map((c) => `${c.id} ${c.subject}`).join('; ')}); fix ${plan.blocking.length > 1 ? 'them' : 'it'}${plan.remedies.length && !o.fix ? ' (or --fix where it says so)' : ''}, or --force`);
        return finish('not-started', EXIT.NOT_STARTED);
      }
      say(`--force: migrating despite ${plan.blocking.length} failed check(s)`);
      result.notes.push(`forced past: ${plan.blocking.map((c) => c.id).join(', ')}`);
    }

    // Source device events: set when QEMU started; say what is missing.
    const noEvents = pf.view.hostdevs.filter((h) => h.properties.get('migration-events')?.toLowerCase() !== 'on' && h.properties.get('migration-events')?.toLowerCase() !== 'true');
    if (noEvents.length) {
      const n = `source devices without migration-events (${noEvents.map((h) => h.label).join(', ')}): their states are not in the timeline; "vfio-mig enable-events ${o.domain}" sets it for the next start`;
      say(`note: ${n}`);
      result.notes.push(n);
    }

    // 2. runtime settings on the source QEMU.
    if (plan.availSwitchoverBandwidth !== undefined) {
      try {
        await dom.execute('migrate-set-parameters', { 'avail-switchover-bandwidth': plan.availSwitchoverBandwidth });
        const a = `avail-switchover-bandwidth=${plan.availSwitchoverBandwidth} B/s set on the running QEMU (pinned devices: QEMU switches over at this rate)`;
        say(`set: ${a}`);
        result.actions.push(a);
      } catch (e) {
        if (destConn.ok) destConn.value.close();
        return stop(`cannot set avail-switchover-bandwidth on ${o.domain}: ${(e as Error).message}`);
      }
    }
    let limitMs = limitNow;
    let autoLimit = o.downtime === 'auto' || (plan.needsLimit && typeof o.downtime !== 'number');
    if (typeof o.downtime === 'number' || autoLimit) {
      let decision: DowntimeDecision;
      if (typeof o.downtime === 'number') {
        decision = { limitMs: o.downtime, change: o.downtime !== limitNow, derivation: `--downtime ${o.downtime}` };
        autoLimit = false;
      } else {
        decision = downtimeAuto(autoInput(plan.ramInLimit, o.linkBytesPerSec, rateSource, limitNow));
      }
      result.downtime = { limitMs: decision.limitMs, derivation: decision.derivation };
      if (decision.change) {
        try {
          setMaxDowntime(dom, decision.limitMs);
        } catch (e) {
          if (destConn.ok) destConn.value.close();
          return stop(`cannot set the downtime limit of ${o.domain}: ${(e as Error).message}`);
        }
        result.actions.push(`downtime limit ${decision.limitMs} ms`);
      }
      limitMs = decision.limitMs;
      say(`downtime limit: ${decision.limitMs} ms (${decision.derivation})`);
    }
    result.downtime = { ...result.downtime, limitMs, predicted: pf.report.downtime };

    // 3. the destination XMLs.
    const fixes = o.fix && sourceFacts ? trapFixes(dom.xml(), sourceFacts.kernelConfig.iommufdDriver, sourceFacts.devices) : new Map<number, PropertyEdit[]>();
    const events = pf.view.hostdevs.length > 0 && destQemu !== undefined && qemuHasEvents(destQemu);
    const live = await pfRun.rewriteXml(dom.xml({ migratable: true, secure: true }), pf, deps.preflight.compat);
    const liveEdit = editDefinition(live.xml, { events, fixes, addUserAliases: false });
    for (const n of live.notes) say(`destination XML: ${n}`);
    for (const c of liveEdit.changes) say(`destination XML: ${c}`);
    if (pf.view.hostdevs.length > 0 && !events) say(`note: the destination's QEMU (${destQemu ?? 'version unknown'}) has no migration-events (9.1+): no destination device events`);
    const persistent = isPersistent(src, o.domain, ListDomainsFlag.PERSISTENT);
    let persistXml: string | undefined;
    if (persistent) {
      const inactive = dom.xml({ inactive: true, migratable: true, secure: true });
      const p = await pfRun.rewriteXml(inactive, pf, deps.preflight.compat);
      // The persistent definition's hostdevs are the same, in the same order: the same fixes by index.
      persistXml = editDefinition(p.xml, { events, fixes, addUserAliases: true }).xml;
    }
    const flags = MigrateFlag.PEER2PEER | (o.live ? MigrateFlag.LIVE : 0) | (persistent ? MigrateFlag.PERSIST_DEST : 0) | (o.undefineSource ? MigrateFlag.UNDEFINE_SOURCE : 0);

    // 4. watch, then migrate.
    const timelinePath = o.timeline ?? defaultTimelinePath(o.domain);
    const reportPath = o.report ?? timelinePath.replace(/\.json$/, '') + '.svg';
    const outcome: Outcome = { migrated: false };
    const ac = new AbortController();
    let ready: () => void = () => {};
    const readyP = new Promise<void>((r) => (ready = r));
    let watchP: Promise<WatchResult> | undefined;
    if (deps.watch) {
      watchP = deps.watch({ domain: o.domain, sourceUri: o.from, destUri: o.to, timeoutMs: o.timeoutMs + SETTLE_MS, settleMs: SETTLE_MS, signal: ac.signal, onReady: () => ready() });
      watchP.catch(() => ready());
      const t = setTimeout(() => ready(), READY_TIMEOUT_MS);
      await readyP;
      clearTimeout(t);
    } else {
      outcome.watchError = 'this build has no libvirt watch: the verdict is libvirt\'s alone, no timeline';
    }
    say(`migrating${o.live ? ' (live)' : ''}${persistent ? ', persistent on the destination' : ''}...`);
    result.started = true;
    const started = Date.now();
    let timer: NodeJS.Timeout | undefined;
    const abort = (why: 'timeout' | 'interrupted'): void => {
      if (outcome.aborted) return;
      outcome.aborted = why;
      try {
        abortJob(dom!);
      } catch (e) {
        result.notes.push(`abort: ${(e as Error).message}`);
      }
    };
    const onSigint = (): void => abort('interrupted');
    process.once('SIGINT', onSigint);
    const migrateP = dom.migrateToUri3(o.to, { destXml: liveEdit.xml, ...(persistXml ? { persistXml } : {}), ...(o.migrateUri ? { uri: o.migrateUri } : {}), ...(o.bandwidthMiB !== undefined ? { bandwidth: o.bandwidthMiB } : {}) }, flags);
    timer = setTimeout(() => abort('timeout'), o.timeoutMs);
    // With --downtime auto: once QEMU has measured the throughput, recompute with it.
    const refine = autoLimit
      ? refineLimit(dom, (rate) => downtimeAuto(autoInput(plan.ramInLimit, rate, 'measured', limitMs)), (d, rate) => {
          limitMs = d.limitMs;
          result.downtime = { ...result.downtime, limitMs, measured: { bytesPerSec: rate, derivation: d.derivation } };
          if (d.change) result.actions.push(`downtime limit ${d.limitMs} ms (measured rate)`);
          say(`downtime limit: ${d.limitMs} ms (${d.derivation})`);
        })
      : undefined;
    try {
      await migrateP;
      outcome.migrated = true;
    } catch (e) {
      outcome.libvirtError = (e as Error).message;
    } finally {
      clearTimeout(timer);
      timer = undefined;
      process.off('SIGINT', onSigint);
      refine?.stop();
    }
    if (refine) await refine.done;
    say(`libvirt: ${outcome.migrated ? 'migration done' : `migration failed: ${outcome.libvirtError}`} after ${((Date.now() - started) / 1000).toFixed(1)} s`);
    if (watchP) {
      // The watch ends by itself once the closing events are in; a migration refused before
      // it began gives it none, so it is stopped after a grace period (shorter after a failure).
      const grace = setTimeout(() => ac.abort(), outcome.migrated ? SETTLE_MS + 5000 : FAILED_GRACE_MS);
      try {
        outcome.watch = await watchP;
      } catch (e) {
        outcome.watchError = `the watch failed: ${(e as Error).message}`;
      } finally {
        clearTimeout(grace);
      }
    }
    ac.abort();
    outcome.sourceState = domainState(src, o.domain);
    outcome.destinationState = destConn.ok ? domainState(destConn.value, o.domain) : undefined;
    if (destConn.ok) destConn.value.close();

    // 5. files and the verdict.
    let timeline: string | undefined;
    let svg: string | undefined;
    if (outcome.watch) {
      try {
        mkdirSync(dirname(timelinePath), { recursive: true });
        writeFileSync(timelinePath, `${JSON.stringify(outcome.watch.record, null, 1)}\n`);
        timeline = timelinePath;
        svg = await writeSvg(outcome.watch.record, outcome.watch.analysis, reportPath);
      } catch (e) {
        result.notes.push(`cannot write the timeline or report: ${(e as Error).message}`);
        err.write(`vfio-mig migrate: cannot write the timeline or report: ${(e as Error).message}\n`);
      }
    }
    const v = verdictOf(outcome);
    result.libvirtError = outcome.libvirtError;
    result.sourceState = outcome.sourceState;
    result.destinationState = outcome.destinationState;
    result.analysis = outcome.watch?.analysis;
    result.timeline = timeline;
    result.report = svg;
    if (outcome.watchError) result.notes.push(outcome.watchError);
    if (!o.json) {
      if (outcome.watch) {
        const { formatSummary } = await import('../report/summary.ts');
        out.write(`\n${formatSummary(outcome.watch.analysis)}\n`);
      }
      for (const l of outcomeLines(outcome, { domain: o.domain, hostdevs: pf.view.hostdevs.length, predicted: pf.report.downtime, limitMs, timeline, report: svg })) say(l);
    }
    return finish(v.verdict, v.exitCode);
  } finally {
    destToClose?.close();
    dom?.dispose();
    src.close();
  }
}

function qemuHasEvents(version: string): boolean {
  const v = parseVersion(version);
  return v !== undefined && atLeast(v, 9, 1);
}

/** The downtime-limit in force: preflight's reading, else QEMU's parameters, else QEMU's default. */
async function currentLimit(dom: import('../libvirt/binding.ts').Domain, fromPreflight: number | undefined): Promise<number> {
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

type Dom = import('../libvirt/binding.ts').Domain;

function setMaxDowntime(dom: Dom, ms: number): void {
  dom.migrateSetMaxDowntime(ms);
}

function abortJob(dom: Dom): void {
  dom.abortJob();
}

/**
 * Polls libvirt's job statistics while the migration runs; once QEMU reports a measured
 * throughput, recomputes the limit with it, raises it if needed, and reports the decision
 * (once).
 */
function refineLimit(dom: Dom, decide: (rate: number) => DowntimeDecision, decided: (d: DowntimeDecision, rate: number) => void): { stop(): void; done: Promise<void> } {
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

function isPersistent(conn: import('../libvirt/binding.ts').Connection, name: string, flag: number): boolean {
  const list = conn.listDomains(flag);
  try {
    return list.some((d) => d.name === name);
  } finally {
    for (const d of list) d.dispose();
  }
}

function domainState(conn: import('../libvirt/binding.ts').Connection, name: string): string | undefined {
  try {
    const d = conn.lookupDomain(name);
    try {
      return d.state().state;
    } finally {
      d.dispose();
    }
  } catch {
    return undefined;
  }
}

async function writeSvg(record: WatchRecord, analysis: Analysis, path: string): Promise<string> {
  const { parseTimeline } = await import('../report/timeline.ts');
  const { renderSvg } = await import('../report/svg.ts');
  mkdirSync(dirname(path), { recursive: true });
  writeFileSync(path, renderSvg(parseTimeline(JSON.parse(JSON.stringify(record))), analysis));
  return path;
}
