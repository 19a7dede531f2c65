// vfio-mig unbind [--device BDF...] [--dry-run] [--json]: give devices back the driver
// (and driver_override) they had before vfio-mig bound them, from the state file.

import { parseArgs, UsageError } from './args.ts';
import { unbind } from '../pci/binder.ts';
import { table } from './table.ts';

export const usage = 'vfio-mig unbind [--all | --device BDF...] [--dry-run] [--json]   restore the drivers devices had before vfio-mig bound them';

export const help = `usage: vfio-mig unbind [--all | --device BDF...] [--dry-run] [--json]

Gives the devices vfio-mig bound (all of them, or the ones named) the driver and
driver_override they had before, from /var/lib/vfio-mig/bindings.json, loading the
previous driver's module again if needed, and turns sriov_drivers_autoprobe back on
where vfio-mig turned it off. A device vfio-mig did not bind is left alone
(not-managed); a device whose IOMMU group a VM holds is refused; a device that no longer
exists (a removed VF) is gone and its record dropped. The package's prerm runs it on
removal; udev runs it (vfio-mig-forget@.service) for a VF that went away.

options:
  --all          every recorded device (the default without --device)
  --device BDF   only this device (repeatable; a bare address works too)
  --dry-run      say what would be restored, change nothing
  --json         {results, pfs, ok}

environment: VFIO_MIG_STATE_DIR (default /var/lib/vfio-mig), VFIO_MIG_SYSFS, VFIO_MIG_MODPROBE
exit codes: 0 nothing failed or was refused; 1 otherwise; 2 usage error
`;

export async function run(argv: string[], out: NodeJS.WritableStream): Promise<number> {
  const args = parseArgs(argv, { flags: ['all', 'dry-run', 'json'], options: ['device'] });
  const devices = [...(args.options.get('device') ?? []), ...args.positional];
  if (args.flags.has('all') && devices.length) throw new UsageError('--all or devices, not both');
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
