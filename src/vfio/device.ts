// VfioDevice: one opened VFIO device and its migration life cycle (the role QEMU's
// hw/vfio/migration.c plays for a VM). Opens through the legacy group/container path
// (Debian's kernels have no iommufd) or the cdev/iommufd path when /dev/vfio/devices
// exists. All ioctls of one device go through a queue, because drivers keep one
// migration mutex and a concurrent RESET is applied "deferred" mid-transition.

import { existsSync } from 'node:fs';
import { sys, OpenFlag, SysError, type IoctlArg, type CallTiming } from '../host/sys.ts';
import { OwnedFd } from './owned-fd.ts';
import { VfioError, fromSys } from './errors.ts';
import { Errno } from '../host/errno.ts';
import * as U from './uapi.ts';
import { MigState, stateName } from './uapi.ts';
import { plan, checkMigrationFlags, describeFlags, arcOpensSession, type Arc } from './fsm.ts';
import { DataFd } from './data.ts';
import * as sysfs from '../host/sysfs.ts';
import type { DeviceId } from '../host/sysfs.ts';


export type OpenPath = 'auto' | 'group' | 'cdev';

export interface OpenOptions {
  path?: OpenPath;
}

export interface SetStateResult {
  state: MigState;
  /** The arcs the kernel walked (predicted from the FSM table and the device's flags). */
  arcs: Arc[];
  /** A new data session's fd, owned by the caller, when the final arc opened one. */
  dataFd?: DataFd;
  /** When the SET was issued to the kernel and returned (when the backend knows). */
  timing: CallTiming;
}

interface Handles {
  containerFd?: number;
  groupFd?: number;
  iommuFd?: number;
  deviceFd: number;
}

/** An open device: its fd owned (calls counted), and the fds that must outlive it. */
interface OpenHandles {
  device: OwnedFd;
  /** Group, container or iommufd: closed only after the device fd was released. */
  holders: number[];
}

/** Serialises async work: each task starts after the previous one settled. */
class Queue {
  #tail: Promise<unknown> = Promise.resolve();
  run<T>(task: () => Promise<T> | T): Promise<T> {
    const next = this.#tail.then(task, task);
    this.#tail = next.catch(() => undefined);
    return next;
  }
}

export class VfioDevice {
  readonly id: DeviceId;
  readonly name: string;
  readonly group: number | undefined;
  readonly openedVia: 'group' | 'cdev';
  #h: OpenHandles | undefined;
  #queue = new Queue();
  #flags: number | undefined;
  #unknownFlags = 0n;
  #knownState: MigState | undefined;
  #precopyV2 = false;
  #dataFds = new Set<DataFd>();

  private constructor(id: DeviceId, group: number | undefined, via: 'group' | 'cdev', h: Handles) {
    this.id = id;
    this.name = sysfs.deviceIdString(id);
    this.group = group;
    this.openedVia = via;
    this.#h = { device: new OwnedFd(h.deviceFd, 'device fd', this.name), holders: [h.groupFd, h.containerFd, h.iommuFd].filter((fd): fd is number => fd !== undefined) };
  }

  /** Opens a device by PCI address or mdev UUID (validated before any path is built). */
  static open(idText: string, opts: OpenOptions = {}): VfioDevice {
    let id: DeviceId;
    try {
      id = sysfs.parseDeviceId(idText);
    } catch (err) {
      throw new VfioError({ operation: 'open', device: String(idText).slice(0, 80), errno: Errno.EINVAL, hint: (err as Error).message });
    }
    const name = sysfs.deviceIdString(id);
    if (!sysfs.deviceExists(id)) {
      throw new VfioError({ operation: 'open', device: name, errno: Errno.ENOENT, hint: `no such device in ${sysfs.sysfsRoot()}` });
    }
    const want = opts.path ?? 'auto';
    const cdev = sysfs.vfioCdevName(id);
    if (want === 'cdev' || (want === 'auto' && cdev && existsSync(sysfs.vfioCdevDir()))) {
      if (!cdev) {
        throw new VfioError({ operation: 'open (cdev)', device: name, errno: Errno.ENOENT, hint: 'the device has no vfio-dev cdev (kernel without CONFIG_VFIO_DEVICE_CDEV, or not bound to a VFIO driver)' });
      }
      return new VfioDevice(id, sysfs.iommuGroupOf(id), 'cdev', openViaCdev(name, cdev));
    }
    const group = sysfs.iommuGroupOf(id);
    if (group === undefined) {
      throw new VfioError({ operation: 'open', device: name, errno: Errno.ENODEV, hint: 'the device has no IOMMU group - is the IOMMU enabled (intel_iommu=on / amd_iommu=on)?' });
    }
    return new VfioDevice(id, group, 'group', openViaGroup(id, name, group));
  }

  get isOpen(): boolean {
    return this.#h !== undefined;
  }

  /** Data fds handed out and not yet closed (for leak checks). */
  get openDataFds(): number {
    return this.#dataFds.size;
  }

  /** Closed while a call was still running: the fd is held until that call returns. */
  get closePending(): boolean {
    return this.#h === undefined && this.#closing?.closePending === true;
  }

  #closing: OwnedFd | undefined;

  #dev(operation: string): OwnedFd {
    if (!this.#h) throw new VfioError({ operation, device: this.name, errno: Errno.EBADF, hint: 'the device was closed' });
    return this.#h.device;
  }

  /** A synchronous ioctl on the device fd; SysError passes through for callers to word. */
  #rawIoctl(operation: string, request: number, arg?: IoctlArg): number {
    return this.#dev(operation).useSync(operation, (fd) => sys().ioctl(fd, request, arg));
  }

  #ioctl(operation: string, request: number, arg?: IoctlArg, hint?: (code: string) => string | undefined): number {
    try {
      return this.#rawIoctl(operation, request, arg);
    } catch (err) {
      throw fromSys(err, operation, this.name, hint);
    }
  }

  async #ioctlAsync(operation: string, request: number, arg?: Buffer, hint?: (code: string) => string | undefined, timing?: CallTiming): Promise<number> {
    try {
      return await this.#dev(operation).use(operation, (fd) => sys().ioctlAsync(fd, request, arg, timing));
    } catch (err) {
      throw fromSys(err, operation, this.name, hint);
    }
  }

  info(): Promise<U.DeviceInfo> {
    return this.#queue.run(() => {
      const buf = U.encodeDeviceInfo();
      this.#ioctl('VFIO_DEVICE_GET_INFO', U.Ioctl.DEVICE_GET_INFO, buf);
      return U.decodeDeviceInfo(buf);
    });
  }

  /** PROBE a feature for the given ops (GET/SET); false when the kernel says ENOTTY/EINVAL. */
  probeFeature(feature: number, op: number): Promise<boolean> {
    return this.#queue.run(() => {
      try {
        this.#ioctl(`PROBE feature ${feature}`, U.Ioctl.DEVICE_FEATURE, U.encodeFeature(feature, U.FeatureFlag.PROBE | op));
        return true;
      } catch (err) {
        if (err instanceof VfioError && (err.code === 'ENOTTY' || err.code === 'EINVAL')) return false;
        throw err;
      }
    });
  }

  /**
   * The MIGRATION feature's known flag bits (STOP_COPY required; unknown higher bits
   * are kept aside in unknownMigrationFlags, not refused). A device
   * without the feature is explained (including devices that only speak v1).
   */
  migrationFlags(): Promise<number> {
    return this.#queue.run(() => this.#migrationFlagsLocked());
  }

  /** Flag bits the kernel reported that this layer does not know (read after migrationFlags()). */
  get unknownMigrationFlags(): bigint {
    return this.#unknownFlags;
  }

  #migrationFlagsLocked(): number {
    if (this.#flags !== undefined) return this.#flags;
    const buf = U.encodeFeature(U.Feature.MIGRATION, U.FeatureFlag.GET, U.Layout.featureMigration.size);
    const operation = 'GET MIGRATION';
    try {
      this.#rawIoctl(operation, U.Ioctl.DEVICE_FEATURE, buf);
    } catch (err) {
      if (err instanceof SysError && err.code === 'ENOTTY') {
        const v1 = this.#hasV1MigrationRegion();
        throw new VfioError({
          operation,
          device: this.name,
          errno: err.errno,
          hint: v1
            ? 'the driver speaks only the removed v1 protocol - needs Linux >= 5.18 and a v2 driver'
            : 'the device is not migratable: its driver has no VFIO migration support (plain vfio-pci? bind the vendor variant driver)',
        });
      }
      throw fromSys(err, operation, this.name);
    }
    const raw = U.decodeMigrationFlags(U.featurePayload(buf));
    const check = checkMigrationFlags(raw);
    if (!check.ok) throw new VfioError({ operation, device: this.name, hint: check.reason });
    this.#flags = check.flags;
    this.#unknownFlags = check.unknown;
    return check.flags;
  }

  #hasV1MigrationRegion(): boolean {
    try {
      const infoBuf = U.encodeDeviceInfo();
      this.#rawIoctl('GET_INFO', U.Ioctl.DEVICE_GET_INFO, infoBuf);
      const { numRegions } = U.decodeDeviceInfo(infoBuf);
      for (let index = 0; index < Math.min(numRegions, 64); index++) {
        let buf = U.encodeRegionInfo(index);
        try {
          this.#rawIoctl('GET_REGION_INFO', U.Ioctl.DEVICE_GET_REGION_INFO, buf);
        } catch {
          continue; // holes in the region index space are normal (e.g. VGA, ROM)
        }
        const needed = buf.readUInt32LE(U.RegionInfo.argsz);
        if (needed > buf.length && needed <= 4096) {
          buf = U.encodeRegionInfo(index, needed);
          this.#rawIoctl('GET_REGION_INFO', U.Ioctl.DEVICE_GET_REGION_INFO, buf);
        }
        const caps = U.decodeRegionCapTypes(buf);
        if (caps.some((c) => c.type === U.RegionInfo.TYPE_MIGRATION_DEPRECATED && c.subtype === U.RegionInfo.SUBTYPE_MIGRATION_DEPRECATED)) {
          return true;
        }
      }
    } catch {
      // Region probing is only used to word the error better; its failure is not one.
    }
    return false;
  }

  state(): Promise<MigState> {
    return this.#queue.run(() => this.#stateLocked());
  }

  #stateLocked(): MigState {
    const buf = U.encodeFeature(U.Feature.MIG_DEVICE_STATE, U.FeatureFlag.GET, U.encodeMigState(0));
    this.#ioctl('GET MIG_DEVICE_STATE', U.Ioctl.DEVICE_FEATURE, buf, notMigratableHint);
    const { deviceState } = U.decodeMigState(U.featurePayload(buf));
    if (!U.isMigState(deviceState)) {
      throw new VfioError({ operation: 'GET MIG_DEVICE_STATE', device: this.name, hint: `the driver reported an undefined state ${deviceState}` });
    }
    this.#knownState = deviceState;
    return deviceState;
  }

  /**
   * Moves the device to `target`. Validates the request against the device's flags and
   * refuses what the kernel must never see, walks the kernel's path in one SET, and on
   * failure re-reads the state and reports it. Returns ownership of a new data fd.
   */
  setState(target: MigState, opts: { signal?: AbortSignal } = {}): Promise<SetStateResult> {
    return this.#queue.run(async () => {
      const targetName = stateName(target);
      if (!U.isMigState(target)) {
        throw new VfioError({ operation: `SET MIG_DEVICE_STATE ${targetName}`, device: this.name, errno: Errno.EINVAL, hint: `target state ${String(target)} is out of range 0..7` });
      }
      this.#dev(`SET MIG_DEVICE_STATE ${targetName}`);
      if (opts.signal?.aborted) {
        throw new VfioError({ operation: `SET MIG_DEVICE_STATE ${targetName}`, device: this.name, errno: Errno.ECANCELED, hint: 'cancelled before the request was sent' });
      }
      const flags = this.#migrationFlagsLocked();
      const from = this.#knownState ?? this.#stateLocked();
      const operation = `SET MIG_DEVICE_STATE ${stateName(from)}->${targetName}`;
      const p = plan(from, target, flags);
      if (!p.ok) {
        throw new VfioError({ operation, device: this.name, errno: Errno.EINVAL, hint: `${p.reason}${p.refusedByUs ? ' (refused before calling the kernel)' : ` (device flags: ${describeFlags(flags).join('|')})`}` });
      }
      const buf = U.encodeFeature(U.Feature.MIG_DEVICE_STATE, U.FeatureFlag.SET, U.encodeMigState(target));
      const timing: CallTiming = {};
      try {
        await this.#ioctlAsync(operation, U.Ioctl.DEVICE_FEATURE, buf, undefined, timing);
      } catch (err) {
        this.#knownState = undefined;
        let after: string;
        let failedArc: string | undefined;
        try {
          const now = this.#stateLocked();
          after = stateName(now);
          // Drivers store each intermediate state, so the arc leaving `now` on the
          // planned path is the one that failed (unknowable when the device is in ERROR).
          const arc = p.arcs.find((a) => a.from === now);
          if (arc) failedArc = `${stateName(arc.from)}->${stateName(arc.to)}`;
        } catch (getErr) {
          after = `unknown (GET failed: ${(getErr as Error).message})`;
        }
        const e = err as VfioError;
        throw new VfioError({ operation, device: this.name, errno: e.errno, hint: e.hint ?? stateHint(e.code), stateAfter: after, failedArc, cause: err });
      }
      this.#knownState = target;
      const { dataFd } = U.decodeMigState(U.featurePayload(buf));
      if (!this.#h) {
        // Closed while the arc was in flight: nobody can own the new fd any more.
        if (dataFd >= 0) closeQuietly(dataFd);
        throw new VfioError({ operation, device: this.name, errno: Errno.EBADF, hint: 'the device was closed during the transition' });
      }
      const last = p.arcs[p.arcs.length - 1];
      const session = last ? arcOpensSession(last) : undefined;
      if (dataFd >= 0) {
        const kind = session ?? (target === MigState.Resuming ? 'resuming' : 'saving');
        const f = new DataFd(dataFd, kind, this.name, (closed) => this.#dataFds.delete(closed));
        this.#dataFds.add(f);
        return { state: target, arcs: p.arcs, dataFd: f, timing };
      }
      return { state: target, arcs: p.arcs, timing };
    });
  }

  /**
   * Sends a SET the layer would normally refuse (a state outside the flags, ERROR, an
   * out-of-range value) to check that the driver refuses it too - `vfio-mig qualify`
   * uses this. Never sends STOP_COPY -> PRE_COPY(_P2P), which hangs unfixed kernels.
   * Returns the errno name, or 'accepted' when the driver wrongly took it.
   */
  probeRefusal(target: number): Promise<string> {
    return this.#queue.run(async () => {
      const from = this.#stateLocked();
      if (from === MigState.StopCopy && (target === MigState.PreCopy || target === MigState.PreCopyP2P)) {
        throw new VfioError({ operation: 'probe refusal', device: this.name, errno: Errno.EINVAL, hint: 'STOP_COPY -> PRE_COPY is never sent: unfixed kernels hang' });
      }
      const buf = U.encodeFeature(U.Feature.MIG_DEVICE_STATE, U.FeatureFlag.SET, U.encodeMigState(target >>> 0));
      try {
        await this.#dev('probe refusal').use('probe refusal', (fd) => sys().ioctlAsync(fd, U.Ioctl.DEVICE_FEATURE, buf));
      } catch (err) {
        this.#knownState = undefined;
        if (err instanceof SysError) return err.code;
        throw err;
      }
      this.#knownState = undefined;
      const { dataFd } = U.decodeMigState(U.featurePayload(buf));
      if (dataFd >= 0) closeQuietly(dataFd);
      return 'accepted';
    });
  }

  /** MIG_DATA_SIZE: the driver's estimate of the bytes STOP_COPY will still produce. */
  dataSize(): Promise<bigint> {
    return this.#queue.run(() => {
      const buf = U.encodeFeature(U.Feature.MIG_DATA_SIZE, U.FeatureFlag.GET, U.Layout.featureMigDataSize.size);
      this.#ioctl('GET MIG_DATA_SIZE', U.Ioctl.DEVICE_FEATURE, buf, (code) =>
        code === 'ENOTTY' ? 'the driver does not report MIG_DATA_SIZE (kernel < 6.2 or no migration support)' : undefined,
      );
      return U.decodeDataSize(U.featurePayload(buf));
    });
  }

  /** Opts in to precopy info v2 (REINIT flag); EINVAL on devices without PRE_COPY. */
  enablePrecopyInfoV2(): Promise<void> {
    return this.#queue.run(() => {
      this.#ioctl('SET MIG_PRECOPY_INFOv2', U.Ioctl.DEVICE_FEATURE, U.encodeFeature(U.Feature.MIG_PRECOPY_INFOv2, U.FeatureFlag.SET));
      this.#precopyV2 = true;
    });
  }

  /**
   * VFIO_MIG_GET_PRECOPY_INFO on a saving fd. Sends flags 0 and ignores what comes back
   * unless v2 was enabled: legacy drivers echo the caller's flags.
   */
  precopyInfo(f: DataFd): Promise<U.PrecopyInfo> {
    return this.#queue.run(() => {
      const operation = 'VFIO_MIG_GET_PRECOPY_INFO';
      const buf = U.encodePrecopyInfo();
      try {
        f.useSync(operation, (fd) => sys().ioctl(fd, U.Ioctl.MIG_GET_PRECOPY_INFO, buf));
      } catch (err) {
        throw fromSys(err, operation, this.name, (code) =>
          code === 'EINVAL' ? 'precopy info exists only in PRE_COPY and PRE_COPY_P2P' : code === 'ENODEV' ? 'the saving session has ended' : undefined,
        );
      }
      const info = U.decodePrecopyInfo(buf);
      return this.#precopyV2 ? info : { ...info, flags: 0 };
    });
  }

  /** VFIO_DEVICE_RESET: the only way out of ERROR; the device returns to RUNNING. */
  reset(): Promise<void> {
    return this.#queue.run(async () => {
      this.#knownState = undefined;
      try {
        await this.#ioctlAsync('VFIO_DEVICE_RESET', U.Ioctl.DEVICE_RESET, undefined, (code) =>
          code === 'EINVAL' ? 'the device has no usable reset (no FLR, PM or bus reset available)' : code === 'EAGAIN' ? 'reset locks are contended; retry' : undefined,
        );
      } finally {
        // The next plan starts from the state the kernel reports, never from a guess:
        // a reset normally lands in RUNNING, but a failed one may not have.
        this.#knownState = undefined;
      }
    });
  }

  /**
   * Closes every data fd still held, then the device, then group and container (in that
   * order: a group fd closed first would leave the device fd dangling). Idempotent, and
   * not queued: a device whose arc never returns (a hung driver) must still be closable.
   * Calls still queued fail with EBADF without reaching the kernel; a call in flight
   * keeps its fd number held (closePending) until it returns, so no later open can
   * receive that number while the call may still act on it. Resolves at once.
   */
  close(): Promise<void> {
    const h = this.#h;
    if (!h) return Promise.resolve();
    this.#h = undefined;
    this.#closing = h.device;
    for (const f of [...this.#dataFds]) f.close();
    h.device.afterRelease(() => {
      for (const fd of h.holders) closeQuietly(fd);
    });
    h.device.close();
    return Promise.resolve();
  }

  /** Resolves when every fd of this device went back to the kernel (after close()). */
  get released(): Promise<void> {
    const owned = this.#h?.device ?? this.#closing;
    return owned ? owned.released : Promise.resolve();
  }
}

function closeQuietly(fd: number): void {
  try {
    sys().close(fd);
  } catch {
    // closing is best effort during teardown
  }
}

function notMigratableHint(code: string): string | undefined {
  return code === 'ENOTTY' ? 'the device is not migratable (no VFIO migration v2 support in its driver)' : undefined;
}

function stateHint(code: string | undefined): string | undefined {
  switch (code) {
    case 'EINVAL':
      return 'the driver refused the transition (invalid data on RESUMING->STOP, or a state the device cannot reach)';
    case 'EIO':
      return 'the device failed the transition';
    case 'ENOMEM':
      return 'the driver could not allocate migration buffers';
    case 'EMFILE':
      return 'too many open files - the data fd could not be installed';
    default:
      return undefined;
  }
}

// ---------------------------------------------------------------------------------
// Opening.

type Hint = (code: string) => string | undefined;

/**
 * Runs the steps of an open sequence; on the first failure closes every fd opened so
 * far (once, in reverse order) and throws a VfioError naming the step.
 */
class OpenSequence {
  readonly #name: string;
  readonly #opened: number[] = [];
  constructor(name: string) {
    this.#name = name;
  }
  step<T>(operation: string, fn: () => T, hint?: Hint): T {
    try {
      return fn();
    } catch (err) {
      for (const fd of this.#opened.reverse()) closeQuietly(fd);
      this.#opened.length = 0;
      throw err instanceof SysError
        ? fromSys(err, operation, this.#name, hint)
        : new VfioError({ operation, device: this.#name, hint: err instanceof Error ? err.message : String(err), cause: err });
    }
  }
  open(path: string, hint?: Hint): number {
    const fd = this.step(`open ${path}`, () => sys().open(path, OpenFlag.O_RDWR), hint);
    this.#opened.push(fd);
    return fd;
  }
}

function openViaGroup(id: DeviceId, name: string, group: number): Handles {
  const seq = new OpenSequence(name);
  const containerFd = seq.open(sysfs.vfioContainerPath(), (c) => (c === 'ENOENT' ? 'the vfio module is not loaded (modprobe vfio-pci)' : undefined));
  seq.step('VFIO_GET_API_VERSION', () => {
    const version = sys().ioctl(containerFd, U.Ioctl.GET_API_VERSION);
    if (version !== U.VFIO_API_VERSION) throw new Error(`the kernel speaks VFIO API version ${version}, expected ${U.VFIO_API_VERSION}`);
  });
  seq.step('VFIO_CHECK_EXTENSION TYPE1v2', () => {
    if (sys().ioctl(containerFd, U.Ioctl.CHECK_EXTENSION, U.Extension.TYPE1v2) <= 0) {
      throw new Error('the container does not offer the TYPE1v2 IOMMU - modprobe vfio_iommu_type1');
    }
  });
  const groupPath = sysfs.vfioGroupPath(group);
  const groupFd = seq.open(groupPath, (c) => {
    if (c === 'EBUSY') return `group ${group} is held by another process - is a VM using ${name}?`;
    if (c === 'ENOENT') return `no ${groupPath}: ${name} is not bound to a vfio-pci (variant) driver (driver: ${sysfs.driverOf(id) ?? 'none'})`;
    return undefined;
  });
  seq.step('VFIO_GROUP_GET_STATUS', () => {
    const status = U.encodeGroupStatus();
    sys().ioctl(groupFd, U.Ioctl.GROUP_GET_STATUS, status);
    if (!U.decodeGroupStatus(status).viable) throw new Error(describeNonViableGroup(group));
  });
  seq.step('VFIO_GROUP_SET_CONTAINER', () => sys().ioctl(groupFd, U.Ioctl.GROUP_SET_CONTAINER, U.encodeFdArg(containerFd)), (c) =>
    c === 'EBUSY' ? `group ${group} is already attached to another container` : undefined,
  );
  seq.step('VFIO_SET_IOMMU TYPE1v2', () => sys().ioctl(containerFd, U.Ioctl.SET_IOMMU, U.Extension.TYPE1v2), (c) =>
    c === 'ENODEV'
      ? 'no IOMMU backend: modprobe vfio_iommu_type1'
      : c === 'EPERM'
        ? 'no interrupt remapping: enable it (intremap) or set vfio_iommu_type1 allow_unsafe_interrupts=1'
        : undefined,
  );
  const deviceFd = seq.step('VFIO_GROUP_GET_DEVICE_FD', () => sys().ioctl(groupFd, U.Ioctl.GROUP_GET_DEVICE_FD, U.encodeDeviceName(name)), (c) =>
    c === 'EBUSY' ? `${name} is already opened by another process - is a VM using it?` : c === 'ENODEV' || c === 'EINVAL' ? `${name} is not in group ${group}` : undefined,
  );
  return { containerFd, groupFd, deviceFd };
}

/** "group 12 is not viable: 0000:3b:00.3 is bound to ixgbe (not a VFIO driver)". */
export function describeNonViableGroup(group: number): string {
  const offenders = groupMembers(group).filter((m) => !m.vfioCompatible);
  if (offenders.length === 0) return `group ${group} is not viable (every member looks VFIO-bound; a member may be mid-bind)`;
  const list = offenders.map((m) => `${m.name} is bound to ${m.driver} (not a VFIO driver)`).join(', ');
  return `group ${group} is not viable: ${list} - bind it to vfio-pci or unbind it`;
}

export interface GroupMember {
  name: string;
  driver: string | undefined;
  vfioCompatible: boolean;
}

export function groupMembers(group: number): GroupMember[] {
  return sysfs.groupMembers(group).map((m) => {
    const driver = sysfs.driverOf(m);
    const vfioCompatible = driver === undefined || sysfs.VFIO_GROUP_SAFE_DRIVERS.has(driver) || sysfs.isVfioBound(m);
    return { name: sysfs.deviceIdString(m), driver, vfioCompatible };
  });
}

function openViaCdev(name: string, cdev: string): Handles {
  const seq = new OpenSequence(name);
  const iommuFd = seq.open(sysfs.iommufdPath(), (c) => (c === 'ENOENT' ? 'no /dev/iommu: the kernel has no iommufd (CONFIG_IOMMUFD)' : undefined));
  const alloc = U.encodeIoasAlloc();
  seq.step('IOMMU_IOAS_ALLOC', () => sys().ioctl(iommuFd, U.Ioctl.IOMMU_IOAS_ALLOC, alloc));
  const ioas = U.decodeIoasAlloc(alloc);
  const deviceFd = seq.open(sysfs.vfioCdevPath(cdev));
  seq.step('VFIO_DEVICE_BIND_IOMMUFD', () => sys().ioctl(deviceFd, U.Ioctl.DEVICE_BIND_IOMMUFD, U.encodeBindIommufd(iommuFd)), (c) =>
    c === 'EBUSY'
      ? `${name}'s group is in use through the legacy group interface - is a VM using it?`
      : c === 'EINVAL'
        ? `${name} is already opened elsewhere (the cdev path allows one open)`
        : undefined,
  );
  seq.step('VFIO_DEVICE_ATTACH_IOMMUFD_PT', () => sys().ioctl(deviceFd, U.Ioctl.DEVICE_ATTACH_IOMMUFD_PT, U.encodeAttachIommufdPt(ioas)));
  return { iommuFd, deviceFd };
}
