// vfio-mig qualify <device>... [--json]: checks that idle VFIO devices behave as the
// migration uAPI requires. With two or more devices, each one's state is also moved into
// the next one. Exit 0 only when every device passes.

import { parseArgs, UsageError } from './args.ts';
import { table } from './table.ts';
import { VfioDevice } from '../vfio/device.ts';
import { qualifyDevice, type QualifyReport } from '../migration/qualify.ts';

export const usage = 'vfio-mig qualify <device>... [--json]   walk every migration arc of idle devices and give a verdict';

export const help = `usage: vfio-mig qualify <device>... [--json]

Checks that idle VFIO devices (PCI addresses or mdev UUIDs, bound to a VFIO driver,
not held by a VM) behave as the VFIO migration v2 uAPI requires: reads the migration
flags, walks every arc the flags allow and times each, checks that the driver refuses
what it must, reads MIG_DATA_SIZE and PRE_COPY info, resets the device; with two or more
devices, each one's state is also moved into the next one. Ends with a verdict per
device. The devices are left RUNNING.

options:
  --json   one report per device (device, flags, checks[{check, ok, latencyMs, result}], verdict)

exit codes: 0 every device passes; 1 a device fails (or cannot be opened); 2 usage error
`;

export async function run(argv: string[], out: NodeJS.WritableStream): Promise<number> {
  const args = parseArgs(argv, { flags: ['json'] });
  if (args.positional.length === 0) throw new UsageError('name at least one device (PCI address or mdev UUID)');
  if (new Set(args.positional).size !== args.positional.length) throw new UsageError('a device is named twice');
  const devs: VfioDevice[] = [];
  const reports: QualifyReport[] = [];
  try {
    for (const id of args.positional) devs.push(VfioDevice.open(id));
    for (const [i, dev] of devs.entries()) reports.push(await qualifyDevice(dev, devs[i + 1]));
  } finally {
    for (const d of devs) await d.close();
  }
  if (args.flags.has('json')) {
    out.write(`${JSON.stringify(reports, null, 2)}\n`);
  } else {
    for (const r of reports) {
      out.write(`${r.device}: flags ${r.flags.join('|') || '-'}\n`);
      const rows = r.checks.map((c) => [c.check, c.latencyMs === undefined ? '' : `${c.latencyMs.toFixed(2)} ms`, c.ok ? (c.warning ? `WARN ${c.result}` : c.result) : `FAIL ${c.result}`]);
      out.write(table(['ARC / CHECK', 'LATENCY', 'RESULT'], rows));
      const failed = r.checks.filter((c) => !c.ok).map((c) => c.check);
      out.write(r.verdict === 'pass' ? `verdict: PASS - ${r.device} behaves as the VFIO migration uAPI requires\n\n` : `verdict: FAIL - ${failed.join(', ')}\n\n`);
    }
  }
  return reports.every((r) => r.verdict === 'pass') ? 0 : 1;
}
