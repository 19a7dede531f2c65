// Bundles test/rig/package/*.test.ts into plain ESM JavaScript for the TCG guest (like
// test/rig/build.mjs, but into its own directory, scratch/rig-package/, so a run of the
// main rig suite - whose build empties test/.rig-build - cannot break this one). The
// output sits two levels below the tree, like the sources.
import { mkdirSync, readdirSync, rmSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { bundleForGuest } from '../bundle.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '..', '..', '..');
const out = join(root, 'scratch', 'rig-package');
rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });
const entries = readdirSync(here).filter((f) => f.endsWith('.test.ts'));
await bundleForGuest(entries.map((f) => join(here, f)), out);
console.log(`rig-package: bundled ${entries.length} test file(s) into ${out}`);
