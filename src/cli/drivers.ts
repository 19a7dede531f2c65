// vfio-mig drivers [--json]: every PCI device, its driver now, the driver the table
// would give it and why (rule / alias / none / excluded). Changes nothing.

import { parseArgs, UsageError } from './args.ts';
import { surveyDrivers, type DriverRow } from '../pci/survey.ts';
import { table } from './table.ts';

export const usage = 'vfio-mig drivers [--json]   every PCI device: current driver, chosen driver and why';

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

