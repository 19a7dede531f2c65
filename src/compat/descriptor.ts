// The compatibility descriptor of one device: everything that decides whether its
// migration state can load on another device, read from sysfs (never by running a
// program: no shell, no binaries). The source sends it to the destination, the
// destination compares it with its candidates (migration-version.ts), and the state
// stream carries it in its header.
//
// What sysfs shows and what it does not:
//   - PCI identity (vendor, device, subsystem, revision, class), the bound driver, its
//     module and the module's srcversion/version/build-id: always, for PCI functions.
//   - Firmware: there is no generic sysfs attribute. mlx5 shows fw_ver and board_id
//     (the PSID) on its RDMA device (`<PF>/infiniband/mlx5_N/`) when mlx5_ib is loaded;
//     its devlink info and `ethtool -i` answers come over netlink/ioctl, which vfio-mig
//     does not speak. Other variant drivers (hisi_acc, pds, virtio, qat, xe) show none.
//   - Migration flags and MIG_DATA_SIZE: only by opening the device, which a running
//     QEMU prevents; so they come from a live probe or the capability cache.
//   - migration_version: where the driver has the attribute (our edu test driver on
//     its PCI function; proposed for mdev types, but no upstream driver has it).

import { readFileSync } from 'node:fs';
import * as sysfs from '../host/sysfs.ts';
import type { DeviceId } from '../host/sysfs.ts';
import { driverIdentity, kernelRelease, moduleFacts } from './identity.ts';
import { readCapabilities } from './cache.ts';
import { readMigrationVersionAt } from './version-attr.ts';
import type { DeviceDescriptor, FirmwareFacts, MdevFacts, MigrationFacts, MigrationVersionFacts, PciIdentity } from './types.ts';

export type { DeviceDescriptor, FirmwareFacts, MdevFacts, MigrationFacts, MigrationVersionFacts, CompatVerdict } from './types.ts';
export { validateDescriptor, DescriptorError } from './types.ts';

export class NoSuchDeviceError extends Error {
  constructor(id: string) {
    super(`no such device ${id} in ${sysfs.sysfsRoot()}`);
    this.name = 'NoSuchDeviceError';
  }
}

function hexAttr(id: DeviceId, attr: string, digits: number): string | null {
  const raw = sysfs.readDeviceAttr(id, attr);
  if (raw === undefined) return null;
  const v = raw.toLowerCase().replace(/^0x/, '');
  return /^[0-9a-f]+$/.test(v) && v.length <= digits ? v.padStart(digits, '0') : null;
}


const NO_PCI: PciIdentity = { vendor: null, device: null, subsystemVendor: null, subsystemDevice: null, revision: null, class: null };

function pciIdentity(id: DeviceId): PciIdentity {
  return {
    vendor: hexAttr(id, 'vendor', 4),
    device: hexAttr(id, 'device', 4),
    subsystemVendor: hexAttr(id, 'subsystem_vendor', 4),
    subsystemDevice: hexAttr(id, 'subsystem_device', 4),
    revision: hexAttr(id, 'revision', 2),
    class: hexAttr(id, 'class', 6),
  };
}

/**
 * Firmware version and PSID, where a driver shows them in sysfs: the RDMA device of the
 * function itself or of its PF (mlx5 with mlx5_ib loaded: fw_ver, board_id = PSID).
 */
export function firmwareFacts(id: DeviceId, physfn: string | null): FirmwareFacts {
  const places: Array<{ dev: DeviceId; prefix: string }> = [{ dev: id, prefix: '' }];
  if (physfn) places.push({ dev: { kind: 'pci', bdf: physfn }, prefix: 'physfn/' });
  for (const { dev, prefix } of places) {
    for (const ib of sysfs.deviceSubdirEntries(dev, 'infiniband')) {
      const version = sysfs.readDeviceNestedAttr(dev, 'infiniband', ib, 'fw_ver') ?? null;
      const psid = sysfs.readDeviceNestedAttr(dev, 'infiniband', ib, 'board_id') ?? null;
      if (version || psid) return { version, psid, from: `${prefix}infiniband/${ib}`, note: 'read from the RDMA device (fw_ver, board_id)' };
    }
  }
  return {
    version: null,
    psid: null,
    from: null,
    note: 'not in sysfs: no RDMA device with fw_ver on the function or its PF (mlx5: load mlx5_ib on the PF; devlink/ethtool firmware queries are netlink/ioctl, which vfio-mig does not make)',
  };
}

function mdevFacts(parent: string, type: string): MdevFacts {
  const { driver, module } = sysfs.mdevParentDriver(parent);
  const mod = moduleFacts(module ?? null);
  let typeName: string | null = null;
  try {
    typeName = readTrimmed(sysfs.mdevTypeAttrPath(parent, type, 'name'));
  } catch {
    typeName = null;
  }
  return { type, typeName, parent, parentDriver: driver ?? null, parentModule: module ?? null, parentModuleVersion: mod.moduleVersion, parentSrcversion: mod.srcversion };
}

function readTrimmed(path: string): string | null {
  try {
    const v = readFileSync(path, 'utf8').trim();
    return v.length > 0 && v.length <= 256 ? v : null;
  } catch {
    return null;
  }
}

/** Where the migration_version of a device lives: its PCI function, or its mdev type at the parent. */
export function migrationVersionPath(id: DeviceId): string | undefined {
  if (id.kind === 'pci') return sysfs.deviceAttrPath(id, 'migration_version');
  const type = sysfs.mdevTypeOf(id);
  const parent = sysfs.mdevParentOf(id);
  if (!type || !parent) return undefined;
  return sysfs.mdevTypeAttrPath(parent, type, 'migration_version');
}

function vendorAttrs(id: DeviceId, vendor: string | null): Record<string, string> {
  const out: Record<string, string> = {};
  if (vendor !== '10de') return out;
  // NVIDIA vGPU: on kernels >= 6.8 with the vendor VFIO framework a vGPU is a VF whose
  // type is chosen in <VF>/nvidia/current_vgpu_type (a decimal type id, 0 = none);
  // the host driver's version is the nvidia module's.
  if (id.kind === 'pci') {
    const t = readTrimmed(sysfs.deviceAttrPath(id, 'current_vgpu_type', 'nvidia'));
    if (t !== null) out['nvidia/current_vgpu_type'] = t;
  }
  const v = sysfs.readModuleAttr('nvidia', 'version');
  if (v) out['module/nvidia/version'] = v.slice(0, 256);
  return out;
}

/**
 * Describes a device (PCI address or mdev UUID) as this host sees it now. Migration
 * facts come from `opts.migration` (a live probe) or the capability cache; when neither
 * has them, `migration` is null and `migrationNote` says why.
 */
export function describeDevice(idText: string, opts: { migration?: MigrationFacts } = {}): DeviceDescriptor {
  const id = sysfs.parseDeviceId(idText);
  const name = sysfs.deviceIdString(id);
  if (!sysfs.deviceExists(id)) throw new NoSuchDeviceError(name);
  let pci: PciIdentity = NO_PCI;
  let mdev: MdevFacts | null = null;
  let physfn: string | null = null;
  if (id.kind === 'pci') {
    pci = pciIdentity(id);
    physfn = sysfs.physfnOf(id.bdf) ?? null;
  } else {
    const type = sysfs.mdevTypeOf(id);
    const parent = sysfs.mdevParentOf(id);
    if (type && parent) {
      mdev = mdevFacts(parent, type);
      // vendor/device of an mdev are its parent's, when the parent is a PCI function.
      if (sysfs.isBdf(parent)) pci = pciIdentity({ kind: 'pci', bdf: parent.toLowerCase() });
    } else {
      mdev = { type: type ?? 'unknown', typeName: null, parent: parent ?? 'unknown', parentDriver: null, parentModule: null, parentModuleVersion: null, parentSrcversion: null };
    }
  }
  const ident = driverIdentity(id);
  let migration: MigrationFacts | null = opts.migration ?? null;
  let migrationNote: string | undefined;
  if (!migration) {
    const cached = readCapabilities(name);
    if (cached.ok && cached.entry.flags !== null) {
      migration = { flags: cached.entry.flags, flagNames: cached.entry.flagNames, dataSize: cached.entry.dataSize, source: 'cache', probedAt: cached.entry.probedAt };
    } else if (cached.ok) {
      migrationNote = `the device refused GET MIGRATION when probed at ${cached.entry.probedAt}: ${cached.entry.flagsError ?? 'no flags'}`;
    } else {
      migrationNote = cached.reason;
    }
  }
  const path = migrationVersionPath(id);
  const migrationVersion: MigrationVersionFacts = path ? readMigrationVersionAt(path) : { present: true, error: `the mdev's type or parent cannot be read, so its migration_version cannot be found` };
  const out: DeviceDescriptor = {
    schema: 1,
    id: name,
    kind: id.kind,
    ...pci,
    physfn,
    driver: ident.driver,
    module: ident.module,
    srcversion: ident.srcversion,
    moduleVersion: ident.moduleVersion,
    buildId: ident.buildId,
    firmware: id.kind === 'pci' ? firmwareFacts(id, physfn) : mdev && sysfs.isBdf(mdev.parent) ? firmwareFacts({ kind: 'pci', bdf: mdev.parent.toLowerCase() }, null) : { version: null, psid: null, from: null, note: 'the mdev parent is not a PCI device' },
    migration,
    mdev,
    kernel: kernelRelease(),
    migrationVersion,
    vendorAttrs: vendorAttrs(id.kind === 'pci' ? id : mdev && sysfs.isBdf(mdev.parent) ? { kind: 'pci', bdf: mdev.parent.toLowerCase() } : id, pci.vendor),
    describedAt: new Date().toISOString(),
  };
  if (migrationNote) out.migrationNote = migrationNote;
  return out;
}

/**
 * What can be known of an mdev of `type` under `parent` before one exists: the parent's
 * identity and driver, the type. Used to compare against a source when neither side has
 * a migration_version. Undefined when the parent does not offer the type.
 */
export function describeMdevType(parent: string, type: string): { pci: PciIdentity; mdev: MdevFacts; vendorAttrs: Record<string, string>; firmware: FirmwareFacts } | undefined {
  sysfs.parseMdevParent(parent);
  sysfs.parseMdevType(type);
  if (!sysfs.mdevTypesOf(parent).includes(type)) return undefined;
  const parentPci: DeviceId | undefined = sysfs.isBdf(parent) ? { kind: 'pci', bdf: parent.toLowerCase() } : undefined;
  const pci = parentPci ? pciIdentity(parentPci) : NO_PCI;
  return {
    pci,
    mdev: mdevFacts(parent, type),
    vendorAttrs: parentPci ? vendorAttrs(parentPci, pci.vendor) : {},
    firmware: parentPci ? firmwareFacts(parentPci, null) : { version: null, psid: null, from: null, note: 'the mdev parent is not a PCI device' },
  };
}
