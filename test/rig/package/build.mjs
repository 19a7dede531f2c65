// Bundles test/rig/package/*.test.ts into plain ESM JavaScript for the TCG guest (like
// test/rig/build.mjs, but into its own directory, scratch/rig-package/, so a run of the
// main rig suite - whose build empties test/.rig-build - cannot break this one). The
// output sits two levels below the tree, like the sources.
import { build } from 'esbuild';
import { mkdirSync, readdirSync, rmSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '..', '..', '..');
const out = join(root, 'scratch', 'rig-package');
rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });
const entries = readdirSync(here).filter((f) => f.endsWith('.test.ts'));
for (const f of entries) {
  await build({
    entryPoints: [join(here, f)],
    outfile: join(out, basename(f).replace(/\.ts$/, '.mjs')),
    bundle: true,
    platform: 'node',
    format: 'esm',
    target: 'node20',
    sourcemap: 'linked',
    packages: 'external',
    logLevel: 'warning',
  });
}
console.log(`rig-package: bundled ${entries.length} test file(s) into ${out}`);
