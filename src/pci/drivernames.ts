// Module name <-> PCI driver name. modules.alias and modprobe speak module names
// (always underscores: xe_vfio_pci), driver_override and /sys/bus/pci/drivers speak the
// driver's own name, which may differ (xe-vfio-pci). Writing the module name to
// driver_override would match nothing and leave the device unbound.

import * as sysfs from '../host/sysfs.ts';

/**
 * Drivers whose name is not their module's name. Only used while the module is not
 * loaded; once it is, /sys/module/<mod>/drivers/pci:<name> is the truth.
 */
const KNOWN: ReadonlyArray<readonly [module: string, driver: string]> = [
  ['vfio_pci', 'vfio-pci'],
  ['xe_vfio_pci', 'xe-vfio-pci'],
  ['edu_vfio_pci', 'edu-vfio-pci'], // the project's rig test driver (native/edu-vfio-pci)
  ['pci_stub', 'pci-stub'],
];

/** Normalises a module name the way the kernel does in /sys/module (dashes -> underscores). */
export function canonicalModule(name: string): string {
  return sysfs.parseModuleName(name).replace(/-/g, '_');
}

/** The PCI driver name a module registers. */
export function pciDriverForModule(module: string): string {
  const mod = canonicalModule(module);
  const registered = sysfs.modulePciDrivers(mod);
  if (registered.length === 1) return registered[0]!;
  // A module registering several PCI drivers: prefer the one named after it.
  const named = registered.find((d) => d === mod || d === mod.replace(/_/g, '-'));
  if (named) return named;
  return KNOWN.find(([m]) => m === mod)?.[1] ?? mod;
}

/** The module to modprobe for a PCI driver name. */
export function moduleForPciDriver(driver: string): string {
  const name = sysfs.parseDriverName(driver);
  const fromSysfs = sysfs.pciDriverModule(name);
  if (fromSysfs) return fromSysfs;
  const known = KNOWN.find(([, d]) => d === name)?.[0];
  return known ?? canonicalModule(name);
}

/** Drivers a VFIO group tolerates besides VFIO drivers (the kernel's allow-list). */
export const DMA_SAFE_DRIVERS = sysfs.VFIO_GROUP_SAFE_DRIVERS;

/** vfio-pci and its variants (mlx5_vfio_pci, xe-vfio-pci, ...), by name. */
export function isVfioDriver(driver: string): boolean {
  return /vfio/i.test(driver);
}
