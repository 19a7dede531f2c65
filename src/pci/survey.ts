// Every PCI device with its current driver, the driver the table would give it and why:
// what `vfio-mig drivers` prints. Read-only; a device whose sysfs entry cannot be read
// is listed with the reason instead of hiding the others.

import * as sysfs from '../host/sysfs.ts';
import { readPciDevice } from './pcidev.ts';
import { chooseDriver, type Reason } from './choose.ts';
import { loadDriverTable, type DriverTable } from './table.ts';
import { loadAliasIndex, type AliasIndex } from './modalias.ts';
import { readState } from './state.ts';

export interface DriverRow {
  address: string;
  vendor: string | null;
  device: string | null;
  subsystemVendor: string | null;
  subsystemDevice: string | null;
  class: string | null;
  iommuGroup: number | null;
  /** The PF when this is an SR-IOV VF. */
  physfn: string | null;
  current: string | null;
  override: string | null;
  chosen: string | null;
  module: string | null;
  reason: Reason;
  detail: string;
  /** True when the state file says vfio-mig bound it (unbind would restore it). */
  managed: boolean;
  error?: string;
}

export function surveyDrivers(opts: { table?: DriverTable; aliases?: AliasIndex } = {}): DriverRow[] {
  const table = opts.table ?? loadDriverTable();
  const aliases = opts.aliases ?? loadAliasIndex();
  let managed: Set<string>;
  try {
    managed = new Set(Object.keys(readState().devices));
  } catch {
    managed = new Set(); // a broken state file is reported by bind/unbind, not here
  }
  return sysfs.listPciDevices().map((address): DriverRow => {
    try {
      const d = readPciDevice(address);
      const c = chooseDriver(d, table, aliases);
      return {
        address,
        vendor: d.vendor,
        device: d.device,
        subsystemVendor: d.subsystemVendor,
        subsystemDevice: d.subsystemDevice,
        class: d.class,
        iommuGroup: d.iommuGroup ?? null,
        physfn: d.physfn ?? null,
        current: d.driver ?? null,
        override: d.override ?? null,
        chosen: c.driver,
        module: c.module,
        reason: c.reason,
        detail: c.detail,
        managed: managed.has(address),
      };
    } catch (err) {
      const message = (err as Error).message;
      return {
        address,
        vendor: null,
        device: null,
        subsystemVendor: null,
        subsystemDevice: null,
        class: null,
        iommuGroup: null,
        physfn: null,
        current: sysfs.driverOf({ kind: 'pci', bdf: address }) ?? null,
        override: null,
        chosen: null,
        module: null,
        reason: 'none',
        detail: message,
        managed: managed.has(address),
        error: message,
      };
    }
  });
}
