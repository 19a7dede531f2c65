// Bundles the rig's TypeScript entry points (test/rig/*.test.ts, test/demo/demo.ts) into
// plain ESM JavaScript on the host, in test/.rig-build/, so the
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

// test/.rig-build sits at the same depth as test/rig and test/demo, so paths the code
// builds from import.meta.url ("../../hooks/daemon", "../../plugin/...") still hold.
const out = join(root, 'test', '.rig-build');
rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });
await Promise.all(
  entries.map((entry) =>
    build({
      entryPoints: [entry],
      outfile: join(out, basename(entry).replace(/\.ts$/, '.mjs')),
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
