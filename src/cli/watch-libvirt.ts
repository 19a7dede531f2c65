// vfio-mig watch, libvirt form: --source-domain NAME --source-uri URI --dest-uri URI.
//
// The same watch as the QMP form (watch.ts), for a domain libvirt manages, through libvirt
// alone - no second QMP socket in the domain, nothing that taints it:
//  - QEMU's events (MIGRATION, MIGRATION_PASS, STOP, RESUME, VFIO_MIGRATION) with QEMU's
//    own timestamps come through libvirt's QEMU monitor events
//    (virConnectDomainQemuMonitorEventRegister). On the source the subscription names the
//    domain. On the destination the domain does not exist yet when the watch starts (libvirt
//    creates it when the migration is prepared), so the subscription covers every domain
//    of that connection and keeps the events whose domain UUID is the source domain's (a
//    migration keeps the UUID; the name may change).
//  - QEMU's figures come from libvirt's job statistics on the source
//    (virDomainGetJobStats): while libvirt migrates it holds an async job on the domain,
//    and job statistics are a query job that this job allows (libvirt asks QEMU's
//    query-migrate itself). The destination refuses them while the migration runs
//    ("available only on the source host"). After the job, the COMPLETED statistics of
//    either side give the final figures (downtime, setup time, data) of a successful
//    migration; libvirt keeps none for a cancelled one (libvirt 11.3).
//  - The VFIO devices are the domain XML's <hostdev>s: each one's alias is QEMU's device
//    id (hostdevN), the id VFIO_MIGRATION events carry.
//  - libvirt turns on QEMU's `events` migration capability when it starts a QEMU (seen
//    before and during migrations with libvirt 11.3), so MIGRATION events come on both
//    sides without the watch changing anything.
//
// The migration is over when libvirt's job on the source ends, not when QEMU says so:
// libvirt still has to start the VM on the destination (Finish) and may roll back to the
// source after QEMU completed. Which status counts is decided in migrationOutcome().

import { Connection, ErrorCode, LibvirtError, asQueryMigrate, jobActive, type Domain, type DomainQmpEvent, type DomainStateInfo, type JobStats } from '../libvirt/binding.ts';
import { DomainXml, formatBdf } from '../libvirt/domain-xml.ts';
import type { RecordedDevice, RecordedEvent, Side, SideRecord } from '../report/timeline.ts';
import { FINAL, finishWatch, loopEnd, RECORDED, settled, sleep, type WatchResult } from './watch-common.ts';

export interface LibvirtWatchOptions {
  /** The domain's name on the source host. */
  domain: string;
  /** libvirt URI of the source host (e.g. qemu:///system). */
  sourceUri: string;
  /** libvirt URI of the destination host (e.g. qemu+ssh://dst/system). */
  destUri: string;
  timeoutMs: number;
  /** After the final status, how long to wait for the closing events. */
  settleMs: number;
  signal?: AbortSignal;
  /** Called once both hosts are connected, subscribed and surveyed: start the migration then. */
  onReady?: () => void;
}

/** The watch could not start: a host unreachable, no such domain, the domain not running. */
export class LibvirtWatchError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'LibvirtWatchError';
  }
}

const POLL_MS = 100;
/**
 * Before a migration starts the source's job is polled faster: a migration that libvirt
 * gives up on before QEMU starts (the destination refuses the domain) holds its job for
 * only tens of milliseconds (16-80 ms measured), and no libvirt event marks it.
 */
const IDLE_POLL_MS = 20;
/** How long after libvirt's job ended QEMU's final MIGRATION event may still come. */
const QEMU_GRACE_MS = 3000;
const EVENT_FILTER = `^(${[...RECORDED].join('|')})$`;

/** QEMU's run state name for a libvirt domain state (what query-status would have said). */
export function runStateName(state: DomainStateInfo, side: Side): string {
  if (state.state === 'running' || state.state === 'blocked') return 'running';
  // VIR_DOMAIN_PAUSED_MIGRATION (2): an incoming migration waits paused on the destination.
  if (state.state === 'paused') return side === 'destination' && state.reason === 2 ? 'inmigrate' : 'paused';
  if (state.state === 'shutoff') return 'shutdown';
  return state.state;
}

/**
 * The VFIO devices of a live domain XML: `<hostdev>` (and `<interface type='hostdev'>`)
 * of PCI functions or vfio-pci mdevs that have an alias (QEMU's device id). Notes each
 * device without `migration-events=on` (a `<qemu:override>` property; QEMU's default is
 * off): QEMU sends no VFIO_MIGRATION events for it.
 */
export function vfioDevicesFromXml(xml: string, side: Side, notes: string[]): RecordedDevice[] {
  const doc = DomainXml.parse(xml);
  const out: RecordedDevice[] = [];
  for (const h of doc.hostdevs()) {
    if (!h.alias) continue; // an inactive definition: no QEMU device yet
    if (h.driverName !== undefined && h.driverName !== 'vfio') continue;
    let host: string | undefined;
    if (h.type === 'pci' && h.pci) host = formatBdf(h.pci);
    else if (h.type === 'mdev' && (h.mdevModel === undefined || h.mdevModel === 'vfio-pci') && h.mdevUuid) host = `/sys/bus/mdev/devices/${h.mdevUuid}`;
    else continue;
    out.push({ id: h.alias, qomPath: `/machine/peripheral/${h.alias}`, host });
    const prop = doc.qemuDeviceProperties(h.alias).find((p) => p.name === 'migration-events');
    if (!prop || prop.value !== 'true') notes.push(`${h.alias} on the ${side} has no migration-events=on (<qemu:override> in the domain XML): QEMU sends no VFIO_MIGRATION events for it`);
  }
  return out;
}

export interface OutcomeInputs {
  /** The last MIGRATION status QEMU sent on the source since the watch armed. */
  qemuStatus?: string;
  /** libvirt's statistics of the finished job on the source (migration-out), if it kept any. */
  completedSource?: JobStats;
  /** The same on the destination (migration-in). */
  completedDest?: JobStats;
  /** The source domain runs after the job. */
  sourceRunning: boolean;
  /** The destination has the domain, running or paused (not shut off). */
  destActive: boolean;
}

/**
 * The final status once libvirt's job on the source has ended. libvirt's statistics of the
 * finished job are its verdict on the whole migration; without them (libvirt keeps none for
 * a cancelled or failed job) QEMU's last MIGRATION status, corrected by where the domain
 * now runs: a QEMU that completed while libvirt then put the VM back on the source is a
 * failed migration. No QEMU status at all means libvirt gave up before QEMU's part (e.g.
 * the destination refused the domain).
 */
export function migrationOutcome(i: OutcomeInputs): { status: string; note?: string } {
  for (const s of [i.completedSource, i.completedDest]) {
    const st = s && asQueryMigrate(s)?.status;
    if (typeof st === 'string' && FINAL.has(st)) return { status: st };
  }
  // QEMU stops in `cancelling` only when libvirt tore it down first: cancelled all the same.
  if (i.qemuStatus === 'cancelling') return { status: 'cancelled' };
  if (i.qemuStatus !== undefined && FINAL.has(i.qemuStatus)) {
    if (i.qemuStatus === 'completed' && i.sourceRunning && !i.destActive) {
      return { status: 'failed', note: 'QEMU completed its part, but libvirt did not finish the migration: the domain runs on the source again, not on the destination' };
    }
    return { status: i.qemuStatus };
  }
  if (i.destActive && !i.sourceRunning) return { status: 'completed', note: 'libvirt kept no statistics and QEMU sent no final status, but the domain now runs on the destination only' };
  return {
    status: 'failed',
    note: `libvirt ended its migration job before QEMU reported a final status${i.qemuStatus ? ` (last: ${i.qemuStatus})` : ' (QEMU never started migrating)'}: the migration failed in libvirt, e.g. the destination refused the domain (a hook, a check, no resources)`,
  };
}

const isLv = (e: unknown, ...codes: number[]): boolean => e instanceof LibvirtError && codes.includes(e.code);

/** One host of the watch: its connection, the domain once it exists there, what was recorded. */
class LvSide {
  readonly record: SideRecord;
  domain: Domain | undefined;
  /** The domain exists on this host and is not shut off. */
  alive = false;
  /** Surveyed while active (the live XML carries the device aliases). */
  surveyedActive = false;
  private seq = 0;

  constructor(
    readonly side: Side,
    readonly conn: Connection,
    endpoint: string,
  ) {
    this.record = { endpoint, events: [] };
  }

  take(ev: DomainQmpEvent): void {
    const rec: RecordedEvent = { event: ev.event, data: ev.data, timestamp: ev.timestamp, seq: ++this.seq, received: Date.now() };
    this.record.events.push(rec);
  }

  /**
   * Adopts the domain: its run state and VFIO devices at this moment. `startedAs` names the
   * run state its QEMU started in when that is known better than now (a destination first
   * looked at after the migration was started for it, `inmigrate`).
   */
  attach(dom: Domain, notes: string[], startedAs?: string): void {
    this.domain = dom;
    try {
      const st = dom.state();
      this.alive = st.state !== 'shutoff';
      if (this.surveyedActive) return;
      this.record.initialStatus = startedAs ?? runStateName(st, this.side);
      this.record.devices = vfioDevicesFromXml(dom.xml(), this.side, notes);
      this.surveyedActive = this.alive;
    } catch (e) {
      this.alive = false;
      // Gone between the look-up and the survey (a failed incoming migration is removed).
      if (!isLv(e, ErrorCode.NO_DOMAIN, ErrorCode.INVALID_DOMAIN)) notes.push(`the ${this.side}'s domain could not be surveyed: ${(e as Error).message}`);
    }
  }

  /** Re-reads whether the domain is still there and running; false once it is gone. */
  refresh(): DomainStateInfo | undefined {
    if (!this.domain) return undefined;
    try {
      const st = this.domain.state();
      this.alive = st.state !== 'shutoff';
      return st;
    } catch (e) {
      if (!isLv(e, ErrorCode.NO_DOMAIN, ErrorCode.INVALID_DOMAIN)) throw e;
      this.alive = false;
      return undefined;
    }
  }

  /** libvirt's statistics of the last finished job of `operation`, if it has any that are new. */
  completedStats(operation: 'migration-out' | 'migration-in', baseline: string | undefined): JobStats | undefined {
    if (!this.domain) return undefined;
    try {
      const s = this.domain.jobStats({ completed: true, keepCompleted: true });
      if (s.operation !== operation || !FINAL.has(asQueryMigrate(s)?.status as string)) return undefined;
      return JSON.stringify(s.raw) === baseline ? undefined : s;
    } catch {
      return undefined; // the domain went away, or this libvirt keeps none
    }
  }

  /** The raw completed statistics now (to tell later ones from those of an older job). */
  baseline(): string | undefined {
    if (!this.domain) return undefined;
    try {
      return JSON.stringify(this.domain.jobStats({ completed: true, keepCompleted: true }).raw);
    } catch {
      return undefined;
    }
  }

  lastQemuStatus(sinceSeq = 0): string | undefined {
    const ev = this.record.events.filter((e) => e.seq > sinceSeq && e.event === 'MIGRATION' && typeof e.data.status === 'string').at(-1);
    return ev?.data.status as string | undefined;
  }
}

function open(uri: string, side: Side): Connection {
  try {
    return Connection.open(uri, { events: true });
  } catch (e) {
    throw new LibvirtWatchError(`${side}: cannot connect to libvirt at ${uri}: ${(e as Error).message}`, { cause: e });
  }
}

/** Watches one libvirt migration of `domain` from both hosts; resolves with the record and its analysis. */
export async function watchLibvirt(opts: LibvirtWatchOptions): Promise<WatchResult> {
  const started = Date.now();
  const deadline = started + opts.timeoutMs;
  const notes: string[] = [];
  const srcConn = open(opts.sourceUri, 'source');
  let dstConn: Connection;
  try {
    dstConn = open(opts.destUri, 'destination');
  } catch (e) {
    srcConn.close();
    throw e;
  }
  const src = new LvSide('source', srcConn, `libvirt:${opts.sourceUri}/${opts.domain}`);
  const dst = new LvSide('destination', dstConn, `libvirt:${opts.destUri}/${opts.domain}`);
  let timedOut = false;
  let ended = 'settled';
  try {
    const dom = srcConn.findDomain(opts.domain);
    if (!dom) throw new LibvirtWatchError(`source: no domain named ${JSON.stringify(opts.domain)} at ${opts.sourceUri}`);
    const uuid = dom.uuid;
    // Subscribe before anything else so no event falls between the survey and the loop.
    srcConn.qemuMonitorEvents({ domain: dom, event: EVENT_FILTER, regex: true, backlog: 1024 }).onEvent((ev) => src.take(ev));
    dstConn.qemuMonitorEvents({ event: EVENT_FILTER, regex: true, backlog: 1024 }).onEvent((ev) => {
      if (ev.uuid === uuid) dst.take(ev);
    });
    src.attach(dom, notes);
    if (!src.alive) throw new LibvirtWatchError(`source: domain ${JSON.stringify(opts.domain)} is not running (${src.record.initialStatus ?? 'unknown'}): there is nothing to migrate live`);
    const srcBaseline = src.baseline();
    const existing = dstConn.findDomainByUuid(uuid);
    if (existing) dst.attach(existing, notes);
    const dstActiveAtStart = dst.alive;
    // Statistics the destination holds now belong to an older job.
    const dstBaseline = dst.baseline();

    let armed = false;
    let jobRunning = false;
    const initial = dom.jobStats();
    src.record.polls = 1;
    if (jobActive(initial) && initial.operation === 'migration-out') {
      armed = true;
      jobRunning = true;
      src.record.migrate = asQueryMigrate(initial);
      notes.push('a migration was already running when the watch started: events sent before it are missing');
    }
    const seqAtStart = src.record.events.at(-1)?.seq ?? 0;
    let lastActive: JobStats | undefined = armed ? initial : undefined;
    opts.onReady?.();

    let status: string | undefined;
    let settleUntil: number | undefined;
    let jobEndedAt: number | undefined;
    for (;;) {
      const stop = loopEnd(opts.signal, deadline);
      if (stop) {
        ended = stop;
        timedOut = stop === 'timeout';
        break;
      }
      // The source's job: running, over, or the domain no longer running there.
      if (status === undefined) {
        try {
          const s = dom.jobStats();
          src.record.polls = (src.record.polls ?? 0) + 1;
          jobRunning = jobActive(s) && s.operation === 'migration-out';
          if (jobRunning) {
            armed = true;
            lastActive = s;
            src.record.migrate = asQueryMigrate(s);
          }
        } catch (e) {
          // After a successful migration the source's QEMU is gone: "domain is not running"
          // (a persistent definition stays) or no domain at all (a transient one).
          if (!isLv(e, ErrorCode.OPERATION_INVALID, ErrorCode.NO_DOMAIN, ErrorCode.INVALID_DOMAIN)) throw e;
          jobRunning = false;
        }
      }
      src.refresh();
      if (!armed && src.record.events.some((e) => e.seq > seqAtStart && e.event === 'MIGRATION' && e.data.status === 'setup')) armed = true;
      // The destination is asked only once the source's job is over. While libvirt
      // prepares an incoming migration it holds the destination domain's lock for seconds
      // (starting QEMU): a look-up, its state or its XML would block this thread that long.
      // Its events need no call: they come through the subscription.
      const jobOver = armed && !jobRunning;
      if (jobOver) {
        if (!dst.alive) {
          const d = dstConn.findDomainByUuid(uuid);
          if (d) {
            dst.domain?.dispose();
            // Its QEMU sent events during the migration, and it was not running before:
            // libvirt started it for this incoming migration, paused (QEMU's `inmigrate`).
            dst.attach(d, notes, dst.record.events.length && !dstActiveAtStart ? 'inmigrate' : undefined);
          }
        } else dst.refresh();
        // libvirt removes (or shuts off) the destination's domain after a failed incoming migration.
        if (!dst.alive && dst.record.events.length) dst.record.closed ??= 'the domain is gone on the destination (libvirt removes it when an incoming migration fails)';
      }

      // libvirt may end its job a moment before QEMU's final MIGRATION event reaches us
      // (a cancel: libvirt returns on `cancelling`): give QEMU's events a short grace.
      if (jobOver) jobEndedAt ??= Date.now();
      const qemuPending = src.record.events.some((e) => e.seq > seqAtStart && e.event === 'MIGRATION') && !FINAL.has(src.lastQemuStatus(seqAtStart) ?? '');
      if (jobOver && status === undefined && (!qemuPending || Date.now() - jobEndedAt! >= QEMU_GRACE_MS)) {
        const completedSource = src.completedStats('migration-out', srcBaseline);
        const completedDest = dst.completedStats('migration-in', dstBaseline);
        const outcome = migrationOutcome({ qemuStatus: src.lastQemuStatus(seqAtStart), completedSource, completedDest, sourceRunning: src.alive, destActive: dst.alive });
        status = outcome.status;
        if (outcome.note) notes.push(outcome.note);
        const finalStats = completedSource ?? completedDest;
        // QEMU's figures: the finished job's, else the last ones seen while it ran, with the final status.
        const figures = (finalStats && asQueryMigrate(finalStats)) ?? (lastActive && asQueryMigrate(lastActive)) ?? {};
        src.record.migrate = { ...figures, status };
        const rawSrc = (completedSource ?? lastActive)?.raw;
        if (rawSrc) src.record.libvirtJob = rawSrc;
        if (completedDest) {
          dst.record.migrate = asQueryMigrate(completedDest);
          dst.record.libvirtJob = completedDest.raw;
        } else {
          // No statistics on the destination: its QEMU's own last MIGRATION status stands in.
          const dq = dst.lastQemuStatus();
          if (dq) dst.record.migrate = { status: dq };
        }
        if (!lastActive && !completedSource) notes.push('libvirt\'s migration job was never seen running on the source: no figures from libvirt');
      }
      if (status !== undefined) {
        settleUntil ??= Math.min(deadline, Date.now() + opts.settleMs);
        if (settled(src, dst, status)) break;
        if (Date.now() >= settleUntil) {
          ended = 'settle-limit';
          break;
        }
      }
      if (!armed && !src.alive) {
        ended = 'source-closed';
        notes.push('the source domain stopped running before a migration started');
        break;
      }
      await sleep(armed ? POLL_MS : IDLE_POLL_MS);
    }
    if (status === undefined && !timedOut) notes.push('the migration did not reach a final status');
    // (Only once QEMU had started moving data: a migration libvirt gave up on before has none.)
    if (armed && (lastActive?.memoryTotal ?? 0) > 0 && !src.record.events.some((e) => e.seq > seqAtStart && e.event === 'MIGRATION')) {
      notes.push('no MIGRATION event came from the source QEMU (libvirt normally keeps its `events` migration capability on): phases come from libvirt\'s job only');
    }
  } finally {
    src.domain?.dispose();
    dst.domain?.dispose();
    srcConn.close();
    dstConn.close();
  }
  return finishWatch({ started, source: src.record, destination: dst.record, ended, notes, timedOut, timeoutMs: opts.timeoutMs });
}
