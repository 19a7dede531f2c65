// A domain's job statistics (virDomainGetJobStats): libvirt's typed parameters decoded into
// a typed record, and that record in QEMU's query-migrate vocabulary.
//
// Why job statistics: while libvirt migrates a domain it holds an async job on it. A QMP
// pass-through call (virDomainQemuMonitorCommand) needs a "modify" job and waits for the
// migration to end, so `query-migrate` cannot be sent. virDomainGetJobStats runs as a
// "query" job, which the migration job allows: libvirt asks QEMU (query-migrate) itself and
// returns QEMU's figures. After the job, VIR_DOMAIN_JOB_STATS_COMPLETED returns the final
// figures of the last job (success or failure, with libvirt's error message).

import type { TypedParamValue } from './typed-params.ts';

/** virDomainJobType */
export const JobType = { NONE: 0, BOUNDED: 1, UNBOUNDED: 2, COMPLETED: 3, FAILED: 4, CANCELLED: 5 } as const;
const JOB_TYPE_NAMES = ['none', 'bounded', 'unbounded', 'completed', 'failed', 'cancelled'] as const;
export type JobTypeName = (typeof JOB_TYPE_NAMES)[number] | 'unknown';

/** virDomainJobOperation */
export const JobOperation = { UNKNOWN: 0, START: 1, SAVE: 2, RESTORE: 3, MIGRATION_IN: 4, MIGRATION_OUT: 5, SNAPSHOT: 6, SNAPSHOT_REVERT: 7, DUMP: 8, BACKUP: 9, SNAPSHOT_DELETE: 10 } as const;
const OPERATION_NAMES = ['unknown', 'start', 'save', 'restore', 'migration-in', 'migration-out', 'snapshot', 'snapshot-revert', 'dump', 'backup', 'snapshot-delete'] as const;
export type JobOperationName = (typeof OPERATION_NAMES)[number];

/** virDomainGetJobStatsFlags */
export const JobStatsFlag = { COMPLETED: 1, KEEP_COMPLETED: 2 } as const;

/** What virDomainGetJobStats said, decoded. Members absent when libvirt did not send them. */
export interface JobStats {
  /** Raw virDomainJobType and its name. */
  typeCode: number;
  type: JobTypeName;
  operation?: JobOperationName | 'unknown';
  /** ms since the job started (time_elapsed). */
  timeElapsedMs?: number;
  timeRemainingMs?: number;
  /** ms the VM was paused (completed migrations; QEMU's downtime). */
  downtimeMs?: number;
  /** The same including the network transfer time (libvirt's estimate). */
  downtimeNetMs?: number;
  setupTimeMs?: number;
  dataTotal?: number;
  dataProcessed?: number;
  dataRemaining?: number;
  memoryTotal?: number;
  memoryProcessed?: number;
  memoryRemaining?: number;
  memoryConstant?: number;
  memoryNormal?: number;
  memoryNormalBytes?: number;
  memoryBps?: number;
  memoryDirtyRate?: number;
  /** Dirty-sync iterations (QEMU's ram.dirty-sync-count). */
  memoryIteration?: number;
  memoryPostcopyRequests?: number;
  /** Bytes of VFIO device state sent (libvirt >= 10.x, QEMU's vfio.transferred). */
  vfioDataTransferred?: number;
  autoConvergeThrottle?: number;
  /** libvirt's message for a failed job. */
  errmsg?: string;
  /** For completed jobs: whether the job succeeded. */
  success?: boolean;
  /** Every parameter as libvirt named it (for the record). */
  raw: Record<string, TypedParamValue>;
}

const NUMERIC: Array<[keyof JobStats, string]> = [
  ['timeElapsedMs', 'time_elapsed'],
  ['timeRemainingMs', 'time_remaining'],
  ['downtimeMs', 'downtime'],
  ['downtimeNetMs', 'downtime_net'],
  ['setupTimeMs', 'setup_time'],
  ['dataTotal', 'data_total'],
  ['dataProcessed', 'data_processed'],
  ['dataRemaining', 'data_remaining'],
  ['memoryTotal', 'memory_total'],
  ['memoryProcessed', 'memory_processed'],
  ['memoryRemaining', 'memory_remaining'],
  ['memoryConstant', 'memory_constant'],
  ['memoryNormal', 'memory_normal'],
  ['memoryNormalBytes', 'memory_normal_bytes'],
  ['memoryBps', 'memory_bps'],
  ['memoryDirtyRate', 'memory_dirty_rate'],
  ['memoryIteration', 'memory_iteration'],
  ['memoryPostcopyRequests', 'memory_postcopy_requests'],
  ['vfioDataTransferred', 'vfio_data_transferred'],
  ['autoConvergeThrottle', 'auto_converge_throttle'],
];

export function jobTypeName(code: number): JobTypeName {
  return JOB_TYPE_NAMES[code] ?? 'unknown';
}

/** Builds the record from the job type and the decoded parameters. */
export function parseJobStats(typeCode: number, params: Map<string, TypedParamValue>): JobStats {
  const s: JobStats = { typeCode, type: jobTypeName(typeCode), raw: Object.fromEntries(params) };
  const op = params.get('operation');
  if (typeof op === 'number') s.operation = OPERATION_NAMES[op] ?? 'unknown';
  for (const [key, field] of NUMERIC) {
    const v = params.get(field);
    if (typeof v === 'number' && Number.isFinite(v)) (s as unknown as Record<string, number>)[key] = v;
  }
  const err = params.get('errmsg');
  if (typeof err === 'string' && err !== '') s.errmsg = err;
  const ok = params.get('success');
  if (typeof ok === 'boolean') s.success = ok;
  return s;
}

/** True for a job that is still running (libvirt: bounded or unbounded). */
export function jobActive(s: JobStats): boolean {
  return s.typeCode === JobType.BOUNDED || s.typeCode === JobType.UNBOUNDED;
}

/**
 * The statistics in QEMU's query-migrate vocabulary (status, total-time, setup-time,
 * downtime, ram.*, vfio.transferred, error-desc), so code that reads QEMU's answer reads
 * libvirt's the same way. A running job is `active` (libvirt does not say setup or
 * device); a finished one `completed`, `failed` or `cancelled`; no job gives undefined.
 */
export function asQueryMigrate(s: JobStats): Record<string, unknown> | undefined {
  let status: string;
  if (jobActive(s)) status = 'active';
  else if (s.typeCode === JobType.COMPLETED) status = s.success === false ? 'failed' : 'completed';
  else if (s.typeCode === JobType.FAILED) status = 'failed';
  else if (s.typeCode === JobType.CANCELLED) status = 'cancelled';
  else return undefined;
  const out: Record<string, unknown> = { status };
  const put = (key: string, v: number | string | undefined, into: Record<string, unknown> = out): void => {
    if (v !== undefined) into[key] = v;
  };
  put('total-time', s.timeElapsedMs);
  put('setup-time', s.setupTimeMs);
  // libvirt sends `downtime` for finished migrations only; while running it is unknown.
  if (status !== 'active') put('downtime', s.downtimeMs);
  const ram: Record<string, unknown> = {};
  put('transferred', s.memoryProcessed, ram);
  put('total', s.memoryTotal, ram);
  put('remaining', s.memoryRemaining, ram);
  put('duplicate', s.memoryConstant, ram);
  put('normal', s.memoryNormal, ram);
  put('normal-bytes', s.memoryNormalBytes, ram);
  put('dirty-pages-rate', s.memoryDirtyRate, ram);
  put('dirty-sync-count', s.memoryIteration, ram);
  put('postcopy-requests', s.memoryPostcopyRequests, ram);
  if (s.memoryBps !== undefined) ram.mbps = (s.memoryBps * 8) / 1e6;
  if (Object.keys(ram).length) out.ram = ram;
  if (s.vfioDataTransferred !== undefined) out.vfio = { transferred: s.vfioDataTransferred };
  put('error-desc', s.errmsg);
  return out;
}
