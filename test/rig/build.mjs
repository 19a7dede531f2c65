// Bundles the rig's TypeScript entry points (test/rig/*.test.ts, test/demo/demo.ts) into
// plain ESM JavaScript on the host (test/rig/bundle.mjs), in test/.rig-build/. Runs in
// well under a second on the host.
//
//   node test/rig/build.mjs                       every entry point into test/.rig-build/
//   node test/rig/build.mjs --out test/.rig-build-me test/rig/watch.test.ts ...
//        only the named entry points into a private folder (at the depth of test/rig, see
//        below), so that several rig runs can work side by side without emptying each
//        other's bundles. Run them in the guest with
//        node_modules/.bin/ava --tap --concurrency=1 --timeout=10m test/.rig-build-me/*.test.mjs
import { readdirSync, rmSync, mkdirSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { bundleForGuest } from './bundle.mjs';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const argv = process.argv.slice(2);
const outAt = argv.indexOf('--out');
const outArg = outAt >= 0 ? argv[outAt + 1] : undefined;
if (outAt >= 0 && !outArg) throw new Error('--out needs a folder');
const named = argv.filter((_, i) => i !== outAt && i !== outAt + 1);
const entries = named.length ? named.map((f) => join(process.cwd(), f)) : [
  ...readdirSync(join(root, 'test', 'rig')).filter((f) => f.endsWith('.test.ts')).map((f) => join(root, 'test', 'rig', f)),
  join(root, 'test', 'demo', 'demo.ts'),
];

// test/.rig-build sits at the same depth as test/rig and test/demo, so paths the code
// builds from import.meta.url ("../../hooks/daemon", "../../plugin/...") still hold.
const out = outArg ? join(process.cwd(), outArg) : join(root, 'test', '.rig-build');
rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });
await bundleForGuest(entries, out);
console.log(`rig: bundled ${entries.length} entry points for the guest`);
