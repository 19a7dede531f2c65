// Version floors, on both ends of a migration.
//  - QEMU: VFIO migration v2 became non-experimental in 8.1; several VFIO devices in one
//    VM need 8.2 (the prepare pass that takes every device to RUNNING_P2P before any is
//    stopped); VFIO_MIGRATION events need 9.1; device state over multifd needs 10.0.
//  - Linux: the VFIO migration v2 uAPI is in 5.18 and later.
//  - libvirt: 8.6 asks QEMU for migration blockers instead of refusing every PCI hostdev;
//    10.0 picks VFIO variant drivers itself for managed='yes' hostdevs. Older libvirt needs
//    managed='no' hostdevs already bound to their variant driver (vfio-mig bind).

import { check, type Check } from './types.ts';

export interface Version {
  major: number;
  minor: number;
  micro: number;
}

/** "10.0.2", "6.12.95+deb12-amd64", "11.3.0" -> numbers; undefined when not a version. */
export function parseVersion(s: string | null | undefined): Version | undefined {
  const m = s ? /^v?([0-9]{1,4})\.([0-9]{1,4})(?:\.([0-9]{1,6}))?/.exec(s.trim()) : null;
  if (!m) return undefined;
  return { major: Number(m[1]), minor: Number(m[2]), micro: Number(m[3] ?? 0) };
}

export function atLeast(v: Version, major: number, minor: number): boolean {
  return v.major > major || (v.major === major && v.minor >= minor);
}

export const fmt = (v: Version): string => `${v.major}.${v.minor}.${v.micro}`;

export const QEMU_MIGRATION_V2 = [8, 1] as const;
export const QEMU_MULTI_DEVICE = [8, 2] as const;
export const QEMU_VFIO_EVENTS = [9, 1] as const;
export const KERNEL_MIGRATION_V2 = [5, 18] as const;
export const LIBVIRT_BLOCKERS = [8, 6] as const;
export const LIBVIRT_VARIANT_DRIVERS = [10, 0] as const;

/** QEMU of one end (the running domain's on the source, the hypervisor's on the destination). */
export function qemuVersionCheck(side: 'source' | 'destination', raw: string | undefined, error: string | undefined, vfioDevices: number): Check {
  const id = 'qemu-version';
  const v = parseVersion(raw);
  if (!v) {
    return check(id, 'versions', side, 'warn', `QEMU version unknown${error ? `: ${error}` : ''}`, `Check the ${side}'s QEMU by hand (virsh version): VFIO migration needs QEMU 8.1, or 8.2 for several devices.`);
  }
  if (vfioDevices > 0 && !atLeast(v, ...QEMU_MIGRATION_V2)) {
    return check(id, 'versions', side, 'fail', `QEMU ${fmt(v)}: VFIO migration v2 needs 8.1 or later`, `Upgrade QEMU on the ${side} to 8.1 or later (on Debian 12: qemu-system-x86 from bookworm-backports).`);
  }
  if (vfioDevices > 1 && !atLeast(v, ...QEMU_MULTI_DEVICE)) {
    return check(id, 'versions', side, 'fail', `QEMU ${fmt(v)} with ${vfioDevices} VFIO devices: several devices per VM need 8.2 (P2P ordering)`, `Upgrade QEMU on the ${side} to 8.2 or later, or migrate a VM with one VFIO device.`);
  }
  const events = atLeast(v, ...QEMU_VFIO_EVENTS) ? '' : '; no VFIO_MIGRATION events before 9.1, so the switchover cannot be observed per device';
  return check(id, 'versions', side, 'pass', `QEMU ${fmt(v)}${events}`, events ? 'Nothing blocks; QEMU 9.1 or later adds per-device migration events.' : 'Nothing to do.');
}

export function kernelVersionCheck(side: 'source' | 'destination', release: string | undefined, error?: string): Check {
  const id = 'kernel-version';
  const v = parseVersion(release);
  if (!v) return check(id, 'versions', side, 'warn', `kernel release unknown${error ? `: ${error}` : ''}`, `Check the ${side}'s kernel by hand (uname -r): VFIO migration v2 needs Linux 5.18 or later.`);
  if (!atLeast(v, ...KERNEL_MIGRATION_V2)) {
    return check(id, 'versions', side, 'fail', `Linux ${release}: the VFIO migration v2 uAPI needs 5.18 or later`, `Boot the ${side} into Linux 5.18 or later (on Debian 12: linux-image-amd64 from bookworm-backports).`);
  }
  return check(id, 'versions', side, 'pass', `Linux ${release}`, 'Nothing to do.');
}

export interface HostdevBinding {
  label: string;
  /** managed='yes' (libvirt binds the driver). */
  managed: boolean | undefined;
  /** The driver the host device is bound to now, when known. */
  driver: string | undefined;
  /** Whether that driver is a VFIO variant driver with migration (not plain vfio-pci). */
  variantBound: boolean;
}

/** libvirt of one end, given how the hostdevs are set up. */
export function libvirtVersionCheck(side: 'source' | 'destination', raw: string | undefined, error: string | undefined, hostdevs: HostdevBinding[]): Check {
  const id = 'libvirt-version';
  const v = parseVersion(raw);
  if (!v) return check(id, 'versions', side, 'warn', `libvirt version unknown${error ? `: ${error}` : ''}`, `Check the ${side}'s libvirt by hand (virsh version): 10.0 or later picks variant drivers itself.`);
  if (hostdevs.length > 0 && !atLeast(v, ...LIBVIRT_BLOCKERS)) {
    return check(id, 'versions', side, 'fail', `libvirt ${fmt(v)} refuses to migrate any domain with a PCI hostdev (QEMU's own blockers are asked only from 8.6)`, `Upgrade libvirt on the ${side} to 10.0 or later (on Debian 12: from bookworm-backports).`);
  }
  if (hostdevs.length > 0 && !atLeast(v, ...LIBVIRT_VARIANT_DRIVERS)) {
    const managed = hostdevs.filter((h) => h.managed === true).map((h) => h.label);
    const unbound = hostdevs.filter((h) => !h.variantBound).map((h) => h.label);
    if (managed.length > 0) {
      return check(id, 'versions', side, 'fail', `libvirt ${fmt(v)} binds managed='yes' hostdevs to plain vfio-pci (no migration): ${managed.join(', ')}`, `Set managed='no' on those hostdevs and bind them with vfio-mig bind, or upgrade libvirt to 10.0.`);
    }
    if (side === 'source' && unbound.length > 0) {
      return check(id, 'versions', side, 'fail', `libvirt ${fmt(v)} with hostdevs not bound to a variant driver: ${unbound.join(', ')}`, 'Bind them to their variant driver with vfio-mig bind before the domain starts.');
    }
    return check(id, 'versions', side, 'pass', `libvirt ${fmt(v)}: managed='no' hostdevs, pre-bound`, 'Nothing to do; keep the devices bound with vfio-mig bind (boot unit and udev rule).');
  }
  return check(id, 'versions', side, 'pass', `libvirt ${fmt(v)}`, 'Nothing to do.');
}
