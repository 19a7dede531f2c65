// A fake kernel behind the syscall seam, for fast rootless unit tests.
//
// It models what src/vfio touches: the container, group and device fds, the cdev/iommufd
// path, VFIO_DEVICE_FEATURE dispatch in the kernel's order of checks, a migration driver
// that walks vfio_mig_get_next_state() one arc at a time (state updated only after an
// arc succeeds, as mlx5 and mtty do), data sessions with stream bytes, precopy info,
// reset, and fd accounting. It also writes the matching sysfs tree into a temp dir.
// The same conformance suite (test/conformance/) runs against it and against the real
// kernel in the rig, which holds this fake to the kernel.
//
// The state machine is the fake's own transcription of the kernel's (./kernel-fsm.ts),
// never src/vfio/fsm.ts: the suite then compares two independent sources.
//
// Like a Linux process, the fake hands out the lowest free fd number (from 3: 0-2 are
// stdio), so a close followed by an open reuses the number; a closed fd is EBADF
// (poll reports POLLNVAL, as poll(2) does).

import { mkdtempSync, mkdirSync, writeFileSync, symlinkSync, rmSync, existsSync, readdirSync, readlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, basename } from 'node:path';
import { createHash } from 'node:crypto';
import { type Syscalls, type IoctlArg, SysError } from '../../src/host/sys.ts';
import { Errno } from '../../src/host/errno.ts';
import * as U from '../../src/vfio/uapi.ts';
import { MigState, parseMigState } from '../../src/vfio/uapi.ts';
import { vfioMigGetNextState, driverArcAction, kernelStateName } from './kernel-fsm.ts';

interface Arc {
  from: MigState;
  to: MigState;
}

/**
 * Thrown when a caller sends what makes an unfixed kernel (6.12 included) spin forever
 * in vfio_mig_get_next_state(): SET STOP_COPY -> PRE_COPY(_P2P) on a PRE_COPY device.
 * The real call never returns (soft lockup, the driver's state mutex held); the fake
 * fails the test loudly instead.
 */
export class FakeKernelLockup extends Error {
  constructor(from: number, to: number) {
    super(`fake kernel: SET ${kernelStateName(from)} -> ${kernelStateName(to)} spins forever in vfio_mig_get_next_state() on kernels without the 2026 fix (soft lockup) - it must never be sent`);
    this.name = 'FakeKernelLockup';
  }
}

export interface FailureInjection {
  from: MigState;
  to: MigState;
  errno: number;
  mode: 'once' | 'always';
  /** 'stay': device remains in the arc's start state (mlx5). 'error': device goes to ERROR. */
  outcome: 'stay' | 'error';
  /** Instead of failing at once, never finish the arc (until reset or close). */
  hang?: boolean;
}

export interface FakeDeviceSpec {
  /** PCI BDF or mdev UUID. */
  id: string;
  group?: number;
  driver?: string;
  /** GET MIGRATION flags; undefined = the driver has no migration support (ENOTTY). */
  flags?: number | bigint;
  /** Show the removed v1 migration region (only meaningful without `flags`). */
  v1Region?: boolean;
  /** Bytes of opaque device state. */
  stateSize?: number;
  seed?: number;
  /** What a PRE_COPY read with nothing pending returns: mlx5's ENOMSG or mtty's 0. */
  precopyEmpty?: 'ENOMSG' | 'zero';
  /** On bad data at RESUMING->STOP: 'error' (edu test driver) or 'stay' in RESUMING (mtty). */
  badDataOutcome?: 'error' | 'stay';
  canReset?: boolean;
  dmaLogging?: boolean;
  /** Per-arc latency for async SETs, in ms. */
  arcLatencyMs?: number;
  /**
   * MIG_DATA_SIZE is an estimate in the uAPI: a driver may report this fixed number of
   * bytes instead of the exact remainder (undefined: the exact remainder).
   */
  dataSizeEstimate?: number;
  /** Has a vfio-dev cdev (requires the kernel's cdev support). */
  cdev?: boolean;
  /** A buggy driver: its state machine runs with these flags, not the ones it reports. */
  fsmFlags?: number;
  /** false: like mtty, RESUMING -> STOP takes whatever was written, unchecked. */
  validatesData?: boolean;
  vendor?: string;
  deviceId?: string;
  /**
   * The migration state the next open finds after the last close. 'kept' (default): the
   * mtty sample's close_device only disables the migration files, the state persists
   * (a device closed in STOP is still in STOP when reopened). 'running': drivers whose
   * open_device/close_device return to RUNNING (mlx5, hisi_acc, our edu-vfio-pci).
   */
  stateOnReopen?: 'kept' | 'running';
}

export interface ArcRecord {
  from: MigState;
  to: MigState;
  errno: number;
}

const MAGIC = Buffer.from('FAKEMIG1');
const HEADER = 24; // magic(8) + version u32 + payload length u32 + seed u64
const TRAILER = 32; // sha256 of everything before it

interface SavingSession {
  kind: 'saving';
  device: FakeDevice;
  bytes: Buffer;
  /** Bytes of `bytes` that belong to the initial (pre-copy) part. */
  initialLength: number;
  pos: number;
  final: boolean;
  disabled: boolean;
}

interface ResumingSession {
  kind: 'resuming';
  device: FakeDevice;
  chunks: Buffer[];
  length: number;
  disabled: boolean;
}

type Session = SavingSession | ResumingSession;

export class FakeDevice {
  readonly spec: Required<Omit<FakeDeviceSpec, 'flags' | 'vendor' | 'deviceId' | 'fsmFlags' | 'validatesData' | 'stateOnReopen' | 'dataSizeEstimate'>> & { validatesData: boolean; stateOnReopen: 'kept' | 'running' } & { flags: bigint | undefined; fsmFlags: number | undefined; dataSizeEstimate: number | undefined };
  state: MigState = MigState.Running;
  payload: Buffer;
  /** Identity of the state content; travels with the stream like the edu driver's seed. */
  seed: number;
  dirtyPending = 0;
  failures: FailureInjection[] = [];
  arcLog: ArcRecord[] = [];
  session: Session | undefined;
  precopyV2 = false;
  opened = 0;
  /** How many of `opened` came through the cdev path. */
  cdevOpens = 0;
  /** Resolvers of arcs hung by an injection; reset/close release them. */
  hung: (() => void)[] = [];

  constructor(spec: FakeDeviceSpec, group: number) {
    this.spec = {
      id: spec.id.toLowerCase(),
      group,
      driver: spec.driver ?? 'edu-vfio-pci',
      flags: spec.flags === undefined ? undefined : BigInt(spec.flags),
      v1Region: spec.v1Region ?? false,
      stateSize: spec.stateSize ?? 4096,
      seed: spec.seed ?? 1,
      precopyEmpty: spec.precopyEmpty ?? 'ENOMSG',
      badDataOutcome: spec.badDataOutcome ?? 'error',
      canReset: spec.canReset ?? true,
      dmaLogging: spec.dmaLogging ?? false,
      arcLatencyMs: spec.arcLatencyMs ?? 0,
      cdev: spec.cdev ?? false,
      fsmFlags: spec.fsmFlags,
      validatesData: spec.validatesData ?? true,
      stateOnReopen: spec.stateOnReopen ?? 'kept',
      dataSizeEstimate: spec.dataSizeEstimate,
    };
    this.seed = this.spec.seed;
    this.payload = derivePayload(this.seed, this.spec.stateSize);
  }

  get flags(): number {
    return this.spec.flags === undefined ? 0 : Number(this.spec.flags & 0xffffffffn);
  }

  get migratable(): boolean {
    return this.spec.flags !== undefined;
  }

  /** An mdev (named by UUID, like mtty) rather than a vfio-pci-core PCI function. */
  get isMdev(): boolean {
    return this.spec.id.includes('-');
  }

  /** A digest of the logical device state, to compare source and destination. */
  digest(): string {
    return createHash('sha256').update(this.payload).digest('hex').slice(0, 16);
  }

  streamBytes(): Buffer {
    const header = Buffer.alloc(HEADER);
    MAGIC.copy(header, 0);
    header.writeUInt32LE(1, 8);
    header.writeUInt32LE(this.payload.length, 12);
    header.writeBigUInt64LE(BigInt(this.seed), 16);
    return Buffer.concat([header, this.payload]);
  }
}

function derivePayload(seed: number, size: number): Buffer {
  const out = Buffer.alloc(size);
  let x = BigInt(seed) & 0xffffffffffffffffn;
  for (let i = 0; i < size; i += 8) {
    // splitmix64
    x = (x + 0x9e3779b97f4a7c15n) & 0xffffffffffffffffn;
    let z = x;
    z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & 0xffffffffffffffffn;
    z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & 0xffffffffffffffffn;
    z ^= z >> 31n;
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(z);
    b.copy(out, i, 0, Math.min(8, size - i));
  }
  return out;
}

function trailerFor(bytes: Buffer): Buffer {
  return createHash('sha256').update(bytes).digest();
}

type FdEntry =
  | { kind: 'container'; iommuSet: boolean; groups: Set<number> }
  | { kind: 'group'; group: number; container?: number }
  | { kind: 'device'; device: FakeDevice; bound: boolean; viaCdev: boolean }
  | { kind: 'data'; session: Session }
  | { kind: 'iommufd'; nextIoas: number }
  | { kind: 'null' };

export interface FakeKernelOptions {
  /** Offer /dev/vfio/devices and /dev/iommu (CONFIG_VFIO_DEVICE_CDEV). */
  cdev?: boolean;
  /**
   * vfio_mig_get_next_state() with the 2026 fix: STOP_COPY -> PRE_COPY(_P2P) fails with
   * EINVAL. Default false, like the rig's 6.12: the request spins (FakeKernelLockup).
   */
  fixedNextState?: boolean;
}

/** fds 0-2 are the process's stdio; the first fd a process opens is 3. */
const FIRST_FD = 3;

export class FakeKernel implements Syscalls {
  readonly root: string;
  readonly sysfsRoot: string;
  readonly devRoot: string;
  readonly devices = new Map<string, FakeDevice>();
  readonly groupsOpen = new Set<number>();
  /** Every ioctl request made, in order (for accounting tests). */
  readonly ioctlLog: { fd: number; request: number }[] = [];
  /** Every arc and reset of every device, in the order they completed. */
  readonly events: { device: string; from: MigState; to: MigState; errno: number; kind: 'arc' | 'reset' }[] = [];
  #fds = new Map<number, FdEntry>();
  #nextGroup = 10;
  #cdevCount = 0;
  readonly cdev: boolean;
  readonly fixedNextState: boolean;

  constructor(opts: FakeKernelOptions = {}) {
    this.root = mkdtempSync(join(tmpdir(), 'vfio-mig-fake-'));
    this.sysfsRoot = join(this.root, 'sys');
    this.devRoot = join(this.root, 'dev');
    this.cdev = opts.cdev ?? false;
    this.fixedNextState = opts.fixedNextState ?? false;
    for (const d of ['bus/pci/devices', 'bus/pci/drivers', 'bus/mdev/devices', 'kernel/iommu_groups', 'devices']) {
      mkdirSync(join(this.sysfsRoot, d), { recursive: true });
    }
    mkdirSync(join(this.devRoot, 'vfio'), { recursive: true });
    if (this.cdev) mkdirSync(join(this.devRoot, 'vfio', 'devices'), { recursive: true });
  }

  /** Environment for code under test (sysfs.ts reads these). */
  env(): Record<string, string> {
    return { VFIO_MIG_SYSFS: this.sysfsRoot, VFIO_MIG_DEV: this.devRoot };
  }

  dispose(): void {
    rmSync(this.root, { recursive: true, force: true });
  }

  addDevice(spec: FakeDeviceSpec): FakeDevice {
    const group = spec.group ?? this.#nextGroup++;
    const dev = new FakeDevice(spec, group);
    this.devices.set(dev.spec.id, dev);
    const isPci = !dev.spec.id.includes('-');
    const real = join(this.sysfsRoot, 'devices', dev.spec.id);
    mkdirSync(real, { recursive: true });
    writeFileSync(join(real, 'vendor'), `0x${spec.vendor ?? '1234'}\n`);
    writeFileSync(join(real, 'device'), `0x${spec.deviceId ?? '11e8'}\n`);
    const groupDir = join(this.sysfsRoot, 'kernel', 'iommu_groups', String(group), 'devices');
    mkdirSync(groupDir, { recursive: true });
    symlinkSync(join(this.sysfsRoot, 'kernel', 'iommu_groups', String(group)), join(real, 'iommu_group'));
    symlinkSync(real, join(groupDir, dev.spec.id));
    this.setDriver(dev.spec.id, dev.spec.driver);
    if (dev.spec.cdev && this.cdev) {
      const name = `vfio${this.#cdevCount++}`;
      mkdirSync(join(real, 'vfio-dev', name), { recursive: true });
      writeFileSync(join(this.devRoot, 'vfio', 'devices', name), '');
    }
    writeFileSync(join(this.devRoot, 'vfio', String(group)), '');
    symlinkSync(real, join(this.sysfsRoot, 'bus', isPci ? 'pci' : 'mdev', 'devices', dev.spec.id));
    return dev;
  }

  /** Binds a device (or a bare sysfs entry) to a driver by name; '' unbinds. */
  setDriver(id: string, driver: string): void {
    const real = join(this.sysfsRoot, 'devices', id);
    const link = join(real, 'driver');
    rmSync(link, { force: true });
    if (driver) {
      const drvDir = join(this.sysfsRoot, 'bus', 'pci', 'drivers', driver);
      mkdirSync(drvDir, { recursive: true });
      symlinkSync(drvDir, link);
    }
  }

  /** The driver a device is bound to per the sysfs `driver` link ('' when unbound). */
  driverOf(id: string): string {
    try {
      return basename(readlinkSync(join(this.sysfsRoot, 'devices', id, 'driver')));
    } catch {
      return '';
    }
  }

  /** Adds a non-VFIO sibling (e.g. a NIC function bound to a host driver) to a group. */
  addGroupSibling(bdf: string, group: number, driver: string): void {
    const real = join(this.sysfsRoot, 'devices', bdf);
    mkdirSync(real, { recursive: true });
    const groupDir = join(this.sysfsRoot, 'kernel', 'iommu_groups', String(group), 'devices');
    mkdirSync(groupDir, { recursive: true });
    symlinkSync(join(this.sysfsRoot, 'kernel', 'iommu_groups', String(group)), join(real, 'iommu_group'));
    symlinkSync(real, join(groupDir, bdf));
    symlinkSync(real, join(this.sysfsRoot, 'bus', 'pci', 'devices', bdf));
    this.setDriver(bdf, driver);
  }

  device(id: string): FakeDevice {
    const d = this.devices.get(id.toLowerCase());
    if (!d) throw new Error(`fake: no device ${id}`);
    return d;
  }

  inject(id: string, f: { arc: string; errno?: number; mode?: 'once' | 'always'; outcome?: 'stay' | 'error'; hang?: boolean }): void {
    const [a, b] = f.arc.split('>');
    const from = parseMigState(a ?? '');
    const to = parseMigState(b ?? '');
    if (from === undefined || to === undefined) throw new Error(`fake: bad arc ${f.arc}`);
    this.device(id).failures.push({ from, to, errno: f.errno ?? Errno.EIO, mode: f.mode ?? 'once', outcome: f.outcome ?? 'stay', hang: f.hang });
  }

  /** Number of fds the fake kernel holds open (leak checks). */
  openFdCount(kind?: FdEntry['kind']): number {
    let n = 0;
    for (const e of this.#fds.values()) if (!kind || e.kind === kind) n++;
    return n;
  }

  // --------------------------------------------------------------- Syscalls ------

  /** The lowest free fd number, as Linux allocates them (get_unused_fd_flags). */
  #alloc(entry: FdEntry): number {
    let fd = FIRST_FD;
    while (this.#fds.has(fd)) fd++;
    this.#fds.set(fd, entry);
    return fd;
  }

  /** Whether an fd number is open in the fake (tests of fd reuse). */
  isOpenFd(fd: number): boolean {
    return this.#fds.has(fd);
  }

  #entry(fd: number, op: string): FdEntry {
    const e = this.#fds.get(fd);
    if (!e) throw new SysError(op, Errno.EBADF);
    return e;
  }

  open(path: string, _flags: number): number {
    const vfio = join(this.devRoot, 'vfio');
    if (path === join(vfio, 'vfio')) return this.#alloc({ kind: 'container', iommuSet: false, groups: new Set() });
    if (path === join(this.devRoot, 'iommu')) {
      if (!this.cdev) throw new SysError(`open ${path}`, Errno.ENOENT);
      return this.#alloc({ kind: 'iommufd', nextIoas: 1 });
    }
    if (path === '/dev/null') return this.#alloc({ kind: 'null' });
    const cdevDir = join(vfio, 'devices');
    if (path.startsWith(`${cdevDir}/`)) {
      if (!this.cdev || !existsSync(path)) throw new SysError(`open ${path}`, Errno.ENOENT);
      const name = path.slice(cdevDir.length + 1);
      const dev = [...this.devices.values()].find((d) => existsSync(join(this.sysfsRoot, 'devices', d.spec.id, 'vfio-dev', name)));
      if (!dev) throw new SysError(`open ${path}`, Errno.ENOENT);
      return this.#alloc({ kind: 'device', device: dev, bound: false, viaCdev: true });
    }
    if (path.startsWith(`${vfio}/`)) {
      const g = path.slice(vfio.length + 1);
      if (!/^[0-9]+$/.test(g)) throw new SysError(`open ${path}`, Errno.ENOENT);
      const group = Number(g);
      const members = [...this.devices.values()].filter((d) => d.spec.group === group);
      if (members.length === 0 || !members.some((d) => /vfio/.test(this.driverOf(d.spec.id)))) throw new SysError(`open ${path}`, Errno.ENOENT);
      if (this.groupsOpen.has(group)) throw new SysError(`open ${path}`, Errno.EBUSY);
      this.groupsOpen.add(group);
      return this.#alloc({ kind: 'group', group });
    }
    throw new SysError(`open ${path}`, Errno.ENOENT);
  }

  close(fd: number): void {
    const e = this.#entry(fd, 'close');
    this.#fds.delete(fd);
    // Closing a data fd changes nothing in the device: the driver holds its own
    // reference to the migration file (get_file), so the session - and the state - stay
    // until the state is left, the device is reset or closed. Only the caller's handle
    // on the stream is gone (GET never returns the fd again).
    if (e.kind === 'group') this.groupsOpen.delete(e.group);
    if (e.kind === 'device') {
      const d = e.device;
      if (e.bound || !e.viaCdev) {
        d.opened--;
        if (e.viaCdev) d.cdevOpens--;
        if (d.opened === 0) {
          // close_device. mtty's (mtty_close) only disables the migration files: the
          // migration state is NOT reset and the next open finds it unchanged (a device
          // closed in STOP reopens in STOP). vfio-pci-core drivers (mlx5, hisi_acc, our
          // edu) instead return to RUNNING in open_device/close_device: stateOnReopen
          // 'running'. The fake follows mtty by default. The precopy-info v2 opt-in is
          // cleared on close (vfio-pci-core), and an arc hung in the driver ends.
          this.#endSession(d);
          if (d.spec.stateOnReopen === 'running') d.state = MigState.Running;
          d.precopyV2 = false;
          for (const release of d.hung.splice(0)) release();
        }
      }
    }
  }

  ioctl(fd: number, request: number, arg?: IoctlArg): number {
    this.ioctlLog.push({ fd, request });
    const e = this.#entry(fd, 'ioctl');
    switch (e.kind) {
      case 'container':
        return this.#containerIoctl(e, request, arg);
      case 'group':
        return this.#groupIoctl(e, request, arg);
      case 'device':
        return this.#deviceIoctl(e, request, arg, false) as number;
      case 'data':
        return this.#dataIoctl(e.session, request, arg);
      case 'iommufd':
        if (request === U.Ioctl.IOMMU_IOAS_ALLOC && Buffer.isBuffer(arg)) {
          arg.writeUInt32LE(e.nextIoas++, U.Layout.iommuIoasAlloc.outIoasId);
          return 0;
        }
        throw new SysError('ioctl', Errno.ENOTTY);
      default:
        throw new SysError('ioctl', Errno.ENOTTY);
    }
  }

  async ioctlAsync(fd: number, request: number, arg?: Buffer, timing?: { issuedAt?: number; returnedAt?: number }): Promise<number> {
    if (timing) timing.issuedAt = performance.now();
    try {
      this.ioctlLog.push({ fd, request });
      const e = this.#entry(fd, 'ioctl');
      if (e.kind === 'device') return await this.#deviceIoctl(e, request, arg, true);
      await new Promise((r) => setImmediate(r));
      this.ioctlLog.pop();
      return this.ioctl(fd, request, arg);
    } finally {
      if (timing) timing.returnedAt = performance.now();
    }
  }

  async read(fd: number, buf: Buffer, length: number): Promise<number> {
    await new Promise((r) => setImmediate(r));
    const e = this.#entry(fd, 'read');
    if (e.kind === 'null') return 0;
    if (e.kind !== 'data') throw new SysError('read', Errno.EINVAL);
    const s = e.session;
    if (s.kind !== 'saving') throw new SysError('read', Errno.EBADF);
    if (s.disabled) throw new SysError('read', Errno.ENODEV);
    const available = s.bytes.length - s.pos;
    if (available <= 0) {
      if (s.final) return 0;
      if (s.device.spec.precopyEmpty === 'ENOMSG') throw new SysError('read', Errno.ENOMSG);
      return 0;
    }
    const n = Math.min(available, length);
    s.bytes.copy(buf, 0, s.pos, s.pos + n);
    s.pos += n;
    return n;
  }

  async write(fd: number, buf: Buffer, length: number): Promise<number> {
    await new Promise((r) => setImmediate(r));
    const e = this.#entry(fd, 'write');
    if (e.kind === 'null') return length;
    if (e.kind !== 'data') throw new SysError('write', Errno.EINVAL);
    const s = e.session;
    if (s.kind !== 'resuming') throw new SysError('write', Errno.EBADF);
    if (s.disabled) throw new SysError('write', Errno.ENODEV);
    const max = HEADER + s.device.spec.stateSize * 4 + TRAILER + 1024 * 1024;
    if (s.length + length > max) throw new SysError('write', Errno.EFBIG);
    // Accept at most 64 KiB per call so callers must handle short writes.
    const n = Math.min(length, 64 * 1024);
    s.chunks.push(Buffer.from(buf.subarray(0, n)));
    s.length += n;
    const joined = s.length >= 8 && s.chunks.length <= 2 ? Buffer.concat(s.chunks) : undefined;
    if (joined && joined.length >= 8 && !joined.subarray(0, 8).equals(MAGIC)) throw new SysError('write', Errno.EINVAL);
    return n;
  }

  async poll(fd: number, events: number, _timeoutMs: number): Promise<number> {
    // poll(2) does not fail on a closed fd: it reports POLLNVAL in revents.
    if (!this.#fds.has(fd)) return 0x20 /* POLLNVAL */;
    return events;
  }

  // --------------------------------------------------------------- per fd kind ----

  #containerIoctl(e: Extract<FdEntry, { kind: 'container' }>, request: number, arg?: IoctlArg): number {
    switch (request) {
      case U.Ioctl.GET_API_VERSION:
        return U.VFIO_API_VERSION;
      case U.Ioctl.CHECK_EXTENSION:
        return arg === U.Extension.TYPE1v2 || arg === U.Extension.TYPE1 ? 1 : 0;
      case U.Ioctl.SET_IOMMU:
        if (e.groups.size === 0) throw new SysError('ioctl', Errno.EINVAL);
        if (arg !== U.Extension.TYPE1v2 && arg !== U.Extension.TYPE1) throw new SysError('ioctl', Errno.EINVAL);
        e.iommuSet = true;
        return 0;
      default:
        throw new SysError('ioctl', Errno.ENOTTY);
    }
  }

  #groupIoctl(e: Extract<FdEntry, { kind: 'group' }>, request: number, arg?: IoctlArg): number {
    switch (request) {
      case U.Ioctl.GROUP_GET_STATUS: {
        if (!Buffer.isBuffer(arg) || arg.length < 8 || arg.readUInt32LE(0) < 8) throw new SysError('ioctl', Errno.EINVAL);
        const viable = this.#groupViable(e.group);
        arg.writeUInt32LE((viable ? U.GroupStatusFlag.VIABLE : 0) | (e.container !== undefined ? U.GroupStatusFlag.CONTAINER_SET : 0), 4);
        return 0;
      }
      case U.Ioctl.GROUP_SET_CONTAINER: {
        if (!Buffer.isBuffer(arg)) throw new SysError('ioctl', Errno.EFAULT);
        if (e.container !== undefined) throw new SysError('ioctl', Errno.EINVAL);
        if (!this.#groupViable(e.group)) throw new SysError('ioctl', Errno.EPERM);
        const cfd = arg.readInt32LE(0);
        const c = this.#fds.get(cfd);
        if (!c) throw new SysError('ioctl', Errno.EBADF);
        if (c.kind !== 'container') throw new SysError('ioctl', Errno.EINVAL);
        c.groups.add(e.group);
        e.container = cfd;
        return 0;
      }
      case U.Ioctl.GROUP_GET_DEVICE_FD: {
        if (!Buffer.isBuffer(arg)) throw new SysError('ioctl', Errno.EFAULT);
        const c = e.container === undefined ? undefined : this.#fds.get(e.container);
        if (!c || c.kind !== 'container' || !c.iommuSet) throw new SysError('ioctl', Errno.EINVAL);
        const nul = arg.indexOf(0);
        const name = arg.subarray(0, nul < 0 ? arg.length : nul).toString('ascii');
        const dev = this.devices.get(name.toLowerCase());
        if (!dev || dev.spec.group !== e.group) throw new SysError('ioctl', Errno.ENODEV);
        dev.opened++;
        return this.#alloc({ kind: 'device', device: dev, bound: true, viaCdev: false });
      }
      default:
        throw new SysError('ioctl', Errno.ENOTTY);
    }
  }

  /** Viable when every member is unbound, VFIO-bound, or on a driver VFIO tolerates. */
  #groupViable(group: number): boolean {
    const dir = join(this.sysfsRoot, 'kernel', 'iommu_groups', String(group), 'devices');
    const members = existsSync(dir) ? readdirSync(dir) : [];
    return members.every((m) => {
      const driver = this.driverOf(m);
      return driver === '' || /vfio/.test(driver) || driver === 'pcieport' || driver === 'pci-stub';
    });
  }

  #deviceIoctl(e: Extract<FdEntry, { kind: 'device' }>, request: number, arg: IoctlArg, async: boolean): number | Promise<number> {
    const d = e.device;
    if (e.viaCdev && !e.bound && request !== U.Ioctl.DEVICE_BIND_IOMMUFD) throw new SysError('ioctl', Errno.EINVAL);
    switch (request) {
      case U.Ioctl.DEVICE_BIND_IOMMUFD: {
        if (!e.viaCdev || e.bound) throw new SysError('ioctl', Errno.EINVAL);
        if (!Buffer.isBuffer(arg) || arg.readUInt32LE(0) < 16) throw new SysError('ioctl', Errno.EINVAL);
        if (arg.readUInt32LE(4) !== 0) throw new SysError('ioctl', Errno.EINVAL);
        const ifd = this.#fds.get(arg.readInt32LE(8));
        if (!ifd || ifd.kind !== 'iommufd') throw new SysError('ioctl', Errno.EBADF);
        // The kernel: EBUSY when the legacy group is in use, EINVAL when the device is
        // already bound through another cdev fd (one open only on this path).
        if (d.opened > d.cdevOpens) throw new SysError('ioctl', Errno.EBUSY);
        if (d.cdevOpens > 0) throw new SysError('ioctl', Errno.EINVAL);
        e.bound = true;
        d.cdevOpens++;
        d.opened++;
        return 0;
      }
      case U.Ioctl.DEVICE_ATTACH_IOMMUFD_PT:
        if (!e.viaCdev || !Buffer.isBuffer(arg) || arg.readUInt32LE(0) < 12) throw new SysError('ioctl', Errno.EINVAL);
        return 0;
      case U.Ioctl.DEVICE_GET_INFO: {
        if (!Buffer.isBuffer(arg) || arg.readUInt32LE(0) < 16) throw new SysError('ioctl', Errno.EINVAL);
        arg.writeUInt32LE(U.DeviceInfoFlag.PCI | (d.spec.canReset ? U.DeviceInfoFlag.RESET : 0), 4);
        arg.writeUInt32LE(d.spec.v1Region ? 10 : 9, 8);
        arg.writeUInt32LE(5, 12);
        return 0;
      }
      case U.Ioctl.DEVICE_GET_REGION_INFO:
        return this.#regionInfo(d, arg);
      case U.Ioctl.DEVICE_RESET:
        if (!d.spec.canReset) throw new SysError('ioctl', Errno.EINVAL);
        this.events.push({ device: d.spec.id, from: d.state, to: MigState.Running, errno: 0, kind: 'reset' });
        this.#endSession(d);
        d.state = MigState.Running;
        for (const release of d.hung.splice(0)) release();
        return async ? Promise.resolve(0) : 0;
      case U.Ioctl.DEVICE_FEATURE:
        return this.#feature(d, arg, async);
      default:
        throw new SysError('ioctl', Errno.ENOTTY);
    }
  }

  #regionInfo(d: FakeDevice, arg: IoctlArg): number {
    if (!Buffer.isBuffer(arg) || arg.readUInt32LE(0) < 32) throw new SysError('ioctl', Errno.EINVAL);
    const index = arg.readUInt32LE(U.RegionInfo.index);
    if (index >= (d.spec.v1Region ? 10 : 9)) throw new SysError('ioctl', Errno.EINVAL);
    if (index !== 9) {
      arg.writeUInt32LE(0, U.RegionInfo.flags);
      return 0;
    }
    // The v1 migration region carries a CAP_TYPE capability: needs 48 bytes.
    if (arg.length < 48) {
      arg.writeUInt32LE(48, U.RegionInfo.argsz);
      arg.writeUInt32LE(U.RegionInfo.FLAG_CAPS, U.RegionInfo.flags);
      arg.writeUInt32LE(0, U.RegionInfo.capOffset);
      return 0;
    }
    arg.writeUInt32LE(U.RegionInfo.FLAG_CAPS, U.RegionInfo.flags);
    arg.writeUInt32LE(32, U.RegionInfo.capOffset);
    arg.writeUInt16LE(U.RegionInfo.CAP_TYPE, 32);
    arg.writeUInt16LE(1, 34);
    arg.writeUInt32LE(0, 36);
    arg.writeUInt32LE(U.RegionInfo.TYPE_MIGRATION_DEPRECATED, 40);
    arg.writeUInt32LE(U.RegionInfo.SUBTYPE_MIGRATION_DEPRECATED, 44);
    return 0;
  }

  /** VFIO_DEVICE_FEATURE in the kernel's order of checks (vfio_main.c + vfio_check_feature). */
  #feature(d: FakeDevice, arg: IoctlArg, async: boolean): number | Promise<number> {
    if (!Buffer.isBuffer(arg) || arg.length < 8) throw new SysError('ioctl', Errno.EFAULT);
    const argsz = arg.readUInt32LE(0);
    const flags = arg.readUInt32LE(4);
    if (argsz < 8 || argsz > arg.length) throw new SysError('ioctl', argsz < 8 ? Errno.EINVAL : Errno.EFAULT);
    const known = U.FeatureFlag.MASK | U.FeatureFlag.GET | U.FeatureFlag.SET | U.FeatureFlag.PROBE;
    if ((flags & ~known) !== 0) throw new SysError('ioctl', Errno.EINVAL);
    const get = (flags & U.FeatureFlag.GET) !== 0;
    const set = (flags & U.FeatureFlag.SET) !== 0;
    const probe = (flags & U.FeatureFlag.PROBE) !== 0;
    if (get && set && !probe) throw new SysError('ioctl', Errno.EINVAL);
    const feature = flags & U.FeatureFlag.MASK;
    const check = (supported: number, minsz: number): boolean => {
      if ((get && !(supported & U.FeatureFlag.GET)) || (set && !(supported & U.FeatureFlag.SET))) throw new SysError('ioctl', Errno.EINVAL);
      if (probe) return false;
      if (!get && !set) throw new SysError('ioctl', Errno.EINVAL);
      if (argsz - 8 < minsz) throw new SysError('ioctl', Errno.EINVAL);
      return true;
    };
    const payload = arg.subarray(8);
    switch (feature) {
      case U.Feature.MIGRATION:
        if (!d.migratable) throw new SysError('ioctl', Errno.ENOTTY);
        if (check(U.FeatureFlag.GET, 8)) payload.writeBigUInt64LE(d.spec.flags!, 0);
        return 0;
      case U.Feature.MIG_DEVICE_STATE: {
        if (!d.migratable) throw new SysError('ioctl', Errno.ENOTTY);
        if (!check(U.FeatureFlag.GET | U.FeatureFlag.SET, 8)) return 0;
        if (get) {
          payload.writeUInt32LE(d.state, 0);
          payload.writeInt32LE(-1, 4);
          return 0;
        }
        const target = payload.readUInt32LE(0);
        payload.writeInt32LE(-1, 4);
        return async ? this.#setStateAsync(d, target, payload) : this.#setStateSync(d, target, payload);
      }
      case U.Feature.MIG_DATA_SIZE:
        if (!d.migratable) throw new SysError('ioctl', Errno.ENOTTY);
        if (check(U.FeatureFlag.GET, 8)) payload.writeBigUInt64LE(BigInt(d.spec.dataSizeEstimate ?? this.#remainingStopCopyBytes(d)), 0);
        return 0;
      case U.Feature.DMA_LOGGING_START:
      case U.Feature.DMA_LOGGING_STOP:
      case U.Feature.DMA_LOGGING_REPORT:
        if (!d.spec.dmaLogging) throw new SysError('ioctl', Errno.ENOTTY);
        check(feature === U.Feature.DMA_LOGGING_REPORT ? U.FeatureFlag.GET : U.FeatureFlag.SET, feature === U.Feature.DMA_LOGGING_START ? 24 : feature === U.Feature.DMA_LOGGING_REPORT ? 32 : 0);
        return 0;
      case U.Feature.MIG_PRECOPY_INFOv2:
        if (!(d.flags & U.MigrationFlag.PRE_COPY)) throw new SysError('ioctl', Errno.EINVAL);
        if (check(U.FeatureFlag.SET, 0)) d.precopyV2 = true;
        return 0;
      default:
        // vfio_ioctl_device_feature(): "if (!device->ops->device_feature) return -EINVAL"
        // (mdevs such as mtty have no device_feature op); vfio-pci-core's answers ENOTTY.
        throw new SysError('ioctl', d.isMdev ? Errno.EINVAL : Errno.ENOTTY);
    }
  }

  #remainingStopCopyBytes(d: FakeDevice): number {
    const s = d.session;
    if (s?.kind === 'saving') {
      const unread = s.bytes.length - s.pos;
      return s.final ? unread : unread + d.dirtyPending + TRAILER;
    }
    return HEADER + d.payload.length + d.dirtyPending + TRAILER;
  }

  #setStateSync(d: FakeDevice, target: number, payload: Buffer): number {
    const steps = this.#steps(d, target);
    for (const arc of steps) {
      const r = this.#runArc(d, arc, target, payload);
      if (r === 'hang') throw new SysError('ioctl', Errno.EDEADLK);
    }
    return 0;
  }

  async #setStateAsync(d: FakeDevice, target: number, payload: Buffer): Promise<number> {
    for (const arc of this.#steps(d, target)) {
      await sleep(d.spec.arcLatencyMs);
      const r = this.#runArc(d, arc, target, payload);
      if (r === 'hang') {
        await new Promise<void>((resolve) => d.hung.push(resolve));
        throw new SysError('ioctl', Errno.EINTR);
      }
    }
    return 0;
  }

  /**
   * The driver's loop (mtty_set_state()): while (state != new_state) { next =
   * vfio_mig_get_next_state(); step; state = next; }. Requesting the current state is a
   * successful no-op that validates nothing (even ERROR while in ERROR).
   */
  *#steps(d: FakeDevice, target: number): Generator<Arc> {
    while (d.state !== target) {
      const hop = vfioMigGetNextState(d.state, target, d.spec.fsmFlags ?? d.flags, { fixed: this.fixedNextState });
      if ('spins' in hop) throw new FakeKernelLockup(d.state, target);
      if (hop.rc !== 0) throw new SysError('ioctl', Errno.EINVAL);
      yield { from: d.state, to: hop.next as MigState };
    }
  }

  #runArc(d: FakeDevice, arc: Arc, target: number, payload: Buffer): 'ok' | 'hang' {
    const injected = d.failures.find((f) => f.from === arc.from && f.to === arc.to);
    if (injected) {
      if (injected.mode === 'once') d.failures.splice(d.failures.indexOf(injected), 1);
      d.arcLog.push({ from: arc.from, to: arc.to, errno: injected.errno });
      this.events.push({ device: d.spec.id, from: arc.from, to: arc.to, errno: injected.errno, kind: 'arc' });
      if (injected.hang) return 'hang';
      if (injected.outcome === 'error') {
        this.#endSession(d);
        d.state = MigState.Error;
      }
      throw new SysError('ioctl', injected.errno);
    }
    const action = driverArcAction(arc.from, arc.to);
    if (action === 'unexpected') throw new SysError('ioctl', Errno.EINVAL); // WARN_ON(true)
    // Only the final arc may return a file: WARN_ON(ret && new_state != next_state).
    const opens = action === 'open-saving' ? 'saving' : action === 'open-resuming' ? 'resuming' : undefined;
    if (opens && arc.to !== target) throw new SysError('ioctl', Errno.EINVAL);
    if (action === 'close' || action === 'load-and-close') {
      if (action === 'load-and-close') {
        const s = d.session;
        const ok = s?.kind === 'resuming' && this.#commitResume(d, s);
        if (!ok) {
          d.arcLog.push({ from: arc.from, to: arc.to, errno: Errno.EINVAL });
          this.events.push({ device: d.spec.id, from: arc.from, to: arc.to, errno: Errno.EINVAL, kind: 'arc' });
          if (d.spec.badDataOutcome === 'error') {
            this.#endSession(d);
            d.state = MigState.Error;
          }
          throw new SysError('ioctl', Errno.EINVAL);
        }
      }
      this.#endSession(d);
    }
    if (action === 'continue-saving' && d.session?.kind === 'saving') {
      // PRE_COPY(_P2P) -> STOP_COPY: the same fd continues with the final part.
      const s = d.session;
      const tail = Buffer.concat([derivePayload(d.seed + 7, d.dirtyPending)]);
      d.dirtyPending = 0;
      const body = Buffer.concat([s.bytes, tail]);
      s.bytes = Buffer.concat([body, trailerFor(body)]);
      s.final = true;
    }
    d.arcLog.push({ from: arc.from, to: arc.to, errno: 0 });
    this.events.push({ device: d.spec.id, from: arc.from, to: arc.to, errno: 0, kind: 'arc' });
    d.state = arc.to;
    if (opens) {
      this.#endSession(d);
      let session: Session;
      if (opens === 'resuming') {
        session = { kind: 'resuming', device: d, chunks: [], length: 0, disabled: false };
      } else {
        const initial = d.streamBytes();
        const precopy = arc.to !== MigState.StopCopy;
        const bytes = precopy ? initial : Buffer.concat([initial, trailerFor(initial)]);
        session = { kind: 'saving', device: d, bytes, initialLength: initial.length, pos: 0, final: !precopy, disabled: false };
      }
      d.session = session;
      payload.writeInt32LE(this.#alloc({ kind: 'data', session }), 4);
    }
    return 'ok';
  }

  #commitResume(d: FakeDevice, s: ResumingSession): boolean {
    const all = Buffer.concat(s.chunks);
    if (!d.spec.validatesData) {
      // Like mtty_load_state(): only "enough bytes for my own state size?" is checked
      // (short data: EINVAL, the device stays in RESUMING); the content and the checksum
      // are taken at face value, so a flipped byte is loaded as is.
      if (all.length < HEADER + d.spec.stateSize + TRAILER) return false;
      d.payload = Buffer.from(all.subarray(HEADER, HEADER + d.spec.stateSize));
      d.seed = Number(all.readBigUInt64LE(16));
      return true;
    }
    if (all.length < HEADER + TRAILER || !all.subarray(0, 8).equals(MAGIC)) return false;
    const body = all.subarray(0, all.length - TRAILER);
    if (!trailerFor(body).equals(all.subarray(all.length - TRAILER))) return false;
    const len = body.readUInt32LE(12);
    if (HEADER + len > body.length) return false;
    d.payload = Buffer.from(body.subarray(HEADER, HEADER + len));
    d.seed = Number(body.readBigUInt64LE(16));
    return true;
  }

  #endSession(d: FakeDevice): void {
    if (d.session) d.session.disabled = true;
    d.session = undefined;
  }

  /**
   * VFIO_MIG_GET_PRECOPY_INFO in the drivers' order of checks (mtty_precopy_ioctl,
   * mlx5vf_precopy_ioctl): cmd (ENOTTY), argsz (EINVAL), device state not PRE_COPY(_P2P)
   * (EINVAL), disabled file (ENODEV). A resuming file has no ioctl op at all (ENOTTY).
   */
  #dataIoctl(s: Session, request: number, arg?: IoctlArg): number {
    if (s.kind !== 'saving' || request !== U.Ioctl.MIG_GET_PRECOPY_INFO) throw new SysError('ioctl', Errno.ENOTTY);
    if (!Buffer.isBuffer(arg) || arg.length < 24) throw new SysError('ioctl', Errno.EFAULT);
    if (arg.readUInt32LE(0) < 24) throw new SysError('ioctl', Errno.EINVAL);
    const d = s.device;
    if (d.state !== MigState.PreCopy && d.state !== MigState.PreCopyP2P) throw new SysError('ioctl', Errno.EINVAL);
    if (s.disabled) throw new SysError('ioctl', Errno.ENODEV);
    const initial = Math.max(0, s.initialLength - s.pos);
    // Legacy drivers copy the struct in and never clear flags: the caller's flags echo back.
    const flags = d.precopyV2 ? 0 : arg.readUInt32LE(4);
    U.writePrecopyInfo(arg, { flags, initialBytes: BigInt(initial), dirtyBytes: BigInt(initial === 0 ? d.dirtyPending : 0) });
    return 0;
  }

  /** A stream the device would accept on RESUMING (its current state, saved). */
  validStream(id: string): Buffer {
    const body = this.device(id).streamBytes();
    return Buffer.concat([body, trailerFor(body)]);
  }

  /** Returns every device to a fresh RUNNING device (between property-test cases). */
  resetAll(): void {
    for (const d of this.devices.values()) {
      this.#endSession(d);
      d.state = MigState.Running;
      d.failures = [];
      d.arcLog = [];
      d.dirtyPending = 0;
      d.spec.arcLatencyMs = 0;
      for (const release of d.hung.splice(0)) release();
    }
    this.events.length = 0;
    this.ioctlLog.length = 0;
  }

  /** Simulates the device changing state during PRE_COPY. */
  dirty(id: string, bytes: number): void {
    this.device(id).dirtyPending += bytes;
  }

}

function sleep(ms: number): Promise<void> {
  return ms > 0 ? new Promise((r) => setTimeout(r, ms)) : new Promise((r) => setImmediate(r));
}

