// QEMU's `switchover-ack` migration capability on the REAL kernel (the rig guest, edu
// devices bound to our variant driver): two nested QEMU 10 processes migrate a VM with one
// edu device whose PRE_COPY initial data is large (the driver's blob_size, default 64 and
// 256 MiB), once with `return-path` + `switchover-ack` on both ends and once without, in
// alternation, REPEATS times per size. Per migration it records QEMU's downtime
// (query-migrate) and the downtime seen in the events: the source's STOP to the
// destination's RESUME, and the source device's VFIO_MIGRATION stop-copy to the
// destination device's running (all processes run in one guest, so one clock).
// The destination's state_digest must equal the source's, else the run is an error.
//
// Why it can matter: without the ack QEMU switches over as soon as the pending data
// (RAM + the device's MIG_DATA_SIZE) fits into bandwidth x downtime-limit, so the tail of
// the device's initial data can travel while the VM is stopped. With the ack the source
// waits until the destination has loaded all initial data.
//
// Headline: ratio = median QEMU downtime with / without at the largest size (< 1: the ack
// helps). On the host, run() bundles this file and boots the rig; in the guest
// (VFIO_MIG_IN_RIG) it measures.

import { measureInRig } from './in-rig.ts';
import { prepareEdu, eduKnob } from '../test/rig/guest.ts';
import { cleanupList, eduDevice, startPair, type Vm } from '../test/rig/qemu-pair.ts';
import { queryMigrate, queryMigrateCapabilities, migrateSetCapabilities, type MigrationInfo } from '../src/qmp/commands.ts';
import type { QmpEvent } from '../src/qmp/events.ts';

const MIB = 1 << 20;
const SIZES = (process.env.VFIO_MIG_BENCH_SWACK_MIB ?? '64,256').split(',').map(Number);
const REPEATS = Number(process.env.VFIO_MIG_BENCH_REPEATS ?? 3);

interface Sample {
  ack: boolean;
  mib: number;
  downtimeMs: number;
  totalMs: number;
  stopToResumeMs: number;
  stopCopyToRunningMs: number;
  vfioBytes: number;
  /** Device data (MiB) sent after the last poll that saw the migration `active`. */
  tailMib: number;
  /** RAM dirty-bitmap syncs of the whole migration (QEMU's ram.dirty-sync-count). */
  syncs: number;
}

const ms = (e: QmpEvent): number => e.timestamp.seconds * 1000 + e.timestamp.microseconds / 1000;

function record(vm: Vm): QmpEvent[] {
  const list: QmpEvent[] = [];
  vm.qmp.onEvent((e) => list.push(e));
  return list;
}

function find(list: QmpEvent[], name: string, state?: string): QmpEvent {
  const e = list.find((x) => x.event === name && (state === undefined || x.data['device-state'] === state));
  if (!e) throw new Error(`no ${name}${state ? ` ${state}` : ''} event (got ${list.map((x) => `${x.event}${x.data['device-state'] ? `:${String(x.data['device-state'])}` : ''}`).join(', ')})`);
  return e;
}

async function once(src: string, dst: string, mib: number, ack: boolean): Promise<Sample> {
  eduKnob(src, 'blob_size', mib * MIB); // EBUSY while open: set before QEMU opens the device
  const s = cleanupList();
  try {
    const p = await startPair(s, [eduDevice(src, 'edu0')], [eduDevice(dst, 'edu0')]);
    const srcEv = record(p.src);
    const dstEv = record(p.dst);
    const caps = ack ? { events: true, 'return-path': true, 'switchover-ack': true } : { events: true };
    for (const vm of [p.src, p.dst]) {
      await migrateSetCapabilities(vm.qmp, caps);
      const on = new Set((await queryMigrateCapabilities(vm.qmp)).filter((c) => c.state).map((c) => c.capability));
      if (on.has('switchover-ack') !== ack) throw new Error(`${vm.name}: switchover-ack is ${on.has('switchover-ack')}, wanted ${ack}`);
    }
    await p.dst.qmp.execute('migrate-incoming', { uri: `unix:${p.migSock}` });
    await p.src.qmp.execute('migrate', { uri: `unix:${p.migSock}` });
    let info: MigrationInfo;
    // Device bytes sent as of the last poll that still saw the VM running (status
    // `active`): what follows went during the downtime or in the last <= 100 ms before it.
    let sentWhileRunning = 0;
    const deadline = Date.now() + 20 * 60_000;
    for (;;) {
      info = await queryMigrate(p.src.qmp);
      if (info.status === 'active') sentWhileRunning = info.vfio?.transferred ?? 0;
      if (info.status === 'completed') break;
      if (info.status === 'failed' || info.status === 'cancelled') throw new Error(`migration ${info.status}: ${info['error-desc'] ?? '?'}`);
      if (Date.now() > deadline) throw new Error(`migration still ${info.status} after 20 min`);
      await new Promise((r) => setTimeout(r, 100));
    }
    await p.dst.qmp.waitFor('RESUME', undefined, 120_000, { since: 0 });
    // The destination device reaches RUNNING after RESUME (running-p2p, then running).
    await p.dst.qmp.waitFor('VFIO_MIGRATION', (e) => e.typed['device-state'] === 'running', 120_000, { since: 0 });
    const digestSrc = eduKnob(src, 'state_digest');
    const digestDst = eduKnob(dst, 'state_digest');
    if (digestSrc !== digestDst) throw new Error(`state_digest differs: source ${digestSrc}, destination ${digestDst} (${eduKnob(dst, 'last_error')})`);
    const sample: Sample = {
      ack,
      mib,
      downtimeMs: info.downtime ?? NaN,
      totalMs: info['total-time'] ?? NaN,
      stopToResumeMs: ms(find(dstEv, 'RESUME')) - ms(find(srcEv, 'STOP')),
      stopCopyToRunningMs: ms(find(dstEv, 'VFIO_MIGRATION', 'running')) - ms(find(srcEv, 'VFIO_MIGRATION', 'stop-copy')),
      vfioBytes: info.vfio?.transferred ?? NaN,
      tailMib: ((info.vfio?.transferred ?? NaN) - sentWhileRunning) / MIB,
      syncs: info.ram?.['dirty-sync-count'] ?? NaN,
    };
    console.log(
      `switchover-ack ${ack ? 'on ' : 'off'} ${mib} MiB: downtime ${sample.downtimeMs} ms (QEMU), STOP->RESUME ${sample.stopToResumeMs.toFixed(0)} ms, stop-copy->running ${sample.stopCopyToRunningMs.toFixed(0)} ms, total ${sample.totalMs} ms, vfio ${sample.vfioBytes} B, of which ${sample.tailMib.toFixed(1)} MiB after the last running poll, ${sample.syncs} RAM syncs`,
    );
    return sample;
  } finally {
    await s.run();
  }
}

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};

export async function measure(): Promise<string> {
  const edu = prepareEdu();
  const [src, dst] = edu as [string, string];
  const env = `[real kernel ${process.env.VFIO_MIG_RIG_KVER ?? '?'}, ${process.env.VFIO_MIG_RIG_ACCEL ?? '?'}, nested QEMU TCG]`;
  const all: Sample[] = [];
  try {
    for (const mib of SIZES) {
      // Alternate, starting with a different mode each repetition, so drift in the
      // machine's load hits both modes alike.
      for (let r = 0; r < REPEATS; r++) {
        const order = r % 2 ? [true, false] : [false, true];
        for (const ack of order) all.push(await once(src, dst, mib, ack));
      }
      const pick = (ack: boolean, k: keyof Sample): number[] => all.filter((x) => x.mib === mib && x.ack === ack).map((x) => x[k] as number);
      const fmt = (xs: number[], digits = 0): string => `${median(xs).toFixed(digits)} (${xs.map((x) => x.toFixed(digits)).join('/')})`;
      for (const ack of [false, true]) {
        console.log(
          `switchover-ack ${ack ? 'on ' : 'off'} ${mib} MiB x${REPEATS}: median downtime ${fmt(pick(ack, 'downtimeMs'))} ms, STOP->RESUME ${fmt(pick(ack, 'stopToResumeMs'))} ms, stop-copy->running ${fmt(pick(ack, 'stopCopyToRunningMs'))} ms, total ${fmt(pick(ack, 'totalMs'))} ms, device MiB after the last running poll ${fmt(pick(ack, 'tailMib'), 1)}, RAM syncs ${fmt(pick(ack, 'syncs'))} ${env}`,
        );
      }
    }
    const big = Math.max(...SIZES);
    const med = (ack: boolean, k: keyof Sample): number => median(all.filter((x) => x.mib === big && x.ack === ack).map((x) => x[k] as number));
    const on = med(true, 'downtimeMs');
    const off = med(false, 'downtimeMs');
    return `switchover-ack: ratio=${(on / off).toFixed(2)} downtime_on_ms=${on.toFixed(0)} downtime_off_ms=${off.toFixed(0)} stop_resume_on_ms=${med(true, 'stopToResumeMs').toFixed(0)} stop_resume_off_ms=${med(false, 'stopToResumeMs').toFixed(0)} size_mib=${big} n=${REPEATS} kernel=real`;
  } finally {
    for (const id of edu) eduKnob(id, 'blob_size', 65536);
  }
}

/** On the host: bundle, boot the rig, stream its output, return its headline. */
function viaRig(): Promise<string> {
  return measureInRig('switchover-ack', import.meta.url, { VFIO_MIG_RIG_TIMEOUT: process.env.VFIO_MIG_RIG_TIMEOUT ?? '3000' });
}

export async function run(): Promise<string> {
  return process.env.VFIO_MIG_IN_RIG ? measure() : viaRig();
}
