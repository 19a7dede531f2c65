// Inventory of VFIO devices on this host: every PCI function bound to a vfio-pci
// (variant) driver and every mdev, with its migration capability when the device can be
// opened right now, or the reason it cannot (in use by a VM, not migratable, ...).

import * as sysfs from '../host/sysfs.ts';
import { VfioDevice } from './device.ts';
import { VfioError } from './errors.ts';
import { describeFlags } from './fsm.ts';
import { stateName } from './uapi.ts';

export interface InventoryEntry {
  address: string;
  kind: 'pci' | 'mdev';
  vendor?: string;
  device?: string;
  /** mdev type (e.g. mtty-2) for mdevs. */
  type?: string;
  driver: string | null;
  iommuGroup: number | null;
  migration: { flags: string[]; state: string } | { error: string; errno?: string };
}

function hexId(raw: string | undefined): string | undefined {
  return raw?.replace(/^0x/, '').toLowerCase();
}

export async function probeMigration(name: string): Promise<InventoryEntry['migration']> {
  let dev: VfioDevice | undefined;
  try {
    dev = VfioDevice.open(name);
    const flags = await dev.migrationFlags();
    const state = await dev.state();
    return { flags: describeFlags(flags, dev.unknownMigrationFlags), state: stateName(state) };
  } catch (err) {
    if (err instanceof VfioError) return { error: err.message, ...(err.code ? { errno: err.code } : {}) };
    return { error: String(err) };
  } finally {
    await dev?.close();
  }
}

/** Lists VFIO devices; `probe: false` skips opening them (no migration column). */
export async function inventory(opts: { probe?: boolean } = {}): Promise<InventoryEntry[]> {
  const out: InventoryEntry[] = [];
  const ids: sysfs.DeviceId[] = [
    ...sysfs.listPciDevices().map((bdf) => ({ kind: 'pci', bdf }) as const).filter((id) => sysfs.isVfioBound(id)),
    ...sysfs.listMdevs().map((uuid) => ({ kind: 'mdev', uuid }) as const),
  ];
  for (const id of ids) {
    const name = sysfs.deviceIdString(id);
    const entry: InventoryEntry = {
      address: name,
      kind: id.kind,
      driver: sysfs.driverOf(id) ?? null,
      iommuGroup: sysfs.iommuGroupOf(id) ?? null,
      migration: { error: 'not probed' },
    };
    if (id.kind === 'pci') {
      entry.vendor = hexId(sysfs.readDeviceAttr(id, 'vendor'));
      entry.device = hexId(sysfs.readDeviceAttr(id, 'device'));
    } else {
      entry.type = sysfs.mdevTypeOf(id);
    }
    if (opts.probe !== false) entry.migration = await probeMigration(name);
    out.push(entry);
  }
  return out;
}
