// A minimal nested QEMU 10 inside the rig guest (q35, 64 MiB, no OS, TCG, one QMP socket
// connected here), for the engine's VM pair (engine-vms.ts), the watch's pair (qemu-pair.ts)
// and the benchmarks. Extra arguments add devices, sockets or -incoming.
//
// Connecting while QEMU starts: QEMU creates the socket file (bind) a moment before it
// listens on it; under nested TCG that moment can be long enough for a connect to be
// refused (ECONNREFUSED). So: wait for the file, then retry a refused connect until the
// deadline, and say why QEMU went away if it did.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { QmpClient } from '../../src/qmp/client.ts';

const QEMU = process.env.VFIO_MIG_QEMU ?? 'qemu-system-x86_64';

export interface NestedVm {
  name: string;
  proc: ChildProcess;
  qmpPath: string;
  qmp: QmpClient;
  exited: Promise<number | string>;
  log(): string;
  stop(): Promise<void>;
}

/** Starts one VM; a VM whose start fails is killed. `stop()` closes the monitor and ends QEMU. */
export async function startVm(dir: string, name: string, extra: string[] = []): Promise<NestedVm> {
  const qmpPath = join(dir, `${name}.qmp`);
  const args = ['-name', name, '-machine', 'q35', '-nodefaults', '-no-user-config', '-accel', 'tcg', '-m', '64', '-smp', '1', '-display', 'none', '-qmp', `unix:${qmpPath},server=on,wait=off`, ...extra];
  const proc = spawn(QEMU, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | string>((resolve) => proc.on('exit', (code, signal) => resolve(code ?? signal ?? -1)));
  let gone = false;
  void exited.then(() => (gone = true));
  let qmp: QmpClient;
  try {
    qmp = await connectStartingQemu(name, qmpPath, { gone: () => gone, stderr: () => stderr });
  } catch (err) {
    // Not left running when the start fails (nobody else holds this process yet).
    if (!gone) proc.kill('SIGKILL');
    await exited;
    throw err;
  }
  const vm: NestedVm = {
    name,
    proc,
    qmpPath,
    qmp,
    exited,
    log: () => stderr,
    async stop() {
      await vm.qmp.close().catch(() => undefined);
      if (gone) return;
      proc.kill('SIGTERM');
      const timer = setTimeout(() => proc.kill('SIGKILL'), 5_000);
      await exited;
      clearTimeout(timer);
    },
  };
  return vm;
}

export async function connectStartingQemu(name: string, qmpPath: string, opts: { gone: () => boolean; stderr: () => string; timeoutMs?: number }): Promise<QmpClient> {
  const deadline = Date.now() + (opts.timeoutMs ?? 60_000);
  for (;;) {
    if (opts.gone()) throw new Error(`QEMU ${name} exited during start-up: ${opts.stderr().trim()}`);
    if (existsSync(qmpPath)) {
      try {
        return await QmpClient.connect({ path: qmpPath }, { connectTimeoutMs: Math.max(1, deadline - Date.now()), commandTimeoutMs: 60_000 });
      } catch (err) {
        const refused = (err as NodeJS.ErrnoException).code === 'ECONNREFUSED' || /ECONNREFUSED/.test((err as Error).message);
        if (!refused || Date.now() > deadline) throw err;
      }
    } else if (Date.now() > deadline) {
      throw new Error(`QEMU ${name}: no QMP socket after ${opts.timeoutMs ?? 60_000} ms: ${opts.stderr().trim()}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
}
