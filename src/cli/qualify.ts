// vfio-mig qualify <device>... [--json]: checks that idle VFIO devices behave as the
// migration uAPI requires. With two or more devices, each one's state is also moved into
// the next one. Exit 0 only when every device passes.

import { parseArgs, UsageError } from './args.ts';
import { table } from './table.ts';
import { VfioDevice } from '../vfio/device.ts';
import { qualifyDevice, type QualifyReport } from '../migration/qualify.ts';

export const usage = 'vfio-mig qualify <device>... [--json]   walk every migration arc of idle devices and give a verdict';

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
