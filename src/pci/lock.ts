// One binder at a time per host: boot unit, udev-triggered VF binds, the daemon hook
// and an operator may all run `vfio-mig bind` at once. The lock is a file created with
// O_EXCL holding "pid starttime token"; a holder that died (pid gone, or reused - the
// start time differs) leaves a stale file, which is broken under a second O_EXCL file
// so that two waiters cannot both break it and then both "hold" the lock.

import { closeSync, openSync, readFileSync, statSync, unlinkSync, writeSync, mkdirSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { errCode, PciError } from './errors.ts';
import { stateDir } from './state.ts';

export interface BinderLock {
  readonly path: string;
  release(): void;
}

const BREAK_STALE_MS = 10_000;

export function lockPath(): string {
  return join(stateDir(), 'bind.lock');
}

/** Field 22 of /proc/<pid>/stat (clock ticks since boot): pid + start time names a process. */
function startTime(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return fields[19];
  } catch {
    return undefined;
  }
}

function alive(pid: number, start: string): boolean {
  const now = startTime(pid);
  if (now !== undefined) return now === start;
  try {
    process.kill(pid, 0); // no /proc: fall back to "the pid exists"
    return true;
  } catch (err) {
    return errCode(err) === 'EPERM';
  }
}

function readOwner(path: string): { text: string; ageMs: number } | undefined {
  try {
    const text = readFileSync(path, 'utf8');
    return { text, ageMs: Date.now() - statSync(path).mtimeMs };
  } catch (err) {
    if (errCode(err) === 'ENOENT') return undefined;
    throw err;
  }
}

function createExclusive(path: string, content: string): boolean {
  let fd: number;
  try {
    fd = openSync(path, 'wx', 0o644);
  } catch (err) {
    if (errCode(err) === 'EEXIST') return false;
    throw err;
  }
  try {
    writeSync(fd, content);
  } finally {
    closeSync(fd);
  }
  return true;
}

/** Whether the lock content names a live holder. Unparsable content is "alive" while young (being written). */
function held(text: string, ageMs: number): boolean {
  const m = /^([0-9]{1,10}) ([0-9]{1,20}|-) [0-9a-f]{16}\n$/.exec(text);
  if (!m) return ageMs < BREAK_STALE_MS;
  return alive(Number(m[1]), m[2]!);
}

function breakStale(path: string, seen: string): void {
  const guard = `${path}.break`;
  if (!createExclusive(guard, `${process.pid}\n`)) {
    const g = readOwner(guard);
    if (g && g.ageMs > BREAK_STALE_MS) unlinkQuiet(guard); // a breaker died mid-break
    return;
  }
  try {
    // Re-read under the guard: only the exact stale content we judged is removed.
    if (readOwner(path)?.text === seen) unlinkQuiet(path);
  } finally {
    unlinkQuiet(guard);
  }
}

function unlinkQuiet(path: string): void {
  try {
    unlinkSync(path);
  } catch (err) {
    if (errCode(err) !== 'ENOENT') throw err;
  }
}

/** Waits up to `timeoutMs` for the binder lock. */
export async function acquireLock(timeoutMs = 30_000, pollMs = 50): Promise<BinderLock> {
  const path = lockPath();
  mkdirSync(stateDir(), { recursive: true, mode: 0o755 });
  const me = `${process.pid} ${startTime(process.pid) ?? '-'} ${randomBytes(8).toString('hex')}\n`;
  const deadline = Date.now() + timeoutMs;
  while (true) {
    if (createExclusive(path, me)) {
      return {
        path,
        release() {
          if (readOwner(path)?.text === me) unlinkQuiet(path);
        },
      };
    }
    const owner = readOwner(path);
    if (!owner) continue; // released between our create and our read: try again at once
    if (!held(owner.text, owner.ageMs)) {
      breakStale(path, owner.text);
      continue;
    }
    if (Date.now() >= deadline) {
      const pid = owner.text.split(' ')[0] || '?';
      throw new PciError({ operation: 'lock', device: '-', reason: `another vfio-mig bind/unbind (pid ${pid}) has held ${path} for more than ${timeoutMs} ms`, code: 'EBUSY' });
    }
    await sleep(pollMs);
  }
}

/** Runs `fn` holding the lock. */
export async function withLock<T>(fn: () => Promise<T> | T, timeoutMs?: number): Promise<T> {
  const lock = await acquireLock(timeoutMs);
  try {
    return await fn();
  } finally {
    lock.release();
  }
}
