// A MODEL, not the real kernel: the Coordinator vs a sequential, one-device-at-a-time
// baseline (what QEMU does), on the in-process fake kernel with a fixed latency per arc
// (a timer, no thread blocks in a kernel). It shows the coordinator's own scheduling and
// overhead; real concurrency and I/O costs are measured on the real kernel by
// coordinator-rig.bench.ts. The fake kernel's timings: time from "quiesce requested" to "every
// device in STOP_COPY" for N = 1, 4, 16, 64. Reports the speed-up (ideal: N) and our
// overhead above the ideal, which is the slowest device's own arc time.

import { FakeKernel } from '../test/fake/fake-kernel.ts';
import { setSyscalls, libcSyscalls } from '../src/host/sys.ts';
import { VfioDevice } from '../src/vfio/device.ts';
import { Coordinator } from '../src/migration/coordinator.ts';
import { MigState } from '../src/vfio/uapi.ts';

const ARC_MS = Number(process.env.BENCH_ARC_MS ?? 5);
const SIZES = [1, 4, 16, 64];

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

async function coordinated(devs: VfioDevice[]): Promise<{ ms: number; idealMs: number }> {
  const c = await Coordinator.create(devs);
  const t0 = performance.now();
  await c.quiesce();
  await c.stopCopy();
  const ms = performance.now() - t0;
  const perDevice = new Map<string, number>();
  for (const e of c.timeline) perDevice.set(e.device, (perDevice.get(e.device) ?? 0) + (e.end - e.start));
  await c.rollback();
  return { ms, idealMs: Math.max(...perDevice.values()) };
}

async function reset(devs: VfioDevice[]): Promise<void> {
  for (const d of devs) if ((await d.state()) !== MigState.Running) await d.setState(MigState.Running);
}

export async function run(): Promise<string> {
  const fake = new FakeKernel();
  const savedEnv = { VFIO_MIG_SYSFS: process.env.VFIO_MIG_SYSFS, VFIO_MIG_DEV: process.env.VFIO_MIG_DEV };
  Object.assign(process.env, fake.env());
  setSyscalls(fake);
  let headline = '';
  console.log(`coordinator: a MODEL on the fake kernel (${ARC_MS} ms timer per arc, nothing blocks in a kernel), not the real kernel - npm run bench -- coordinator-rig measures the real one`);
  try {
    const ids = Array.from({ length: Math.max(...SIZES) }, (_, i) => `0000:${(0x60 + (i >> 3)).toString(16)}:${(i & 7).toString(16).padStart(2, '0')}.0`);
    for (const id of ids) fake.addDevice({ id, flags: 3, stateSize: 64, arcLatencyMs: ARC_MS });
    for (const n of SIZES) {
      const devs = ids.slice(0, n).map((id) => VfioDevice.open(id));
      try {
        const seq: number[] = [];
        const ours: { ms: number; idealMs: number }[] = [];
        for (let r = 0; r < 3; r++) {
          seq.push(await sequential(devs));
          await reset(devs);
          ours.push(await coordinated(devs));
        }
        const s = Math.min(...seq);
        const best = ours.reduce((a, b) => (b.ms < a.ms ? b : a));
        const ratio = s / best.ms;
        const overhead = Math.max(0, best.ms - best.idealMs);
        console.log(`coordinator n=${n}: sequential ${s.toFixed(1)} ms, coordinated ${best.ms.toFixed(1)} ms (ideal ${best.idealMs.toFixed(1)} ms), ratio ${ratio.toFixed(1)}, overhead ${overhead.toFixed(2)} ms [fake kernel model: ${ARC_MS} ms per arc, 3 arcs per device]`);
        headline = `coordinator: n=${n} ratio=${ratio.toFixed(1)} overhead_ms=${overhead.toFixed(2)} kernel=fake`;
      } finally {
        for (const d of devs) await d.close();
      }
    }
  } finally {
    setSyscalls(libcSyscalls);
    for (const [k, v] of Object.entries(savedEnv)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
    fake.dispose();
  }
  return headline;
}
