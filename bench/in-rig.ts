// Runs a benchmark's `measure()` inside the rig (the real 6.12 kernel under QEMU): bundles
// the benchmark file, boots the rig with `env`, passes the guest's output through and
// returns the line that starts with `<name>: ` - the benchmark's headline.
import { spawn } from 'node:child_process';
import { mkdirSync, rmSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');

export async function measureInRig(name: string, benchUrl: string, env: NodeJS.ProcessEnv): Promise<string> {
  const { build } = await import('esbuild');
  // Not test/.rig-build: test/rig/build.mjs empties that folder whenever anyone builds.
  // Under node_modules, so that packages (koffi) resolve from the bundle's location.
  const outDir = join(root, 'node_modules', '.cache', 'vfio-mig-bench');
  mkdirSync(outDir, { recursive: true });
  const outfile = join(outDir, `${name}-${process.pid}.mjs`);
  await build({
    stdin: { contents: `import { measure } from ${JSON.stringify(fileURLToPath(benchUrl))};\nconsole.log(await measure());\n`, resolveDir: root, loader: 'ts' },
    outfile,
    bundle: true,
    platform: 'node',
    format: 'esm',
    target: 'node20',
    sourcemap: 'inline',
    packages: 'external',
    logLevel: 'warning',
  });
  let headline = '';
  const code = await new Promise<number>((resolve, reject) => {
    const child = spawn(join(root, 'test', 'rig', 'run.sh'), [`node --enable-source-maps ${outfile}`], { cwd: root, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'inherit'] });
    let pending = '';
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (chunk: string) => {
      pending += chunk;
      for (let nl = pending.indexOf('\n'); nl >= 0; nl = pending.indexOf('\n')) {
        const line = pending.slice(0, nl);
        pending = pending.slice(nl + 1);
        if (line.startsWith(`${name}: `)) headline = line;
        else console.log(line);
      }
    });
    child.on('error', reject);
    child.on('close', (c) => resolve(c ?? 1));
  }).finally(() => rmSync(outfile, { force: true }));
  if (!headline) throw new Error(`the rig run ended (exit ${code}) without a headline`);
  return headline;
}
