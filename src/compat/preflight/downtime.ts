// Downtime: the limit in force against the devices' stop-copy data, a prediction that
// counts device state (not only RAM), and which of QEMU's downtime levers are off.
//
// QEMU counts a VFIO device's pending stop-copy data (MIG_DATA_SIZE) in the data it must
// send after the guest stops, and switches over only once all of it fits the
// downtime-limit at the measured bandwidth (or at avail-switchover-bandwidth when set).
// Device state larger than limit x bandwidth therefore means a migration that never
// ends. With the limit met, the downtime is the device data plus what RAM is left, which
// QEMU keeps under the rest of the limit - except with a pinned device whose RAM is all
// reported dirty: then all guest RAM moves while the guest is stopped.

import { check, formatBytes, type Check, type DowntimePrediction } from './types.ts';
import type { VfioHostdev } from './domain-view.ts';
import type { FactDevice } from './facts.ts';
import type { PinnedAnalysis } from './dirty-tracking.ts';
import { atLeast, parseVersion } from './versions.ts';

/** QEMU's default downtime-limit (ms). */
export const DEFAULT_DOWNTIME_LIMIT_MS = 300;

export interface DowntimeInput {
  hostdevs: VfioHostdev[];
  devices: FactDevice[];
  memoryBytes: number | undefined;
  /** downtime-limit from query-migrate-parameters; undefined = QEMU's default assumed. */
  limitMs: number | undefined;
  linkBytesPerSec: number;
  linkAssumed: boolean;
  pinned: PinnedAnalysis;
  qemuVersion: string | undefined;
  /** Capabilities in force on the source QEMU (undefined when unknown). */
  capabilities: Record<string, boolean> | undefined;
  /** The operator will migrate with --parallel (multifd). */
  parallel: boolean;
  /** The source's libvirt version, when the migration goes through libvirt. */
  libvirtVersion?: string | undefined;
}

/**
 * libvirt 11.3 (measured: test/libvirt/switchover-ack.test.ts) negotiates return-path and
 * switchover-ack itself for every migration that is not --tunnelled, and turns them on on
 * both QEMUs only for the migration: before it the capability reads off. Older versions
 * were not measured here, so for them the capability in force is what counts.
 */
export const LIBVIRT_NEGOTIATES_SWITCHOVER_ACK = [11, 3] as const;

const ms = (bytes: number, rate: number): number => (bytes / rate) * 1000;
const r1 = (n: number): number => Math.round(n * 10) / 10;

export function predictDowntime(inp: DowntimeInput): DowntimePrediction & { neverConverges: boolean; switchDeviceMs: number } {
  const limitMs = inp.limitMs ?? DEFAULT_DOWNTIME_LIMIT_MS;
  let deviceBytes = 0;
  const unknownDevices: string[] = [];
  for (const h of inp.hostdevs) {
    const cap = inp.devices.find((d) => d.id === h.device)?.capabilities;
    if (cap?.ok && cap.stopCopyBytes !== null) deviceBytes += cap.stopCopyBytes;
    else unknownDevices.push(h.label);
  }
  const deviceMs = ms(deviceBytes, inp.linkBytesPerSec);
  // QEMU's switchover test uses avail-switchover-bandwidth when it is set.
  const switchRate = inp.pinned.availSwitchoverBandwidth ?? inp.linkBytesPerSec;
  const switchDeviceMs = ms(deviceBytes, switchRate);
  const pinnedAll = inp.pinned.allDirty.length > 0;
  const neverConverges = pinnedAll && !inp.pinned.precopyTrackingOff && inp.pinned.availSwitchoverBandwidth === undefined;
  let ramMs: number;
  let ramBasis: string;
  if (pinnedAll && inp.memoryBytes !== undefined) {
    ramMs = ms(inp.memoryBytes, inp.linkBytesPerSec);
    ramBasis = `all guest RAM (${formatBytes(inp.memoryBytes)}): a pinned device without dirty tracking`;
  } else {
    ramMs = Math.max(0, limitMs - deviceMs);
    ramBasis = 'at most the rest of the limit (QEMU switches over once the RAM left fits it)';
  }
  return {
    deviceMs: r1(deviceMs),
    ramMs: r1(ramMs),
    totalMs: r1(deviceMs + ramMs),
    limitMs,
    linkBytesPerSec: inp.linkBytesPerSec,
    deviceBytes,
    unknownDevices,
    ramBasis,
    neverConverges,
    switchDeviceMs: r1(switchDeviceMs),
  };
}

function rateText(inp: DowntimeInput): string {
  const gbit = (inp.linkBytesPerSec * 8) / 1e9;
  return `${gbit >= 1 ? gbit.toFixed(gbit >= 10 ? 0 : 1) : gbit.toFixed(2)} Gbit/s${inp.linkAssumed ? ' (assumed; --link-gbps)' : ''}`;
}

export function downtimeChecks(inp: DowntimeInput): { checks: Check[]; prediction: DowntimePrediction } {
  const p = predictDowntime(inp);
  const checks: Check[] = [];
  const limitText = `downtime-limit ${p.limitMs} ms${inp.limitMs === undefined ? ' (QEMU default assumed)' : ''}`;
  const dev = `${formatBytes(p.deviceBytes)} of device state = ${p.deviceMs} ms at ${rateText(inp)}`;
  const unknown = p.unknownDevices.length ? `; no stop-copy estimate for ${p.unknownDevices.join(', ')}` : '';
  const needed = Math.ceil(p.switchDeviceMs * 1.25 + 50);

  // 1. The limit against the devices' stop-copy data.
  if (inp.hostdevs.length === 0) {
    checks.push(check('downtime-limit', 'downtime', 'domain', 'pass', `${limitText}; no VFIO devices`, 'Nothing to do.'));
  } else if (p.switchDeviceMs > p.limitMs) {
    checks.push(check('downtime-limit', 'downtime', 'domain', 'fail', `${limitText} < ${dev}: QEMU counts device state against the limit and never switches over${unknown}`, `Raise the limit to at least ${needed} ms (virsh migrate-setmaxdowntime DOMAIN ${needed}) or use a faster link.`));
  } else if (p.switchDeviceMs > p.limitMs / 2) {
    checks.push(check('downtime-limit', 'downtime', 'domain', 'warn', `${limitText}; ${dev} leaves little room for RAM${unknown}`, `Raise the limit (virsh migrate-setmaxdowntime DOMAIN ${Math.max(needed, p.limitMs * 2)}) or expect a long pre-copy.`));
  } else if (unknown) {
    checks.push(check('downtime-limit', 'downtime', 'domain', 'warn', `${limitText}; ${dev}${unknown}`, 'Record those devices\' capabilities with vfio-mig bind so their state size is known.'));
  } else {
    checks.push(check('downtime-limit', 'downtime', 'domain', 'pass', `${limitText}; ${dev}`, 'Nothing to do.'));
  }

  // 2. The prediction.
  const predicted = `~${p.totalMs} ms = devices ${p.deviceMs} ms + RAM ${p.ramMs} ms (${p.ramBasis})`;
  if (p.neverConverges) {
    checks.push(check('downtime-prediction', 'downtime', 'domain', 'fail', `no switchover: pinned device RAM never stops being dirty (${predicted} if it did)`, 'Fix the pinned-convergence check first.'));
  } else if (p.totalMs > p.limitMs) {
    checks.push(check('downtime-prediction', 'downtime', 'domain', 'warn', `${predicted}, above the ${p.limitMs} ms limit`, 'Accept the longer pause, or shrink it: a faster link, less guest RAM, devices with PRE_COPY.'));
  } else {
    checks.push(check('downtime-prediction', 'downtime', 'domain', 'pass', `${predicted}, within the ${p.limitMs} ms limit`, 'Nothing to do.'));
  }

  // 3. Levers that would shorten it, and whether they are off.
  const tight = p.switchDeviceMs > p.limitMs / 2 || p.totalMs > p.limitMs;
  const lever = (id: string, subject: string, on: boolean | 'n/a', detail: string, advice: string): void => {
    const verdict = on === false && tight ? 'warn' : 'pass';
    checks.push(check(id, 'downtime', subject, verdict, detail, on === false ? advice : 'Nothing to do.'));
  };
  const precopyDevices = inp.hostdevs.filter((h) => {
    const cap = inp.devices.find((d) => d.id === h.device)?.capabilities;
    return cap?.ok && cap.flags.includes('PRE_COPY');
  });
  for (const h of inp.hostdevs) {
    const cap = inp.devices.find((d) => d.id === h.device)?.capabilities;
    if (!cap?.ok) continue;
    const has = cap.flags.includes('PRE_COPY');
    lever('lever-precopy', h.label, has, has ? 'PRE_COPY: state is sent while the guest runs' : 'no PRE_COPY: all of its state moves while the guest is stopped', 'A driver or firmware with PRE_COPY moves device state before the switchover.');
  }
  const caps = inp.capabilities;
  if (precopyDevices.length === 0) {
    lever('lever-switchover-ack', 'source', 'n/a', 'switchover-ack: no device with PRE_COPY, nothing to wait for', '');
  } else {
    const lv = inp.libvirtVersion ? parseVersion(inp.libvirtVersion) : undefined;
    if (lv && atLeast(lv, ...LIBVIRT_NEGOTIATES_SWITCHOVER_ACK)) {
      lever('lever-switchover-ack', 'source', true, `switchover-ack: libvirt ${inp.libvirtVersion} turns it on (with return-path) on both QEMUs for the migration, unless it is --tunnelled: QEMU waits until devices have sent their initial data`, '');
    } else {
      const on = caps?.['switchover-ack'] === true;
      const why = inp.libvirtVersion ? ` (libvirt ${inp.libvirtVersion} is older than ${LIBVIRT_NEGOTIATES_SWITCHOVER_ACK.join('.')}, which negotiates it)` : '';
      lever('lever-switchover-ack', 'source', on, `switchover-ack ${on ? 'on' : 'off'}${on ? '' : why}: ${on ? 'QEMU waits until devices have sent their initial data' : 'QEMU may switch over before the devices sent their pre-copy data'}`, `Use libvirt ${LIBVIRT_NEGOTIATES_SWITCHOVER_ACK.join('.')} or later (it negotiates switchover-ack for non-tunnelled migrations), or turn on return-path and switchover-ack on both QEMUs before the source starts sending (migrate-set-capabilities).`);
    }
  }
  const v = parseVersion(inp.qemuVersion);
  if (v && !atLeast(v, 10, 0)) {
    lever('lever-multifd', 'source', 'n/a', `multifd device state needs QEMU 10.0 (have ${inp.qemuVersion})`, '');
  } else if (inp.hostdevs.length > 0) {
    const on = caps?.multifd === true || inp.parallel;
    lever('lever-multifd', 'source', on, `multifd ${on ? 'on' : 'off'}: device state ${on ? 'travels on parallel channels' : 'goes through the main channel, one device after another'}`, 'Migrate with virsh migrate --parallel (multifd): QEMU 10 then sends device state in parallel.');
  }
  const prediction: DowntimePrediction = {
    deviceMs: p.deviceMs,
    ramMs: p.ramMs,
    totalMs: p.totalMs,
    limitMs: p.limitMs,
    linkBytesPerSec: p.linkBytesPerSec,
    deviceBytes: p.deviceBytes,
    unknownDevices: p.unknownDevices,
    ramBasis: p.ramBasis,
  };
  return { checks, prediction };
}
