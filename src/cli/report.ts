// vfio-mig report <timeline.json> [-o report.svg] [--json]: reads a recorded timeline -
// `vfio-mig watch --timeline FILE` (QEMU's events from both ends) or the engine's
// (Coordinator.toJSON()) - checks the ordering rules, prints the summary (or the analysis
// as JSON) and, with -o, writes an SVG picture: one lane per device and side, coloured by
// VFIO state, the phases, the vCPU stop and resume, and the downtime window.
//
// The exit code follows the verdict, like `watch`: 0 ok, 1 failed, 5 rule broken.

import { readFileSync, writeFileSync } from 'node:fs';
import { parseArgs, UsageError } from './args.ts';
import { parseTimeline } from '../report/timeline.ts';
import { analyze, verdictExitCode } from '../report/analysis.ts';
import { formatSummary } from '../report/summary.ts';
import { renderSvg } from '../report/svg.ts';

export const usage = 'vfio-mig report <timeline.json> [-o report.svg] [--json]';

const HELP = [
  `usage: ${usage}`,
  '',
  'Summarises a recorded migration timeline (vfio-mig watch --timeline, or the engine\'s):',
  'verdict, each device\'s states on each side, phases, downtime; checks the ordering rules.',
  '',
  '  -o, --output FILE  also write an SVG timeline to FILE',
  '  --json             print the analysis as one JSON object instead of the text summary',
  '',
  'exit codes: 0 ok; 1 the migration failed (or the file cannot be read); 2 usage; 5 ordering rule broken',
  '',
].join('\n');

export async function run(argv: string[], out: NodeJS.WritableStream, err: NodeJS.WritableStream = process.stderr): Promise<number> {
  // -o is the one short option; map it onto --output for the shared parser.
  const mapped = argv.map((a) => (a === '-o' ? '--output' : a.startsWith('-o') && !a.startsWith('--') ? `--output=${a.slice(2)}` : a));
  const args = parseArgs(mapped, { flags: ['help', 'json'], options: ['output'] });
  if (args.flags.has('help')) {
    out.write(HELP);
    return 0;
  }
  if (args.positional.length !== 1) throw new UsageError(args.positional.length ? `one timeline file, got ${args.positional.length}` : 'name a timeline file (vfio-mig watch --timeline FILE writes one)');
  const outputs = args.options.get('output');
  if (outputs && outputs.length > 1) throw new UsageError('-o given more than once');
  const output = outputs?.[0];
  if (output === '') throw new UsageError('-o needs a file name');
  const file = args.positional[0]!;
  let json: unknown;
  try {
    json = JSON.parse(readFileSync(file, 'utf8'));
  } catch (e) {
    err.write(`vfio-mig report: cannot read ${file}: ${(e as Error).message}\n`);
    return 1;
  }
  let tl;
  try {
    tl = parseTimeline(json);
  } catch (e) {
    err.write(`vfio-mig report: ${file}: ${(e as Error).message}\n`);
    return 1;
  }
  const a = analyze(tl);
  if (output !== undefined) {
    try {
      writeFileSync(output, renderSvg(tl, a));
    } catch (e) {
      err.write(`vfio-mig report: cannot write ${output}: ${(e as Error).message}\n`);
      return 1;
    }
  }
  out.write(args.flags.has('json') ? `${JSON.stringify(a)}\n` : formatSummary(a));
  return verdictExitCode(a.verdict);
}
