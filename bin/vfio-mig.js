#!/usr/bin/env node
// Entry point of the installed `vfio-mig` command: loads the TypeScript sources through
// tsx's ESM loader (no build step), then hands over to src/cli/main.ts.
import { register } from 'tsx/esm/api';

register();
const { main } = await import('../src/cli/main.ts');
process.exitCode = await main(process.argv.slice(2));
