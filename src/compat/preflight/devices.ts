// Per-device checks on the source: each hostdev is bound to a VFIO variant driver with
// migration, its flags were recorded (the capability cache: a running QEMU holds the
// device, so it cannot be asked now), and with more than one device every one has P2P.

import { check, formatBytes, type Check } from './types.ts';
import type { VfioHostdev } from './domain-view.ts';
import type { FactDevice } from './facts.ts';
import { UNKNOWN_FLAG } from './compat-port.ts';

export function findDevice(devices: FactDevice[], id: string): FactDevice | undefined {
  return devices.find((d) => d.id === id.toLowerCase());
}

/** Driver and recorded capability of one hostdev. */
export function deviceCapabilityCheck(h: VfioHostdev, dev: FactDevice | undefined): Check {
  const id = 'device-capability';
  if (!dev) {
    return check(id, 'devices', h.label, 'fail', `${h.device} is not a VFIO device on this host (absent, or bound to a host driver)`, 'Bind it to its VFIO variant driver with vfio-mig bind, or fix the hostdev address in the domain XML.');
  }
  if (dev.kind === 'pci' && dev.driver === 'vfio-pci') {
    return check(id, 'devices', h.label, 'fail', `${h.device} is bound to plain vfio-pci, which has no migration support`, `Bind it to its variant driver (vfio-mig bind --device ${h.device}), or set <driver model='...'/> on the hostdev (libvirt 10+).`);
  }
  const cap = dev.capabilities;
  if (!cap.ok) {
    return check(id, 'devices', h.label, 'fail', `driver ${dev.driver ?? '-'}: no recorded migration capability (${cap.reason})`, 'Record it: bind the device with vfio-mig bind while no VM holds it (the capability is probed at bind time).');
  }
  if (!cap.flags.includes('STOP_COPY')) {
    return check(id, 'devices', h.label, 'fail', `driver ${dev.driver ?? '-'}: migration flags ${cap.flags.join('|') || 'none'} lack STOP_COPY`, 'Use a driver and firmware with VFIO migration v2 (STOP_COPY); this device cannot migrate.');
  }
  const size = cap.stopCopyBytes === null ? 'stop-copy size unknown' : `stop-copy ~${formatBytes(cap.stopCopyBytes)}`;
  const unknown = cap.flags.filter((f) => UNKNOWN_FLAG.test(f));
  if (unknown.length > 0) {
    // Only 1, 3, 5 and 7 are defined; a driver setting other bits is newer than this uAPI, or wrong.
    return check(id, 'devices', h.label, 'warn', `driver ${dev.driver ?? '-'}, flags ${cap.flags.join('|')}: bits the VFIO uAPI does not define`, 'Check the driver against its release notes; QEMU ignores bits it does not know, so the migration relies on STOP_COPY alone.');
  }
  return check(id, 'devices', h.label, 'pass', `driver ${dev.driver ?? '-'}, flags ${cap.flags.join('|')}, ${size}`, 'Nothing to do.');
}

/** With several VFIO devices QEMU needs P2P on every one (else it installs a migration blocker). */
export function p2pCheck(hostdevs: VfioHostdev[], devices: FactDevice[]): Check {
  const id = 'multi-device-p2p';
  if (hostdevs.length <= 1) return check(id, 'devices', 'domain', 'pass', `${hostdevs.length} VFIO device${hostdevs.length === 1 ? '' : 's'}: P2P not required`, 'Nothing to do.');
  const missing: string[] = [];
  const unknown: string[] = [];
  for (const h of hostdevs) {
    const cap = findDevice(devices, h.device)?.capabilities;
    if (!cap || !cap.ok) unknown.push(h.label);
    else if (!cap.flags.includes('P2P')) missing.push(h.label);
  }
  if (missing.length > 0) {
    return check(id, 'devices', 'domain', 'fail', `${hostdevs.length} VFIO devices; without P2P: ${missing.join(', ')}`, 'Migrate those devices in a separate VM, or use drivers/firmware that offer P2P: QEMU refuses several devices unless all have it.');
  }
  if (unknown.length > 0) {
    return check(id, 'devices', 'domain', 'warn', `${hostdevs.length} VFIO devices; P2P unknown for: ${unknown.join(', ')}`, 'Record their capabilities with vfio-mig bind; every device of a multi-device VM needs P2P.');
  }
  return check(id, 'devices', 'domain', 'pass', `${hostdevs.length} VFIO devices, all with P2P`, 'Nothing to do.');
}
