// Finds the code an entry point (bin/vfio-mig.js, hooks/qemu, hooks/daemon) runs:
//   - the esbuild bundle in dist/js/ (built by `npm run build`, which `npm ci` runs):
//     plain JavaScript, no transpiling at start - what an installed host runs;
//   - in a development checkout (a .git next to src/) whose dist/ is missing or older
//     than src/, the TypeScript sources through tsx (a devDependency), silently, so an
//     edit is never shadowed by a stale bundle;
//   - an installed tree without dist/ (a failed build): tsx if it is there, with a
//     warning, else an error that says to build.
import { existsSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

function newerThan(dir, ms) {
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory() ? newerThan(p, ms) : e.name.endsWith('.ts') && statSync(p).mtimeMs > ms) return true;
  }
  return false;
}

/** Imports `dist/js/<bundle>` under `root`, or `<root>/<source>` through tsx (see above). */
export async function load(root, bundle, source) {
  const built = join(root, 'dist', 'js', bundle);
  const dev = existsSync(join(root, '.git')) && existsSync(join(root, 'src'));
  const haveBuilt = existsSync(built);
  if (haveBuilt && !(dev && newerThan(join(root, 'src'), statSync(built).mtimeMs))) return import(pathToFileURL(built).href);
  if (!existsSync(join(root, source))) throw new Error(`${built} is missing: run "npm run build" in ${root}`);
  let api;
  try {
    api = await import('tsx/esm/api');
  } catch {
    throw new Error(`${built} is missing and tsx (a development dependency) is not installed: run "npm run build" in ${root}`);
  }
  if (!dev) process.stderr.write(`vfio-mig: ${built} is missing (run "npm run build" in ${root}); running the TypeScript sources through tsx, which is slower\n`);
  api.register();
  return import(pathToFileURL(join(root, source)).href);
}
