// The engine's state stream on the REAL kernel (the rig guest, edu devices bound to our
// variant driver): a 256 MiB device state from device A's saving fd into device B's
// resuming fd, through the engine (source and destination engines, the v2 stream with its
// digests, a token-authenticated unix socket, the coordinator's arcs), versus a plain
// `cat` between the same two fds (the child gets the fds as its stdin and stdout), in the
// same run. Both include the arcs (STOP_COPY on A, RESUMING on B, B's commit, both back to
// RUNNING) and B's validation of every byte in the kernel. Headline: ratio = our
// throughput / cat's (target >= 0.8), mib_s = ours.
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
import { runEngines, type EngineRun } from '../test/rig/engine-vms.ts';

const MIB = 1 << 20;
const BIG = Number(process.env.VFIO_MIG_BENCH_STREAM_MIB ?? 256);
const EACH = Number(process.env.VFIO_MIG_BENCH_STREAM_EACH_MIB ?? 32);
const COUNTS = [1, 2, 4];

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

function dataPhaseMs(r: EngineRun): number {
  const m = (name: string) => r.source.outcome.marks.find((x) => x.name === name)?.at;
  const from = m('stop-copy');
  const to = m('destination-committed');
  if (!r.source.outcome.ok || from === undefined || to === undefined) throw new Error(`the migration failed: ${r.source.outcome.cause ?? r.destination.outcome.cause}`);
  return to - from;
}

async function viaEngine(dir: string, src: VfioDevice[], dst: VfioDevice[]): Promise<{ totalMs: number; dataMs: number }> {
  const t0 = performance.now();
  const r = await runEngines({ dir, source: src, destination: dst, sourceExtra: { preCopy: false } });
  const totalMs = performance.now() - t0;
  const dataMs = dataPhaseMs(r);
  // The source copies stay in STOP after a completed migration: give them back.
  for (const d of src) await d.setState(MigState.Running);
  return { totalMs, dataMs };
}

export async function measure(): Promise<string> {
  const edu = prepareEdu();
  const need = 2 * Math.max(...COUNTS);
  if (edu.length < need) throw new Error(`the rig has ${edu.length} edu devices, this benchmark needs ${need} (VFIO_MIG_RIG_EDU=${need})`);
  const dir = mkdtempSync(join(tmpdir(), 'vfio-mig-bench-stream-'));
  const env = `[real kernel ${process.env.VFIO_MIG_RIG_KVER ?? '?'}, ${process.env.VFIO_MIG_RIG_ACCEL ?? '?'}]`;
  try {
    // 1. 256 MiB, A -> B: cat, then the engine, then cat again (load on a shared machine drifts).
    eduKnob(edu[0]!, 'blob_size', BIG * MIB);
    const a = VfioDevice.open(edu[0]!);
    const b = VfioDevice.open(edu[1]!);
    const cat: number[] = [];
    const ours: number[] = [];
    try {
      cat.push(await viaCat(a, b));
      ours.push((await viaEngine(dir, [a], [b])).totalMs);
      cat.push(await viaCat(a, b));
    } finally {
      await a.close();
      await b.close();
    }
    const bytes = BIG * MIB + 128;
    const catMs = Math.min(...cat);
    const ourMs = Math.min(...ours);
    const ratio = catMs / ourMs;
    const mibS = bytes / MIB / (ourMs / 1000);
    console.log(`stream ${BIG} MiB A->B: cat ${cat.map((x) => x.toFixed(0)).join('/')} ms, engine ${ours.map((x) => x.toFixed(0)).join('/')} ms; ours ${mibS.toFixed(1)} MiB/s, cat ${(bytes / MIB / (catMs / 1000)).toFixed(1)} MiB/s ${env}`);
    // 2. The data phase for N devices: one migration of N (parallel) vs N migrations of one.
    for (const id of edu.slice(0, need)) eduKnob(id, 'blob_size', EACH * MIB);
    for (const n of COUNTS) {
      const src = edu.slice(0, n).map((id) => VfioDevice.open(id));
      const dst = edu.slice(n, 2 * n).map((id) => VfioDevice.open(id));
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
          `stream data phase n=${n} x ${EACH} MiB: parallel ${par.dataMs.toFixed(0)} ms (whole migration ${par.totalMs.toFixed(0)} ms), one after another ${seqData.toFixed(0)} ms (${seqTotal.toFixed(0)} ms), ratio ${(seqData / par.dataMs).toFixed(2)} ${env}`,
        );
      } finally {
        for (const d of [...src, ...dst]) await d.close();
      }
    }
    return `stream: ratio=${ratio.toFixed(2)} mib_s=${mibS.toFixed(1)} cat_mib_s=${(bytes / MIB / (catMs / 1000)).toFixed(1)} size_mib=${BIG} kernel=real`;
  } finally {
    for (const id of edu) eduKnob(id, 'blob_size', 65536);
    rmSync(dir, { recursive: true, force: true });
  }
}

/** On the host: bundle, boot the rig with 8 edu devices, stream its output, return its headline. */
function viaRig(): Promise<string> {
  return measureInRig('stream', import.meta.url, { VFIO_MIG_RIG_EDU: process.env.VFIO_MIG_RIG_EDU ?? String(2 * Math.max(...COUNTS)), VFIO_MIG_RIG_TIMEOUT: process.env.VFIO_MIG_RIG_TIMEOUT ?? '2400' });
}

export async function run(): Promise<string> {
  return process.env.VFIO_MIG_IN_RIG ? measure() : viaRig();
}
