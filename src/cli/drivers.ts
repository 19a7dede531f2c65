// vfio-mig drivers [--json]: every PCI device, its driver now, the driver the table
// would give it and why (rule / alias / none / excluded). Changes nothing.

import { parseArgs, UsageError } from './args.ts';
import { surveyDrivers, type DriverRow } from '../pci/survey.ts';
import { table } from './table.ts';

export const usage = 'vfio-mig drivers [--json]   every PCI device: current driver, chosen driver and why';

export const help = `usage: vfio-mig drivers [--json]

Every PCI device of this host, read-only: its ids and class, IOMMU group, current
driver (with * when vfio-mig bound it), the driver vfio-mig would choose and why: a rule
of /etc/vfio-mig/config.json, a vfio_pci: alias of the running kernel's modules.alias,
excluded, or nothing. See docs/binding.md.

options:
  --json   an array of objects (address, vendor, device, subsystemVendor, subsystemDevice,
           class, iommuGroup, physfn, current, override, chosen, module, reason, detail,
           managed, error)

environment: VFIO_MIG_CONFIG (default /etc/vfio-mig/config.json), VFIO_MIG_STATE_DIR,
             VFIO_MIG_MODULES_DIR, VFIO_MIG_SYSFS
exit codes: 0 listed; 1 the config was rejected (nothing listed); 2 usage error
`;

export async function run(argv: string[], out: NodeJS.WritableStream): Promise<number> {
  const args = parseArgs(argv, { flags: ['json'] });
  if (args.positional.length) throw new UsageError(`unexpected argument ${JSON.stringify(args.positional[0])}`);
  const rows = surveyDrivers();
  if (args.flags.has('json')) {
    out.write(`${JSON.stringify(rows, null, 2)}\n`);
    return 0;
  }
  if (rows.length === 0) {
    out.write('no PCI devices found\n');
    return 0;
  }
  out.write(
    table(
      ['ADDRESS', 'IDS', 'CLASS', 'GROUP', 'CURRENT', 'CHOSEN', 'REASON'],
      rows.map((r) => [r.address, ids(r), r.class ?? '?', r.iommuGroup === null ? '-' : String(r.iommuGroup), current(r), r.chosen ?? '-', `${r.reason}: ${r.detail}`]),
    ),
  );
  return 0;
}

function ids(r: DriverRow): string {
  return `${r.vendor ?? '?'}:${r.device ?? '?'}${r.physfn ? ' (VF)' : ''}`;
}

function current(r: DriverRow): string {
  return `${r.current ?? '-'}${r.managed ? '*' : ''}`;
}

