// test/tally.mjs, the counter behind npm test's "N passed, N failed", on synthetic TAP:
// the inputs are ava 7's own --tap output (failed hooks, skip, todo, summary lines)
// trimmed to the lines that matter.
import test from 'ava';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

interface Suite {
  name: string;
  tap: string;
  rc?: number;
}
interface Counted {
  name: string;
  passed: number;
  failed: number;
  skipped: number;
  notes: string[];
}
interface TallyModule {
  countSuite(s: Suite): Counted;
  tally(s: Suite[]): { passed: number; failed: number; skipped: number; suites: Counted[]; lines: string[] };
}

const script = join(dirname(fileURLToPath(import.meta.url)), '..', 'tally.mjs');
// A .mjs module without type declarations: imported by URL, typed here.
const { countSuite, tally } = (await import(new URL(`file://${script}`).href)) as TallyModule;

const PASSING = `TAP version 13
ok 1 - fsm › plan() reproduces the spec's resolved paths for flags 1
ok 2 - fsm › states the flags do not support are refused
# fsm › afterEach.always hook for states the flags do not support are refused

1..2
# tests 2
# pass 2
# fail 0
`;

// ava reports a failed hook as a "not ok" line but leaves it out of "# fail".
const FAILED_HOOK = `TAP version 13
ok 1 - device › bad device names are refused
not ok 2 - device › after.always hook
  ---
    name: AssertionError
    details:
      'Error thrown in test:': |-
        Error {
          message: 'ENOTEMPTY: directory not empty, rmdir',
        }
    message: Error thrown in test
  ...

1..1
# tests 1
# pass 1
# fail 0
`;

const SKIPS = `TAP version 13
ok 1 - abi › uapi.ts equals the system <linux/vfio.h>
ok 2 - abi › uapi.ts equals the rig kernel 6.12 uapi headers # SKIP
not ok 3 - abi › a todo # TODO

1..3
# tests 2
# pass 1
# skip 1
# fail 1
`;

test('a passing suite: every ok line is a pass, hook comments are not tests', (t) => {
  const r = countSuite({ name: 'unit', tap: PASSING, rc: 0 });
  t.like(r, { passed: 2, failed: 0, skipped: 0 });
  t.deepEqual(r.notes, []);
  const all = tally([{ name: 'unit', tap: PASSING, rc: 0 }]);
  t.deepEqual(all.lines.slice(-2), ['0 skipped (not counted as passed)', '2 passed, 0 failed']);
});

test('a failed hook is a failure, although ava leaves it out of "# fail"', (t) => {
  const r = countSuite({ name: 'unit', tap: FAILED_HOOK, rc: 1 });
  t.like(r, { passed: 1, failed: 1 });
  t.true(r.notes.some((n) => n.includes('after.always hook')), 'the failing hook is named');
});

test('a suite without a TAP plan did not finish: one failure, said so', (t) => {
  const r = countSuite({ name: 'rig', tap: 'TAP version 13\nok 1 - conformance › one\nok 2 - conformance › two\n' });
  t.like(r, { passed: 2, failed: 1 });
  t.regex(r.notes.join('\n'), /no TAP plan/);
  t.like(countSuite({ name: 'empty', tap: '' }), { passed: 0, failed: 1 }, 'an empty file too');
});

test('skip and todo are skipped: never passes, never failures', (t) => {
  const r = countSuite({ name: 'unit', tap: SKIPS, rc: 0 });
  t.like(r, { passed: 1, failed: 0, skipped: 2 });
  const all = tally([{ name: 'unit', tap: SKIPS, rc: 0 }, { name: 'more', tap: PASSING, rc: 0 }]);
  t.is(all.skipped, 2);
  t.deepEqual(all.lines.slice(-2), ['2 skipped (not counted as passed)', '3 passed, 0 failed']);
  t.is(all.lines[0], 'unit: 1 passed, 0 failed, 2 skipped');
});

test('a non-zero exit with no failure in the TAP is one failure; with failures it adds none', (t) => {
  const r = countSuite({ name: 'qemu', tap: PASSING, rc: 3 });
  t.like(r, { passed: 2, failed: 1 });
  t.regex(r.notes.join('\n'), /exited with status 3 but reported no failure/);
  const both = countSuite({ name: 'unit', tap: FAILED_HOOK, rc: 1 });
  t.is(both.failed, 1, 'the hook failure already explains the status');
  t.like(countSuite({ name: 'unit', tap: PASSING }), { failed: 0 }, 'no status recorded: the TAP decides');
});

test('tests ava counted as failed without a result line (a crashed worker) are added', (t) => {
  const tap = `TAP version 13
ok 1 - coordinator › one
not ok 2 - test/unit/coordinator.test.ts exited with a non-zero exit code: 1

1..4
# tests 4
# pass 1
# fail 4
`;
  const r = countSuite({ name: 'unit', tap, rc: 1 });
  t.like(r, { passed: 1, failed: 4 });
  t.regex(r.notes.join('\n'), /never ran/);
});

test('YAML diagnostics and logs are not counted, even when a line in them reads "ok"', (t) => {
  const tap = `TAP version 13
not ok 1 - x › fails
  ---
    message: >-
ok 2 - this is inside the YAML block
  ...
ok 2 - x › passes
#   ok 3 - a t.log line

1..2
# fail 1
`;
  t.like(countSuite({ name: 'x', tap }), { passed: 1, failed: 1 });
});

test('records of run-all.sh (type-check, lint, a suite not run) are plain TAP', (t) => {
  t.like(countSuite({ name: 'typecheck', tap: 'TAP version 13\nok 1 - typecheck\n1..1\n' }), { passed: 1, failed: 0 });
  const notRun = countSuite({ name: 'rig', tap: 'TAP version 13\nnot ok 1 - rig suite not run: needs root\n1..1\n' });
  t.like(notRun, { passed: 0, failed: 1 });
  t.regex(notRun.notes.join('\n'), /needs root/);
});

test('the command line reads <suite>.tap and <suite>.rc and exits 1 on any failure', (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'tally-'));
  try {
    writeFileSync(join(dir, 'unit.tap'), PASSING);
    writeFileSync(join(dir, 'unit.rc'), '0\n');
    writeFileSync(join(dir, 'lint.tap'), 'TAP version 13\nok 1 - lint\n1..1\n');
    const ok = execFileSync('node', [script, join(dir, 'lint.tap'), join(dir, 'unit.tap')], { encoding: 'utf8' });
    t.is(ok.trim().split('\n').pop(), '3 passed, 0 failed');
    writeFileSync(join(dir, 'qemu.tap'), PASSING);
    writeFileSync(join(dir, 'qemu.rc'), '1\n');
    const err = t.throws(() => execFileSync('node', [script, join(dir, 'unit.tap'), join(dir, 'qemu.tap')], { encoding: 'utf8' })) as Error & { status?: number; stdout?: string };
    t.is(err.status, 1);
    t.regex(err.stdout ?? '', /qemu: 2 passed, 1 failed\n {2}exited with status 1 but reported no failure/);
    t.is((err.stdout ?? '').trim().split('\n').pop(), '4 passed, 1 failed');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
