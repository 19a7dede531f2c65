// koffi binding to libvirt.so.0 and libvirt-qemu.so.0 (DESIGN.md: the one other file that
// touches koffi). Loaded on first use: a hook or CLI command that never talks to libvirt
// does not pay for dlopen'ing libvirt.
//
// Calls are synchronous (short RPCs to the local daemon, milliseconds) except migration,
// which takes seconds and runs on a libuv worker through koffi's `.async`.
//
// Errors: libvirt keeps the last error per thread. Synchronous calls read it on the main
// thread right after the call. For `.async` calls the error lives on the worker thread, so
// it is captured by the error callback (virSetErrorFunc), which libvirt invokes on that
// thread before the call returns and koffi relays to the main thread; async API calls run
// one at a time so a captured error always belongs to the call in flight. The callback also
// silences libvirt's default handler, which would print every error to stderr.
//
// QEMU monitor events (virConnectDomainQemuMonitorEventRegister) need a libvirt event loop;
// see EventPump below and docs/qmp-libvirt.md for why this, not a second QMP socket.

import { createRequire } from 'node:module';
import { QmpProtocolError, qmpErrorFrom } from '../qmp/errors.ts';
import type { ExecuteOptions, QmpExecutor } from '../qmp/commands.ts';
import { parseEventEnvelope, type QmpEvent } from '../qmp/events.ts';
import { EventHub, type EventFor, type WaitOptions } from '../qmp/event-hub.ts';

// --- constants (libvirt-domain.h, libvirt-nodedev.h, virterror.h of libvirt 11.3) ---------

export const DomainState = { NOSTATE: 0, RUNNING: 1, BLOCKED: 2, PAUSED: 3, SHUTDOWN: 4, SHUTOFF: 5, CRASHED: 6, PMSUSPENDED: 7 } as const;
const STATE_NAMES = ['nostate', 'running', 'blocked', 'paused', 'shutdown', 'shutoff', 'crashed', 'pmsuspended'] as const;
export type DomainStateName = (typeof STATE_NAMES)[number] | 'unknown';

export const DomainXmlFlag = { SECURE: 1, INACTIVE: 2, UPDATE_CPU: 4, MIGRATABLE: 8 } as const;

export const ListDomainsFlag = { ACTIVE: 1, INACTIVE: 2, PERSISTENT: 4, TRANSIENT: 8, RUNNING: 16, PAUSED: 32 } as const;

export const ListNodeDevicesFlag = { CAP_PCI_DEV: 1 << 1, CAP_MDEV_TYPES: 1 << 13, CAP_MDEV: 1 << 14, CAP_VDPA: 1 << 17, INACTIVE: 1 << 30, ACTIVE: 2 ** 31 } as const;

export const MigrateFlag = {
  LIVE: 1 << 0,
  PEER2PEER: 1 << 1,
  TUNNELLED: 1 << 2,
  PERSIST_DEST: 1 << 3,
  UNDEFINE_SOURCE: 1 << 4,
  PAUSED: 1 << 5,
  NON_SHARED_DISK: 1 << 6,
  NON_SHARED_INC: 1 << 7,
  CHANGE_PROTECTION: 1 << 8,
  UNSAFE: 1 << 9,
  OFFLINE: 1 << 10,
  COMPRESSED: 1 << 11,
  ABORT_ON_ERROR: 1 << 12,
  AUTO_CONVERGE: 1 << 13,
  RDMA_PIN_ALL: 1 << 14,
  POSTCOPY: 1 << 15,
  TLS: 1 << 16,
  PARALLEL: 1 << 17,
  NON_SHARED_SYNCHRONOUS_WRITES: 1 << 18,
  POSTCOPY_RESUME: 1 << 19,
  ZEROCOPY: 1 << 20,
} as const;

/** virErrorNumber values callers branch on. */
export const ErrorCode = {
  INTERNAL_ERROR: 1, NO_SUPPORT: 3, NO_CONNECT: 5, INVALID_CONN: 6, INVALID_DOMAIN: 7, INVALID_ARG: 8,
  OPERATION_FAILED: 9, XML_ERROR: 27, XML_DETAIL: 35, DOM_EXIST: 28, OPERATION_DENIED: 29, SYSTEM_ERROR: 38, RPC: 39,
  NO_DOMAIN: 42, AUTH_FAILED: 45, INVALID_NODE_DEVICE: 52, NO_NODE_DEVICE: 53, OPERATION_INVALID: 55,
  CONFIG_UNSUPPORTED: 67, OPERATION_TIMEOUT: 68, MIGRATE_PERSIST_FAILED: 69, HOOK_SCRIPT_FAILED: 70,
  ARGUMENT_UNSUPPORTED: 74, OPERATION_ABORTED: 78, MIGRATE_UNSAFE: 81, OPERATION_UNSUPPORTED: 84,
  AGENT_UNRESPONSIVE: 86, RESOURCE_BUSY: 87, ACCESS_DENIED: 88, DEVICE_MISSING: 99,
} as const;
/** virErrorNumber names, indexed by code (VIR_ERR_ prefix dropped; VIR_WAR_* kept as WAR_*). */
const CODE_NAMES = [
  'OK', 'INTERNAL_ERROR', 'NO_MEMORY', 'NO_SUPPORT', 'UNKNOWN_HOST', 'NO_CONNECT', 'INVALID_CONN',
  'INVALID_DOMAIN', 'INVALID_ARG', 'OPERATION_FAILED', 'GET_FAILED', 'POST_FAILED', 'HTTP_ERROR',
  'SEXPR_SERIAL', 'NO_XEN', 'XEN_CALL', 'OS_TYPE', 'NO_KERNEL', 'NO_ROOT', 'NO_SOURCE', 'NO_TARGET',
  'NO_NAME', 'NO_OS', 'NO_DEVICE', 'NO_XENSTORE', 'DRIVER_FULL', 'CALL_FAILED', 'XML_ERROR', 'DOM_EXIST',
  'OPERATION_DENIED', 'OPEN_FAILED', 'READ_FAILED', 'PARSE_FAILED', 'CONF_SYNTAX', 'WRITE_FAILED',
  'XML_DETAIL', 'INVALID_NETWORK', 'NETWORK_EXIST', 'SYSTEM_ERROR', 'RPC', 'GNUTLS_ERROR', 'WAR_NO_NETWORK',
  'NO_DOMAIN', 'NO_NETWORK', 'INVALID_MAC', 'AUTH_FAILED', 'INVALID_STORAGE_POOL', 'INVALID_STORAGE_VOL',
  'WAR_NO_STORAGE', 'NO_STORAGE_POOL', 'NO_STORAGE_VOL', 'WAR_NO_NODE', 'INVALID_NODE_DEVICE',
  'NO_NODE_DEVICE', 'NO_SECURITY_MODEL', 'OPERATION_INVALID', 'WAR_NO_INTERFACE', 'NO_INTERFACE',
  'INVALID_INTERFACE', 'MULTIPLE_INTERFACES', 'WAR_NO_NWFILTER', 'INVALID_NWFILTER', 'NO_NWFILTER',
  'BUILD_FIREWALL', 'WAR_NO_SECRET', 'INVALID_SECRET', 'NO_SECRET', 'CONFIG_UNSUPPORTED',
  'OPERATION_TIMEOUT', 'MIGRATE_PERSIST_FAILED', 'HOOK_SCRIPT_FAILED', 'INVALID_DOMAIN_SNAPSHOT',
  'NO_DOMAIN_SNAPSHOT', 'INVALID_STREAM', 'ARGUMENT_UNSUPPORTED', 'STORAGE_PROBE_FAILED',
  'STORAGE_POOL_BUILT', 'SNAPSHOT_REVERT_RISKY', 'OPERATION_ABORTED', 'AUTH_CANCELLED', 'NO_DOMAIN_METADATA',
  'MIGRATE_UNSAFE', 'OVERFLOW', 'BLOCK_COPY_ACTIVE', 'OPERATION_UNSUPPORTED', 'SSH', 'AGENT_UNRESPONSIVE',
  'RESOURCE_BUSY', 'ACCESS_DENIED', 'DBUS_SERVICE', 'STORAGE_VOL_EXIST', 'CPU_INCOMPATIBLE',
  'XML_INVALID_SCHEMA', 'MIGRATE_FINISH_OK', 'AUTH_UNAVAILABLE', 'NO_SERVER', 'NO_CLIENT', 'AGENT_UNSYNCED',
  'LIBSSH', 'DEVICE_MISSING', 'INVALID_NWFILTER_BINDING', 'NO_NWFILTER_BINDING', 'INVALID_DOMAIN_CHECKPOINT',
  'NO_DOMAIN_CHECKPOINT', 'NO_DOMAIN_BACKUP', 'INVALID_NETWORK_PORT', 'NETWORK_PORT_EXIST',
  'NO_NETWORK_PORT', 'NO_HOSTNAME', 'CHECKPOINT_INCONSISTENT', 'MULTIPLE_DOMAINS', 'NO_NETWORK_METADATA',
  'AGENT_COMMAND_TIMEOUT', 'AGENT_COMMAND_FAILED',
];

/** virErrorDomain names (where in libvirt the error was raised). */
const ERROR_DOMAINS = [
  'NONE', 'XEN', 'XEND', 'XENSTORE', 'SEXPR', 'XML', 'DOM', 'RPC', 'PROXY', 'CONF', 'QEMU', 'NET', 'TEST', 'REMOTE',
  'OPENVZ', 'XENXM', 'STATS_LINUX', 'LXC', 'STORAGE', 'NETWORK', 'DOMAIN', 'UML', 'NODEDEV', 'XEN_INOTIFY', 'SECURITY',
  'VBOX', 'INTERFACE', 'ONE', 'ESX', 'PHYP', 'SECRET', 'CPU', 'XENAPI', 'NWFILTER', 'HOOK', 'DOMAIN_SNAPSHOT', 'AUDIT',
  'SYSINFO', 'STREAMS', 'VMWARE', 'EVENT', 'LIBXL', 'LOCKING', 'HYPERV', 'CAPABILITIES', 'URI', 'AUTH', 'DBUS',
  'PARALLELS', 'DEVICE', 'SSH', 'LOCKSPACE', 'INITCTL', 'IDENTITY', 'CGROUP', 'ACCESS', 'SYSTEMD', 'BHYVE', 'CRYPTO',
  'FIREWALL', 'POLKIT', 'THREAD', 'ADMIN', 'LOGGING', 'XENXL', 'PERF', 'LIBSSH', 'RESCTRL', 'FIREWALLD',
  'DOMAIN_CHECKPOINT', 'TPM', 'BPF', 'CH',
];

// --- errors ----------------------------------------------------------------------------------

/** A failed libvirt call, with libvirt's own code, domain and message kept. */
export class LibvirtError extends Error {
  /** virErrorNumber (e.g. 42 = VIR_ERR_NO_DOMAIN). */
  readonly code: number;
  /** "NO_DOMAIN" etc. (libvirt 11.3 names), or the number as text for newer codes. */
  readonly codeName: string;
  /** virErrorDomain (e.g. 10 = VIR_FROM_QEMU). */
  readonly domain: number;
  readonly domainName: string;
  /** libvirt's message, as libvirt wrote it. */
  readonly libvirtMessage: string;
  /** Our operation, e.g. "virDomainMigrateToURI3 tiny". */
  readonly operation: string;
  constructor(operation: string, code: number, domain: number, message: string) {
    const codeName = CODE_NAMES[code] || String(code);
    const domainName = ERROR_DOMAINS[domain] ?? String(domain);
    super(`${operation}: ${message} [libvirt ${domainName}/${codeName}]`);
    this.name = 'LibvirtError';
    this.code = code;
    this.codeName = codeName;
    this.domain = domain;
    this.domainName = domainName;
    this.libvirtMessage = message;
    this.operation = operation;
  }
}

// --- native layer ----------------------------------------------------------------------------

type Ptr = bigint;

interface KFn {
  (...args: unknown[]): unknown;
  async(...args: unknown[]): void;
}

interface Koffi {
  load(name: string): { func(proto: string): KFn };
  opaque(name: string): unknown;
  struct(name: string, members: Record<string, unknown>): unknown;
  union(name: string, members: Record<string, unknown>): unknown;
  array(type: string, n: number): unknown;
  disposable(name: string, type: string): unknown;
  proto(proto: string): unknown;
  pointer(type: unknown): unknown;
  register(fn: (...args: never[]) => unknown, type: unknown): unknown;
  decode: ((ptr: Ptr, type: unknown, len?: number) => unknown) & { string(ptr: Ptr): string };
  free(ptr: Ptr): void;
}

interface Natives {
  koffi: Koffi;
  VirError: unknown;
  connectOpen: KFn;
  connectClose: KFn;
  connectGetLibVersion: KFn;
  connectGetVersion: KFn;
  connectListAllDomains: KFn;
  domainLookupByName: KFn;
  domainLookupByUUIDString: KFn;
  domainDefineXML: KFn;
  domainUndefine: KFn;
  domainCreate: KFn;
  domainDestroy: KFn;
  domainSuspend: KFn;
  domainResume: KFn;
  domainFree: KFn;
  domainGetName: KFn;
  domainGetUUIDString: KFn;
  domainGetID: KFn;
  domainGetState: KFn;
  domainGetXMLDesc: KFn;
  domainMigrateToURI3: KFn;
  connectListAllNodeDevices: KFn;
  nodeDeviceLookupByName: KFn;
  nodeDeviceGetName: KFn;
  nodeDeviceGetXMLDesc: KFn;
  nodeDeviceFree: KFn;
  getLastError: KFn;
  resetLastError: KFn;
  eventRegisterDefaultImpl: KFn;
  eventRunDefaultImpl: KFn;
  eventAddTimeout: KFn;
  eventRemoveTimeout: KFn;
  qemuMonitorCommand: KFn;
  qemuMonitorEventRegister: KFn;
  qemuMonitorEventDeregister: KFn;
  /** Registered trampolines (one each, shared by every subscription). */
  monitorEventCb: unknown;
  wakeTimeoutCb: unknown;
}

let natives: Natives | undefined;

/** True while a synchronous libvirt call runs on the main thread (see onLibvirtError). */
let inSyncCall = false;
/** The error of the async API call in flight, captured by the error callback. */
let asyncError: LibvirtError | undefined;

function load(): Natives {
  if (natives) return natives;
  const koffi = createRequire(import.meta.url)('koffi') as Koffi;
  let lib: ReturnType<Koffi['load']>;
  let qemu: ReturnType<Koffi['load']>;
  try {
    lib = koffi.load('libvirt.so.0');
    qemu = koffi.load('libvirt-qemu.so.0');
  } catch (err) {
    throw new Error(`cannot load libvirt (libvirt.so.0 / libvirt-qemu.so.0): ${(err as Error).message}; install libvirt0 (Debian: apt-get install libvirt0)`, { cause: err });
  }
  koffi.opaque('virConnect');
  koffi.opaque('virDomain');
  koffi.opaque('virNodeDevice');
  const VirError = koffi.struct('virError', {
    code: 'int', domain: 'int', message: 'const char *', level: 'int', conn: 'void *', dom: 'void *',
    str1: 'const char *', str2: 'const char *', str3: 'const char *', int1: 'int', int2: 'int', net: 'void *',
  });
  koffi.union('virTypedParameterValue', { i: 'int', ui: 'uint', l: 'int64_t', ul: 'uint64_t', d: 'double', b: 'char', s: 'const char *' });
  koffi.struct('virTypedParameter', { field: koffi.array('char', 80), type: 'int', value: 'virTypedParameterValue' });
  // Strings libvirt allocates and the caller frees: koffi frees them after conversion.
  koffi.disposable('virHeapString', 'str');
  const errorFunc = koffi.proto('void virErrorFunc(void *userData, virError *error)');
  const monitorEventProto = koffi.proto('void virConnectDomainQemuMonitorEventCallback(virConnect *conn, virDomain *dom, const char *event, long long seconds, unsigned int micros, const char *details, void *opaque)');
  const timeoutProto = koffi.proto('void virEventTimeoutCallback(int timer, void *opaque)');

  const n: Natives = {
    koffi,
    VirError,
    connectOpen: lib.func('virConnect *virConnectOpen(const char *name)'),
    connectClose: lib.func('int virConnectClose(virConnect *conn)'),
    connectGetLibVersion: lib.func('int virConnectGetLibVersion(virConnect *conn, _Out_ uint64_t *libVer)'),
    connectGetVersion: lib.func('int virConnectGetVersion(virConnect *conn, _Out_ uint64_t *hvVer)'),
    connectListAllDomains: lib.func('int virConnectListAllDomains(virConnect *conn, void *domains, unsigned int flags)'),
    domainLookupByName: lib.func('virDomain *virDomainLookupByName(virConnect *conn, const char *name)'),
    domainLookupByUUIDString: lib.func('virDomain *virDomainLookupByUUIDString(virConnect *conn, const char *uuid)'),
    domainDefineXML: lib.func('virDomain *virDomainDefineXML(virConnect *conn, const char *xml)'),
    domainUndefine: lib.func('int virDomainUndefine(virDomain *dom)'),
    domainCreate: lib.func('int virDomainCreate(virDomain *dom)'),
    domainDestroy: lib.func('int virDomainDestroy(virDomain *dom)'),
    domainSuspend: lib.func('int virDomainSuspend(virDomain *dom)'),
    domainResume: lib.func('int virDomainResume(virDomain *dom)'),
    domainFree: lib.func('int virDomainFree(virDomain *dom)'),
    domainGetName: lib.func('const char *virDomainGetName(virDomain *dom)'),
    domainGetUUIDString: lib.func('int virDomainGetUUIDString(virDomain *dom, void *buf)'),
    domainGetID: lib.func('unsigned int virDomainGetID(virDomain *dom)'),
    domainGetState: lib.func('int virDomainGetState(virDomain *dom, _Out_ int *state, _Out_ int *reason, unsigned int flags)'),
    domainGetXMLDesc: lib.func('virHeapString virDomainGetXMLDesc(virDomain *dom, unsigned int flags)'),
    domainMigrateToURI3: lib.func('int virDomainMigrateToURI3(virDomain *dom, const char *dconnuri, virTypedParameter *params, unsigned int nparams, unsigned int flags)'),
    connectListAllNodeDevices: lib.func('int virConnectListAllNodeDevices(virConnect *conn, void *devices, unsigned int flags)'),
    nodeDeviceLookupByName: lib.func('virNodeDevice *virNodeDeviceLookupByName(virConnect *conn, const char *name)'),
    nodeDeviceGetName: lib.func('const char *virNodeDeviceGetName(virNodeDevice *dev)'),
    nodeDeviceGetXMLDesc: lib.func('virHeapString virNodeDeviceGetXMLDesc(virNodeDevice *dev, unsigned int flags)'),
    nodeDeviceFree: lib.func('int virNodeDeviceFree(virNodeDevice *dev)'),
    getLastError: lib.func('virError *virGetLastError(void)'),
    resetLastError: lib.func('void virResetLastError(void)'),
    eventRegisterDefaultImpl: lib.func('int virEventRegisterDefaultImpl(void)'),
    eventRunDefaultImpl: lib.func('int virEventRunDefaultImpl(void)'),
    eventAddTimeout: lib.func('int virEventAddTimeout(int frequency, virEventTimeoutCallback *cb, void *opaque, void *ff)'),
    eventRemoveTimeout: lib.func('int virEventRemoveTimeout(int timer)'),
    qemuMonitorCommand: qemu.func('int virDomainQemuMonitorCommand(virDomain *dom, const char *cmd, void *result, unsigned int flags)'),
    qemuMonitorEventRegister: qemu.func('int virConnectDomainQemuMonitorEventRegister(virConnect *conn, virDomain *dom, const char *event, virConnectDomainQemuMonitorEventCallback *cb, void *opaque, void *freecb, unsigned int flags)'),
    qemuMonitorEventDeregister: qemu.func('int virConnectDomainQemuMonitorEventDeregister(virConnect *conn, int callbackID)'),
    monitorEventCb: undefined,
    wakeTimeoutCb: undefined,
  };
  // virInitialize makes the library safe for threads before any worker uses it.
  if (Number(lib.func('int virInitialize(void)')()) < 0) throw new Error('virInitialize failed');
  const setErrorFunc = lib.func('void virSetErrorFunc(void *userData, virErrorFunc *handler)');
  setErrorFunc(null, koffi.register(onLibvirtError, koffi.pointer(errorFunc)));
  n.monitorEventCb = koffi.register(onMonitorEvent, koffi.pointer(monitorEventProto));
  n.wakeTimeoutCb = koffi.register((timer: number) => void n.eventRemoveTimeout(timer), koffi.pointer(timeoutProto));
  natives = n;
  return n;
}

function decodeError(ptr: unknown, operation: string): LibvirtError | undefined {
  if (ptr === null || ptr === undefined || ptr === 0n) return undefined;
  const e = natives!.koffi.decode(ptr as Ptr, natives!.VirError) as { code: number; domain: number; message: string | null };
  if (e.code === 0) return undefined;
  return new LibvirtError(operation, e.code, e.domain, e.message ?? 'unknown libvirt error');
}

/**
 * libvirt's error callback (virSetErrorFunc). Runs for every failing API call. During a
 * synchronous call it runs inline on the main thread: ignored, the caller reads the error.
 * Otherwise it was relayed from the worker thread of the async call in flight: keep it.
 */
function onLibvirtError(_userData: unknown, error: unknown): void {
  if (inSyncCall) return;
  asyncError = decodeError(error, 'libvirt') ?? asyncError;
}

function lastError(operation: string): LibvirtError {
  const n = load();
  const e = decodeError(n.getLastError(), operation) ?? new LibvirtError(operation, ErrorCode.INTERNAL_ERROR, 0, 'failed without an error message');
  n.resetLastError();
  return e;
}

/** Runs one synchronous call; `failed` says whether its result means failure. */
function sync<T>(operation: string, fn: () => T, failed: (r: T) => boolean): T {
  load();
  inSyncCall = true;
  let r: T;
  try {
    r = fn();
  } finally {
    inSyncCall = false;
  }
  if (failed(r)) throw lastError(operation);
  return r;
}

const isNull = (p: unknown): boolean => p === null || p === undefined || p === 0n;
const isNeg = (r: unknown): boolean => Number(r) < 0;

let asyncChain: Promise<unknown> = Promise.resolve();

/** Runs an API call on a worker; one at a time, so the captured error is this call's. */
function callAsync(operation: string, fn: KFn, args: unknown[]): Promise<number> {
  const run = (): Promise<number> =>
    new Promise<number>((resolve, reject) => {
      asyncError = undefined;
      fn.async(...args, (err: Error | null, res: unknown) => {
        if (err) return reject(err);
        const rc = Number(res);
        if (rc < 0) {
          const e = asyncError;
          asyncError = undefined;
          return reject(e ? new LibvirtError(operation, e.code, e.domain, e.libvirtMessage) : new LibvirtError(operation, ErrorCode.INTERNAL_ERROR, 0, 'failed (no error detail reached this thread)'));
        }
        resolve(rc);
      });
    });
  const p = asyncChain.then(run, run);
  asyncChain = p.catch(() => undefined);
  return p;
}

function readPtr(buf: Buffer): Ptr {
  return buf.readBigUInt64LE(0);
}

/** Decodes an array of `count` pointers that libvirt allocated, then frees the array. */
function takePtrArray(arr: Ptr, count: number): Ptr[] {
  const k = natives!.koffi;
  if (count <= 0 || arr === 0n) {
    if (arr !== 0n) k.free(arr);
    return [];
  }
  const ptrs = (k.decode(arr, 'void *', count) as Array<Ptr | null>).map((p) => BigInt(p ?? 0));
  k.free(arr);
  return ptrs;
}

/** Domain handles are freed when garbage-collected (or at once by dispose()); node device handles never outlive their call. */
const domainFinalizer = new FinalizationRegistry<Ptr>((p) => {
  if (natives) quiet(() => natives!.domainFree(p));
});

/** A call whose failure is not reported (frees, getters that cannot fail): keeps the error callback out of it. */
function quiet<T>(fn: () => T): T {
  inSyncCall = true;
  try {
    return fn();
  } finally {
    inSyncCall = false;
  }
}

// --- event loop ------------------------------------------------------------------------------

/**
 * Runs libvirt's default event loop (virEventRunDefaultImpl, one iteration per call) on a
 * libuv worker via koffi `.async`, re-queued after each iteration, so Node's own loop never
 * blocks. libvirt calls our JS callbacks from that worker; koffi relays them to the main
 * thread. The pump runs while at least one connection opened after the loop was registered
 * is open (libvirt routes those connections' I/O and keepalive through it); when the last
 * one closes, a zero-delay libvirt timer wakes the blocked iteration and the pump stops, so
 * the process can exit. It holds one libuv worker thread while it runs.
 */
class EventPump {
  private registered = false;
  private refs = 0;
  private running = false;
  private idle: Promise<void> = Promise.resolve();
  private markIdle: () => void = () => {};

  /** Must run before the connection that wants events is opened. */
  register(): void {
    if (this.registered) return;
    const n = load();
    sync('virEventRegisterDefaultImpl', () => n.eventRegisterDefaultImpl(), isNeg);
    this.registered = true;
  }

  get isRegistered(): boolean {
    return this.registered;
  }

  acquire(): void {
    this.refs++;
    if (this.running) return;
    this.running = true;
    this.idle = new Promise((resolve) => (this.markIdle = resolve));
    this.iterate();
  }

  release(): void {
    if (this.refs === 0) return;
    this.refs--;
    if (this.refs === 0 && this.running) {
      // Wake the iteration blocked in poll(); its timer callback removes itself.
      const n = load();
      n.eventAddTimeout(0, n.wakeTimeoutCb, null, null);
    }
  }

  /** Resolves when the pump has stopped (no iteration in flight). */
  stopped(): Promise<void> {
    return this.idle;
  }

  private iterate(): void {
    const n = load();
    n.eventRunDefaultImpl.async((err: Error | null) => {
      if (err || this.refs === 0) {
        this.running = false;
        this.markIdle();
        return;
      }
      this.iterate();
    });
  }
}

const pump = new EventPump();

// --- QEMU monitor events -------------------------------------------------------------------

/** A QMP event of a libvirt-managed domain. */
export interface DomainQmpEvent extends QmpEvent {
  /** Name of the domain that sent it. */
  domain: string;
}

const subscriptions = new Map<number, (ev: Omit<DomainQmpEvent, 'seq'>) => void>();
let nextSubscription = 1;

function onMonitorEvent(_conn: unknown, dom: unknown, event: string | null, seconds: unknown, micros: unknown, details: string | null, opaque: unknown): void {
  const deliver = subscriptions.get(Number(opaque));
  if (!deliver || !event) return;
  const n = natives!;
  const domain = quiet(() => n.domainGetName(dom) as string | null) ?? '';
  let data: unknown = {};
  if (details) {
    try {
      data = JSON.parse(details);
    } catch {
      return; // libvirt serialized it; unparsable details mean a broken daemon, drop the event
    }
  }
  const parsed = parseEventEnvelope({ event, data, timestamp: { seconds: Number(seconds), microseconds: Number(micros) } });
  if (typeof parsed === 'string') return;
  deliver({ ...parsed, domain });
}

/** A live subscription to QEMU monitor events; also an event source with waitFor. */
export class QemuMonitorEvents {
  private readonly hub: EventHub<DomainQmpEvent>;
  private closedFlag = false;

  constructor(
    private readonly conn: Connection,
    private readonly callbackId: number,
    private readonly subscriptionId: number,
    hub: EventHub<DomainQmpEvent>,
  ) {
    this.hub = hub;
  }

  get lastSeq(): number {
    return this.hub.lastSeq;
  }

  recentEvents(): DomainQmpEvent[] {
    return this.hub.recent();
  }

  onEvent(listener: (ev: DomainQmpEvent) => void): () => void {
    return this.hub.onEvent(listener);
  }

  waitFor<N extends string>(name: N, predicate?: (ev: EventFor<N> & DomainQmpEvent) => boolean, timeoutMs?: number, options?: WaitOptions): Promise<EventFor<N> & DomainQmpEvent> {
    return this.hub.waitFor(name, predicate, timeoutMs, options);
  }

  /** Deregisters; pending waits reject. */
  close(): void {
    if (this.closedFlag) return;
    this.closedFlag = true;
    subscriptions.delete(this.subscriptionId);
    this.conn.dropSubscription(this);
    if (this.conn.isOpen) {
      const n = load();
      try {
        sync('virConnectDomainQemuMonitorEventDeregister', () => n.qemuMonitorEventDeregister(this.conn.handle, this.callbackId), isNeg);
      } catch {
        // The daemon may be gone already; the subscription is dead either way.
      }
    }
    this.hub.close((what) => new Error(`${what}: the QEMU monitor event subscription is closed`));
  }
}

// --- connection ------------------------------------------------------------------------------

export interface OpenOptions {
  /** Enable QEMU monitor events on this connection (starts libvirt's event loop). */
  events?: boolean;
}

export interface NodeDevice {
  name: string;
  /** The node device XML (libvirt's nodedev format). */
  xml: string;
}

function checkString(what: string, v: string, max = 65536): void {
  if (typeof v !== 'string' || v.length === 0 || v.length > max || v.includes('\0')) throw new TypeError(`${what} must be a non-empty string without NUL (at most ${max} chars)`);
}

export class Connection {
  readonly uri: string;
  /** The virConnectPtr (valid until close()). */
  readonly handle: Ptr;
  private open = true;
  private readonly pumped: boolean;
  private readonly subs = new Set<QemuMonitorEvents>();

  private constructor(uri: string, handle: Ptr, pumped: boolean) {
    this.uri = uri;
    this.handle = handle;
    this.pumped = pumped;
  }

  /**
   * Opens a connection (e.g. "qemu:///system", "qemu+unix:///system?socket=/path").
   * With `events`, libvirt's event loop is registered first and pumped while the
   * connection is open (needed for qemuMonitorEvents()).
   */
  static open(uri: string, options: OpenOptions = {}): Connection {
    checkString('libvirt URI', uri, 4096);
    const n = load();
    if (options.events) pump.register();
    const h = sync(`virConnectOpen ${uri}`, () => n.connectOpen(uri) as Ptr | null, isNull) as Ptr;
    // Once the loop is registered, every connection's keepalive runs through it.
    const pumped = pump.isRegistered;
    if (pumped) pump.acquire();
    return new Connection(uri, BigInt(h), pumped);
  }

  get isOpen(): boolean {
    return this.open;
  }

  /** Closes the connection (subscriptions first). Idempotent. */
  close(): void {
    if (!this.open) return;
    for (const s of [...this.subs]) s.close();
    this.open = false;
    const n = load();
    try {
      sync('virConnectClose', () => n.connectClose(this.handle), isNeg);
    } finally {
      if (this.pumped) pump.release();
    }
  }

  /** Resolves once libvirt's event loop has stopped (after the last pumped connection closed). */
  static eventLoopStopped(): Promise<void> {
    return pump.stopped();
  }

  /** libvirt library version of the daemon side, e.g. "11.3.0". */
  libVersion(): string {
    const out = [0];
    sync('virConnectGetLibVersion', () => load().connectGetLibVersion(this.live(), out), isNeg);
    return versionString(Number(out[0]));
  }

  /** Hypervisor (QEMU) version, e.g. "10.0.2". */
  hypervisorVersion(): string {
    const out = [0];
    sync('virConnectGetVersion', () => load().connectGetVersion(this.live(), out), isNeg);
    return versionString(Number(out[0]));
  }

  listDomains(flags = 0): Domain[] {
    const n = load();
    const out = Buffer.alloc(8);
    const count = sync('virConnectListAllDomains', () => n.connectListAllDomains(this.live(), out, flags), isNeg) as number;
    return takePtrArray(readPtr(out), count).map((p) => new Domain(this, p));
  }

  lookupDomain(name: string): Domain {
    checkString('domain name', name, 1024);
    const n = load();
    const p = sync(`virDomainLookupByName ${name}`, () => n.domainLookupByName(this.live(), name), isNull) as Ptr;
    return new Domain(this, BigInt(p));
  }

  lookupDomainByUuid(uuid: string): Domain {
    if (!/^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$/.test(uuid)) throw new TypeError(`not a UUID: ${uuid}`);
    const n = load();
    const p = sync(`virDomainLookupByUUIDString ${uuid}`, () => n.domainLookupByUUIDString(this.live(), uuid), isNull) as Ptr;
    return new Domain(this, BigInt(p));
  }

  /** Defines (or redefines) a persistent domain from XML. */
  defineDomain(xml: string): Domain {
    checkString('domain XML', xml, 16 * 1024 * 1024);
    const n = load();
    const p = sync('virDomainDefineXML', () => n.domainDefineXML(this.live(), xml), isNull) as Ptr;
    return new Domain(this, BigInt(p));
  }

  /** Node device names (e.g. pci_0000_00_03_0), filtered by ListNodeDevicesFlag. */
  listNodeDevices(flags = 0): string[] {
    const n = load();
    const out = Buffer.alloc(8);
    const count = sync('virConnectListAllNodeDevices', () => n.connectListAllNodeDevices(this.live(), out, flags >>> 0), isNeg) as number;
    return takePtrArray(readPtr(out), count).map((p) => {
      try {
        return sync('virNodeDeviceGetName', () => n.nodeDeviceGetName(p) as string | null, (r) => r === null)!;
      } finally {
        quiet(() => n.nodeDeviceFree(p));
      }
    });
  }

  nodeDevice(name: string): NodeDevice {
    checkString('node device name', name, 1024);
    const n = load();
    const p = sync(`virNodeDeviceLookupByName ${name}`, () => n.nodeDeviceLookupByName(this.live(), name), isNull) as Ptr;
    try {
      const xml = sync(`virNodeDeviceGetXMLDesc ${name}`, () => n.nodeDeviceGetXMLDesc(p, 0) as string | null, (x) => x === null) as string;
      return { name, xml };
    } finally {
      quiet(() => n.nodeDeviceFree(p));
    }
  }

  /**
   * Subscribes to QMP events of `domain` (all domains when undefined), optionally only the
   * event named `event` (a regex when `regex`). The connection must be opened with
   * `{ events: true }`. Events keep QEMU's data and timestamp.
   */
  qemuMonitorEvents(opts: { domain?: Domain; event?: string; regex?: boolean; backlog?: number; defaultTimeoutMs?: number } = {}): QemuMonitorEvents {
    if (!this.pumped) throw new Error('QEMU monitor events need a connection opened with { events: true }');
    if (opts.event !== undefined) checkString('event filter', opts.event, 256);
    if (opts.domain && opts.domain.conn !== this) throw new TypeError('the domain belongs to another connection');
    const n = load();
    const id = nextSubscription++;
    const hub = new EventHub<DomainQmpEvent>({
      backlog: opts.backlog ?? 256,
      defaultTimeoutMs: opts.defaultTimeoutMs ?? 30_000,
      onListenerError: (err) => process.emitWarning(`libvirt QMP event listener threw: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`),
    });
    subscriptions.set(id, (ev) => hub.publish(ev));
    let callbackId: number;
    try {
      const flags = opts.regex ? 1 : 0; // VIR_CONNECT_DOMAIN_QEMU_MONITOR_EVENT_REGISTER_REGEX
      // The opaque pointer carries our subscription id; no memory behind it.
      callbackId = sync('virConnectDomainQemuMonitorEventRegister', () => n.qemuMonitorEventRegister(this.live(), opts.domain?.handle ?? null, opts.event ?? null, n.monitorEventCb, BigInt(id), null, flags), isNeg) as number;
    } catch (err) {
      subscriptions.delete(id);
      throw err;
    }
    const sub = new QemuMonitorEvents(this, callbackId, id, hub);
    this.subs.add(sub);
    return sub;
  }

  /** @internal */
  dropSubscription(s: QemuMonitorEvents): void {
    this.subs.delete(s);
  }

  /** @internal the live handle, or an error after close(). */
  live(): Ptr {
    if (!this.open) throw new LibvirtError(`connection ${this.uri}`, ErrorCode.INVALID_CONN, 0, 'the connection is closed');
    return this.handle;
  }
}

function versionString(v: number): string {
  return `${Math.floor(v / 1_000_000)}.${Math.floor(v / 1000) % 1000}.${v % 1000}`;
}

// --- domain ----------------------------------------------------------------------------------

export interface DomainStateInfo {
  state: DomainStateName;
  /** Raw virDomainState number. */
  code: number;
  /** The state's reason code (virDomainRunningReason, virDomainPausedReason, ...). */
  reason: number;
}

/** Typed migration parameters (VIR_MIGRATE_PARAM_*), the ones vfio-mig uses. */
export interface MigrateParams {
  /** migrate_uri: where QEMU's stream goes, e.g. "tcp://10.0.0.2". */
  uri?: string;
  /** destination_name */
  destName?: string;
  /** destination_xml: the domain XML to use on the destination (e.g. with remapped hostdevs). */
  destXml?: string;
  /** persistent_xml */
  persistXml?: string;
  /** bandwidth in MiB/s */
  bandwidth?: number;
  /** listen_address on the destination */
  listenAddress?: string;
  /** parallel.connections (with MigrateFlag.PARALLEL) */
  parallelConnections?: number;
}

const PARAM_FIELDS: Record<keyof MigrateParams, { field: string; type: 'string' | 'ullong' | 'int' }> = {
  uri: { field: 'migrate_uri', type: 'string' },
  destName: { field: 'destination_name', type: 'string' },
  destXml: { field: 'destination_xml', type: 'string' },
  persistXml: { field: 'persistent_xml', type: 'string' },
  bandwidth: { field: 'bandwidth', type: 'ullong' },
  listenAddress: { field: 'listen_address', type: 'string' },
  parallelConnections: { field: 'parallel.connections', type: 'int' },
};

/** Builds the virTypedParameter array (VIR_TYPED_PARAM_INT = 1, ULLONG = 4, STRING = 7). */
export function typedParams(params: MigrateParams): Array<{ field: string; type: number; value: Record<string, unknown> }> {
  const out: Array<{ field: string; type: number; value: Record<string, unknown> }> = [];
  for (const [key, value] of Object.entries(params) as Array<[keyof MigrateParams, unknown]>) {
    if (value === undefined) continue;
    const spec = PARAM_FIELDS[key];
    if (!spec) throw new TypeError(`unknown migration parameter ${String(key)}`);
    if (spec.type === 'string') {
      checkString(`migration parameter ${key}`, value as string, 16 * 1024 * 1024);
      out.push({ field: spec.field, type: 7, value: { s: value } });
    } else if (spec.type === 'ullong') {
      if (!Number.isSafeInteger(value) || (value as number) < 0) throw new RangeError(`migration parameter ${key} must be a non-negative integer`);
      out.push({ field: spec.field, type: 4, value: { ul: BigInt(value as number) } });
    } else {
      if (!Number.isSafeInteger(value) || Math.abs(value as number) > 2 ** 31 - 1) throw new RangeError(`migration parameter ${key} must be a 32-bit integer`);
      out.push({ field: spec.field, type: 1, value: { i: value } });
    }
  }
  return out;
}

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
    const n = load();
    return sync('virDomainGetName', () => n.domainGetName(this.live()) as string | null, (r) => r === null)!;
  }

  get uuid(): string {
    const n = load();
    const buf = Buffer.alloc(37);
    sync('virDomainGetUUIDString', () => n.domainGetUUIDString(this.live(), buf), isNeg);
    return buf.toString('latin1', 0, 36);
  }

  /** The running domain's id, or undefined when it is not running. */
  get id(): number | undefined {
    const n = load();
    const id = Number(quiet(() => n.domainGetID(this.live())));
    return id === 0xffffffff ? undefined : id;
  }

  /** Domain XML: the live definition by default, the persistent one with `inactive`. */
  xml(opts: { inactive?: boolean; migratable?: boolean; secure?: boolean } = {}): string {
    const flags = (opts.inactive ? DomainXmlFlag.INACTIVE : 0) | (opts.migratable ? DomainXmlFlag.MIGRATABLE : 0) | (opts.secure ? DomainXmlFlag.SECURE : 0);
    const n = load();
    return sync(`virDomainGetXMLDesc ${this.label()}`, () => n.domainGetXMLDesc(this.live(), flags) as string | null, (x) => x === null)!;
  }

  state(): DomainStateInfo {
    const n = load();
    const st = [0];
    const reason = [0];
    sync(`virDomainGetState ${this.label()}`, () => n.domainGetState(this.live(), st, reason, 0), isNeg);
    return { state: STATE_NAMES[st[0]!] ?? 'unknown', code: st[0]!, reason: reason[0]! };
  }

  start(): void {
    sync(`virDomainCreate ${this.label()}`, () => load().domainCreate(this.live()), isNeg);
  }

  destroy(): void {
    sync(`virDomainDestroy ${this.label()}`, () => load().domainDestroy(this.live()), isNeg);
  }

  suspend(): void {
    sync(`virDomainSuspend ${this.label()}`, () => load().domainSuspend(this.live()), isNeg);
  }

  resume(): void {
    sync(`virDomainResume ${this.label()}`, () => load().domainResume(this.live()), isNeg);
  }

  undefine(): void {
    sync(`virDomainUndefine ${this.label()}`, () => load().domainUndefine(this.live()), isNeg);
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
    const n = load();
    const out = Buffer.alloc(8);
    const json = JSON.stringify(args === undefined ? { execute: command } : { execute: command, arguments: args });
    sync(`virDomainQemuMonitorCommand ${this.label()} ${command}`, () => n.qemuMonitorCommand(this.live(), json, out, 0), isNeg);
    const p = readPtr(out);
    if (p === 0n) throw new QmpProtocolError(`libvirt returned no reply to ${command}`);
    let text: string;
    try {
      text = n.koffi.decode.string(p);
    } finally {
      n.koffi.free(p);
    }
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
    const n = load();
    await callAsync(`virDomainMigrateToURI3 ${this.label()}${dconnuri ? ` -> ${dconnuri}` : ''}`, n.domainMigrateToURI3, [this.live(), dconnuri ?? null, list.length ? list : null, list.length, flags >>> 0]);
  }

  /** Frees the libvirt handle now (otherwise it is freed when garbage-collected). */
  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    domainFinalizer.unregister(this);
    const n = load();
    quiet(() => n.domainFree(this.handle));
  }

  private live(): Ptr {
    if (this.disposed) throw new LibvirtError('domain', ErrorCode.INVALID_DOMAIN, 0, 'the domain handle was disposed');
    this.conn.live();
    return this.handle;
  }

  private label(): string {
    const n = load();
    return quiet(() => n.domainGetName(this.handle) as string | null) ?? '?';
  }
}

