// The kernel's VFIO / iommufd user API as this project uses it: ioctl numbers, feature
// ids, flags, enums and struct layouts, plus Buffer encoders/decoders.
//
// Every value here is restated from include/uapi/linux/vfio.h and iommufd.h (the
// kernel's Documentation and the header comments are the contract); test/unit/abi.test.ts compiles
// native/abi-probe against the system header (and the rig kernel's 6.12 header) and
// fails when any of these numbers or offsets disagrees with it.
//
// All VFIO ioctls are plain _IO(';', nr): on x86-64/arm64 the direction bits are 0, so
// the request is (0x3B << 8) | nr. (powerpc/mips would need the "none" bit; not targeted.)

const VFIO_TYPE = 0x3b;
const VFIO_BASE = 100;
const IOMMUFD_CMD_BASE = 0x80;

function io(nr: number): number {
  return (VFIO_TYPE << 8) | nr;
}

/** ioctl request codes, each valid only on its own kind of fd. */
export const Ioctl = {
  // container fd (/dev/vfio/vfio)
  GET_API_VERSION: io(VFIO_BASE + 0),
  CHECK_EXTENSION: io(VFIO_BASE + 1),
  SET_IOMMU: io(VFIO_BASE + 2),
  // group fd (/dev/vfio/<N>)
  GROUP_GET_STATUS: io(VFIO_BASE + 3),
  GROUP_SET_CONTAINER: io(VFIO_BASE + 4),
  GROUP_UNSET_CONTAINER: io(VFIO_BASE + 5),
  GROUP_GET_DEVICE_FD: io(VFIO_BASE + 6),
  // device fd
  DEVICE_GET_INFO: io(VFIO_BASE + 7),
  DEVICE_GET_REGION_INFO: io(VFIO_BASE + 8),
  DEVICE_RESET: io(VFIO_BASE + 11),
  DEVICE_FEATURE: io(VFIO_BASE + 17),
  // cdev device fd only (Linux >= 6.6 with CONFIG_VFIO_DEVICE_CDEV)
  DEVICE_BIND_IOMMUFD: io(VFIO_BASE + 18),
  DEVICE_ATTACH_IOMMUFD_PT: io(VFIO_BASE + 19),
  DEVICE_DETACH_IOMMUFD_PT: io(VFIO_BASE + 20),
  // migration data fd (saving side) - shares nr 121 with the spapr EEH container ioctl
  MIG_GET_PRECOPY_INFO: io(VFIO_BASE + 21),
  // /dev/iommu
  IOMMU_DESTROY: io(IOMMUFD_CMD_BASE + 0),
  IOMMU_IOAS_ALLOC: io(IOMMUFD_CMD_BASE + 1),
} as const;

export const VFIO_API_VERSION = 0;

/** Container extensions / IOMMU types for CHECK_EXTENSION and SET_IOMMU (passed by value). */
export const Extension = {
  TYPE1: 1,
  SPAPR_TCE: 2,
  TYPE1v2: 3,
  DMA_CC_IOMMU: 4,
  EEH: 5,
  SPAPR_TCE_v2: 7,
  NOIOMMU: 8,
  UNMAP_ALL: 9,
  UPDATE_VADDR: 10,
} as const;

export const GroupStatusFlag = { VIABLE: 1 << 0, CONTAINER_SET: 1 << 1 } as const;

export const DeviceInfoFlag = {
  RESET: 1 << 0,
  PCI: 1 << 1,
  PLATFORM: 1 << 2,
  AMBA: 1 << 3,
  CCW: 1 << 4,
  AP: 1 << 5,
  FSL_MC: 1 << 6,
  CAPS: 1 << 7,
  CDX: 1 << 8,
} as const;

/** VFIO_DEVICE_FEATURE header flags (bits 0-15 hold the feature index). */
export const FeatureFlag = {
  MASK: 0xffff,
  GET: 1 << 16,
  SET: 1 << 17,
  PROBE: 1 << 18,
} as const;

export const Feature = {
  PCI_VF_TOKEN: 0,
  MIGRATION: 1,
  MIG_DEVICE_STATE: 2,
  LOW_POWER_ENTRY: 3,
  LOW_POWER_ENTRY_WITH_WAKEUP: 4,
  LOW_POWER_EXIT: 5,
  DMA_LOGGING_START: 6,
  DMA_LOGGING_STOP: 7,
  DMA_LOGGING_REPORT: 8,
  MIG_DATA_SIZE: 9,
  BUS_MASTER: 10,
  DMA_BUF: 11,
  MIG_PRECOPY_INFOv2: 12,
} as const;

/** Bits of the MIGRATION feature's flags (GET). */
export const MigrationFlag = {
  STOP_COPY: 1 << 0,
  P2P: 1 << 1,
  PRE_COPY: 1 << 2,
} as const;

/** The only flag combinations the uAPI defines. */
export const DEFINED_MIGRATION_FLAG_SETS = [1, 3, 5, 7] as const;

/** enum vfio_device_mig_state. Values are ABI. */
export enum MigState {
  Error = 0,
  Stop = 1,
  Running = 2,
  StopCopy = 3,
  Resuming = 4,
  RunningP2P = 5,
  PreCopy = 6,
  PreCopyP2P = 7,
}
/** VFIO_DEVICE_STATE_NR: first invalid state value. */
export const MIG_STATE_COUNT = 8;

const STATE_NAMES: Record<MigState, string> = {
  [MigState.Error]: 'ERROR',
  [MigState.Stop]: 'STOP',
  [MigState.Running]: 'RUNNING',
  [MigState.StopCopy]: 'STOP_COPY',
  [MigState.Resuming]: 'RESUMING',
  [MigState.RunningP2P]: 'RUNNING_P2P',
  [MigState.PreCopy]: 'PRE_COPY',
  [MigState.PreCopyP2P]: 'PRE_COPY_P2P',
};

export function stateName(state: number): string {
  return STATE_NAMES[state as MigState] ?? `INVALID(${state})`;
}

export function isMigState(value: unknown): value is MigState {
  return typeof value === 'number' && Number.isInteger(value) && value >= 0 && value < MIG_STATE_COUNT;
}

/** Parses "STOP_COPY", "stop-copy" (QEMU's spelling) or a number. */
export function parseMigState(text: string): MigState | undefined {
  const t = text.trim();
  if (/^[0-9]+$/.test(t)) {
    const n = Number(t);
    return isMigState(n) ? n : undefined;
  }
  const upper = t.toUpperCase().replace(/-/g, '_');
  for (const [value, name] of Object.entries(STATE_NAMES)) {
    if (name === upper) return Number(value) as MigState;
  }
  return undefined;
}

/** vfio_precopy_info.flags output bit, meaningful only after opting in to feature 12. */
export const PRECOPY_INFO_REINIT = 1 << 0;

export const BindIommufdFlag = { TOKEN: 1 << 0 } as const;

// ---------------------------------------------------------------------------------
// Struct sizes and field offsets (x86-64 / arm64).

export const Layout = {
  feature: { size: 8, argsz: 0, flags: 4, data: 8 },
  featureMigration: { size: 8, flags: 0 },
  featureMigState: { size: 8, deviceState: 0, dataFd: 4 },
  featureMigDataSize: { size: 8, stopCopyLength: 0 },
  dmaLoggingControl: { size: 24, pageSize: 0, numRanges: 8, reserved: 12, ranges: 16 },
  dmaLoggingRange: { size: 16, iova: 0, length: 8 },
  dmaLoggingReport: { size: 32, iova: 0, length: 8, pageSize: 16, bitmap: 24 },
  precopyInfo: { size: 24, argsz: 0, flags: 4, initialBytes: 8, dirtyBytes: 16 },
  groupStatus: { size: 8, argsz: 0, flags: 4 },
  // size 24 since the trailing pad field was added; older headers (6.1) say 20 - both
  // are accepted by the kernel (minsz 16), and 24 also returns capability chains.
  deviceInfo: { size: 24, sizeWithoutPad: 20, argsz: 0, flags: 4, numRegions: 8, numIrqs: 12, capOffset: 16, pad: 20 },
  bindIommufd: { size: 24, argsz: 0, flags: 4, iommufd: 8, outDevid: 12, tokenUuidPtr: 16 },
  attachIommufdPt: { size: 16, argsz: 0, flags: 4, ptId: 8, pasid: 12 },
  iommuIoasAlloc: { size: 12, size_: 0, flags: 4, outIoasId: 8 },
} as const;

// ---------------------------------------------------------------------------------
// Encoders / decoders. Buffers are zero-filled and 8-byte aligned (Buffer.alloc for
// sizes >= 8 comes from an aligned allocation; payloads contain __aligned_u64).

function alignedBuffer(size: number): Buffer {
  // Round up to a multiple of 8 and allocate outside the pool so the base address
  // is 8-aligned (pooled slices can start at any offset).
  const buf = Buffer.alloc(Math.max(8, Math.ceil(size / 8) * 8));
  return size === buf.length ? buf : buf.subarray(0, size);
}

/**
 * vfio_device_feature header + payload. argsz counts header AND payload in bytes
 * (the header's data[] is a flexible byte array).
 */
export function encodeFeature(feature: number, op: number, payload?: Buffer | number): Buffer {
  if (!Number.isInteger(feature) || feature < 0 || feature > FeatureFlag.MASK) {
    throw new RangeError(`feature index ${feature} out of range 0..65535`);
  }
  const payloadSize = typeof payload === 'number' ? payload : payload?.length ?? 0;
  const buf = alignedBuffer(Layout.feature.size + payloadSize);
  buf.writeUInt32LE(buf.length, Layout.feature.argsz);
  buf.writeUInt32LE((feature | op) >>> 0, Layout.feature.flags);
  if (Buffer.isBuffer(payload)) payload.copy(buf, Layout.feature.data);
  return buf;
}

export function featurePayload(buf: Buffer): Buffer {
  return buf.subarray(Layout.feature.data);
}

export function decodeFeatureHeader(buf: Buffer): { argsz: number; flags: number; feature: number } {
  const flags = buf.readUInt32LE(Layout.feature.flags);
  return { argsz: buf.readUInt32LE(Layout.feature.argsz), flags, feature: flags & FeatureFlag.MASK };
}

export function encodeMigState(state: number): Buffer {
  const p = Buffer.alloc(Layout.featureMigState.size);
  p.writeUInt32LE(state >>> 0, Layout.featureMigState.deviceState);
  p.writeInt32LE(-1, Layout.featureMigState.dataFd);
  return p;
}

export function decodeMigState(payload: Buffer): { deviceState: number; dataFd: number } {
  return {
    deviceState: payload.readUInt32LE(Layout.featureMigState.deviceState),
    dataFd: payload.readInt32LE(Layout.featureMigState.dataFd),
  };
}

/** The MIGRATION flags field is an __aligned_u64; only the low bits are defined. */
export function decodeMigrationFlags(payload: Buffer): bigint {
  return payload.readBigUInt64LE(Layout.featureMigration.flags);
}

export function encodeMigrationFlags(flags: bigint): Buffer {
  const p = Buffer.alloc(Layout.featureMigration.size);
  p.writeBigUInt64LE(flags, Layout.featureMigration.flags);
  return p;
}

export function decodeDataSize(payload: Buffer): bigint {
  return payload.readBigUInt64LE(Layout.featureMigDataSize.stopCopyLength);
}

export function encodeDataSize(bytes: bigint): Buffer {
  const p = Buffer.alloc(Layout.featureMigDataSize.size);
  p.writeBigUInt64LE(bytes, Layout.featureMigDataSize.stopCopyLength);
  return p;
}

export interface PrecopyInfo {
  flags: number;
  initialBytes: bigint;
  dirtyBytes: bigint;
}

/** Always sends flags = 0: in-tree drivers echo whatever flags userspace passed in. */
export function encodePrecopyInfo(): Buffer {
  const buf = alignedBuffer(Layout.precopyInfo.size);
  buf.writeUInt32LE(Layout.precopyInfo.size, Layout.precopyInfo.argsz);
  return buf;
}

export function decodePrecopyInfo(buf: Buffer): PrecopyInfo {
  return {
    flags: buf.readUInt32LE(Layout.precopyInfo.flags),
    initialBytes: buf.readBigUInt64LE(Layout.precopyInfo.initialBytes),
    dirtyBytes: buf.readBigUInt64LE(Layout.precopyInfo.dirtyBytes),
  };
}

export function writePrecopyInfo(buf: Buffer, info: PrecopyInfo): void {
  buf.writeUInt32LE(info.flags >>> 0, Layout.precopyInfo.flags);
  buf.writeBigUInt64LE(info.initialBytes, Layout.precopyInfo.initialBytes);
  buf.writeBigUInt64LE(info.dirtyBytes, Layout.precopyInfo.dirtyBytes);
}

export interface DmaRange {
  iova: bigint;
  length: bigint;
}

/** DMA_LOGGING_START payload; `rangesAddress` is the user pointer of the ranges array. */
export function encodeDmaLoggingControl(pageSize: bigint, numRanges: number, rangesAddress: bigint): Buffer {
  const L = Layout.dmaLoggingControl;
  const p = Buffer.alloc(L.size);
  p.writeBigUInt64LE(pageSize, L.pageSize);
  p.writeUInt32LE(numRanges, L.numRanges);
  p.writeBigUInt64LE(rangesAddress, L.ranges);
  return p;
}

export function encodeDmaLoggingRanges(ranges: readonly DmaRange[]): Buffer {
  const L = Layout.dmaLoggingRange;
  const buf = alignedBuffer(Math.max(L.size, ranges.length * L.size));
  ranges.forEach((r, i) => {
    buf.writeBigUInt64LE(r.iova, i * L.size + L.iova);
    buf.writeBigUInt64LE(r.length, i * L.size + L.length);
  });
  return buf;
}

export function encodeDmaLoggingReport(iova: bigint, length: bigint, pageSize: bigint, bitmapAddress: bigint): Buffer {
  const L = Layout.dmaLoggingReport;
  const p = Buffer.alloc(L.size);
  p.writeBigUInt64LE(iova, L.iova);
  p.writeBigUInt64LE(length, L.length);
  p.writeBigUInt64LE(pageSize, L.pageSize);
  p.writeBigUInt64LE(bitmapAddress, L.bitmap);
  return p;
}

export function encodeGroupStatus(): Buffer {
  const buf = alignedBuffer(Layout.groupStatus.size);
  buf.writeUInt32LE(Layout.groupStatus.size, Layout.groupStatus.argsz);
  return buf;
}

export function decodeGroupStatus(buf: Buffer): { flags: number; viable: boolean; containerSet: boolean } {
  const flags = buf.readUInt32LE(Layout.groupStatus.flags);
  return {
    flags,
    viable: (flags & GroupStatusFlag.VIABLE) !== 0,
    containerSet: (flags & GroupStatusFlag.CONTAINER_SET) !== 0,
  };
}

export interface DeviceInfo {
  flags: number;
  numRegions: number;
  numIrqs: number;
  capOffset: number;
  canReset: boolean;
  kind: 'pci' | 'platform' | 'amba' | 'ccw' | 'ap' | 'fsl-mc' | 'cdx' | 'unknown';
}

export function encodeDeviceInfo(): Buffer {
  const buf = alignedBuffer(Layout.deviceInfo.size);
  buf.writeUInt32LE(Layout.deviceInfo.size, Layout.deviceInfo.argsz);
  return buf;
}

export function decodeDeviceInfo(buf: Buffer): DeviceInfo {
  const L = Layout.deviceInfo;
  const flags = buf.readUInt32LE(L.flags);
  const kinds: [number, DeviceInfo['kind']][] = [
    [DeviceInfoFlag.PCI, 'pci'],
    [DeviceInfoFlag.PLATFORM, 'platform'],
    [DeviceInfoFlag.AMBA, 'amba'],
    [DeviceInfoFlag.CCW, 'ccw'],
    [DeviceInfoFlag.AP, 'ap'],
    [DeviceInfoFlag.FSL_MC, 'fsl-mc'],
    [DeviceInfoFlag.CDX, 'cdx'],
  ];
  return {
    flags,
    numRegions: buf.readUInt32LE(L.numRegions),
    numIrqs: buf.readUInt32LE(L.numIrqs),
    capOffset: buf.readUInt32LE(L.capOffset),
    canReset: (flags & DeviceInfoFlag.RESET) !== 0,
    kind: kinds.find(([bit]) => (flags & bit) !== 0)?.[1] ?? 'unknown',
  };
}

/** VFIO_GROUP_SET_CONTAINER takes a pointer to an s32 holding the container fd. */
export function encodeFdArg(fd: number): Buffer {
  const buf = alignedBuffer(8).subarray(0, 4);
  buf.writeInt32LE(fd, 0);
  return buf;
}

export function encodeBindIommufd(iommufd: number): Buffer {
  const L = Layout.bindIommufd;
  const buf = alignedBuffer(L.size);
  // argsz 16 = up to out_devid: no token, so older kernels (flags must be 0) accept it.
  buf.writeUInt32LE(16, L.argsz);
  buf.writeInt32LE(iommufd, L.iommufd);
  return buf;
}

export function encodeAttachIommufdPt(ptId: number): Buffer {
  const L = Layout.attachIommufdPt;
  const buf = alignedBuffer(L.size);
  buf.writeUInt32LE(12, L.argsz); // minsz: no PASID
  buf.writeUInt32LE(ptId >>> 0, L.ptId);
  return buf;
}

export function encodeIoasAlloc(): Buffer {
  const L = Layout.iommuIoasAlloc;
  const buf = alignedBuffer(L.size);
  buf.writeUInt32LE(L.size, L.size_);
  return buf;
}

export function decodeIoasAlloc(buf: Buffer): number {
  return buf.readUInt32LE(Layout.iommuIoasAlloc.outIoasId);
}

/** NUL-terminated device name for GROUP_GET_DEVICE_FD. */
export function encodeDeviceName(name: string): Buffer {
  return Buffer.from(`${name}\0`, 'ascii');
}

// Region info, used only to recognise devices that still expose the removed v1
// migration region (VFIO_REGION_TYPE_MIGRATION_DEPRECATED).
export const RegionInfo = {
  size: 32,
  argsz: 0,
  flags: 4,
  index: 8,
  capOffset: 12,
  regionSize: 16,
  offset: 24,
  FLAG_CAPS: 1 << 3,
  CAP_TYPE: 2, // VFIO_REGION_INFO_CAP_TYPE (1 is SPARSE_MMAP)
  /** vfio_info_cap_header { u16 id; u16 version; u32 next; } then { u32 type; u32 subtype; } */
  capTypeType: 8,
  capTypeSubtype: 12,
  TYPE_MIGRATION_DEPRECATED: 3,
  SUBTYPE_MIGRATION_DEPRECATED: 1,
} as const;

export function encodeRegionInfo(index: number, argsz: number = RegionInfo.size): Buffer {
  const buf = alignedBuffer(Math.max(argsz, RegionInfo.size));
  buf.writeUInt32LE(buf.length, RegionInfo.argsz);
  buf.writeUInt32LE(index >>> 0, RegionInfo.index);
  return buf;
}

export interface RegionCapType {
  type: number;
  subtype: number;
}

/** Walks a region-info capability chain and returns its CAP_TYPE entries. */
export function decodeRegionCapTypes(buf: Buffer): RegionCapType[] {
  const out: RegionCapType[] = [];
  if ((buf.readUInt32LE(RegionInfo.flags) & RegionInfo.FLAG_CAPS) === 0) return out;
  let off = buf.readUInt32LE(RegionInfo.capOffset);
  const seen = new Set<number>();
  // Offsets are relative to the start of the struct; a chain that loops or points
  // outside the buffer is garbage and ends the walk.
  while (off >= RegionInfo.size && off + 8 <= buf.length && !seen.has(off)) {
    seen.add(off);
    const id = buf.readUInt16LE(off);
    if (id === RegionInfo.CAP_TYPE && off + 16 <= buf.length) {
      out.push({ type: buf.readUInt32LE(off + RegionInfo.capTypeType), subtype: buf.readUInt32LE(off + RegionInfo.capTypeSubtype) });
    }
    off = buf.readUInt32LE(off + 4);
  }
  return out;
}
