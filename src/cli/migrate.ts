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
//     With --switchover-ack (migrate-switchover.ts) the migration starts only when both ends
//     run libvirt >= 11.3 (it negotiates return-path + switchover-ack itself for a migration
//     that is not tunnelled) and QEMU >= 8.1 with the capability; while it runs, the source
//     QEMU's capabilities are read once its migration has begun and the result recorded.
//  5. the verdict: libvirt's result, the watch's analysis (devices, phases, ordering
//     rules), the downtime predicted and measured, the timeline and its SVG. On failure:
//     which device, which phase, what QEMU reported, and the state of the source devices
//     and domain.
//
// The parts, one module each: migrate-preflight.ts (step 1: preflight, the traps and their
// remedies, what stops the migration), migrate-downtime.ts (step 2: the limit's derivation
// and its refinement from the measured throughput), migrate-output.ts (step 5: the verdict,
// the text after the summary, the JSON, the files), migrate-switchover.ts (--switchover-ack:
// the gate and the observation). This module: the arguments, --help,
// the seams tests replace, and the command that runs the steps in order.

import { parseArgs, UsageError } from './args.ts';
import { editDefinition, trapFixes, type PropertyEdit } from './enable-events.ts';
import { answer, defaultPreflightDeps } from './preflight.ts';
import { autoInputs, currentLimit, downtimeAuto, limitBeforeStart, MAX_LIMIT_MS, refineLimit, type DowntimeAutoInput } from './migrate-downtime.ts';
import { notStartedLine, planTraps, preflightLines, preflightRunning, type MigratePreflight } from './migrate-preflight.ts';
import { defaultTimelinePath, EXIT, MIGRATE_SCHEMA, outcomeLines, verdictOf, writeTimelineFiles, type MigrateJson, type MigrateVerdict, type Outcome } from './migrate-output.ts';
import type { PreflightDeps } from '../compat/preflight/run.ts';
import type { WatchResult } from './watch-common.ts';
import type { LibvirtWatchOptions } from './watch-libvirt.ts';
import { atLeast, parseVersion } from '../compat/preflight/versions.ts';
import { observeSwitchoverAck, switchoverAckLines, switchoverAckRefusalLine, switchoverAckRefusals, type SwitchoverAckReport } from './migrate-switchover.ts';

// What tests and other modules import from the command's module.
export { downtimeAuto, MAX_LIMIT_MS, type DowntimeAutoInput, type DowntimeDecision } from './migrate-downtime.ts';
export { planTraps, type TrapPlan } from './migrate-preflight.ts';
export { EXIT, MIGRATE_SCHEMA, outcomeLines, verdictOf, type MigrateJson, type MigrateVerdict, type Outcome } from './migrate-output.ts';

export const usage = [
  'vfio-mig migrate <domain> --to <libvirt-uri> [--from URI] [--live] [--json] [--force] [--fix]',
  '                 [--downtime auto|MS] [--link-gbps N] [--timeline FILE] [--report FILE.svg]',
  '                 [--timeout S] [--bandwidth MIB] [--migrate-uri URI] [--undefine-source]',
  '                 [--switchover-ack]',
].join('\n');


const DEFAULT_TIMEOUT_S = 1800;
const DEFAULT_LINK_BYTES_PER_SEC = 10e9 / 8;
const SETTLE_MS = 10_000;
const READY_TIMEOUT_MS = 60_000;
/** How long the watch may still collect events after libvirt reported a failure. */
const FAILED_GRACE_MS = 5_000;

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
  --switchover-ack  require QEMU's switchover-ack (the source does not stop the VM before
                    the destination has loaded the devices' initial pre-copy data). Not a
                    setting: libvirt 11.3+ turns it on (with return-path) on both QEMUs for
                    every migration that is not tunnelled. The flag makes it a requirement:
                    not started (exit 3, --force does not lift it) unless libvirt >= 11.3 on
                    both ends, QEMU >= 8.1 on both ends and the source QEMU knows the
                    capability; once QEMU's migration has begun (setup or active) the source QEMU's
                    capabilities are read through libvirt's QMP pass-through
                    (query-migrate-capabilities; libvirt marks the domain tainted
                    "custom-monitor", as preflight's queries already do) and the result is
                    printed (JSON: switchoverAck). Seen off or not verifiable: a WARNING line;
                    the verdict and exit code stay the migration's (docs/performance.md)

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
  /** Require switchover-ack: gate before the start, verify during the migration. */
  switchoverAck: boolean;
}

function positive(name: string, raw: string, max: number, integer = false): number {
  const n = integer ? (/^\d+$/.test(raw) ? Number(raw) : NaN) : /^\d+(\.\d+)?$/.test(raw) ? Number(raw) : NaN;
  if (!Number.isFinite(n) || n <= 0 || n > max) throw new UsageError(`--${name} must be ${integer ? 'an integer' : 'a number'} above 0 and at most ${max}, got ${JSON.stringify(raw)}`);
  return n;
}

export function parseMigrateArgs(argv: string[], env: NodeJS.ProcessEnv = process.env): MigrateOptions | 'help' {
  const args = parseArgs(argv, {
    flags: ['help', 'live', 'json', 'force', 'fix', 'undefine-source', 'switchover-ack'],
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
    switchoverAck: args.flags.has('switchover-ack'),
  };
}

// --- dependencies (the seams tests replace) ------------------------------------------------

export interface MigrateDeps {
  preflight: PreflightDeps;
  /** Watches the migration through libvirt; undefined when this build has no libvirt watch. */
  watch: ((opts: LibvirtWatchOptions) => Promise<WatchResult>) | undefined;
  /** --switchover-ack's observation of the source QEMU (default: observeSwitchoverAck through the domain's QMP pass-through). */
  observeSwitchoverAck?: typeof observeSwitchoverAck;
}

let depsOverride: MigrateDeps | undefined;

/** Tests: replace preflight's host/peer access and the watch. */
export function setMigrateDeps(deps: MigrateDeps | undefined): void {
  depsOverride = deps;
}

/** The real dependencies (tests wrap them to replace one part). */
export async function defaultMigrateDeps(timeoutMs: number): Promise<MigrateDeps> {
  return { preflight: await defaultPreflightDeps(timeoutMs), watch: await loadWatch() };
}

/** The libvirt watch (src/cli/watch-libvirt.ts). */
async function loadWatch(): Promise<MigrateDeps['watch']> {
  const { watchLibvirt } = await import('./watch-libvirt.ts');
  return watchLibvirt;
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
  const result: MigrateJson = { schema: MIGRATE_SCHEMA, domain: o.domain, from: o.from, to: o.to, verdict: 'not-started', exitCode: EXIT.NOT_STARTED, started: false, remedies: [], actions: [], notes: [] };
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
  let dom: import('../libvirt/binding.ts').Domain | undefined;
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
    const destConn = answer(() => Connection.open(o.to));
    if (destConn.ok) destToClose = destConn.value;
    let checked: MigratePreflight;
    try {
      checked = await preflightRunning(dom, src, destConn, o, deps.preflight);
    } catch (e) {
      if (destConn.ok) destConn.value.close();
      return stop(`preflight could not run: ${(e as Error).message}`);
    }
    const { pf, sourceFacts, destQemu, versions } = checked;
    result.preflight = pf.report;
    for (const l of preflightLines(pf.report)) say(l);

    // --switchover-ack: a requirement, checked before anything is changed; --force does not lift it.
    if (o.switchoverAck) {
      const reasons = switchoverAckRefusals(versions);
      if (reasons.length) {
        if (destConn.ok) destConn.value.close();
        const line = switchoverAckRefusalLine(reasons);
        result.switchoverAck = { required: true, observed: null, detail: `not started: ${reasons.join('; ')}` };
        return stop(`not started: ${line}`);
      }
      say(`switchover-ack: required; libvirt ${versionText(versions.sourceLibvirt)} -> ${versionText(versions.destinationLibvirt)} negotiates it, QEMU ${versionText(versions.sourceQemu)} -> ${versionText(versions.destinationQemu)} knows it; verified once the migration is active`);
    }

    // The limit in force and what the devices need at the link rate.
    const limitNow = await currentLimit(dom, pf.report.downtime?.limitMs);
    const autoInput = autoInputs(pf.report.downtime, pf.view.memoryBytes ?? 0);
    const rateSource: DowntimeAutoInput['rateSource'] = o.linkAssumed ? 'assumed' : 'given';
    const neededNoRam = downtimeAuto(autoInput(false, o.linkBytesPerSec, rateSource, 0)).limitMs;
    const plan = planTraps(pf.report, o, neededNoRam);
    result.remedies = plan.remedies;
    result.blocking = plan.blocking.map((c) => ({ id: c.id, subject: c.subject, detail: c.detail, advice: c.advice }));
    for (const r of plan.remedies) say(`remedy: ${r}`);
    if (plan.blocking.length > 0) {
      if (!o.force) {
        if (destConn.ok) destConn.value.close();
        say(notStartedLine(plan, o.fix));
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
    const start = limitBeforeStart(o.downtime, plan.needsLimit, limitNow, () => downtimeAuto(autoInput(plan.ramInLimit, o.linkBytesPerSec, rateSource, limitNow)));
    const autoLimit = start?.derived ?? false;
    if (start) {
      const { decision } = start;
      result.downtime = { limitMs: decision.limitMs, derivation: decision.derivation };
      if (decision.change) {
        try {
          dom.migrateSetMaxDowntime(decision.limitMs);
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
    const pfRun = await import('../compat/preflight/run.ts');
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
        dom!.abortJob();
      } catch (e) {
        result.notes.push(`abort: ${(e as Error).message}`);
      }
    };
    const onSigint = (): void => abort('interrupted');
    process.once('SIGINT', onSigint);
    const migrateP = dom.migrateToUri3(o.to, { destXml: liveEdit.xml, ...(persistXml ? { persistXml } : {}), ...(o.migrateUri ? { uri: o.migrateUri } : {}), ...(o.bandwidthMiB !== undefined ? { bandwidth: o.bandwidthMiB } : {}) }, flags);
    timer = setTimeout(() => abort('timeout'), o.timeoutMs);
    // --switchover-ack: read the source QEMU's capabilities once its migration is active.
    const ackStop = new AbortController();
    const ackP: Promise<SwitchoverAckReport> | undefined = o.switchoverAck ? (deps.observeSwitchoverAck ?? observeSwitchoverAck)(dom, { signal: ackStop.signal }) : undefined;
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
      ackStop.abort();
    }
    if (refine) await refine.done;
    if (ackP) result.switchoverAck = await ackP;
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
      const files = await writeTimelineFiles(outcome.watch, timelinePath, reportPath);
      ({ timeline, svg } = files);
      if (files.error !== undefined) {
        result.notes.push(`cannot write the timeline or report: ${files.error}`);
        err.write(`vfio-mig migrate: cannot write the timeline or report: ${files.error}\n`);
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
    if (result.switchoverAck) {
      const lines = switchoverAckLines(result.switchoverAck);
      for (const l of lines) say(l);
      if (result.switchoverAck.observed !== true) {
        result.notes.push(lines.join(' '));
        if (o.json) err.write(`vfio-mig migrate: ${lines.join(' ')}\n`);
      }
    }
    return finish(v.verdict, v.exitCode);
  } finally {
    destToClose?.close();
    dom?.dispose();
    src.close();
  }
}

function versionText(a: { ok: true; value: string } | { ok: false; error: string } | undefined): string {
  return a?.ok ? a.value : '?';
}

function qemuHasEvents(version: string): boolean {
  const v = parseVersion(version);
  return v !== undefined && atLeast(v, 9, 1);
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

