// Runs the vfio-mig CLI in-process and captures what it prints (unit and rig tests).
import { PassThrough } from 'node:stream';
import { main } from '../src/cli/main.ts';

export async function runCli(argv: string[]): Promise<{ code: number; out: string; err: string }> {
  const out = new PassThrough();
  const err = new PassThrough();
  let o = '';
  let e = '';
  out.on('data', (c) => (o += c));
  err.on('data', (c) => (e += c));
  const code = await main(argv, out, err);
  return { code, out: o, err: e };
}
