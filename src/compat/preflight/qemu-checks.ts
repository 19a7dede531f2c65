// What the running source QEMU itself says: its migration blockers (query-migrate's
// blocked-reasons, what libvirt turns into "cannot migrate domain: ..."), postcopy
// (QEMU refuses it with VFIO devices: they have no postcopy state), and a migration
// already under way.

import { check, type Check } from './types.ts';
import { capOn, type QemuFacts } from './qmp-facts.ts';

/** One sentence of advice for the blockers QEMU is known to install for VFIO devices. */
export function blockerAdvice(reason: string): string {
  if (/dirty tracking/i.test(reason)) return "Set enable-migration=on on that device (<qemu:override>), or boot a kernel whose IOMMU tracks dirty pages.";
  if (/only if all of them support P2P/i.test(reason)) return 'Give every VFIO device a driver with P2P, or keep one VFIO device per VM.';
  if (/not supported in kernel|doesn't support migration|does not support migration/i.test(reason)) return 'Bind the device to a VFIO variant driver with migration (vfio-mig bind), then restart the VM.';
  if (/vIOMMU/i.test(reason)) return 'Remove the vIOMMU from the VM or turn off device dirty tracking for that device.';
  if (/exceed/i.test(reason)) return 'Use the iommufd backend for VFIO, or give the VM less RAM.';
  return 'Remove the cause QEMU names (it is checked again when the migration starts).';
}

export function blockersCheck(q: QemuFacts): Check {
  const id = 'qemu-blockers';
  if (!q.migrate.ok) return check(id, 'qemu', 'source', 'warn', `query-migrate failed: ${q.migrate.error}`, 'Run virsh qemu-monitor-command DOMAIN \'{"execute":"query-migrate"}\' by hand and look for blocked-reasons.');
  const reasons = q.migrate.value['blocked-reasons'] ?? [];
  if (reasons.length === 0) return check(id, 'qemu', 'source', 'pass', 'query-migrate reports no blocked-reasons', 'Nothing to do.');
  return check(id, 'qemu', 'source', 'fail', `QEMU blocks migration: ${reasons.join('; ')}`, blockerAdvice(reasons[0]!));
}

export function postcopyCheck(q: QemuFacts | undefined, requested: boolean, vfioDevices: number): Check {
  const id = 'postcopy';
  const enabled = q ? capOn(q, 'postcopy-ram') === true : false;
  if (vfioDevices === 0) return check(id, 'qemu', 'source', 'pass', 'no VFIO devices', 'Nothing to do.');
  if (requested || enabled) {
    const how = requested ? 'postcopy requested (--postcopy)' : 'the postcopy-ram capability is on';
    return check(id, 'qemu', 'source', 'fail', `${how} with ${vfioDevices} VFIO device(s): QEMU refuses postcopy with VFIO devices`, 'Migrate without --postcopy (pre-copy only); turn the postcopy-ram capability off.');
  }
  return check(id, 'qemu', 'source', 'pass', 'pre-copy only', 'Nothing to do.');
}

export function inProgressCheck(q: QemuFacts): Check | undefined {
  if (!q.migrate.ok) return undefined;
  const st = q.migrate.value.status;
  if (st === undefined || ['none', 'completed', 'failed', 'cancelled'].includes(st)) return undefined;
  return check('migration-in-progress', 'qemu', 'source', 'warn', `a migration is already under way (status ${st})`, 'Wait for it to end (virsh domjobinfo) before starting another.');
}
