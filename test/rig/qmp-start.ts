// Connecting to the QMP socket of a QEMU that is still starting. QEMU creates the socket
// file (bind) a moment before it listens on it; under nested TCG that moment can be long
// enough for a connect to be refused (ECONNREFUSED). So: wait for the file, then retry a
// refused connect until the deadline, and say why QEMU went away if it did.
import { existsSync } from 'node:fs';
import { QmpClient } from '../../src/qmp/client.ts';

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
