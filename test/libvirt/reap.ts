// Tears down fake libvirt hosts left behind by a test process that died before its
// teardown (test/run-all.sh runs this after the libvirt suite). Prints what it removed.
import { reapStale } from './hosts.ts';

const reaped = await reapStale();
for (const base of reaped) console.error(`libvirt rig: removed leftovers of a dead test run: ${base}`);
