// A libvirt domain: its identity, state and XML, life cycle (define, start, destroy, suspend,
// resume), the QMP pass-through (virDomainQemuMonitorCommand) and live migration
// (virDomainMigrateToURI3, off the event loop).

import { QmpProtocolError, qmpErrorFrom } from '../qmp/errors.ts';
import type { ExecuteOptions, QmpExecutor } from '../qmp/commands.ts';
import { copyNative, libvirtIfLoaded, peekCString, readPtr, takeCString, type Ptr } from './ffi.ts';
import { callAsync, checkString, isNeg, lib, quiet, sync } from './calls.ts';
import { ErrorCode, LibvirtError } from './errors.ts';
import { typedParams, type MigrateParams } from './migrate-params.ts';
import type { Connection } from './connection.ts';
import { decodeTypedParams, TYPED_PARAM_SIZE, type TypedParamValue } from './typed-params.ts';
import { JobStatsFlag, jobTypeName, parseJobStats, type JobStats, type JobTypeName } from './job-stats.ts';

/** virDomainState (libvirt-domain.h of libvirt 11.3). */
export const DomainState = { NOSTATE: 0, RUNNING: 1, BLOCKED: 2, PAUSED: 3, SHUTDOWN: 4, SHUTOFF: 5, CRASHED: 6, PMSUSPENDED: 7 } as const;
/** virDomainState names, indexed by number. */
const STATE_NAMES = ['nostate', 'running', 'blocked', 'paused', 'shutdown', 'shutoff', 'crashed', 'pmsuspended'] as const;
export type DomainStateName = (typeof STATE_NAMES)[number] | 'unknown';

/** virDomainXMLFlags */
export const DomainXmlFlag = { SECURE: 1, INACTIVE: 2, UPDATE_CPU: 4, MIGRATABLE: 8 } as const;

/** virDomainGetJobInfo's answer (the older, untyped form of the job statistics). */
export interface JobInfo {
  typeCode: number;
  type: JobTypeName;
  timeElapsedMs: number;
  timeRemainingMs: number;
  dataTotal: number;
  dataProcessed: number;
  dataRemaining: number;
  memTotal: number;
  memProcessed: number;
  memRemaining: number;
}

export interface DomainStateInfo {
  state: DomainStateName;
  /** Raw virDomainState number. */
  code: number;
  /** The state's reason code (virDomainRunningReason, virDomainPausedReason, ...). */
  reason: number;
}

/** Domain handles are freed when garbage-collected (or at once by dispose()). */
const domainFinalizer = new FinalizationRegistry<Ptr>((p) => {
  const n = libvirtIfLoaded();
  if (n) quiet(() => n.domainFree(p));
});

export class Domain implements QmpExecutor {
  readonly conn: Connection;
  /** The virDomainPtr (valid until dispose()). */
  readonly handle: Ptr;
  private disposed = false;

  /** @internal */
  constructor(conn: Connection, handle: Ptr) {
    this.conn = conn;
    this.handle = handle;
    domainFinalizer.register(this, handle, this);
  }

  get name(): string {
    const n = lib();
    return sync('virDomainGetName', () => n.domainGetName(this.live()) as string | null, (r) => r === null)!;
  }

  get uuid(): string {
    const n = lib();
    const buf = Buffer.alloc(37);
    sync('virDomainGetUUIDString', () => n.domainGetUUIDString(this.live(), buf), isNeg);
    return buf.toString('latin1', 0, 36);
  }

  /** The running domain's id, or undefined when it is not running. */
  get id(): number | undefined {
    const n = lib();
    const id = Number(quiet(() => n.domainGetID(this.live())));
    return id === 0xffffffff ? undefined : id;
  }

  /** Domain XML: the live definition by default, the persistent one with `inactive`. */
  xml(opts: { inactive?: boolean; migratable?: boolean; secure?: boolean } = {}): string {
    const flags = (opts.inactive ? DomainXmlFlag.INACTIVE : 0) | (opts.migratable ? DomainXmlFlag.MIGRATABLE : 0) | (opts.secure ? DomainXmlFlag.SECURE : 0);
    const n = lib();
    return sync(`virDomainGetXMLDesc ${this.label()}`, () => n.domainGetXMLDesc(this.live(), flags) as string | null, (x) => x === null)!;
  }

  state(): DomainStateInfo {
    const n = lib();
    const st = [0];
    const reason = [0];
    sync(`virDomainGetState ${this.label()}`, () => n.domainGetState(this.live(), st, reason, 0), isNeg);
    return { state: STATE_NAMES[st[0]!] ?? 'unknown', code: st[0]!, reason: reason[0]! };
  }

  start(): void {
    sync(`virDomainCreate ${this.label()}`, () => lib().domainCreate(this.live()), isNeg);
  }

  destroy(): void {
    sync(`virDomainDestroy ${this.label()}`, () => lib().domainDestroy(this.live()), isNeg);
  }

  suspend(): void {
    sync(`virDomainSuspend ${this.label()}`, () => lib().domainSuspend(this.live()), isNeg);
  }

  resume(): void {
    sync(`virDomainResume ${this.label()}`, () => lib().domainResume(this.live()), isNeg);
  }

  undefine(): void {
    sync(`virDomainUndefine ${this.label()}`, () => lib().domainUndefine(this.live()), isNeg);
  }

  /**
   * QMP pass-through (virDomainQemuMonitorCommand): resolves with `return`; a QMP error in
   * a successful call rejects with QmpError, a failed call with LibvirtError. libvirt marks
   * the domain tainted (custom-monitor). Changing state this way bypasses libvirt: use it for
   * queries and for what libvirt has no API for.
   */
  async execute(command: string, args?: Record<string, unknown>, _options?: ExecuteOptions): Promise<unknown> {
    if (!/^[A-Za-z][A-Za-z0-9_-]{0,127}$/.test(command)) throw new TypeError(`invalid QMP command name ${JSON.stringify(command)}`);
    if (args !== undefined && (typeof args !== 'object' || args === null || Array.isArray(args))) throw new TypeError(`QMP ${command}: arguments must be an object`);
    const n = lib();
    const out = Buffer.alloc(8);
    const json = JSON.stringify(args === undefined ? { execute: command } : { execute: command, arguments: args });
    sync(`virDomainQemuMonitorCommand ${this.label()} ${command}`, () => n.qemuMonitorCommand(this.live(), json, out, 0), isNeg);
    const p = readPtr(out);
    if (p === 0n) throw new QmpProtocolError(`libvirt returned no reply to ${command}`);
    const text = takeCString(p);
    let reply: unknown;
    try {
      reply = JSON.parse(text);
    } catch {
      throw new QmpProtocolError(`malformed JSON in the reply to ${command}: ${text.slice(0, 120)}`);
    }
    if (typeof reply !== 'object' || reply === null || Array.isArray(reply)) throw new QmpProtocolError(`reply to ${command} is not an object`);
    const r = reply as Record<string, unknown>;
    if ('error' in r) throw qmpErrorFrom(command, r.error);
    if (!('return' in r)) throw new QmpProtocolError(`reply to ${command} has neither return nor error`);
    return r.return;
  }

  /**
   * virDomainMigrateToURI3, off the event loop. With MigrateFlag.PEER2PEER `dconnuri` is the
   * destination libvirt URI (the source daemon connects to it); without it libvirt expects
   * direct migration (not supported by QEMU). Resolves when libvirt reports the migration done.
   */
  async migrateToUri3(dconnuri: string | undefined, params: MigrateParams, flags: number): Promise<void> {
    if (dconnuri !== undefined) checkString('destination URI', dconnuri, 4096);
    const list = typedParams(params);
    const n = lib();
    await callAsync(`virDomainMigrateToURI3 ${this.label()}${dconnuri ? ` -> ${dconnuri}` : ''}`, n.domainMigrateToURI3, [this.live(), dconnuri ?? null, list.length ? list : null, list.length, flags >>> 0]);
  }

  /**
   * virDomainGetJobStats: the running job's statistics, or with `completed` those of the
   * last finished job (`keepCompleted` leaves them for the next reader; without it libvirt
   * forgets them once read). Allowed while libvirt migrates the domain (a query job).
   */
  jobStats(opts: { completed?: boolean; keepCompleted?: boolean } = {}): JobStats {
    const flags = (opts.completed ? JobStatsFlag.COMPLETED : 0) | (opts.keepCompleted ? JobStatsFlag.KEEP_COMPLETED : 0);
    const n = lib();
    const type = [0];
    const count = [0];
    const out = Buffer.alloc(8);
    sync(`virDomainGetJobStats ${this.label()}`, () => n.domainGetJobStats(this.live(), type, out, count, flags), isNeg);
    const arr = readPtr(out);
    const nparams = Math.max(0, count[0]!);
    let params: Map<string, TypedParamValue>;
    try {
      params = arr === 0n ? new Map() : decodeTypedParams(copyNative(arr, nparams * TYPED_PARAM_SIZE), nparams, peekCString);
    } finally {
      if (arr !== 0n) quiet(() => n.typedParamsFree(arr, nparams));
    }
    return parseJobStats(type[0]!, params);
  }

  /** virDomainGetJobInfo: the running job's type, time and data counters. */
  jobInfo(): JobInfo {
    const n = lib();
    const info: Record<string, number | bigint> = {};
    sync(`virDomainGetJobInfo ${this.label()}`, () => n.domainGetJobInfo(this.live(), info), isNeg);
    const v = (k: string): number => Number(info[k] ?? 0);
    return {
      typeCode: v('type'),
      type: jobTypeName(v('type')),
      timeElapsedMs: v('timeElapsed'),
      timeRemainingMs: v('timeRemaining'),
      dataTotal: v('dataTotal'),
      dataProcessed: v('dataProcessed'),
      dataRemaining: v('dataRemaining'),
      memTotal: v('memTotal'),
      memProcessed: v('memProcessed'),
      memRemaining: v('memRemaining'),
    };
  }

  /** virDomainAbortJob: cancels the running job (e.g. an outgoing migration). */
  abortJob(): void {
    sync(`virDomainAbortJob ${this.label()}`, () => lib().domainAbortJob(this.live()), isNeg);
  }

  /** virDomainMigrateSetMaxSpeed: the migration bandwidth limit in MiB/s (also before a migration). */
  migrateSetMaxSpeed(mibPerSecond: number): void {
    if (!Number.isSafeInteger(mibPerSecond) || mibPerSecond < 0) throw new RangeError('migration bandwidth must be a non-negative integer (MiB/s)');
    sync(`virDomainMigrateSetMaxSpeed ${this.label()}`, () => lib().domainMigrateSetMaxSpeed(this.live(), mibPerSecond, 0), isNeg);
  }

  /** virDomainMigrateSetMaxDowntime: the downtime limit (ms) QEMU must meet to switch over. */
  migrateSetMaxDowntime(ms: number): void {
    if (!Number.isSafeInteger(ms) || ms <= 0) throw new RangeError('migration downtime limit must be a positive integer (ms)');
    sync(`virDomainMigrateSetMaxDowntime ${this.label()}`, () => lib().domainMigrateSetMaxDowntime(this.live(), BigInt(ms), 0), isNeg);
  }

  /** Frees the libvirt handle now (otherwise it is freed when garbage-collected). */
  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    domainFinalizer.unregister(this);
    const n = lib();
    quiet(() => n.domainFree(this.handle));
  }

  private live(): Ptr {
    if (this.disposed) throw new LibvirtError('domain', ErrorCode.INVALID_DOMAIN, 0, 'the domain handle was disposed');
    this.conn.live();
    return this.handle;
  }

  private label(): string {
    const n = lib();
    return quiet(() => n.domainGetName(this.handle) as string | null) ?? '?';
  }
}
