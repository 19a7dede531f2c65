// `npm run build` (also run by `npm ci` through the `prepare` script): bundles the
// entry points into plain ESM JavaScript in dist/js/, so the CLI and the libvirt hooks
// start without transpiling TypeScript (tsx is a development dependency only):
//   vfio-mig.mjs     src/cli/main.ts        (bin/vfio-mig.js)
//   hook-qemu.mjs    src/hooks/qemu.ts      (hooks/qemu)
//   hook-daemon.mjs  src/hooks/daemon.ts    (hooks/daemon)
// Code splitting keeps lazy imports lazy: every dynamic import() becomes its own chunk,
// loaded only when called, so a hook that returns early loads a few KB. npm packages
// stay in node_modules (koffi is a native addon; both koffi and fast-xml-parser are
// loaded on first use through createRequire). Target node18: Debian bookworm's nodejs.
//
// dist/js/ sits two levels below the tree like src/<dir>/, so the paths the code builds
// from import.meta.url ("../../plugin/config.schema.json", "../../bin/vfio-mig.js")
// hold in the bundle too. The new bundle is written next to the old one and swapped in
// with renames, so a hook running during a build sees one or the other, never half.
//
//   node plugin/build.mjs [--root DIR]   (DIR: write DIR/dist/js; default this tree)
import { build } from 'esbuild';
import { existsSync, mkdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const tree = dirname(dirname(fileURLToPath(import.meta.url)));
const ENTRIES = { 'vfio-mig': 'src/cli/main.ts', 'hook-qemu': 'src/hooks/qemu.ts', 'hook-daemon': 'src/hooks/daemon.ts' };

export async function buildDist(outRoot = tree) {
  const dist = join(outRoot, 'dist');
  const final = join(dist, 'js');
  const tmp = join(dist, `.js.${process.pid}.tmp`);
  mkdirSync(dist, { recursive: true });
  rmSync(tmp, { recursive: true, force: true });
  const t0 = Date.now();
  const result = await build({
    entryPoints: Object.fromEntries(Object.entries(ENTRIES).map(([name, src]) => [name, join(tree, src)])),
    outdir: tmp,
    bundle: true,
    splitting: true,
    format: 'esm',
    platform: 'node',
    target: 'node18',
    outExtension: { '.js': '.mjs' },
    chunkNames: 'chunk-[hash]',
    packages: 'external',
    sourcemap: 'linked',
    metafile: true,
    logLevel: 'warning',
  });
  const outputs = Object.keys(result.metafile.outputs).filter((f) => f.endsWith('.mjs'));
  writeFileSync(join(tmp, 'build.json'), `${JSON.stringify({ builtAt: new Date().toISOString(), target: 'node18', entries: ENTRIES, files: outputs.length }, null, 2)}\n`);
  const old = join(dist, `.js.${process.pid}.old`);
  if (existsSync(final)) renameSync(final, old);
  renameSync(tmp, final);
  rmSync(old, { recursive: true, force: true });
  return { dir: final, files: outputs.length, ms: Date.now() - t0 };
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const i = process.argv.indexOf('--root');
  const outRoot = i > 0 ? process.argv[i + 1] : tree;
  if (!outRoot) {
    console.error('usage: node plugin/build.mjs [--root DIR]');
    process.exit(2);
  }
  try {
    const r = await buildDist(outRoot);
    console.log(`vfio-mig build: ${r.files} files in ${r.dir} (${r.ms} ms)`);
  } catch (err) {
    console.error(`vfio-mig build failed: ${err instanceof Error ? err.message : String(err)}`);
    process.exit(1);
  }
}
