// Typed QMP commands. Each wrapper takes a QmpExecutor - our own socket client or libvirt's
// monitor pass-through (src/libvirt/binding.ts) - so the same code steers a bare QEMU and a
// libvirt-managed one. Replies are validated: a member we type must have that type (else
// QmpProtocolError); members we do not know are kept; enum values we do not know are kept.
// Argument names follow qapi/migration.json, qapi/run-state.json and qapi/misc.json.

import { QmpProtocolError } from './errors.ts';
import type { MigrationStatus, OpenEnum } from './events.ts';

export interface ExecuteOptions {
  /** Per-command time limit (ms); the executor's default when absent. */
  timeoutMs?: number;
}

/** Anything that can run one QMP command and return its `return` member. */
export interface QmpExecutor {
  /** Resolves with `return`; rejects with QmpError when QEMU answers `error`. */
  execute(command: string, args?: Record<string, unknown>, options?: ExecuteOptions): Promise<unknown>;
}

/** An executor that can attach a file descriptor to a command (SCM_RIGHTS). */
export interface QmpFdExecutor extends QmpExecutor {
  executeWithFd(command: string, args: Record<string, unknown> | undefined, fd: number, options?: ExecuteOptions): Promise<unknown>;
}

// --- reply validation --------------------------------------------------------------------

type Obj = Record<string, unknown>;

function bad(command: string, what: string, value: unknown): QmpProtocolError {
  return new QmpProtocolError(`reply to ${command}: ${what} (got ${JSON.stringify(value)?.slice(0, 200)})`);
}

function obj(command: string, v: unknown, what = 'return value is not an object'): Obj {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw bad(command, what, v);
  return v as Obj;
}

type Kind = 'string' | 'boolean' | 'int' | 'number' | 'object' | 'string[]';

function check(command: string, o: Obj, member: string, kind: Kind, required: boolean): void {
  const v = o[member];
  if (v === undefined) {
    if (required) throw bad(command, `member "${member}" is missing`, o);
    return;
  }
  const ok =
    kind === 'string' ? typeof v === 'string'
    : kind === 'boolean' ? typeof v === 'boolean'
    : kind === 'int' ? Number.isSafeInteger(v)
    : kind === 'number' ? typeof v === 'number' && Number.isFinite(v)
    : kind === 'object' ? typeof v === 'object' && v !== null && !Array.isArray(v)
    : Array.isArray(v) && v.every((x) => typeof x === 'string');
  if (!ok) throw bad(command, `member "${member}" is not ${kind}`, v);
}

// --- query-version -----------------------------------------------------------------------

export interface QemuVersion {
  qemu: { major: number; minor: number; micro: number };
  package: string;
}

/** Validates a version object (query-version's reply and the greeting's `version`). */
export function parseVersion(command: string, v: unknown): QemuVersion {
  const o = obj(command, v);
  check(command, o, 'qemu', 'object', true);
  const q = o.qemu as Obj;
  for (const m of ['major', 'minor', 'micro']) check(command, q, m, 'int', true);
  check(command, o, 'package', 'string', true);
  return { qemu: { major: q.major as number, minor: q.minor as number, micro: q.micro as number }, package: o.package as string };
}

export async function queryVersion(q: QmpExecutor, options?: ExecuteOptions): Promise<QemuVersion> {
  return parseVersion('query-version', await q.execute('query-version', undefined, options));
}

/** Is QEMU at least major.minor (e.g. 9.1 for VFIO_MIGRATION events)? */
export function qemuAtLeast(v: QemuVersion, major: number, minor: number): boolean {
  return v.qemu.major > major || (v.qemu.major === major && v.qemu.minor >= minor);
}

// --- run state ------------------------------------------------------------------------------

/** qapi/run-state.json RunState. */
export type RunState = OpenEnum<
  | 'debug' | 'inmigrate' | 'internal-error' | 'io-error' | 'paused' | 'postmigrate' | 'prelaunch'
  | 'finish-migrate' | 'restore-vm' | 'running' | 'save-vm' | 'shutdown' | 'suspended' | 'watchdog'
  | 'guest-panicked' | 'colo'
>;

export interface StatusInfo {
  /** true when the vCPUs run. */
  running: boolean;
  status: RunState;
  [extra: string]: unknown;
}

export async function queryStatus(q: QmpExecutor, options?: ExecuteOptions): Promise<StatusInfo> {
  const o = obj('query-status', await q.execute('query-status', undefined, options));
  check('query-status', o, 'running', 'boolean', true);
  check('query-status', o, 'status', 'string', true);
  return o as StatusInfo;
}

/** Pauses the vCPUs (QEMU then emits STOP). */
export async function stop(q: QmpExecutor, options?: ExecuteOptions): Promise<void> {
  await q.execute('stop', undefined, options);
}

/** Resumes the vCPUs (QEMU then emits RESUME). */
export async function cont(q: QmpExecutor, options?: ExecuteOptions): Promise<void> {
  await q.execute('cont', undefined, options);
}

// --- migration ------------------------------------------------------------------------------

export interface MigrationStats {
  transferred?: number;
  remaining?: number;
  total?: number;
  duplicate?: number;
  normal?: number;
  'dirty-sync-count'?: number;
  [extra: string]: unknown;
}

/** query-migrate's reply; every member is optional (QEMU omits what does not apply). */
export interface MigrationInfo {
  status?: MigrationStatus;
  ram?: MigrationStats;
  /** Bytes of VFIO device state sent (QEMU 5.2+). */
  vfio?: { transferred: number; [extra: string]: unknown };
  'total-time'?: number;
  'expected-downtime'?: number;
  downtime?: number;
  'setup-time'?: number;
  /** Why migration is blocked right now (QEMU 6.0+), e.g. a VFIO device without dirty tracking. */
  'blocked-reasons'?: string[];
  'error-desc'?: string;
  [extra: string]: unknown;
}

export async function queryMigrate(q: QmpExecutor, options?: ExecuteOptions): Promise<MigrationInfo> {
  const c = 'query-migrate';
  const o = obj(c, await q.execute(c, undefined, options));
  check(c, o, 'status', 'string', false);
  check(c, o, 'ram', 'object', false);
  check(c, o, 'vfio', 'object', false);
  if (o.vfio) check(c, o.vfio as Obj, 'transferred', 'int', true);
  for (const m of ['total-time', 'expected-downtime', 'downtime', 'setup-time']) check(c, o, m, 'int', false);
  check(c, o, 'blocked-reasons', 'string[]', false);
  check(c, o, 'error-desc', 'string', false);
  return o as MigrationInfo;
}

/** Where the migration stream goes: a URI (tcp:, unix:, fd:NAME, exec:, file:) or a channels list (8.2+). */
export type MigrationTarget = { uri: string } | { channels: Obj[] };

function targetArgs(command: string, target: MigrationTarget): Obj {
  if ('uri' in target) {
    if (typeof target.uri !== 'string' || target.uri.length === 0) throw new TypeError(`${command}: uri must be a non-empty string`);
    return { uri: target.uri };
  }
  if (!Array.isArray(target.channels) || target.channels.length === 0) throw new TypeError(`${command}: channels must be a non-empty array`);
  return { channels: target.channels };
}

/** Starts an outgoing migration. Progress: query-migrate, or MIGRATION events (capability `events`). */
export async function migrate(q: QmpExecutor, target: MigrationTarget, opts: { resume?: boolean } = {}, options?: ExecuteOptions): Promise<void> {
  const args = targetArgs('migrate', target);
  if (opts.resume !== undefined) args.resume = opts.resume;
  await q.execute('migrate', args, options);
}

/** Starts listening for an incoming migration (QEMU started with `-incoming defer`). */
export async function migrateIncoming(q: QmpExecutor, target: MigrationTarget, opts: { exitOnError?: boolean } = {}, options?: ExecuteOptions): Promise<void> {
  const args = targetArgs('migrate-incoming', target);
  if (opts.exitOnError !== undefined) args['exit-on-error'] = opts.exitOnError; // QEMU 9.1+
  await q.execute('migrate-incoming', args, options);
}

/** qapi/migration.json MigrationCapability (the ones vfio-mig sets, plus any other by name). */
export type MigrationCapability = OpenEnum<
  'events' | 'pause-before-switchover' | 'return-path' | 'switchover-ack' | 'multifd' | 'postcopy-ram' | 'late-block-activate' | 'auto-converge' | 'zero-copy-send'
>;

export async function migrateSetCapabilities(q: QmpExecutor, caps: Partial<Record<MigrationCapability, boolean>>, options?: ExecuteOptions): Promise<void> {
  const capabilities = Object.entries(caps).map(([capability, state]) => {
    if (typeof state !== 'boolean') throw new TypeError(`migrate-set-capabilities: ${capability} must be true or false`);
    return { capability, state };
  });
  if (capabilities.length === 0) return;
  await q.execute('migrate-set-capabilities', { capabilities }, options);
}

export async function queryMigrateCapabilities(q: QmpExecutor, options?: ExecuteOptions): Promise<Array<{ capability: MigrationCapability; state: boolean }>> {
  const c = 'query-migrate-capabilities';
  const r = await q.execute(c, undefined, options);
  if (!Array.isArray(r)) throw bad(c, 'return value is not an array', r);
  return r.map((e) => {
    const o = obj(c, e, 'an entry is not an object');
    check(c, o, 'capability', 'string', true);
    check(c, o, 'state', 'boolean', true);
    return { capability: o.capability as string, state: o.state as boolean };
  });
}

/** qapi/migration.json MigrationParameters (typed: the ones vfio-mig tunes). */
export interface MigrationParameters {
  /** Maximum downtime in ms (QEMU default 300). */
  'downtime-limit'?: number;
  /** Bytes per second. */
  'max-bandwidth'?: number;
  /** Bytes per second assumed available at switchover (8.2+). */
  'avail-switchover-bandwidth'?: number;
  'multifd-channels'?: number;
  [other: string]: unknown;
}

export async function migrateSetParameters(q: QmpExecutor, params: MigrationParameters, options?: ExecuteOptions): Promise<void> {
  if (Object.keys(params).length === 0) return;
  await q.execute('migrate-set-parameters', { ...params }, options);
}

/**
 * Leaves the pause a migration with `pause-before-switchover` holds at `pre-switchover`.
 * Under libvirt, libvirt owns that pause: never send this to a libvirt-managed QEMU.
 */
export async function migrateContinue(q: QmpExecutor, state: MigrationStatus = 'pre-switchover', options?: ExecuteOptions): Promise<void> {
  await q.execute('migrate-continue', { state }, options);
}

/** Cancels the outgoing migration (succeeds when none runs); the source keeps running. */
export async function migrateCancel(q: QmpExecutor, options?: ExecuteOptions): Promise<void> {
  await q.execute('migrate_cancel', undefined, options);
}

// --- file descriptors ----------------------------------------------------------------------

const FD_NAME = /^[A-Za-z][A-Za-z0-9_.-]{0,63}$/;

function checkFdName(name: string): void {
  // QEMU refuses names starting with a digit (they would read as fd numbers in "fd:N").
  if (!FD_NAME.test(name)) throw new TypeError(`fd name ${JSON.stringify(name)} must match ${FD_NAME}`);
}

/** Gives QEMU a descriptor under a name (then `migrate` to "fd:NAME"); QEMU dups it, close yours after. */
export async function getfd(q: QmpFdExecutor, name: string, fd: number, options?: ExecuteOptions): Promise<void> {
  checkFdName(name);
  await q.executeWithFd('getfd', { fdname: name }, fd, options);
}

export async function closefd(q: QmpExecutor, name: string, options?: ExecuteOptions): Promise<void> {
  checkFdName(name);
  await q.execute('closefd', { fdname: name }, options);
}

export interface AddedFd {
  fdsetId: number;
  /** The descriptor number inside QEMU ("/dev/fdset/ID" opens it). */
  fd: number;
}

/** Adds a descriptor to an fd set (a new one unless fdsetId is given). */
export async function addFd(q: QmpFdExecutor, fd: number, opts: { fdsetId?: number; opaque?: string } = {}, options?: ExecuteOptions): Promise<AddedFd> {
  const args: Obj = {};
  if (opts.fdsetId !== undefined) args['fdset-id'] = opts.fdsetId;
  if (opts.opaque !== undefined) args.opaque = opts.opaque;
  const o = obj('add-fd', await q.executeWithFd('add-fd', args, fd, options));
  check('add-fd', o, 'fdset-id', 'int', true);
  check('add-fd', o, 'fd', 'int', true);
  return { fdsetId: o['fdset-id'] as number, fd: o.fd as number };
}

export async function removeFd(q: QmpExecutor, fdsetId: number, fd?: number, options?: ExecuteOptions): Promise<void> {
  const args: Obj = { 'fdset-id': fdsetId };
  if (fd !== undefined) args.fd = fd;
  await q.execute('remove-fd', args, options);
}

export interface FdsetInfo {
  fdsetId: number;
  fds: Array<{ fd: number; opaque?: string }>;
}

export async function queryFdsets(q: QmpExecutor, options?: ExecuteOptions): Promise<FdsetInfo[]> {
  const c = 'query-fdsets';
  const r = await q.execute(c, undefined, options);
  if (!Array.isArray(r)) throw bad(c, 'return value is not an array', r);
  return r.map((e) => {
    const o = obj(c, e, 'an entry is not an object');
    check(c, o, 'fdset-id', 'int', true);
    if (!Array.isArray(o.fds)) throw bad(c, 'fds is not an array', o.fds);
    const fds = o.fds.map((f) => {
      const fo = obj(c, f, 'an fd entry is not an object');
      check(c, fo, 'fd', 'int', true);
      check(c, fo, 'opaque', 'string', false);
      return fo.opaque === undefined ? { fd: fo.fd as number } : { fd: fo.fd as number, opaque: fo.opaque as string };
    });
    return { fdsetId: o['fdset-id'] as number, fds };
  });
}
