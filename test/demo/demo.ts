// npm run demo, inside the rig guest: the device inventory, then device-state
// migrations between real VFIO devices on the real 6.12 kernel - our edu variant
// driver (with a 64 MiB device state) and the upstream mtty sample - each verified by
// re-saving the destination and comparing byte for byte.
import { main } from '../../src/cli/main.ts';
import { trialMigrate } from '../../src/migration/trial.ts';
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
    line(`  via ${r.via}: ${r.bytes} bytes, save ${r.saveMs.toFixed(1)} ms, restore ${r.restoreMs.toFixed(1)} ms (${mbps.toFixed(0)} MB/s)`);
    line(`  destination state equals source byte for byte: ${r.verified ? 'yes' : 'NO'}`);
    ok &&= r.verified;
  } catch (err) {
    line(`  FAILED: ${err instanceof Error ? err.message : String(err)}`);
    ok = false;
  }
  line();
}
line(ok ? 'demo: all device states migrated and verified' : 'demo: FAILED');
process.exitCode = ok ? 0 : 1;
