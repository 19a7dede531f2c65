// Can the migration state of a source device load on a target? The `migration_version`
// protocol of the 2019-2020 mdev proposal, exactly, and the descriptor rules where
// neither side has the attribute.
//
// The protocol (the vendor driver decides, userspace only carries a string):
//   1. read `migration_version` on the source (descriptor.ts puts it in the descriptor);
//   2. write that string to the target's `migration_version`;
//   3. the target's driver accepts the write (compatible) or fails it with an errno of
//      its choosing (incompatible; the errno is reported as the driver gave it, never
//      interpreted).
// Incompatible if ANY of: the mdev types differ; the attribute is missing on either
// side; the source's read failed (or its content is not ASCII / longer than PATH_MAX);
// the write failed. Compatible only if ALL of: same type, read ok, write ok.
//
// Where the target is an mdev that does not exist yet, the write goes to the type at
// its parent: `<parent>/mdev_supported_types/<type>/migration_version`. Several parents
// may offer one type name with different versions (two GPU generations, two firmware
// levels), so the type is always checked at the parent that would create the mdev.
// For PCI functions the attribute is the device's own `<device>/migration_version`.
//
// Where neither side has the attribute, the descriptors decide (descriptorRules below):
// the first field that differs is named in `decidedBy`.

import * as sysfs from '../host/sysfs.ts';
import type { DeviceId } from '../host/sysfs.ts';
import { describeDevice, describeMdevType, migrationVersionPath } from './descriptor.ts';
import { validateDescriptor, type CompatVerdict, type DeviceDescriptor, type FirmwareFacts, type MdevFacts, type PciIdentity } from './types.ts';
import { attributeExists, writeMigrationVersionAt } from './version-attr.ts';

export type { CompatVerdict } from './types.ts';

/** A target that does not exist yet: an mdev of `mdevType`, to be created under `parent`. */
export interface MdevTypeTarget {
  parent: string;
  mdevType: string;
}

function no(decidedBy: string, reason: string, errno?: string): CompatVerdict {
  return { compatible: false, decidedBy, reason, ...(errno ? { errno } : {}) };
}

/** The facts of the target needed for the descriptor rules. */
interface TargetFacts extends PciIdentity {
  label: string;
  kind: 'pci' | 'mdev';
  /** null for an mdev that does not exist yet (its driver is not known before it is created). */
  driver: string | null | undefined;
  srcversion: string | null | undefined;
  moduleVersion: string | null | undefined;
  migration: { flags: number } | null;
  mdev: MdevFacts | null;
  firmware: FirmwareFacts;
  vendorAttrs: Record<string, string>;
  /** Where its migration_version is (or would be). */
  versionPath: string | undefined;
}

function fromDescriptor(d: DeviceDescriptor, path: string | undefined): TargetFacts {
  return { ...d, label: d.id, versionPath: path };
}

/**
 * Checks whether `source` (a descriptor, possibly from another host) can migrate to
 * `target`: an existing device of this host (PCI address or mdev UUID), or an mdev type
 * at a parent of this host (before the mdev exists). Writes to the target's
 * migration_version attribute when both sides have one; that write changes nothing on
 * the target by the protocol's definition, it only asks the driver.
 */
export function checkCompatibility(source: DeviceDescriptor, target: string | MdevTypeTarget): CompatVerdict {
  let src: DeviceDescriptor;
  try {
    src = validateDescriptor(source);
  } catch (err) {
    return no('source', (err as Error).message);
  }

  // 1. The target: what it is, and where its attribute lives.
  let t: TargetFacts;
  if (typeof target === 'string') {
    let id: DeviceId;
    try {
      id = sysfs.parseDeviceId(target);
    } catch (err) {
      return no('target', (err as Error).message);
    }
    const name = sysfs.deviceIdString(id);
    if (!sysfs.deviceExists(id)) return no('target', `no such device ${name} on this host`);
    t = fromDescriptor(describeDevice(name), migrationVersionPath(id));
  } else {
    if (typeof target !== 'object' || target === null) return no('target', 'the target is neither a device id nor { parent, mdevType }');
    let described: ReturnType<typeof describeMdevType>;
    try {
      described = describeMdevType(target.parent, target.mdevType);
    } catch (err) {
      return no('target', (err as Error).message);
    }
    if (src.kind !== 'mdev') return no('kind', `the source ${src.id} is a PCI function; an mdev type cannot take its state`);
    if (src.mdev!.type !== target.mdevType) return no('mdevType', `different mdev types: the source is ${src.mdev!.type}, the target ${target.mdevType}`);
    if (!described) {
      const offering = sysfs.listMdevParents().filter((p) => sysfs.mdevTypesOf(p).includes(target.mdevType));
      return no('mdevType', `parent ${target.parent} does not offer mdev type ${target.mdevType}${offering.length ? ` (offered by ${offering.join(', ')})` : ' (no parent of this host offers it)'}`);
    }
    t = {
      label: `${target.mdevType} at ${target.parent}`,
      kind: 'mdev',
      ...described.pci,
      driver: undefined,
      srcversion: undefined,
      moduleVersion: undefined,
      migration: null,
      mdev: described.mdev,
      firmware: described.firmware,
      vendorAttrs: described.vendorAttrs,
      versionPath: sysfs.mdevTypeAttrPath(target.parent, target.mdevType, 'migration_version'),
    };
  }

  // 2. Kind and type, which no string can bridge.
  if (src.kind !== t.kind) return no('kind', `the source ${src.id} is ${src.kind === 'pci' ? 'a PCI function' : 'an mdev'}, the target ${t.label} ${t.kind === 'pci' ? 'a PCI function' : 'an mdev'}`);
  if (src.kind === 'mdev' && src.mdev!.type !== t.mdev!.type) return no('mdevType', `different mdev types: the source is ${src.mdev!.type}, the target ${t.mdev!.type}`);

  // 3. The attribute on both sides, or on neither.
  const srcHas = src.migrationVersion.present;
  const dstHas = t.versionPath !== undefined && attributeExists(t.versionPath);
  if (!srcHas && !dstHas) return descriptorRules(src, t);
  if (!srcHas) return no('migration_version', `the target ${t.label} has a migration_version attribute, the source ${src.id} has none`);
  if (!dstHas) {
    // The attribute belongs to the driver: a target on another driver (plain vfio-pci, unbound) has none.
    const hint = t.driver !== undefined && t.driver !== src.driver ? ` (the target is bound to ${t.driver ?? 'no driver'}, the source to ${src.driver ?? 'no driver'}: bind the target to the same driver first)` : '';
    return no('migration_version', `the source ${src.id} has a migration_version attribute, the target ${t.label} has none${hint}`);
  }
  const mv = src.migrationVersion;
  if (!('value' in mv)) return no('migration_version', `reading the source's migration_version failed: ${mv.error}`, mv.errno);

  // 4. The driver decides.
  const w = writeMigrationVersionAt(t.versionPath!, mv.value);
  if (!w.ok) return no('migration_version', `the target's driver refused the source's migration_version (${w.message})`, w.errno);
  return { compatible: true, decidedBy: 'migration_version', reason: `the driver of ${t.label} accepted the migration_version of ${src.id}${src.kind === 'mdev' ? ` (same type ${src.mdev!.type})` : ''}` };
}

/**
 * Where neither side has a migration_version: the devices must be the same kind of
 * thing served by the same driver build. Fields are compared in order and the first
 * difference decides. A field known on one side only counts as a difference; a field
 * known on neither (flags of an mdev not yet created, firmware a driver does not show)
 * is not compared, and the reason lists it.
 */
export function descriptorRules(src: DeviceDescriptor, t: TargetFacts): CompatVerdict {
  const compared: string[] = [];
  const skipped: string[] = [];
  const field = (name: string, a: string | number | null | undefined, b: string | number | null | undefined, what = name): CompatVerdict | undefined => {
    if (b === undefined) {
      skipped.push(`${what} (not known before the mdev exists)`);
      return undefined;
    }
    if ((a === null || a === undefined) && b === null) {
      skipped.push(`${what} (shown on neither side)`);
      return undefined;
    }
    compared.push(what);
    if (a === b) return undefined;
    return no(name, `${what} differs: source ${src.id} has ${a ?? 'none'}, target ${t.label} has ${b ?? 'none'} (neither side has a migration_version, so the descriptors decide)`);
  };
  const checks: Array<() => CompatVerdict | undefined> = [
    () => field('vendor', src.vendor, t.vendor),
    () => field('device', src.device, t.device),
    () => field('subsystemVendor', src.subsystemVendor, t.subsystemVendor, 'subsystem vendor'),
    () => field('subsystemDevice', src.subsystemDevice, t.subsystemDevice, 'subsystem device'),
    () => field('revision', src.revision, t.revision),
    () => field('class', src.class, t.class),
    () => (src.kind === 'mdev' ? field('mdevType', src.mdev!.type, t.mdev!.type, 'mdev type') : undefined),
    () => field('driver', src.driver, t.driver),
    () => field('srcversion', src.srcversion, t.srcversion),
    () => field('moduleVersion', src.moduleVersion, t.moduleVersion, 'module version'),
    () => (src.kind === 'mdev' ? field('parentDriver', src.mdev!.parentDriver, t.mdev!.parentDriver, 'parent driver') : undefined),
    () => (src.kind === 'mdev' ? field('parentSrcversion', src.mdev!.parentSrcversion, t.mdev!.parentSrcversion, 'parent srcversion') : undefined),
    () => (src.kind === 'mdev' ? field('parentModuleVersion', src.mdev!.parentModuleVersion, t.mdev!.parentModuleVersion, 'parent module version') : undefined),
    () => {
      const a = src.migration?.flags;
      const b = t.migration?.flags;
      if (a === undefined || b === undefined) {
        skipped.push(`migration flags (${a === undefined ? 'source' : 'target'} not probed)`);
        return undefined;
      }
      return field('migrationFlags', a, b, 'migration flags');
    },
    () => firmwareField('version', src.firmware.version, t.firmware.version),
    () => firmwareField('PSID', src.firmware.psid, t.firmware.psid),
    () => {
      for (const key of [...new Set([...Object.keys(src.vendorAttrs), ...Object.keys(t.vendorAttrs)])].sort()) {
        const v = field(`vendorAttrs.${key}`, src.vendorAttrs[key] ?? null, t.vendorAttrs[key] ?? null, key);
        if (v) return v;
      }
      return undefined;
    },
  ];
  function firmwareField(what: string, a: string | null, b: string | null): CompatVerdict | undefined {
    if (a === null || b === null) {
      skipped.push(`firmware ${what} (${a === null && b === null ? 'shown on neither side' : `not shown on the ${a === null ? 'source' : 'target'}`})`);
      return undefined;
    }
    return field('firmware', a, b, `firmware ${what}`);
  }
  for (const c of checks) {
    const v = c();
    if (v) return v;
  }
  return {
    compatible: true,
    decidedBy: 'descriptor',
    reason: `neither side has a migration_version; equal: ${compared.join(', ') || 'nothing'}${skipped.length ? `; not compared: ${skipped.join(', ')}` : ''}`,
  };
}

/**
 * Every parent of this host that offers the source's mdev type, each with its verdict:
 * the destination picks a parent whose verdict is compatible before creating the mdev.
 */
export function checkMdevParents(source: DeviceDescriptor): Array<{ parent: string; verdict: CompatVerdict }> {
  const type = source.mdev?.type;
  if (source.kind !== 'mdev' || !type) return [];
  return sysfs
    .listMdevParents()
    .filter((p) => sysfs.mdevTypesOf(p).includes(type))
    .map((parent) => ({ parent, verdict: checkCompatibility(source, { parent, mdevType: type }) }));
}
