// vfio-mig bind [--all | --device BDF...] [--dry-run] [--json]: move devices to the
// driver the table chooses (whole IOMMU groups), recording what changed for `unbind`.
// Exit 0 when nothing failed or was refused (skipped devices are not failures: the
// udev rule calls this for every new VF, most of which may not be ours).

import { parseArgs, UsageError } from './args.ts';
import { bind, type BindReport } from '../pci/binder.ts';
import { table } from './table.ts';

export const usage = 'vfio-mig bind [--all | --device BDF...] [--dry-run] [--json]   bind devices to the driver the table chooses';

export const help = `usage: vfio-mig bind [--all | --device BDF...] [--dry-run] [--json]

Moves PCI devices to the driver the operator's table (/etc/vfio-mig/config.json) and the
kernel's vfio_pci: aliases in modules.alias choose - a vfio-pci variant driver with
migration support where one matches - through driver_override, whole IOMMU groups at a
time, and proves each bind took by reading the driver link back. What changed is
recorded in /var/lib/vfio-mig/bindings.json so that \`vfio-mig unbind\` can restore it.
A device just bound to a VFIO driver is probed once (migration flags, MIG_DATA_SIZE,
descriptor) into the capability cache that preflight and the hooks read. A device whose
IOMMU group a VM holds is never rebound. The boot unit runs \`bind --all\`; udev runs
\`bind --device\` for every VF the kernel adds.

options:
  --all          every PCI device the table or an alias covers
  --device BDF   only this device (repeatable; a bare address works too)
  --dry-run      say what would change, change nothing
  --json         the report as JSON

environment: VFIO_MIG_CONFIG, VFIO_MIG_STATE_DIR (default /var/lib/vfio-mig),
  VFIO_MIG_SYSFS, VFIO_MIG_MODULES_DIR, VFIO_MIG_MODPROBE,
  VFIO_MIG_PROBE_ON_BIND=0 (no capability probe after a bind)
exit codes: 0 nothing failed or was refused (skipped devices are not failures); 1 otherwise;
  2 usage error
`;

export async function run(argv: string[], out: NodeJS.WritableStream): Promise<number> {
  const args = parseArgs(argv, { flags: ['all', 'dry-run', 'json'], options: ['device'] });
  const devices = [...(args.options.get('device') ?? []), ...args.positional];
  const all = args.flags.has('all');
  if (all && devices.length) throw new UsageError('give --all or --device, not both');
  if (!all && devices.length === 0) throw new UsageError('give --all or --device BDF');
  const dryRun = args.flags.has('dry-run');
  const probe = !dryRun && process.env.VFIO_MIG_PROBE_ON_BIND !== '0';
  const report = await bind({ all, devices, dryRun, ...(probe ? { afterBind: probeOnBind } : {}) });
  if (args.flags.has('json')) out.write(`${JSON.stringify(report, null, 2)}\n`);
  else out.write(render(report, all));
  return report.ok ? 0 : 1;
}

// A device just bound to a VFIO driver is idle: the one moment its migration
// capabilities can be read before a VM holds it. Cached for preflight and the hooks
// (src/compat/cache.ts); VFIO_MIG_PROBE_ON_BIND=0 turns this off.
async function probeOnBind(bdf: string): Promise<string> {
  return (await import('../compat/probe.ts')).probeAfterBind(bdf);
}

export function render(report: BindReport, all: boolean): string {
  const lines: string[] = [];
  // With --all, devices nothing matched are the silent majority: count them only.
  const shown = report.results.filter((r) => !all || r.action !== 'skipped' || r.reason === 'excluded');
  if (shown.length) {
    lines.push(
      table(
        ['ADDRESS', 'ACTION', 'DRIVER', 'REASON'],
        shown.map((r) => [
          r.address,
          r.action,
          driverCol(r.previous, r.current, r.chosen, r.action),
          r.error ?? (r.steps ? `${r.detail}; ${r.steps.join(', ')}` : `${r.reason}: ${r.detail}${r.afterBind ? `; ${r.afterBind}` : ''}`),
        ]),
      ).trimEnd(),
    );
  }
  for (const p of report.pfs) lines.push(`${p.address}  ${p.action}  ${p.detail}`);
  const count = (a: string) => report.results.filter((r) => r.action === a).length;
  const parts = ['bound', 'would-bind', 'already', 'skipped', 'refused', 'failed'].map((a) => [a, count(a)] as const).filter(([, n]) => n > 0);
  lines.push(parts.length ? parts.map(([a, n]) => `${n} ${a}`).join(', ') : 'no devices');
  return `${lines.join('\n')}\n`;
}

function driverCol(previous: string | null, current: string | null, chosen: string | null, action: string): string {
  if (action === 'bound') return `${previous ?? '-'} -> ${current ?? '-'}`;
  if (action === 'would-bind') return `${previous ?? '-'} -> ${chosen ?? '-'}`;
  return current ?? '-';
}
