// The one place where sysfs (and /dev) paths are built. Every device name that comes from
// outside - CLI arguments, domain XML, hook input, sysfs listings - is checked against a
// strict pattern here before it becomes part of a path, so "../" or "/" never reaches
// the file system. The roots come from $VFIO_MIG_SYSFS (default /sys) and
// $VFIO_MIG_DEV (default /dev) so tests can point them at fake trees.

import { readFileSync, readdirSync, readlinkSync, realpathSync, existsSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';

export class InvalidDeviceIdError extends Error {
  readonly input: string;
  constructor(input: string, what: string) {
    super(`invalid ${what} ${JSON.stringify(input.length > 80 ? `${input.slice(0, 80)}...` : input)}: expected ${EXPECTED[what] ?? what}`);
    this.name = 'InvalidDeviceIdError';
    this.input = input;
  }
}

const EXPECTED: Record<string, string> = {
  'PCI address': 'domain:bus:device.function like 0000:3b:00.2',
  'mdev UUID': 'a UUID like 83b8f4f2-509f-382f-3c1e-e6bfe0fa0001',
  'device id': 'a PCI address like 0000:3b:00.2 or an mdev UUID',
  'attribute name': 'a sysfs attribute name ([a-z0-9_])',
  'driver name': 'a driver name ([A-Za-z0-9_-], at most 64 characters)',
  'IOMMU group': 'a decimal group number',
  'module name': 'a kernel module name ([A-Za-z0-9_-], starting with a letter or digit, at most 64 characters)',
  'mdev parent': 'an mdev parent name from /sys/class/mdev_bus ([A-Za-z0-9_.:+-], at most 64 characters)',
  'mdev type': 'an mdev type name like mtty-2 ([A-Za-z0-9_.:+-], at most 64 characters)',
};

const BDF = /^([0-9a-fA-F]{4}):([0-9a-fA-F]{2}):([0-1][0-9a-fA-F])\.([0-7])$/;
const UUID = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/;
const ATTR = /^[a-z0-9_]{1,64}$/;
const DRIVER = /^[A-Za-z0-9_-]{1,64}$/;
const GROUP = /^(0|[1-9][0-9]{0,8})$/;

export type DeviceId = { kind: 'pci'; bdf: string } | { kind: 'mdev'; uuid: string };

/** Canonical lower-case PCI address; device numbers above 0x1f are rejected. */
export function parseBdf(input: string): string {
  const m = typeof input === 'string' ? BDF.exec(input) : null;
  if (!m) throw new InvalidDeviceIdError(String(input), 'PCI address');
  return input.toLowerCase();
}

export function parseMdevUuid(input: string): string {
  if (typeof input !== 'string' || !UUID.test(input)) throw new InvalidDeviceIdError(String(input), 'mdev UUID');
  return input.toLowerCase();
}

export function isBdf(input: string): boolean {
  return BDF.test(input);
}

export function isMdevUuid(input: string): boolean {
  return UUID.test(input);
}

export function parseDeviceId(input: string): DeviceId {
  if (typeof input === 'string' && BDF.test(input)) return { kind: 'pci', bdf: input.toLowerCase() };
  if (typeof input === 'string' && UUID.test(input)) return { kind: 'mdev', uuid: input.toLowerCase() };
  throw new InvalidDeviceIdError(String(input), 'device id');
}

export function deviceIdString(id: DeviceId): string {
  return id.kind === 'pci' ? id.bdf : id.uuid;
}

export function parseDriverName(input: string): string {
  if (typeof input !== 'string' || !DRIVER.test(input)) throw new InvalidDeviceIdError(String(input), 'driver name');
  return input;
}

export function parseGroup(input: string | number): number {
  const s = String(input);
  if (!GROUP.test(s)) throw new InvalidDeviceIdError(s, 'IOMMU group');
  return Number(s);
}

export function sysfsRoot(): string {
  return process.env.VFIO_MIG_SYSFS || '/sys';
}

export function devRoot(): string {
  return process.env.VFIO_MIG_DEV || '/dev';
}

export function deviceDir(id: DeviceId): string {
  return id.kind === 'pci'
    ? join(sysfsRoot(), 'bus', 'pci', 'devices', id.bdf)
    : join(sysfsRoot(), 'bus', 'mdev', 'devices', id.uuid);
}

export function deviceExists(id: DeviceId): boolean {
  return existsSync(deviceDir(id));
}

function readLinkBase(path: string): string | undefined {
  try {
    return basename(readlinkSync(path));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
}

/** IOMMU group number of a device, or undefined when it has none (no IOMMU, not present). */
export function iommuGroupOf(id: DeviceId): number | undefined {
  const name = readLinkBase(join(deviceDir(id), 'iommu_group'));
  return name === undefined ? undefined : parseGroup(name);
}

/** Members of an IOMMU group as device ids (PCI functions and mdevs). */
export function groupMembers(group: number): DeviceId[] {
  const dir = join(sysfsRoot(), 'kernel', 'iommu_groups', String(parseGroup(group)), 'devices');
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return [];
  }
  const out: DeviceId[] = [];
  for (const n of names.sort()) {
    if (isBdf(n) || isMdevUuid(n)) out.push(parseDeviceId(n));
  }
  return out;
}

/** Name of the driver a device is bound to (the `driver` link), or undefined. */
export function driverOf(id: DeviceId): string | undefined {
  return readLinkBase(join(deviceDir(id), 'driver'));
}

/**
 * Drivers the kernel lets share a VFIO group with VFIO-bound devices (vfio_main.c's
 * allow-list: bridges under pcieport, devices parked on pci-stub).
 */
export const VFIO_GROUP_SAFE_DRIVERS: ReadonlySet<string> = new Set(['pcieport', 'pci-stub']);

/**
 * Whether a device is bound to a VFIO driver, from what the kernel shows: an mdev is
 * always VFIO; a PCI function has a vfio-dev cdev (CONFIG_VFIO_DEVICE_CDEV), or its
 * driver's module is vfio_pci or holds vfio_pci_core (every variant driver links
 * against it). Only a driver built into the kernel, which has no module link, is
 * judged by its name (as is any driver while vfio_pci_core shows no holders).
 */
export function isVfioBound(id: DeviceId): boolean {
  if (id.kind === 'mdev') return true;
  const driver = driverOf(id);
  if (driver === undefined) return false;
  if (vfioCdevName(id) !== undefined) return true;
  const module = isDriverName(driver) ? pciDriverModule(driver) : undefined;
  if (module === 'vfio_pci') return true;
  const holders = join(sysfsRoot(), 'module', 'vfio_pci_core', 'holders');
  if (module !== undefined && existsSync(holders)) return existsSync(join(holders, module));
  return /vfio/i.test(driver);
}

/** The mdev type name (e.g. "mtty-2") from the mdev's `mdev_type` link. */
export function mdevTypeOf(id: DeviceId): string | undefined {
  return readLinkBase(join(deviceDir(id), 'mdev_type'));
}

/** Reads a sysfs attribute of a device, trimmed; undefined when absent. */
export function readDeviceAttr(id: DeviceId, attr: string): string | undefined {
  if (!ATTR.test(attr)) throw new InvalidDeviceIdError(attr, 'attribute name');
  try {
    return readFileSync(join(deviceDir(id), attr), 'utf8').trim();
  } catch {
    return undefined;
  }
}

/** The VFIO cdev name (vfioX) of a device when the kernel has CONFIG_VFIO_DEVICE_CDEV. */
export function vfioCdevName(id: DeviceId): string | undefined {
  try {
    return readdirSync(join(deviceDir(id), 'vfio-dev')).find((n) => /^vfio[0-9]{1,9}$/.test(n));
  } catch {
    return undefined;
  }
}

export function listPciDevices(): string[] {
  try {
    return readdirSync(join(sysfsRoot(), 'bus', 'pci', 'devices')).filter(isBdf).map((b) => b.toLowerCase()).sort();
  } catch {
    return [];
  }
}

export function listMdevs(): string[] {
  try {
    return readdirSync(join(sysfsRoot(), 'bus', 'mdev', 'devices')).filter(isMdevUuid).map((u) => u.toLowerCase()).sort();
  } catch {
    return [];
  }
}

// /dev paths -----------------------------------------------------------------------

export function vfioContainerPath(): string {
  return join(devRoot(), 'vfio', 'vfio');
}

export function vfioGroupPath(group: number): string {
  return join(devRoot(), 'vfio', String(parseGroup(group)));
}

export function vfioCdevDir(): string {
  return join(devRoot(), 'vfio', 'devices');
}

export function vfioCdevPath(name: string): string {
  if (!/^vfio[0-9]{1,9}$/.test(name)) throw new InvalidDeviceIdError(name, 'device id');
  return join(vfioCdevDir(), name);
}

export function iommufdPath(): string {
  return join(devRoot(), 'iommu');
}

// PCI driver binding: drivers, modules, attributes the binder writes ----------------
// Everything below serves src/pci/binder.ts and the driver survey. Driver and module
// names come from config files, modules.alias and sysfs listings, so they are checked
// like device ids before they are joined into a path.

const MODULE = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;
const VIRTFN = /^virtfn([0-9]{1,5})$/;

/**
 * A kernel module name. It must not start with '-' because it becomes an argument of
 * modprobe, where a leading dash would be read as an option.
 */
export function parseModuleName(input: string): string {
  if (typeof input !== 'string' || !MODULE.test(input)) throw new InvalidDeviceIdError(String(input), 'module name');
  return input;
}

export function isModuleName(input: string): boolean {
  return typeof input === 'string' && MODULE.test(input);
}

export function isDriverName(input: string): boolean {
  return typeof input === 'string' && DRIVER.test(input);
}

function pciId(bdf: string): DeviceId {
  return { kind: 'pci', bdf: parseBdf(bdf) };
}

/** /sys/bus/pci/devices/<bdf>/<attr>: the path of an attribute the binder reads or writes. */
export function pciAttrPath(bdf: string, attr: string): string {
  if (!ATTR.test(attr)) throw new InvalidDeviceIdError(attr, 'attribute name');
  return join(deviceDir(pciId(bdf)), attr);
}

/** /sys/bus/pci/drivers/<driver> */
export function pciDriverDir(driver: string): string {
  return join(sysfsRoot(), 'bus', 'pci', 'drivers', parseDriverName(driver));
}

/** Writing a BDF here detaches the device from `driver`. */
export function pciDriverUnbindPath(driver: string): string {
  return join(pciDriverDir(driver), 'unbind');
}

/** Writing a BDF here attaches the device to `driver` (if the driver matches it). */
export function pciDriverBindPath(driver: string): string {
  return join(pciDriverDir(driver), 'bind');
}

/** Writing a BDF here makes the PCI core look for a driver for an unbound device. */
export function pciDriversProbePath(): string {
  return join(sysfsRoot(), 'bus', 'pci', 'drivers_probe');
}

/** True when a PCI driver of this name is registered (its module is loaded or built in). */
export function pciDriverRegistered(driver: string): boolean {
  return existsSync(pciDriverDir(driver));
}

/** The module that registered a PCI driver (the driver's `module` link), when it has one. */
export function pciDriverModule(driver: string): string | undefined {
  const name = readLinkBase(join(pciDriverDir(driver), 'module'));
  return name !== undefined && MODULE.test(name) ? name : undefined;
}

/** /sys/module/<module> exists while the module is loaded (or built in with parameters). */
export function moduleLoaded(module: string): boolean {
  return existsSync(join(sysfsRoot(), 'module', parseModuleName(module)));
}

/**
 * The PCI driver names a loaded module registered, from /sys/module/<mod>/drivers/pci:<name>.
 * This is the authoritative module -> driver mapping (xe_vfio_pci registers xe-vfio-pci).
 */
export function modulePciDrivers(module: string): string[] {
  let names: string[];
  try {
    names = readdirSync(join(sysfsRoot(), 'module', parseModuleName(module), 'drivers'));
  } catch {
    return [];
  }
  return names
    .filter((n) => n.startsWith('pci:'))
    .map((n) => n.slice(4))
    .filter((n) => DRIVER.test(n))
    .sort();
}

/** The PF of an SR-IOV VF (its `physfn` link), or undefined for anything else. */
export function physfnOf(bdf: string): string | undefined {
  const name = readLinkBase(join(deviceDir(pciId(bdf)), 'physfn'));
  return name !== undefined && isBdf(name) ? name.toLowerCase() : undefined;
}

/** The VFs of an SR-IOV PF (virtfn0, virtfn1, ... links), in VF index order. */
export function virtfnsOf(bdf: string): string[] {
  let names: string[];
  try {
    names = readdirSync(deviceDir(pciId(bdf)));
  } catch {
    return [];
  }
  const vfs: Array<[number, string]> = [];
  for (const n of names) {
    const m = VIRTFN.exec(n);
    if (!m) continue;
    const target = readLinkBase(join(deviceDir(pciId(bdf)), n));
    if (target !== undefined && isBdf(target)) vfs.push([Number(m[1]), target.toLowerCase()]);
  }
  return vfs.sort((a, b) => a[0] - b[0]).map((v) => v[1]);
}

// Compatibility facts: mdev parents and types, driver modules, migration_version ----
// Used by src/compat. An mdev parent is named as in /sys/class/mdev_bus/<name>: a PCI
// address for PCI parents (GPUs, VFs), a class device name for others (mtty's "mtty").
// A type is the directory name under the parent's mdev_supported_types (mtty-2,
// nvidia-63, i915-GVTg_V5_4).

const MDEV_NAME = /^[A-Za-z0-9_][A-Za-z0-9_.:+-]{0,63}$/;
const SUBDIR = /^[a-z0-9_]{1,32}$/;

export function parseMdevParent(input: string): string {
  if (typeof input !== 'string' || !MDEV_NAME.test(input)) throw new InvalidDeviceIdError(String(input), 'mdev parent');
  return input;
}

export function parseMdevType(input: string): string {
  if (typeof input !== 'string' || !MDEV_NAME.test(input)) throw new InvalidDeviceIdError(String(input), 'mdev type');
  return input;
}

/** /sys/class/mdev_bus/<parent>: a link to the parent device's directory. */
export function mdevParentDir(parent: string): string {
  return join(sysfsRoot(), 'class', 'mdev_bus', parseMdevParent(parent));
}

/** /sys/class/mdev_bus/<parent>/mdev_supported_types/<type>/<attr> */
export function mdevTypeAttrPath(parent: string, type: string, attr: string): string {
  if (!ATTR.test(attr)) throw new InvalidDeviceIdError(attr, 'attribute name');
  return join(mdevParentDir(parent), 'mdev_supported_types', parseMdevType(type), attr);
}

/** Every mdev parent of the host, sorted. */
export function listMdevParents(): string[] {
  try {
    return readdirSync(join(sysfsRoot(), 'class', 'mdev_bus')).filter((n) => MDEV_NAME.test(n)).sort();
  } catch {
    return [];
  }
}

/** The mdev types a parent offers, sorted. */
export function mdevTypesOf(parent: string): string[] {
  try {
    return readdirSync(join(mdevParentDir(parent), 'mdev_supported_types')).filter((n) => MDEV_NAME.test(n)).sort();
  } catch {
    return [];
  }
}

/** An mdev's parent: the device whose directory holds the mdev's (and its type's) directory. */
export function mdevParentOf(id: DeviceId): string | undefined {
  if (id.kind !== 'mdev') return undefined;
  try {
    const name = basename(dirname(realpathSync(deviceDir(id))));
    return MDEV_NAME.test(name) ? name : undefined;
  } catch {
    return undefined;
  }
}

/** The module of the driver a device is bound to (the driver's `module` link; PCI or mdev bus). */
export function driverModuleOf(id: DeviceId): string | undefined {
  const name = readLinkBase(join(deviceDir(id), 'driver', 'module'));
  return name !== undefined && MODULE.test(name) ? name : undefined;
}

/** /sys/module/<module>/<attr> (srcversion, version, ...), trimmed; undefined when absent. */
export function readModuleAttr(module: string, attr: string): string | undefined {
  if (!ATTR.test(attr)) throw new InvalidDeviceIdError(attr, 'attribute name');
  try {
    return readFileSync(join(sysfsRoot(), 'module', parseModuleName(module), attr), 'utf8').trim();
  } catch {
    return undefined;
  }
}

/** /sys/module/<module>/notes/.note.gnu.build-id: the module binary's ELF build-id note (root only). */
export function moduleBuildIdNotePath(module: string): string {
  return join(sysfsRoot(), 'module', parseModuleName(module), 'notes', '.note.gnu.build-id');
}

/** Path of a device attribute, optionally in one sub-directory (`nvidia/current_vgpu_type`). */
export function deviceAttrPath(id: DeviceId, attr: string, subdir?: string): string {
  if (!ATTR.test(attr)) throw new InvalidDeviceIdError(attr, 'attribute name');
  if (subdir !== undefined && !SUBDIR.test(subdir)) throw new InvalidDeviceIdError(subdir, 'attribute name');
  return subdir === undefined ? join(deviceDir(id), attr) : join(deviceDir(id), subdir, attr);
}

/** Names in a device sub-directory (e.g. the IB devices under `infiniband/`), sorted. */
export function deviceSubdirEntries(id: DeviceId, subdir: string): string[] {
  if (!SUBDIR.test(subdir)) throw new InvalidDeviceIdError(subdir, 'attribute name');
  try {
    return readdirSync(join(deviceDir(id), subdir)).filter((n) => MDEV_NAME.test(n)).sort();
  } catch {
    return [];
  }
}

/** Reads `<device>/<subdir>/<entry>/<attr>` (e.g. infiniband/mlx5_0/fw_ver), trimmed. */
export function readDeviceNestedAttr(id: DeviceId, subdir: string, entry: string, attr: string): string | undefined {
  if (!SUBDIR.test(subdir) || !MDEV_NAME.test(entry) || !ATTR.test(attr)) throw new InvalidDeviceIdError(`${subdir}/${entry}/${attr}`, 'attribute name');
  try {
    return readFileSync(join(deviceDir(id), subdir, entry, attr), 'utf8').trim();
  } catch {
    return undefined;
  }
}

/** The driver of an mdev parent and its module (mtty's parent has none: a virtual class device). */
export function mdevParentDriver(parent: string): { driver: string | undefined; module: string | undefined } {
  const dir = mdevParentDir(parent);
  const driver = readLinkBase(join(dir, 'driver'));
  const module = driver === undefined ? undefined : readLinkBase(join(dir, 'driver', 'module'));
  return { driver: driver !== undefined && DRIVER.test(driver) ? driver : undefined, module: module !== undefined && MODULE.test(module) ? module : undefined };
}
