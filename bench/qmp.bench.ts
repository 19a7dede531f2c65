// Per-command cost of our QMP client (id allocation, per-command timer, line framing,
// JSON parse, reply validation in the typed wrapper) against a minimal hand-written
// ping-pong client on the same socket, both talking to the same in-process fake QMP server.
// Measured in the same run, so the ratio shows regressions on any machine. No QEMU needed
// (a TCG guest would measure QEMU, not us).

import net from 'node:net';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { QmpClient } from '../src/qmp/client.ts';
import { queryStatus } from '../src/qmp/commands.ts';

const N = Number(process.env.BENCH_QMP_N ?? 5_000);
const GREETING = JSON.stringify({ QMP: { version: { qemu: { major: 10, minor: 0, micro: 2 }, package: '' }, capabilities: ['oob'] } }) + '\r\n';

function fakeServer(path: string): Promise<net.Server> {
  const server = net.createServer((s) => {
    s.write(GREETING);
    let buf = '';
    s.on('data', (d) => {
      buf += d.toString();
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const cmd = JSON.parse(buf.slice(0, nl)) as { id?: unknown };
        buf = buf.slice(nl + 1);
        s.write(JSON.stringify({ return: { status: 'running', singlestep: false, running: true }, id: cmd.id }) + '\r\n');
      }
    });
    s.on('error', () => {});
  });
  return new Promise((resolve) => server.listen(path, () => resolve(server)));
}

/** The least a correct client must do: write a line, frame the reply, parse it, match the id. */
async function rawNs(path: string): Promise<number> {
  const s = net.createConnection({ path });
  let buf = '';
  let waiting: ((line: string) => void) | undefined;
  s.on('data', (d) => {
    buf += d.toString();
    let nl;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      waiting?.(line);
    }
  });
  const next = (): Promise<string> => new Promise((r) => (waiting = r));
  await next(); // greeting
  s.write('{"execute":"qmp_capabilities","id":0}\r\n');
  await next();
  const t0 = process.hrtime.bigint();
  for (let i = 1; i <= N; i++) {
    s.write(`{"execute":"query-status","id":${i}}\r\n`);
    const reply = JSON.parse(await next()) as { id: number };
    if (reply.id !== i) throw new Error('raw client desync');
  }
  const ns = Number(process.hrtime.bigint() - t0) / N;
  s.destroy();
  return ns;
}

async function clientNs(path: string): Promise<number> {
  const q = await QmpClient.connect({ path });
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < N; i++) {
    const st = await queryStatus(q);
    if (!st.running) throw new Error('unexpected status');
  }
  const ns = Number(process.hrtime.bigint() - t0) / N;
  await q.close();
  return ns;
}

export async function run(): Promise<string> {
  const dir = mkdtempSync(join(tmpdir(), 'qmp-bench-'));
  const path = join(dir, 'qmp.sock');
  const server = await fakeServer(path);
  try {
    await rawNs(path); // warm-up: JIT
    await clientNs(path);
    const raw: number[] = [];
    const ours: number[] = [];
    // Interleaved best of three: the machine is shared, the minimum is the least disturbed.
    for (let r = 0; r < 3; r++) {
      raw.push(await rawNs(path));
      ours.push(await clientNs(path));
    }
    const rawBest = Math.min(...raw);
    const oursBest = Math.min(...ours);
    console.log(`qmp: ${N} sequential query-status round trips over a unix socket: minimal client ${(rawBest / 1000).toFixed(1)} us, QmpClient + typed queryStatus ${(oursBest / 1000).toFixed(1)} us`);
    return `qmp: ratio=${(oursBest / rawBest).toFixed(2)} client_us=${(oursBest / 1000).toFixed(1)} raw_us=${(rawBest / 1000).toFixed(1)} n=${N}`;
  } finally {
    server.close();
    rmSync(dir, { recursive: true, force: true });
  }
}
