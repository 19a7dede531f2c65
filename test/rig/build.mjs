// Bundles the rig's TypeScript entry points (test/rig/*.test.ts, test/demo/demo.ts) into
// plain ESM JavaScript on the host, next to their sources in .build/ folders, so the
// TCG guest runs them with plain node: loading tsx and transpiling in the guest costs
// 20-30 s per test file under emulation. Runs in well under a second on the host.
import { build } from 'esbuild';
import { readdirSync, rmSync, mkdirSync } from 'node:fs';
import { join, dirname, basename } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const entries = [
  ...readdirSync(join(root, 'test', 'rig')).filter((f) => f.endsWith('.test.ts')).map((f) => join(root, 'test', 'rig', f)),
  join(root, 'test', 'demo', 'demo.ts'),
];

for (const dir of new Set(entries.map((e) => join(dirname(e), '.build')))) {
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
}
await Promise.all(
  entries.map((entry) =>
    build({
      entryPoints: [entry],
      // Same folder depth as the source, so paths built from import.meta.url still hold.
      outfile: join(dirname(entry), '.build', basename(entry).replace(/\.ts$/, '.mjs')),
      bundle: true,
      platform: 'node',
      format: 'esm',
      target: 'node20',
      sourcemap: 'linked',
      // Packages stay in node_modules (koffi has a native addon; ava must be shared).
      packages: 'external',
      logLevel: 'warning',
    }),
  ),
);
console.log(`rig: bundled ${entries.length} entry points for the guest`);
