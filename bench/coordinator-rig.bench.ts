// Coordinator vs one-device-at-a-time on the REAL kernel: the rig guest (Debian's 6.12,
// edu devices bound to our variant driver, every arc delayed 50 ms in the kernel). For
// N = 1, 4 and 12 devices it times "quiesce + stop-copy" (RUNNING -> RUNNING_P2P -> STOP
// -> STOP_COPY, 3 arcs per device) both ways in the same run: sequentially, one device's
// calls after the other's (same arcs, P2P rule kept), and through the Coordinator. The
// headline is the speed-up at N = 12 (ideal 12) and the coordinator's time above the ideal,
// which is one device's arcs alone (its sequential time at N = 1, measured in this run).
//
// On the host, run() bundles this file, boots the rig with 12 edu devices and returns the
// guest's headline; in the guest (VFIO_MIG_IN_RIG) it measures.

import { VfioDevice } from '../src/vfio/device.ts';
import { measureInRig } from './in-rig.ts';
import { Coordinator } from '../src/migration/coordinator.ts';
import { MigState } from '../src/vfio/uapi.ts';
import { prewarm } from '../src/host/sys.ts';
import { prepareEdu, eduKnob } from '../test/rig/guest.ts';

const ARC_DELAY_US = 50_000;
const SIZES = [1, 4, 12];
const REPEATS = Number(process.env.VFIO_MIG_BENCH_REPEATS ?? 5);

async function sequential(devs: VfioDevice[]): Promise<number> {
  const t0 = performance.now();
  for (const d of devs) await d.setState(MigState.RunningP2P);
  for (const d of devs) {
    await d.setState(MigState.Stop);
    const r = await d.setState(MigState.StopCopy);
    r.dataFd?.close();
  }
  return performance.now() - t0;
}

async function coordinated(devs: VfioDevice[]): Promise<number> {
  // The Coordinator would warm its threads itself; done here too so that the timed part
  // is the same whether or not it does.
  await prewarm(devs.length);
  const c = await Coordinator.create(devs);
  const t0 = performance.now();
  try {
    await c.quiesce();
    const fds = await c.stopCopy();
    const ms = performance.now() - t0;
    for (const f of fds.values()) f.close();
    return ms;
  } finally {
    await c.rollback();
  }
}

async function backToRunning(devs: VfioDevice[]): Promise<void> {
  await Promise.all(devs.map(async (d) => ((await d.state()) !== MigState.Running ? d.setState(MigState.Running) : undefined)));
}

/** In the guest: measures and prints one line per N; returns the headline. */
export async function measure(): Promise<string> {
  const edu = prepareEdu();
  const max = Math.max(...SIZES);
  if (edu.length < max) throw new Error(`the rig has ${edu.length} edu devices, this benchmark needs ${max} (VFIO_MIG_RIG_EDU=${max})`);
  for (const id of edu) eduKnob(id, 'arc_delay_us', ARC_DELAY_US);
  let oneDevice = Infinity;
  let headline = '';
  try {
    for (const n of SIZES) {
      const devs = edu.slice(0, n).map((id) => VfioDevice.open(id));
      try {
        const seq: number[] = [];
        const ours: number[] = [];
        for (let r = 0; r < REPEATS; r++) {
          seq.push(await sequential(devs));
          await backToRunning(devs);
          ours.push(await coordinated(devs));
          await backToRunning(devs);
        }
        const s = Math.min(...seq);
        const c = Math.min(...ours);
        if (n === 1) oneDevice = s;
        const ratio = s / c;
        const overhead = c - oneDevice;
        console.log(
          `coordinator-rig n=${n}: sequential ${s.toFixed(1)} ms, coordinated ${c.toFixed(1)} ms, ratio ${ratio.toFixed(2)} (ideal ${n}), ` +
            `overhead ${overhead.toFixed(1)} ms above one device alone (${oneDevice.toFixed(1)} ms; kernel floor ${((3 * ARC_DELAY_US) / 1000).toFixed(0)} ms) ` +
            `[real kernel ${process.env.VFIO_MIG_RIG_KVER ?? '?'}, ${process.env.VFIO_MIG_RIG_ACCEL ?? '?'}, ${ARC_DELAY_US / 1000} ms per arc, 3 arcs per device, best of ${REPEATS}; ` +
            `all: seq ${seq.map((x) => x.toFixed(0)).join('/')} coord ${ours.map((x) => x.toFixed(0)).join('/')}]`,
        );
        headline = `coordinator-rig: n=${n} ratio=${ratio.toFixed(1)} overhead_ms=${overhead.toFixed(1)}`;
      } finally {
        for (const d of devs) await d.close();
      }
    }
  } finally {
    for (const id of edu) eduKnob(id, 'arc_delay_us', 0);
  }
  return headline;
}

/** On the host: bundle, boot the rig with enough edu devices, stream its output, return its headline. */
function viaRig(): Promise<string> {
  return measureInRig('coordinator-rig', import.meta.url, { VFIO_MIG_RIG_EDU: process.env.VFIO_MIG_RIG_EDU ?? String(Math.max(...SIZES)) });
}

export async function run(): Promise<string> {
  return process.env.VFIO_MIG_IN_RIG ? measure() : viaRig();
}
