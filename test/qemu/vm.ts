// A tiny real QEMU for the QMP tests: q35, TCG (this machine's /dev/kvm cannot boot normal
// guests), 64 MiB, no disk, no display - SeaBIOS finds nothing to boot and idles, which is
// all QMP and migration need. Each VM lives in its own temp dir and is killed at teardown.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { ExecutionContext } from 'ava';
import { QmpClient } from '../../src/qmp/client.ts';

export const QEMU = process.env.VFIO_MIG_QEMU ?? 'qemu-system-x86_64';

export interface Vm {
  name: string;
  dir: string;
  qmpPath: string;
  proc: ChildProcess;
  qmp: QmpClient;
  /** stderr so far (QEMU's own error messages). */
  log(): string;
  /** Resolves with the exit code (or signal name) once QEMU is gone. */
  exited: Promise<number | string>;
}

export function tempDir(t: ExecutionContext, prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Starts QEMU and connects to its QMP socket. `incoming`: start with `-incoming defer`. */
export async function startVm(t: ExecutionContext, dir: string, name: string, opts: { incoming?: boolean; extra?: string[] } = {}): Promise<Vm> {
  const qmpPath = join(dir, `${name}.qmp`);
  const args = [
    '-name', name, '-M', 'q35', '-nodefaults', '-no-user-config', '-accel', 'tcg', '-m', '64', '-smp', '1',
    '-display', 'none', '-qmp', `unix:${qmpPath},server=on,wait=off`,
    ...(opts.incoming ? ['-incoming', 'defer'] : []),
    ...(opts.extra ?? []),
  ];
  const proc = spawn(QEMU, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | string>((resolve) => proc.on('exit', (code, signal) => resolve(code ?? signal ?? -1)));
  let gone = false;
  void exited.then(() => (gone = true));
  t.teardown(async () => {
    if (gone) return;
    proc.kill('SIGTERM');
    const timer = setTimeout(() => proc.kill('SIGKILL'), 5_000);
    await exited;
    clearTimeout(timer);
  });
  // QEMU creates the socket during start-up; wait for it (or for QEMU to die).
  const deadline = Date.now() + 20_000;
  while (!existsSync(qmpPath)) {
    if (gone) throw new Error(`QEMU ${name} exited during start-up: ${stderr.trim()}`);
    if (Date.now() > deadline) throw new Error(`QEMU ${name}: no QMP socket after 20 s: ${stderr.trim()}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  const qmp = await QmpClient.connect({ path: qmpPath }, { commandTimeoutMs: 30_000 });
  t.teardown(() => qmp.close());
  return { name, dir, qmpPath, proc, qmp, log: () => stderr, exited };
}
