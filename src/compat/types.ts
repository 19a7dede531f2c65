// The compatibility descriptor's shape and its validation. A descriptor crosses hosts
// (the destination's `vfio-mig` answers the source's questions as JSON) and is stored
// in the capability cache, so whatever reads one back checks it field by field here
// before anything trusts it. Kept apart from descriptor.ts (which reads sysfs) so the
// cache can validate entries without importing the code that builds them.

/** What GET MIGRATION and MIG_DATA_SIZE said, and where the answer came from. */
export interface MigrationFacts {
  /** VFIO_DEVICE_FEATURE_MIGRATION flags (1 STOP_COPY, 2 P2P, 4 PRE_COPY). */
  flags: number;
  /** The same flags by name (STOP_COPY, P2P, PRE_COPY, and unknown bits as 0x...). */
  flagNames: string[];
  /** MIG_DATA_SIZE in bytes as a decimal string (a u64), null when the driver did not answer. */
  dataSize: string | null;
  /** 'probe': read just now from the open device; 'cache': from the capability cache. */
  source: 'probe' | 'cache';
  /** When the device was opened and asked (ISO 8601). */
  probedAt: string;
}

/**
 * The `migration_version` attribute: absent (the driver has none), read (its exact
 * bytes, never parsed - not even trimmed), or unreadable (the read failed, or the
 * content is not ASCII or longer than PATH_MAX: the protocol allows neither).
 */
export type MigrationVersionFacts = { present: false } | { present: true; value: string } | { present: true; error: string; errno?: string };

/** Firmware identity, when the driver exposes it in sysfs (most do not: see docs/compatibility.md). */
export interface FirmwareFacts {
  version: string | null;
  /** Mellanox/NVIDIA board PSID (the IB device's board_id). */
  psid: string | null;
  /** The sysfs path, relative to the device directory, it was read from. */
  from: string | null;
  /** Why nothing was found, or what was not looked at. */
  note: string;
}

export interface MdevFacts {
  /** The type directory name under mdev_supported_types (mtty-2, nvidia-63). */
  type: string;
  /** The type's human name (`name` attribute), when it has one. */
  typeName: string | null;
  /** The parent as named in /sys/class/mdev_bus (a PCI address, or e.g. "mtty"). */
  parent: string;
  parentDriver: string | null;
  parentModule: string | null;
  parentModuleVersion: string | null;
  parentSrcversion: string | null;
}

export interface DeviceDescriptor {
  schema: 1;
  /** PCI address or mdev UUID, lower case. */
  id: string;
  kind: 'pci' | 'mdev';
  /** 4 hex digits, no 0x. For an mdev: the parent's, null when the parent is not a PCI device. */
  vendor: string | null;
  device: string | null;
  subsystemVendor: string | null;
  subsystemDevice: string | null;
  /** 2 hex digits. */
  revision: string | null;
  /** 6 hex digits (class, subclass, prog-if). */
  class: string | null;
  /** The PF of an SR-IOV VF. */
  physfn: string | null;
  /** The bound driver (for an mdev: the mdev driver, e.g. mtty). */
  driver: string | null;
  /** The driver's module, null for a built-in driver. */
  module: string | null;
  /** /sys/module/<module>/srcversion: only modules with MODULE_VERSION, or all with CONFIG_MODULE_SRCVERSION_ALL. */
  srcversion: string | null;
  /** /sys/module/<module>/version (MODULE_VERSION). */
  moduleVersion: string | null;
  /** The module binary's GNU build-id (hex), when readable (root). Identifies this very build. */
  buildId: string | null;
  firmware: FirmwareFacts;
  /** Null when not known: never probed, or the cached answer is stale (see migrationNote). */
  migration: MigrationFacts | null;
  migrationNote?: string;
  mdev: MdevFacts | null;
  /** os.release() of the host that described the device. */
  kernel: string;
  migrationVersion: MigrationVersionFacts;
  /**
   * Vendor attributes the vendor checks need, keyed by where they were read:
   * `nvidia/current_vgpu_type` (a VF-based vGPU), `module/nvidia/version` (the NVIDIA host driver).
   */
  vendorAttrs: Record<string, string>;
  describedAt: string;
}

/** The answer of checkCompatibility. */
export interface CompatVerdict {
  compatible: boolean;
  /**
   * What decided: 'migration_version' (the driver, through the attribute), 'mdevType',
   * 'kind', 'target' (no such target), 'source' (an invalid descriptor), a descriptor
   * field that differed ('vendor', 'device', 'driver', 'srcversion', 'migrationFlags',
   * 'firmware', ...), or 'descriptor' when every compared field was equal.
   */
  decidedBy: string;
  reason: string;
  /** The errno the target's driver returned for the write, as it returned it (EINVAL, ...). */
  errno?: string;
}

// --- validation --------------------------------------------------------------------

const HEX = (n: number) => new RegExp(`^[0-9a-f]{${n}}$`);
const SHORT = 256;

export class DescriptorError extends Error {
  constructor(reason: string) {
    super(`invalid device descriptor: ${reason}`);
    this.name = 'DescriptorError';
  }
}

function isObj(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function str(o: Record<string, unknown>, k: string, max = SHORT, pattern?: RegExp): string {
  const v = o[k];
  if (typeof v !== 'string' || v.length > max || (pattern && !pattern.test(v))) throw new DescriptorError(`${k} is not a valid string`);
  return v;
}

function nstr(o: Record<string, unknown>, k: string, max = SHORT, pattern?: RegExp): string | null {
  if (o[k] === null || o[k] === undefined) return null;
  return str(o, k, max, pattern);
}

/**
 * Checks a descriptor from outside (a peer, the cache) and returns a clean copy with
 * only the known fields. Throws DescriptorError naming the first bad field.
 */
export function validateDescriptor(input: unknown): DeviceDescriptor {
  if (!isObj(input)) throw new DescriptorError('not an object');
  if (input.schema !== 1) throw new DescriptorError(`schema ${JSON.stringify(input.schema)} is not 1`);
  const kind = input.kind;
  if (kind !== 'pci' && kind !== 'mdev') throw new DescriptorError('kind is not pci or mdev');
  const idPattern = kind === 'pci' ? /^[0-9a-f]{4}:[0-9a-f]{2}:[01][0-9a-f]\.[0-7]$/ : /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
  const fw = input.firmware;
  if (!isObj(fw)) throw new DescriptorError('firmware is not an object');
  const mv = input.migrationVersion;
  if (!isObj(mv) || typeof mv.present !== 'boolean') throw new DescriptorError('migrationVersion is not valid');
  let migrationVersion: MigrationVersionFacts;
  if (!mv.present) migrationVersion = { present: false };
  else if (typeof mv.value === 'string') {
    // The same limits the reader applies: ASCII, at most PATH_MAX bytes, not empty.
    if (mv.value.length === 0 || mv.value.length > 4096 || [...mv.value].some((c) => c.charCodeAt(0) === 0 || c.charCodeAt(0) > 0x7f)) throw new DescriptorError('migrationVersion.value is not 1-4096 ASCII characters');
    migrationVersion = { present: true, value: mv.value };
  } else {
    migrationVersion = { present: true, error: str(mv, 'error', 1024), ...(mv.errno !== undefined ? { errno: str(mv, 'errno', 32, /^E[A-Z0-9]+$/) } : {}) };
  }
  let migration: MigrationFacts | null = null;
  if (input.migration !== null && input.migration !== undefined) {
    const m = input.migration;
    if (!isObj(m)) throw new DescriptorError('migration is not an object');
    if (typeof m.flags !== 'number' || !Number.isInteger(m.flags) || m.flags < 0 || m.flags > 0xffffffff) throw new DescriptorError('migration.flags is not a u32');
    if (!Array.isArray(m.flagNames) || m.flagNames.length > 64 || !m.flagNames.every((n) => typeof n === 'string' && n.length <= 32)) throw new DescriptorError('migration.flagNames is not a list of names');
    if (m.source !== 'probe' && m.source !== 'cache') throw new DescriptorError('migration.source is not probe or cache');
    migration = {
      flags: m.flags,
      flagNames: [...(m.flagNames as string[])],
      dataSize: nstr(m, 'dataSize', 20, /^[0-9]{1,20}$/),
      source: m.source,
      probedAt: str(m, 'probedAt', 40),
    };
  }
  let mdev: MdevFacts | null = null;
  if (input.mdev !== null && input.mdev !== undefined) {
    const d = input.mdev;
    if (!isObj(d)) throw new DescriptorError('mdev is not an object');
    const name = /^[A-Za-z0-9_][A-Za-z0-9_.:+-]{0,63}$/;
    mdev = {
      type: str(d, 'type', 64, name),
      typeName: nstr(d, 'typeName'),
      parent: str(d, 'parent', 64, name),
      parentDriver: nstr(d, 'parentDriver', 64),
      parentModule: nstr(d, 'parentModule', 64),
      parentModuleVersion: nstr(d, 'parentModuleVersion'),
      parentSrcversion: nstr(d, 'parentSrcversion'),
    };
  }
  if (kind === 'mdev' && !mdev) throw new DescriptorError('an mdev descriptor has no mdev facts');
  const attrs = input.vendorAttrs ?? {};
  if (!isObj(attrs) || Object.keys(attrs).length > 32) throw new DescriptorError('vendorAttrs is not a small object');
  const vendorAttrs: Record<string, string> = {};
  for (const [k, v] of Object.entries(attrs)) {
    if (!/^[a-z0-9_][a-z0-9_.-]{0,31}(\/[a-z0-9_][a-z0-9_.-]{0,31}){0,3}$/.test(k) || typeof v !== 'string' || v.length > 1024) throw new DescriptorError(`vendorAttrs.${k.slice(0, 40)} is not valid`);
    vendorAttrs[k] = v;
  }
  const out: DeviceDescriptor = {
    schema: 1,
    id: str(input, 'id', 36, idPattern),
    kind,
    vendor: nstr(input, 'vendor', 4, HEX(4)),
    device: nstr(input, 'device', 4, HEX(4)),
    subsystemVendor: nstr(input, 'subsystemVendor', 4, HEX(4)),
    subsystemDevice: nstr(input, 'subsystemDevice', 4, HEX(4)),
    revision: nstr(input, 'revision', 2, HEX(2)),
    class: nstr(input, 'class', 6, HEX(6)),
    physfn: nstr(input, 'physfn', 12, /^[0-9a-f]{4}:[0-9a-f]{2}:[01][0-9a-f]\.[0-7]$/),
    driver: nstr(input, 'driver', 64),
    module: nstr(input, 'module', 64),
    srcversion: nstr(input, 'srcversion'),
    moduleVersion: nstr(input, 'moduleVersion'),
    buildId: nstr(input, 'buildId', 128, /^[0-9a-f]*$/),
    firmware: { version: nstr(fw, 'version'), psid: nstr(fw, 'psid'), from: nstr(fw, 'from', 1024), note: str(fw, 'note', 1024) },
    migration,
    mdev,
    kernel: str(input, 'kernel'),
    migrationVersion,
    vendorAttrs,
    describedAt: str(input, 'describedAt', 40),
  };
  if (input.migrationNote !== undefined) out.migrationNote = str(input, 'migrationNote', 1024);
  return out;
}

/** Names of the migration flag bits, unknown bits as hex (JSON-friendly, no vfio import needed). */
export function migrationFlagNames(flags: number): string[] {
  const names: string[] = [];
  if (flags & 1) names.push('STOP_COPY');
  if (flags & 2) names.push('P2P');
  if (flags & 4) names.push('PRE_COPY');
  const rest = flags & ~7;
  if (rest) names.push(`0x${(rest >>> 0).toString(16)}`);
  return names;
}

/** The PCI identity fields of a descriptor (an mdev carries its parent's). */
export type PciIdentity = Pick<DeviceDescriptor, 'vendor' | 'device' | 'subsystemVendor' | 'subsystemDevice' | 'revision' | 'class'>;
