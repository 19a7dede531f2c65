// Sums the "# pass N" / "# fail N" lines of TAP outputs (ava --tap, and one-line
// records for type-check and lint) and prints "N passed, N failed". A TAP file with
// no summary at all means the suite crashed: that counts as one failure.
import { readFileSync } from 'node:fs';
import { basename } from 'node:path';

let passed = 0;
let failed = 0;
for (const file of process.argv.slice(2)) {
  const text = readFileSync(file, 'utf8').replace(/\r/g, '');
  const pass = [...text.matchAll(/^# pass (\d+)$/gm)].map((m) => Number(m[1]));
  const fail = [...text.matchAll(/^# fail (\d+)$/gm)].map((m) => Number(m[1]));
  if (pass.length === 0 && fail.length === 0) {
    console.log(`${basename(file, '.tap')}: no test summary (the suite did not run to the end) - counted as 1 failure`);
    failed += 1;
    continue;
  }
  const p = pass.reduce((a, b) => a + b, 0);
  const f = fail.reduce((a, b) => a + b, 0);
  console.log(`${basename(file, '.tap')}: ${p} passed, ${f} failed`);
  passed += p;
  failed += f;
}
console.log(`${passed} passed, ${failed} failed`);
process.exitCode = failed === 0 ? 0 : 1;
