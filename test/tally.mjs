// Counts the results of every suite of `npm test` honestly and prints one line
// "N passed, N failed" at the end (with the skipped tests on their own line before it).
//
//   node test/tally.mjs <results>/<suite>.tap ...
//
// Each <suite>.tap is a suite's TAP output (ava --tap) or a one-test record that
// test/run-all.sh writes for a check that is not a TAP suite (type-check, lint) or for a
// suite that could not run. Next to it, <suite>.rc may hold the exit status of the
// command that produced it. The rules:
//   - every "ok" line counts as a pass, every "not ok" line as a failure: failed tests,
//     failed hooks (ava prints "not ok N - <file> › after.always hook"), crashes,
//     timeouts. ava's own "# fail" summary leaves failed hooks out, so it is not used to
//     count - only to add tests ava never got to run (a crashed worker's remaining tests);
//   - "# SKIP" and "# TODO" tests are skipped: never a pass, never a failure;
//   - a suite without a TAP plan line ("1..N") did not run to its end: one failure;
//   - a non-zero exit status with no failure in the TAP is one failure, with the status;
// The exit code is 1 when anything failed.
import { readFileSync, existsSync } from 'node:fs';
import { basename } from 'node:path';
import { fileURLToPath } from 'node:url';

const TEST_LINE = /^(not ok|ok)\b\s*(\d+)?\s*(?:-\s*)?(.*)$/;
const DIRECTIVE = /\s#\s*(SKIP|TODO)\b.*$/i;

/**
 * Counts one suite.
 * @param {{ name: string, tap: string, rc?: number | undefined }} suite
 * @returns {{ name: string, passed: number, failed: number, skipped: number, notes: string[] }}
 */
export function countSuite({ name, tap, rc }) {
  let passed = 0;
  let failed = 0;
  let skipped = 0;
  let plans = 0;
  let todo = 0;
  let summaryFail;
  const notes = [];
  const failures = [];
  let inYaml = false;
  for (const raw of tap.replace(/\r/g, '').split('\n')) {
    const line = raw.trimEnd();
    // YAML diagnostics blocks ("  ---" ... "  ...") belong to the test line before them.
    if (/^\s+---$/.test(line)) {
      inYaml = true;
      continue;
    }
    if (inYaml) {
      if (/^\s+\.\.\.$/.test(line)) inYaml = false;
      continue;
    }
    if (/^1\.\.\d+/.test(line)) {
      plans++;
      continue;
    }
    const summary = /^# fail (\d+)$/.exec(line);
    if (summary) {
      summaryFail = (summaryFail ?? 0) + Number(summary[1]);
      continue;
    }
    const m = TEST_LINE.exec(line);
    if (!m) continue;
    const ok = m[1] === 'ok';
    const directive = DIRECTIVE.exec(m[3] ?? '');
    const title = (m[3] ?? '').replace(DIRECTIVE, '').trim();
    if (directive) {
      skipped++;
      if (directive[1].toUpperCase() === 'TODO') todo++;
      continue;
    }
    if (ok) {
      passed++;
    } else {
      failed++;
      failures.push(title || `test ${m[2] ?? '?'}`);
    }
  }
  if (plans === 0) {
    failed++;
    notes.push('no TAP plan (1..N): the suite did not run to its end - counted as 1 failure');
  }
  // ava's "# fail" = failed tests + tests that never ran + crashes + todo; the lines
  // above already hold failed tests, failed hooks and crashes. Tests that never ran
  // show up only in the summary.
  if (summaryFail !== undefined) {
    const unseen = summaryFail - todo - failed;
    if (unseen > 0) {
      failed += unseen;
      notes.push(`${unseen} test(s) counted as failed by the runner's summary without a result line (never ran)`);
    }
  }
  if (rc !== undefined && rc !== 0) {
    if (failed === 0) {
      failed++;
      notes.push(`exited with status ${rc} but reported no failure - counted as 1 failure`);
    } else {
      notes.push(`exited with status ${rc}`);
    }
  }
  for (const f of failures.slice(0, 20)) notes.push(`not ok: ${f}`);
  if (failures.length > 20) notes.push(`... and ${failures.length - 20} more`);
  return { name, passed, failed, skipped, notes };
}

/**
 * Counts every suite and words the report.
 * @param {{ name: string, tap: string, rc?: number | undefined }[]} suites
 */
export function tally(suites) {
  const results = suites.map(countSuite);
  const lines = [];
  let passed = 0;
  let failed = 0;
  let skipped = 0;
  for (const r of results) {
    lines.push(`${r.name}: ${r.passed} passed, ${r.failed} failed${r.skipped ? `, ${r.skipped} skipped` : ''}`);
    for (const n of r.notes) lines.push(`  ${n}`);
    passed += r.passed;
    failed += r.failed;
    skipped += r.skipped;
  }
  lines.push(`${skipped} skipped (not counted as passed)`);
  lines.push(`${passed} passed, ${failed} failed`);
  return { passed, failed, skipped, suites: results, lines };
}

/** Reads <name>.tap and, when present, <name>.rc (an exit status). */
export function readSuite(file) {
  const name = basename(file).replace(/\.tap$/, '');
  const tap = readFileSync(file, 'utf8');
  const rcFile = file.replace(/\.tap$/, '.rc');
  let rc;
  if (rcFile !== file && existsSync(rcFile)) {
    const text = readFileSync(rcFile, 'utf8').trim();
    rc = /^\d+$/.test(text) ? Number(text) : 255;
  }
  return { name, tap, rc };
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const result = tally(process.argv.slice(2).map(readSuite));
  for (const line of result.lines) console.log(line);
  process.exitCode = result.failed === 0 ? 0 : 1;
}
