// vfio-mig unbind [--device BDF...] [--dry-run] [--json]: give devices back the driver
// (and driver_override) they had before vfio-mig bound them, from the state file.

import { parseArgs } from './args.ts';
import { unbind } from '../pci/binder.ts';
import { table } from './table.ts';

export const usage = 'vfio-mig unbind [--device BDF...] [--dry-run] [--json]   restore the drivers devices had before vfio-mig bound them';

export async function run(argv: string[], out: NodeJS.WritableStream): Promise<number> {
  const args = parseArgs(argv, { flags: ['dry-run', 'json'], options: ['device'] });
  const devices = [...(args.options.get('device') ?? []), ...args.positional];
  const report = await unbind({ devices, dryRun: args.flags.has('dry-run') });
  if (args.flags.has('json')) {
    out.write(`${JSON.stringify(report, null, 2)}\n`);
    return report.ok ? 0 : 1;
  }
  if (report.results.length === 0 && report.pfs.length === 0) {
    out.write('nothing to restore: vfio-mig has not bound any device\n');
    return 0;
  }
  if (report.results.length) {
    out.write(table(['ADDRESS', 'ACTION', 'DRIVER', 'DETAIL'], report.results.map((r) => [r.address, r.action, `${r.current ?? '-'} -> ${r.restore ?? '-'}`, r.error ?? r.detail])));
  }
  for (const p of report.pfs) out.write(`${p.address}  ${p.action}  ${p.detail}\n`);
  return report.ok ? 0 : 1;
}
