// One PCI function as the binder sees it: ids, class, modalias, driver, driver_override,
// IOMMU group and SR-IOV relations, read from sysfs and checked against the kernel's
// formats. sysfs is an external input too: a value that does not look like what the
// kernel prints is an error, not something to guess around.

import * as sysfs from '../host/sysfs.ts';
import { PciError } from './errors.ts';

export interface SriovInfo {
  totalVfs: number;
  numVfs: number;
  /** sriov_drivers_autoprobe: whether new VFs are offered to drivers automatically. */
  autoprobe: boolean;
  /** Device id the PF's VFs carry (sriov_vf_device), when the kernel reports it. */
  vfDevice: string | undefined;
}

export interface PciDeviceInfo {
  address: string;
  /** 4 lower-case hex digits, no 0x. */
  vendor: string;
  device: string;
  subsystemVendor: string;
  subsystemDevice: string;
  /** 6 lower-case hex digits: base class, subclass, programming interface. */
  class: string;
  revision: string | undefined;
  /** pci:v...d...sv...sd...bc..sc..i.. as the kernel prints it. */
  modalias: string;
  driver: string | undefined;
  /** The driver_override in effect, or undefined when none is set. */
  override: string | undefined;
  iommuGroup: number | undefined;
  /** The PF when this is an SR-IOV VF. */
  physfn: string | undefined;
  virtfns: string[];
  sriov: SriovInfo | undefined;
}

export const MODALIAS = /^pci:v([0-9A-F]{8})d([0-9A-F]{8})sv([0-9A-F]{8})sd([0-9A-F]{8})bc([0-9A-F]{2})sc([0-9A-F]{2})i([0-9A-F]{2})$/;
const HEX16 = /^0x([0-9a-fA-F]{4})$/;
const HEX24 = /^0x([0-9a-fA-F]{6})$/;
const HEX8 = /^0x([0-9a-fA-F]{2})$/;
const COUNT = /^(0|[1-9][0-9]{0,5})$/;

function bad(address: string, attr: string, value: string | undefined, expected: string): PciError {
  const shown = value === undefined ? 'missing' : JSON.stringify(value.slice(0, 80));
  return new PciError({ operation: `read ${attr}`, device: address, reason: `${shown} is not ${expected}` });
}

function attr(address: string, name: string): string | undefined {
  return sysfs.readDeviceAttr({ kind: 'pci', bdf: address }, name);
}

function hexAttr(address: string, name: string, re: RegExp, expected: string): string {
  const v = attr(address, name);
  const m = v === undefined ? null : re.exec(v);
  if (!m) throw bad(address, name, v, expected);
  return m[1]!.toLowerCase();
}

/**
 * driver_override as read back: the kernel prints "(null)" when none is set; an empty
 * string (some kernels) means the same.
 */
export function parseOverride(raw: string | undefined): string | undefined {
  if (raw === undefined || raw === '' || raw === '(null)') return undefined;
  return raw;
}

/** Reads one PCI function; throws PciError when it is missing or sysfs holds garbage. */
export function readPciDevice(input: string): PciDeviceInfo {
  const address = sysfs.parseBdf(input);
  const id = { kind: 'pci', bdf: address } as const;
  if (!sysfs.deviceExists(id)) {
    throw new PciError({ operation: 'look up', device: address, reason: `no such PCI device in ${sysfs.sysfsRoot()}/bus/pci/devices`, code: 'ENOENT' });
  }
  const modalias = attr(address, 'modalias');
  if (modalias === undefined || !MODALIAS.test(modalias)) throw bad(address, 'modalias', modalias, 'a PCI modalias (pci:v...d...sv...sd...bc..sc..i..)');
  const rawOverride = attr(address, 'driver_override');
  const override = parseOverride(rawOverride);
  if (override !== undefined && !sysfs.isDriverName(override)) throw bad(address, 'driver_override', rawOverride, 'a driver name');
  const driver = sysfs.driverOf(id);
  if (driver !== undefined && !sysfs.isDriverName(driver)) throw bad(address, 'driver', driver, 'a driver name');
  const rev = attr(address, 'revision');
  return {
    address,
    vendor: hexAttr(address, 'vendor', HEX16, 'a 16-bit id like 0x15b3'),
    device: hexAttr(address, 'device', HEX16, 'a 16-bit id like 0x101e'),
    subsystemVendor: hexAttr(address, 'subsystem_vendor', HEX16, 'a 16-bit id'),
    subsystemDevice: hexAttr(address, 'subsystem_device', HEX16, 'a 16-bit id'),
    class: hexAttr(address, 'class', HEX24, 'a 24-bit class like 0x020000'),
    revision: rev !== undefined && HEX8.test(rev) ? rev.slice(2).toLowerCase() : undefined,
    modalias,
    driver,
    override,
    iommuGroup: sysfs.iommuGroupOf(id),
    physfn: sysfs.physfnOf(address),
    virtfns: sysfs.virtfnsOf(address),
    sriov: readSriov(address),
  };
}

function readSriov(address: string): SriovInfo | undefined {
  const total = attr(address, 'sriov_totalvfs');
  if (total === undefined) return undefined;
  if (!COUNT.test(total)) throw bad(address, 'sriov_totalvfs', total, 'a VF count');
  const num = attr(address, 'sriov_numvfs') ?? '0';
  if (!COUNT.test(num)) throw bad(address, 'sriov_numvfs', num, 'a VF count');
  const autoprobe = attr(address, 'sriov_drivers_autoprobe') ?? '1';
  if (autoprobe !== '0' && autoprobe !== '1') throw bad(address, 'sriov_drivers_autoprobe', autoprobe, '0 or 1');
  const vfDev = attr(address, 'sriov_vf_device');
  // Older kernels lack sriov_vf_device; a PF without VFs may print 0.
  const vfDevice = vfDev !== undefined && /^[0-9a-fA-F]{1,4}$/.test(vfDev) && vfDev !== '0' ? vfDev.toLowerCase().padStart(4, '0') : undefined;
  return { totalVfs: Number(total), numVfs: Number(num), autoprobe: autoprobe === '1', vfDevice };
}
