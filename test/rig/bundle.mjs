// One way to bundle TypeScript entry points into plain ESM JavaScript for the TCG guest,
// shared by test/rig/build.mjs, test/demo/build.mjs and test/rig/package/build.mjs: the
// guest runs the bundles with plain node (tsx transpiling under emulation costs 20-30 s
// per file). Packages stay in node_modules (koffi has a native addon; ava must be shared),
// so a bundle must sit where node_modules resolves from it.
import { build } from 'esbuild';
import { basename, join } from 'node:path';

/** Bundles each entry to `outDir/<name>.mjs` (`name(entry)`, default: its base name). */
export async function bundleForGuest(entries, outDir, name = (entry) => basename(entry).replace(/\.ts$/, '')) {
  await Promise.all(
    entries.map((entry) =>
      build({
        entryPoints: [entry],
        outfile: join(outDir, `${name(entry)}.mjs`),
        bundle: true,
        platform: 'node',
        format: 'esm',
        target: 'node20',
        sourcemap: 'linked',
        packages: 'external',
        logLevel: 'warning',
      }),
    ),
  );
}
