// The binder lock across real processes: concurrent holders never overlap, and a holder
// killed with SIGKILL does not block the next one.
import test from 'ava';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { acquireLock, lockPath } from '../../src/pci/lock.ts';

const dir = mkdtempSync(join(tmpdir(), 'vfio-mig-lock-'));
test.after.always(() => rmSync(dir, { recursive: true, force: true }));
process.env.VFIO_MIG_STATE_DIR = join(dir, 'state');

const lockModule = fileURLToPath(new URL('../../src/pci/lock.ts', import.meta.url));
const child = join(dir, 'child.mts');
// Each child: take the lock, log enter/leave around a pause, release (or hang when told).
writeFileSync(
  child,
  `import { appendFileSync } from 'node:fs';
const { acquireLock } = await import(${JSON.stringify(lockModule)});
const [log, holdMs, mode] = process.argv.slice(2);
const lock = await acquireLock(20000, 5);
appendFileSync(log, 'enter ' + process.pid + '\\n');
if (mode === 'hang') { appendFileSync(log, 'holding\\n'); await new Promise(() => setInterval(() => {}, 1000)); }
await new Promise((r) => setTimeout(r, Number(holdMs)));
appendFileSync(log, 'leave ' + process.pid + '\\n');
lock.release();
`,
);

function run(log: string, holdMs: number, mode = 'normal') {
  const p = spawn(process.execPath, ['--import', 'tsx', child, log, String(holdMs), mode], { env: process.env, stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  p.stderr.on('data', (c) => (stderr += c));
  const done = new Promise<number>((resolve) => p.on('exit', (code, signal) => resolve(code ?? (signal ? 128 : -1))));
  return { p, done, stderr: () => stderr };
}

test.serial('holders in different processes never overlap', async (t) => {
  const log = join(dir, 'log1');
  writeFileSync(log, '');
  const kids = Array.from({ length: 5 }, () => run(log, 30));
  const codes = await Promise.all(kids.map((k) => k.done));
  t.deepEqual(codes, [0, 0, 0, 0, 0], kids.map((k) => k.stderr()).join('\n'));
  const lines = readFileSync(log, 'utf8').trim().split('\n');
  t.is(lines.length, 10);
  for (let i = 0; i < lines.length; i += 2) {
    const [a, pidA] = lines[i]!.split(' ');
    const [b, pidB] = lines[i + 1]!.split(' ');
    t.is(a, 'enter');
    t.is(b, 'leave');
    t.is(pidA, pidB, 'each enter is followed by the same process leaving');
  }
  t.false(existsSync(lockPath()));
});

test.serial('a holder killed with SIGKILL leaves a stale lock that the next one breaks', async (t) => {
  const log = join(dir, 'log2');
  writeFileSync(log, '');
  const holder = run(log, 0, 'hang');
  while (!readFileSync(log, 'utf8').includes('holding')) await sleep(10);
  t.true(existsSync(lockPath()));
  holder.p.kill('SIGKILL');
  await holder.done;
  const t0 = Date.now();
  const lock = await acquireLock(5_000, 5);
  t.true(Date.now() - t0 < 2_000);
  t.regex(readFileSync(lockPath(), 'utf8'), new RegExp(`^${process.pid} `));
  lock.release();
  t.false(existsSync(lockPath()));
});
