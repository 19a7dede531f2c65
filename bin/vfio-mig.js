#!/usr/bin/env node
// Entry point of the installed `vfio-mig` command: runs the bundle in dist/js/ (see
// bin/launch.mjs for when it runs the TypeScript sources instead), then hands over to
// src/cli/main.ts's main().
import { dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { load } from './launch.mjs';

const root = dirname(dirname(fileURLToPath(import.meta.url)));
let cli;
try {
  cli = await load(root, 'vfio-mig.mjs', 'src/cli/main.ts');
} catch (err) {
  process.stderr.write(`vfio-mig: cannot start: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exit(1);
}
process.exitCode = await cli.main(process.argv.slice(2));
