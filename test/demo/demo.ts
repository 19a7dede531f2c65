// npm run demo, inside the rig guest: the device inventory, then device-state
// migrations between real VFIO devices on the real 6.12 kernel - our edu variant
// driver (with a 64 MiB device state) and the upstream mtty sample - each verified by
// re-saving the destination and comparing byte for byte.
import { main } from '../../src/cli/main.ts';
import { trialMigrate, saveState } from '../../src/migration/trial.ts';
import { Coordinator } from '../../src/migration/coordinator.ts';
import { VfioDevice } from '../../src/vfio/device.ts';
import { readToEnd, readAvailable, writeAll } from '../../src/vfio/data.ts';
import { prepareEdu, prepareMtty, eduKnob } from '../rig/guest.ts';

function line(text = ''): void {
  process.stdout.write(`${text}\n`);
}

const edu = prepareEdu();
const mtty = prepareMtty(2);
eduKnob(edu[0]!, 'blob_size', 64 << 20);
eduKnob(edu[1]!, 'blob_size', 64 << 20);

line('== vfio-mig devices ==');
await main(['devices']);
line();
let ok = true;
for (const [src, dst, what] of [
  [edu[0]!, edu[1]!, 'edu-vfio-pci, 64 MiB state'],
  [mtty[0]!, mtty[1]!, 'upstream mtty sample'],
] as const) {
  line(`== trial migration ${src} -> ${dst} (${what}) ==`);
  try {
    const r = await trialMigrate(src, dst);
    const mbps = r.bytes / 1e6 / ((r.saveMs + r.restoreMs) / 1000);
    const rate = r.bytes > 1e6 ? ` (${mbps.toFixed(0)} MB/s)` : '';
    line(`  via ${r.via}: ${r.bytes} bytes, save ${r.saveMs.toFixed(1)} ms, restore ${r.restoreMs.toFixed(1)} ms${rate}`);
    line(`  destination state equals source byte for byte: ${r.verified ? 'yes' : 'NO'}`);
    ok &&= r.verified;
  } catch (err) {
    line(`  FAILED: ${err instanceof Error ? err.message : String(err)}`);
    ok = false;
  }
  line();
}
// A coordinated migration of a two-device "VM" (edu + mtty) into two other devices:
// pre-copy while running, then every device to the P2P state before any stops, parallel
// STOP_COPY, and on the destination RESUMING -> STOP -> RUNNING_P2P -> RUNNING for all.
line(`== coordinated migration {${edu[2]}, ${mtty[0]}} -> {${edu[3]}, ${mtty[1]}} ==`);
try {
  eduKnob(edu[2]!, 'blob_size', 4 << 20);
  eduKnob(edu[3]!, 'blob_size', 4 << 20);
  const src = [VfioDevice.open(edu[2]!), VfioDevice.open(mtty[0]!)];
  const dst = [VfioDevice.open(edu[3]!), VfioDevice.open(mtty[1]!)];
  const s = await Coordinator.create(src);
  const d = await Coordinator.create(dst);
  const incoming = await d.beginResume(); // the destination is ready before the source stops
  // Each source device's stream goes straight into its destination device, also while
  // pre-copying, so only the final part is moved during the downtime.
  const route = new Map([[edu[2]!, edu[3]!], [mtty[0]!, mtty[1]!]]);
  const forward = (name: string) => async (chunk: Buffer) => void (await writeAll(incoming.get(route.get(name)!)!, chunk));
  for (const [name, f] of await s.preCopy()) await readAvailable(f, forward(name));
  const t0 = performance.now();
  await s.quiesce();
  await Promise.all([...(await s.stopCopy())].map(([name, f]) => readToEnd(f, forward(name))));
  await s.finishSource();
  await d.completeResume();
  const stopToRunning = performance.now() - t0;
  await s.rollback(); // the "source VM" is done; give its devices back
  for (const e of [...d.timeline.filter((x) => x.phase === 'resuming'), ...s.timeline, ...d.timeline.filter((x) => x.phase !== 'resuming')].filter((x) => x.op === 'set')) {
    line(`  ${e.phase.padEnd(10)} ${e.device.padEnd(36)} ${`${e.from}->${e.to}`.padEnd(26)} ${(e.end - e.start).toFixed(1).padStart(7)} ms ${e.result}`);
  }
  line(`  device downtime (quiesce on the source to RUNNING on the destination): ${stopToRunning.toFixed(1)} ms`);
  // Verify: edu reports a digest of its logical state; mtty's state is re-saved on both.
  const eduSame = eduKnob(edu[2]!, 'state_digest') === eduKnob(edu[3]!, 'state_digest');
  const mttySame = (await saveState(src[1]!)).equals(await saveState(dst[1]!));
  line(`  destination states equal the sources: edu ${eduSame ? 'yes' : 'NO'}, mtty ${mttySame ? 'yes' : 'NO'}`);
  ok &&= eduSame && mttySame;
  for (const dev of [...src, ...dst]) await dev.close();
} catch (err) {
  line(`  FAILED: ${err instanceof Error ? err.message : String(err)}`);
  ok = false;
}
line();
line(ok ? 'demo: all device states migrated and verified' : 'demo: FAILED');
process.exitCode = ok ? 0 : 1;
