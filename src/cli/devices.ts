// vfio-mig devices [--json]: the VFIO devices on this host and whether they can migrate.

import { parseArgs } from './args.ts';
import { inventory, type InventoryEntry } from '../vfio/inventory.ts';
import { table } from './table.ts';

export const usage = 'vfio-mig devices [--json]   list VFIO-bound PCI devices and mdevs with their migration capability';

export const help = `usage: vfio-mig devices [--json]

Lists the VFIO devices of this host - PCI functions bound to vfio-pci or a vfio-pci
variant driver, and mdevs - with their IOMMU group and migration capability: the
migration flags (STOP_COPY, P2P, PRE_COPY) and the device state, read through the VFIO
uAPI, or why they could not be read (no migration support, the group is held by a VM).
Read-only.

options:
  --json   an array of objects (address, kind, vendor, device, driver, iommuGroup, migration)

environment: VFIO_MIG_SYSFS, VFIO_MIG_DEV (roots, for tests)
exit codes: 0 listed (also when there is none); 2 usage error
`;

export async function run(argv: string[], out: NodeJS.WritableStream): Promise<number> {
  const args = parseArgs(argv, { flags: ['json'] });
  const list = await inventory();
  if (args.flags.has('json')) {
    out.write(`${JSON.stringify(list, null, 2)}\n`);
    return 0;
  }
  if (list.length === 0) {
    out.write('no VFIO devices (nothing bound to vfio-pci or a variant driver, no mdevs)\n');
    return 0;
  }
  const rows = list.map((e) => [e.address, ids(e), e.driver ?? '-', e.iommuGroup === null ? '-' : String(e.iommuGroup), migration(e)]);
  out.write(table(['ADDRESS', 'IDS', 'DRIVER', 'GROUP', 'MIGRATION'], rows));
  return 0;
}

function ids(e: InventoryEntry): string {
  return e.kind === 'mdev' ? `mdev ${e.type ?? '?'}` : `${e.vendor ?? '?'}:${e.device ?? '?'}`;
}

function migration(e: InventoryEntry): string {
  return 'error' in e.migration ? `no: ${e.migration.error}` : `${e.migration.flags.join('|')} (${e.migration.state})`;
}

