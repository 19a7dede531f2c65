// The engine's state stream on the REAL kernel (the rig guest, edu devices bound to our
// variant driver): a 256 MiB device state from device A's saving fd into device B's
// resuming fd, through the engine (source and destination engines, the v2 stream with its
// digests, a token-authenticated unix socket, the coordinator's arcs), versus a plain
// `cat` between the same two fds (the child gets the fds as its stdin and stdout), in the
// same run. Both include the arcs (STOP_COPY on A, RESUMING on B, B's commit, both back to
// RUNNING) and B's validation of every byte in the kernel. Headline: ratio = our
// throughput / cat's (target >= 0.8), mib_s = ours.
//
// As in production (two hosts), the two ends run in two processes: the destination is the
// real `vfio-mig receive --device B --from unix:PATH --token T` (src/cli/receive.ts, run
// in a child node process started from this same bundle), the source is the source engine
// in this process. The clock starts once the receiver listens (its process start and
// device open are not counted, as cat's device opens are not) and stops when the receiver
// has printed its outcome (B committed and RUNNING). cat, too, is a process of its own
// next to this one. The one-process form (both engines in this process, as before) is
// measured in the same run for comparison; VFIO_MIG_BENCH_STREAM_PROCS=1 makes it the
// headline and the data phase's form.
// The rig runs multi-threaded TCG for this benchmark (see viaRig).
// Then the data phase (stop-copy done -> destination committed) for 1, 2 and 4 devices of
// 32 MiB each, all in one migration (parallel) versus one migration per device.
//
// On the host, run() bundles this file, boots the rig with 8 edu devices and returns the
// guest's headline; in the guest (VFIO_MIG_IN_RIG) it measures.

import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { VfioDevice } from '../src/vfio/device.ts';
import { measureInRig } from './in-rig.ts';
import { MigState } from '../src/vfio/uapi.ts';
import { prepareEdu, eduKnob } from '../test/rig/guest.ts';
import { runEngines } from '../test/rig/engine-vms.ts';
import { run as receiveCli } from '../src/cli/receive.ts';
import { describeForStream } from '../src/cli/migrate-devices.ts';
import { migrateSource, type SourceResult } from '../src/migration/engine-source.ts';
import { connect, newToken } from '../src/migration/transport.ts';

const MIB = 1 << 20;
const BIG = Number(process.env.VFIO_MIG_BENCH_STREAM_MIB ?? 256);
const EACH = Number(process.env.VFIO_MIG_BENCH_STREAM_EACH_MIB ?? 32);
const COUNTS = [1, 2, 4];
const PROCS = Number(process.env.VFIO_MIG_BENCH_STREAM_PROCS ?? 2);
const ROLE = 'VFIO_MIG_BENCH_STREAM_RECEIVE';

async function viaCat(a: VfioDevice, b: VfioDevice): Promise<number> {
  const t0 = performance.now();
  const save = (await a.setState(MigState.StopCopy)).dataFd!;
  const load = (await b.setState(MigState.Resuming)).dataFd!;
  try {
    await save.use('cat', (rfd) =>
      load.use('cat', (wfd) => new Promise<void>((resolve, reject) => {
        const child = spawn('cat', [], { stdio: [rfd, wfd, 'inherit'] });
        child.on('error', reject);
        child.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`cat exited ${code}`))));
      })),
    );
  } finally {
    save.close();
    load.close();
  }
  await b.setState(MigState.Stop); // the commit: the driver validates what cat wrote
  const ms = performance.now() - t0;
  await b.setState(MigState.Running);
  await a.setState(MigState.Running);
  return ms;
}

function dataPhaseMs(r: SourceResult, cause?: string): number {
  const m = (name: string) => r.outcome.marks.find((x) => x.name === name)?.at;
  const from = m('stop-copy');
  const to = m('destination-committed');
  if (!r.outcome.ok || from === undefined || to === undefined) throw new Error(`the migration failed: ${r.outcome.cause ?? cause}`);
  return to - from;
}

/** Both engines in this process (test/rig/engine-vms.ts). */
interface EngineTimes {
  totalMs: number;
  dataMs: number;
  /** CPU time (user + system) of the source's and the destination's process during the migration. */
  cpuMs?: { source: number; destination: number };
}

async function viaEngine1(dir: string, src: VfioDevice[], dstIds: string[]): Promise<EngineTimes> {
  const dst = dstIds.map((id) => VfioDevice.open(id));
  try {
    const t0 = performance.now();
    const r = await runEngines({ dir, source: src, destination: dst, sourceExtra: { preCopy: false } });
    const totalMs = performance.now() - t0;
    const dataMs = dataPhaseMs(r.source, r.destination.outcome.cause);
    // The source copies stay in STOP after a completed migration: give them back.
    for (const d of src) await d.setState(MigState.Running);
    return { totalMs, dataMs };
  } finally {
    for (const d of dst) await d.close();
    await Promise.all(dst.map((d) => d.released));
  }
}

/** The destination in a child process: the real `vfio-mig receive`; the source engine here. */
async function viaEngine2(dir: string, src: VfioDevice[], dstIds: string[]): Promise<EngineTimes> {
  const token = newToken();
  const path = join(dir, `recv-${Date.now()}.sock`);
  const argv = [...dstIds.flatMap((id) => ['--device', id]), '--from', `unix:${path}`, '--token', token, '--timeline', join(dir, `recv-${Date.now()}.json`)];
  const child = spawn(process.execPath, [...process.execArgv, process.argv[1]!], { env: { ...process.env, [ROLE]: JSON.stringify(argv) }, stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  let stdout = '';
  const exited = new Promise<number>((resolve) => child.on('close', (code) => resolve(code ?? -1)));
  const listening = new Promise<void>((resolve, reject) => {
    child.stderr!.setEncoding('utf8').on('data', (d: string) => {
      stderr += d;
      if (stderr.includes('vfio-mig receive: listening on')) resolve();
    });
    void exited.then((code) => reject(new Error(`vfio-mig receive exited ${code} before listening: ${stderr.trim()}`)));
  });
  // Its outcome line on stdout: B committed and RUNNING again.
  const done = new Promise<void>((resolve) => child.stdout!.setEncoding('utf8').on('data', (d: string) => ((stdout += d), resolve())));
  try {
    await listening;
    const t0 = performance.now();
    const cpu0 = process.cpuUsage();
    const r = await migrateSource({ devices: src, describe: (name) => describeForStream(name), connect: () => connect({ path }, { token }), preCopy: false });
    await Promise.race([done, exited]);
    const totalMs = performance.now() - t0;
    const cpu = process.cpuUsage(cpu0);
    const code = await exited;
    if (code !== 0) throw new Error(`vfio-mig receive exited ${code}: ${stdout.trim()} ${stderr.trim().split('\n').slice(-5).join(' | ')}`);
    const dataMs = dataPhaseMs(r);
    for (const d of src) await d.setState(MigState.Running);
    const dst = Number(/stream-receive cpu_ms=(\d+)/.exec(stderr)?.[1] ?? NaN);
    return { totalMs, dataMs, cpuMs: { source: (cpu.user + cpu.system) / 1000, destination: dst } };
  } finally {
    if (child.exitCode === null) child.kill('SIGKILL');
    await exited;
  }
}

const viaEngine = PROCS === 1 ? viaEngine1 : viaEngine2;

export async function measure(): Promise<string> {
  const role = process.env[ROLE];
  if (role) {
    // The child of viaEngine2: the destination host's `vfio-mig receive`.
    // CPU time from the moment it listens (start-up and device open not counted).
    let atListen = process.cpuUsage();
    const err = {
      write(chunk: string) {
        if (chunk.includes('listening on')) atListen = process.cpuUsage();
        return process.stderr.write(chunk);
      },
    } as unknown as NodeJS.WritableStream;
    process.exitCode = await receiveCli(JSON.parse(role) as string[], process.stdout, err);
    const u = process.cpuUsage(atListen);
    process.stderr.write(`stream-receive cpu_ms=${((u.user + u.system) / 1000).toFixed(0)}\n`);
    return '';
  }
  const edu = prepareEdu();
  const need = 2 * Math.max(...COUNTS);
  if (edu.length < need) throw new Error(`the rig has ${edu.length} edu devices, this benchmark needs ${need} (VFIO_MIG_RIG_EDU=${need})`);
  const dir = mkdtempSync(join(tmpdir(), 'vfio-mig-bench-stream-'));
  const env = `[real kernel ${process.env.VFIO_MIG_RIG_KVER ?? '?'}, ${process.env.VFIO_MIG_RIG_ACCEL ?? '?'}]`;
  try {
    // 1. 256 MiB, A -> B: cat, then the engine, then cat again (load on a shared machine drifts).
    eduKnob(edu[0]!, 'blob_size', BIG * MIB);
    const a = VfioDevice.open(edu[0]!);
    let b: VfioDevice | undefined;
    const cat: number[] = [];
    const ours: number[] = [];
    const other: number[] = [];
    const catAB = async () => {
      b = VfioDevice.open(edu[1]!);
      cat.push(await viaCat(a, b));
      await b.close();
      await b.released; // the engine's destination opens B itself
    };
    try {
      // cat, ours, the other form, ours, cat: drift on a shared machine hits both.
      await catAB();
      const cpu: string[] = [];
      const timed = async (f: typeof viaEngine, into: number[]) => {
        const t = await f(dir, [a], [edu[1]!]);
        into.push(t.totalMs);
        if (t.cpuMs) cpu.push(`source ${t.cpuMs.source.toFixed(0)} ms, destination ${t.cpuMs.destination.toFixed(0)} ms in ${t.totalMs.toFixed(0)} ms`);
      };
      await timed(viaEngine, ours);
      await timed(PROCS === 1 ? viaEngine2 : viaEngine1, other);
      await timed(viaEngine, ours);
      console.log(`stream ${BIG} MiB two-process CPU time (user+system): ${cpu.join('; ')}`);
      await catAB();
    } finally {
      await a.close();
      await b?.close();
    }
    const bytes = BIG * MIB + 128;
    const catMs = Math.min(...cat);
    const ourMs = Math.min(...ours);
    const ratio = catMs / ourMs;
    const mibS = bytes / MIB / (ourMs / 1000);
    const otherMibS = bytes / MIB / (Math.min(...other) / 1000);
    const form = (n: number) => (n === 1 ? 'one process' : 'two processes');
    console.log(`stream ${BIG} MiB A->B: cat ${cat.map((x) => x.toFixed(0)).join('/')} ms, engine (${form(PROCS)}) ${ours.map((x) => x.toFixed(0)).join('/')} ms, engine (${form(PROCS === 1 ? 2 : 1)}) ${other.map((x) => x.toFixed(0)).join('/')} ms; ours ${mibS.toFixed(1)} MiB/s, other form ${otherMibS.toFixed(1)} MiB/s, cat ${(bytes / MIB / (catMs / 1000)).toFixed(1)} MiB/s ${env} [tcg threads ${process.env.VFIO_MIG_RIG_TCG_THREAD ?? 'single'}, ${process.env.VFIO_MIG_RIG_CPUS ?? 2} vCPUs]`);
    // 2. The data phase for N devices: one migration of N (parallel) vs N migrations of one.
    for (const id of edu.slice(0, need)) eduKnob(id, 'blob_size', EACH * MIB);
    for (const n of COUNTS) {
      const src = edu.slice(0, n).map((id) => VfioDevice.open(id));
      const dst = edu.slice(n, 2 * n);
      try {
        const par = await viaEngine(dir, src, dst);
        let seqData = 0;
        let seqTotal = 0;
        for (let i = 0; i < n; i++) {
          const one = await viaEngine(dir, [src[i]!], [dst[i]!]);
          seqData += one.dataMs;
          seqTotal += one.totalMs;
        }
        console.log(
          `stream data phase (${form(PROCS)}) n=${n} x ${EACH} MiB: parallel ${par.dataMs.toFixed(0)} ms (whole migration ${par.totalMs.toFixed(0)} ms), one after another ${seqData.toFixed(0)} ms (${seqTotal.toFixed(0)} ms), ratio ${(seqData / par.dataMs).toFixed(2)} ${env}`,
        );
      } finally {
        for (const d of src) await d.close();
      }
    }
    return `stream: ratio=${ratio.toFixed(2)} mib_s=${mibS.toFixed(1)} cat_mib_s=${(bytes / MIB / (catMs / 1000)).toFixed(1)} ${PROCS === 1 ? 'two_proc' : 'one_proc'}_mib_s=${otherMibS.toFixed(1)} procs=${PROCS} tcg_thread=${process.env.VFIO_MIG_RIG_TCG_THREAD ?? 'single'} size_mib=${BIG} kernel=real`;
  } finally {
    for (const id of edu) eduKnob(id, 'blob_size', 65536);
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * On the host: bundle, boot the rig with 8 edu devices, stream its output, return its
 * headline. Multi-threaded TCG by default: each of the guest's two vCPUs on a host thread
 * of its own, so the two ends (and cat's two sides) can run at the same time, as on two
 * hosts; VFIO_MIG_RIG_TCG_THREAD=single gives the rig's default back.
 */
function viaRig(): Promise<string> {
  return measureInRig('stream', import.meta.url, {
    VFIO_MIG_RIG_EDU: process.env.VFIO_MIG_RIG_EDU ?? String(2 * Math.max(...COUNTS)),
    VFIO_MIG_RIG_TIMEOUT: process.env.VFIO_MIG_RIG_TIMEOUT ?? '2400',
    VFIO_MIG_RIG_TCG_THREAD: process.env.VFIO_MIG_RIG_TCG_THREAD ?? 'multi',
    VFIO_MIG_RIG_CPUS: process.env.VFIO_MIG_RIG_CPUS ?? '2',
  });
}

export async function run(): Promise<string> {
  return process.env.VFIO_MIG_IN_RIG ? measure() : viaRig();
}
