// The koffi declarations of libvirt.so.0 and libvirt-qemu.so.0: the one file of the libvirt
// binding that loads koffi (DESIGN.md: only src/host/sys.ts and this file touch it). The
// rest of src/libvirt calls the functions declared here and the few helpers below that
// decode or free what libvirt allocated; none of it sees koffi.
//
// Loaded on first use: a hook or CLI command that never talks to libvirt does not pay for
// dlopen'ing libvirt. libvirt calls back into JavaScript in two places (its error callback
// and QEMU monitor events); the trampolines for those are registered here once and forward
// to the handlers the other modules install in `nativeHandlers`.

import { createRequire } from 'node:module';

/** A C pointer as koffi hands it out. */
export type Ptr = bigint;

/** A declared C function: called synchronously, or on a libuv worker with `.async`. */
export interface KFn {
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
  view(ptr: Ptr, len: number): ArrayBuffer;
}

/** The libvirt functions vfio-mig uses (libvirt 11.3 prototypes). */
export interface Natives {
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
  domainGetJobStats: KFn;
  domainGetJobInfo: KFn;
  domainAbortJob: KFn;
  domainMigrateSetMaxSpeed: KFn;
  domainMigrateSetMaxDowntime: KFn;
  typedParamsFree: KFn;
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

/** A virError as decoded from libvirt's struct. */
export interface RawVirError {
  code: number;
  domain: number;
  message: string | null;
}

/**
 * Where libvirt's callbacks go. Installed by calls.ts (errors) and monitor-events.ts (QEMU
 * monitor events) when they are imported, i.e. before the first call can load libvirt.
 */
export const nativeHandlers: {
  /** virErrorFunc: `error` is a virError pointer (decode it with decodeVirError). */
  error: (error: unknown) => void;
  /** virConnectDomainQemuMonitorEventCallback, minus the connection. */
  monitorEvent: (dom: unknown, event: string | null, seconds: unknown, micros: unknown, details: string | null, opaque: unknown) => void;
} = {
  error: () => {},
  monitorEvent: () => {},
};

let koffi: Koffi | undefined;
let virErrorType: unknown;
let natives: Natives | undefined;

/** The declared functions; loads koffi and libvirt on the first call. */
export function libvirt(): Natives {
  if (natives) return natives;
  const k = createRequire(import.meta.url)('koffi') as Koffi;
  let lib: ReturnType<Koffi['load']>;
  let qemu: ReturnType<Koffi['load']>;
  try {
    lib = k.load('libvirt.so.0');
    qemu = k.load('libvirt-qemu.so.0');
  } catch (err) {
    throw new Error(`cannot load libvirt (libvirt.so.0 / libvirt-qemu.so.0): ${(err as Error).message}; install libvirt0 (Debian: apt-get install libvirt0)`, { cause: err });
  }
  k.opaque('virConnect');
  k.opaque('virDomain');
  k.opaque('virNodeDevice');
  const VirError = k.struct('virError', {
    code: 'int', domain: 'int', message: 'const char *', level: 'int', conn: 'void *', dom: 'void *',
    str1: 'const char *', str2: 'const char *', str3: 'const char *', int1: 'int', int2: 'int', net: 'void *',
  });
  k.union('virTypedParameterValue', { i: 'int', ui: 'uint', l: 'int64_t', ul: 'uint64_t', d: 'double', b: 'char', s: 'const char *' });
  k.struct('virTypedParameter', { field: k.array('char', 80), type: 'int', value: 'virTypedParameterValue' });
  k.struct('virDomainJobInfo', {
    type: 'int', timeElapsed: 'uint64_t', timeRemaining: 'uint64_t', dataTotal: 'uint64_t', dataProcessed: 'uint64_t', dataRemaining: 'uint64_t',
    memTotal: 'uint64_t', memProcessed: 'uint64_t', memRemaining: 'uint64_t', fileTotal: 'uint64_t', fileProcessed: 'uint64_t', fileRemaining: 'uint64_t',
  });
  // Strings libvirt allocates and the caller frees: koffi frees them after conversion.
  k.disposable('virHeapString', 'str');
  const errorFunc = k.proto('void virErrorFunc(void *userData, virError *error)');
  const monitorEventProto = k.proto('void virConnectDomainQemuMonitorEventCallback(virConnect *conn, virDomain *dom, const char *event, long long seconds, unsigned int micros, const char *details, void *opaque)');
  const timeoutProto = k.proto('void virEventTimeoutCallback(int timer, void *opaque)');

  const n: Natives = {
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
    // params: out-pointer to an array libvirt allocates (freed with virTypedParamsFree).
    domainGetJobStats: lib.func('int virDomainGetJobStats(virDomain *dom, _Out_ int *type, void *params, _Out_ int *nparams, unsigned int flags)'),
    domainGetJobInfo: lib.func('int virDomainGetJobInfo(virDomain *dom, _Out_ virDomainJobInfo *info)'),
    domainAbortJob: lib.func('int virDomainAbortJob(virDomain *dom)'),
    domainMigrateSetMaxSpeed: lib.func('int virDomainMigrateSetMaxSpeed(virDomain *dom, unsigned long bandwidth, unsigned int flags)'),
    domainMigrateSetMaxDowntime: lib.func('int virDomainMigrateSetMaxDowntime(virDomain *dom, unsigned long long downtime, unsigned int flags)'),
    typedParamsFree: lib.func('void virTypedParamsFree(void *params, int nparams)'),
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
  koffi = k;
  virErrorType = VirError;
  setErrorFunc(null, k.register((_userData: unknown, error: unknown) => nativeHandlers.error(error), k.pointer(errorFunc)));
  n.monitorEventCb = k.register(
    (_conn: unknown, dom: unknown, event: string | null, seconds: unknown, micros: unknown, details: string | null, opaque: unknown) => nativeHandlers.monitorEvent(dom, event, seconds, micros, details, opaque),
    k.pointer(monitorEventProto),
  );
  n.wakeTimeoutCb = k.register((timer: number) => void n.eventRemoveTimeout(timer), k.pointer(timeoutProto));
  natives = n;
  return n;
}

/** The declared functions if libvirt was loaded already, else undefined (never loads it). */
export function libvirtIfLoaded(): Natives | undefined {
  return natives;
}

function loadedKoffi(): Koffi {
  if (!koffi) throw new Error('libvirt binding: native helper used before libvirt was loaded');
  return koffi;
}

/** Decodes a virError pointer (as virGetLastError or the error callback give it); undefined for none. */
export function decodeVirError(ptr: unknown): RawVirError | undefined {
  if (ptr === null || ptr === undefined || ptr === 0n) return undefined;
  const e = loadedKoffi().decode(ptr as Ptr, virErrorType) as RawVirError;
  return e.code === 0 ? undefined : e;
}

/** Reads a NUL-terminated string libvirt allocated, then frees it. */
export function takeCString(ptr: Ptr): string {
  const k = loadedKoffi();
  try {
    return k.decode.string(ptr);
  } finally {
    k.free(ptr);
  }
}

/** Decodes an array of `count` pointers that libvirt allocated, then frees the array. */
export function takePtrArray(arr: Ptr, count: number): Ptr[] {
  const k = loadedKoffi();
  if (count <= 0 || arr === 0n) {
    if (arr !== 0n) k.free(arr);
    return [];
  }
  const ptrs = (k.decode(arr, 'void *', count) as Array<Ptr | null>).map((p) => BigInt(p ?? 0));
  k.free(arr);
  return ptrs;
}

/** A copy of `len` bytes of native memory at `ptr` (e.g. a typed parameter array). */
export function copyNative(ptr: Ptr, len: number): Buffer {
  if (len <= 0) return Buffer.alloc(0);
  return Buffer.from(new Uint8Array(loadedKoffi().view(ptr, len)));
}

/** Reads a NUL-terminated string libvirt owns (not freed here). */
export function peekCString(ptr: Ptr): string {
  return loadedKoffi().decode.string(ptr);
}

/** The pointer libvirt stored into an out-parameter buffer (8 bytes, little-endian). */
export function readPtr(buf: Buffer): Ptr {
  return buf.readBigUInt64LE(0);
}
