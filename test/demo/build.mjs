// Bundles the demo and the engine's rig test into test/scratch/ (git-ignored), like
// test/rig/build.mjs does for the whole rig suite but without deleting test/.rig-build,
// so the demo can run while someone else runs the rig from the same checkout.
// test/scratch sits at the same depth as test/rig: paths built from import.meta.url hold.
import { mkdirSync, writeFileSync } from 'node:fs';
import { join, dirname, basename } from 'node:path';
import { fileURLToPath } from 'node:url';
import { bundleForGuest } from '../rig/bundle.mjs';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
// src/cli/main.ts as vfio-mig.mjs: the rig test runs `vfio-mig receive` as a process it can kill.
const entries = [join(root, 'test', 'demo', 'demo.ts'), join(root, 'test', 'rig', 'engine.test.ts'), join(root, 'src', 'cli', 'main.ts'), ...process.argv.slice(2)];
const out = join(root, 'test', 'scratch');
mkdirSync(out, { recursive: true });
await bundleForGuest(entries, out, (entry) => (basename(entry) === 'main.ts' ? 'vfio-mig' : basename(entry).replace(/\.ts$/, '')));
// The ava configuration for running the engine test from here in the guest:
//   test/rig/run.sh 'node_modules/.bin/ava --config test/scratch/ava.config.mjs'
writeFileSync(
  join(out, 'ava.config.mjs'),
  "export default { files: ['test/scratch/*.test.mjs'], workerThreads: false, timeout: '10m', nodeArguments: ['--enable-source-maps'] };\n",
);
