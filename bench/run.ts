// npm run bench [-- <name>...]: runs bench/<name>.bench.ts (all by default). Each bench
// measures its own baseline in the same run and returns one headline line; benchmarks
// report, they never fail a test run.

import { readdirSync } from 'node:fs';
import { dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const available = readdirSync(here).filter((f) => f.endsWith('.bench.ts')).map((f) => f.replace('.bench.ts', '')).sort();
const wanted = process.argv.slice(2);
const unknown = wanted.filter((w) => !available.includes(w));
if (unknown.length) {
  console.error(`unknown benchmark(s): ${unknown.join(', ')}; available: ${available.join(', ')}`);
  process.exit(2);
}
const headlines: string[] = [];
for (const name of wanted.length ? wanted : available) {
  const mod = (await import(`./${name}.bench.ts`)) as { run(): Promise<string> };
  try {
    headlines.push(await mod.run());
  } catch (err) {
    headlines.push(`${name}: error=${JSON.stringify(err instanceof Error ? err.message : String(err))}`);
  }
}
console.log('');
for (const h of headlines) console.log(h);
