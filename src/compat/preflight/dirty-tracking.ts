// Dirty-page tracking with VFIO devices, and the convergence trap of pinned devices.
//
// 1. A device whose driver reports dirty pages itself (DMA logging: mlx5, pds, the mtty
//    sample) makes QEMU use device dirty tracking. The kernel side of that report
//    (iova_bitmap) exists only with CONFIG_IOMMUFD_DRIVER; without it every report fails
//    with EOPNOTSUPP and the migration fails at RAM setup. The way around it is
//    `x-device-dirty-page-tracking=off`, which needs `enable-migration=on` as well
//    (with the default `auto` QEMU installs a migration blocker instead).
// 2. A PCI device assigned through the type1 IOMMU pins all guest RAM. When neither the
//    device nor the IOMMU tracks dirty pages, type1 reports every pinned page dirty at
//    each sync: pre-copy resends all RAM forever and never converges. Either
//    `x-pre-copy-dirty-page-tracking=off` (RAM goes once, in stop-copy) or the migration
//    parameter `avail-switchover-bandwidth` (QEMU >= 8.2) lets it switch over.

import { check, type Check } from './types.ts';
import { boolProp, type VfioHostdev } from './domain-view.ts';
import type { FactDevice } from './facts.ts';

/** Drivers known to implement device DMA logging (they select CONFIG_IOMMUFD_DRIVER in Kconfig). */
export const DMA_LOGGING_DRIVERS: ReadonlySet<string> = new Set(['mlx5_vfio_pci', 'mlx5-vfio-pci', 'pds_vfio_pci', 'pds-vfio-pci']);

const PROPS = `<qemu:override> properties x-device-dirty-page-tracking=off and enable-migration=on`;

/** One hostdev: is the dirty tracking QEMU will pick going to work on this kernel? */
export function dirtyTrackingCheck(h: VfioHostdev, iommufdDriver: boolean | null, dev: FactDevice | undefined, side = 'source'): Check {
  const id = 'dirty-tracking';
  const deviceTracking = boolProp(h, 'x-device-dirty-page-tracking');
  const enable = h.properties.get('enable-migration')?.toLowerCase();
  if (deviceTracking === false) {
    if (boolProp(h, 'enable-migration') === true) {
      return check(id, 'dirty-tracking', h.label, 'pass', 'device dirty tracking off (x-device-dirty-page-tracking=off, enable-migration=on): the IOMMU container tracks', 'Nothing to do.');
    }
    return check(id, 'dirty-tracking', h.label, 'fail', `x-device-dirty-page-tracking=off with enable-migration=${enable ?? 'auto'}: QEMU installs a migration blocker ("doesn't support device and IOMMU dirty tracking")`, `Add enable-migration=on next to x-device-dirty-page-tracking=off (a <qemu:override> property of ${h.alias}).`);
  }
  if (iommufdDriver === true) {
    return check(id, 'dirty-tracking', h.label, 'pass', `the ${side} kernel has CONFIG_IOMMUFD_DRIVER: device dirty reports work`, 'Nothing to do.');
  }
  const known = iommufdDriver === false ? `the ${side} kernel lacks CONFIG_IOMMUFD_DRIVER, so device dirty reports fail (EOPNOTSUPP)` : `the ${side} kernel's config could not be read`;
  if (h.kind === 'mdev' || (dev?.driver !== undefined && dev?.driver !== null && DMA_LOGGING_DRIVERS.has(dev.driver))) {
    return check(id, 'dirty-tracking', h.label, iommufdDriver === false ? 'fail' : 'warn', `${known}; a ${h.kind === 'mdev' ? 'mediated device' : `${dev?.driver} device`} reports dirty pages itself, so the migration fails at RAM setup`, `Boot a kernel with CONFIG_IOMMUFD_DRIVER, or add the ${PROPS} for ${h.alias}.`);
  }
  return check(id, 'dirty-tracking', h.label, 'warn', `${known}; if driver ${dev?.driver ?? '?'} reports dirty pages itself the migration fails at RAM setup (otherwise the type1 IOMMU tracks)`, `Add the ${PROPS} for ${h.alias} to be sure, or boot a kernel with CONFIG_IOMMUFD_DRIVER.`);
}

export interface PinnedAnalysis {
  /** PCI hostdevs whose pinned RAM the type1 IOMMU reports as all dirty. */
  allDirty: VfioHostdev[];
  /** Fixed by x-pre-copy-dirty-page-tracking=off on every such device. */
  precopyTrackingOff: boolean;
  /** Fixed by the avail-switchover-bandwidth migration parameter (bytes/s, > 0). */
  availSwitchoverBandwidth: number | undefined;
}

/** Which pinned devices will have all of guest RAM reported dirty at every sync. */
export function analysePinned(hostdevs: VfioHostdev[], devices: FactDevice[], iommufdDriver: boolean | null, availSwitchoverBandwidth: number | undefined): PinnedAnalysis {
  const allDirty = hostdevs.filter((h) => {
    if (h.kind !== 'pci') return false; // mdevs behind an emulated IOMMU pin nothing
    const driver = devices.find((d) => d.id === h.device)?.driver ?? '';
    const deviceTracks = iommufdDriver === true && DMA_LOGGING_DRIVERS.has(driver) && boolProp(h, 'x-device-dirty-page-tracking') !== false;
    return !deviceTracks;
  });
  return {
    allDirty,
    precopyTrackingOff: allDirty.length > 0 && allDirty.every((h) => boolProp(h, 'x-pre-copy-dirty-page-tracking') === false),
    availSwitchoverBandwidth: availSwitchoverBandwidth !== undefined && availSwitchoverBandwidth > 0 ? availSwitchoverBandwidth : undefined,
  };
}

export function pinnedConvergenceCheck(p: PinnedAnalysis): Check {
  const id = 'pinned-convergence';
  if (p.allDirty.length === 0) return check(id, 'dirty-tracking', 'domain', 'pass', 'no pinned device without dirty tracking', 'Nothing to do.');
  const names = p.allDirty.map((h) => h.label).join(', ');
  if (p.precopyTrackingOff) {
    return check(id, 'dirty-tracking', 'domain', 'pass', `pinned devices (${names}) with x-pre-copy-dirty-page-tracking=off: guest RAM goes once, during downtime`, 'Nothing blocks; the downtime prediction counts all guest RAM.');
  }
  if (p.availSwitchoverBandwidth !== undefined) {
    return check(id, 'dirty-tracking', 'domain', 'pass', `pinned devices (${names}); avail-switchover-bandwidth=${p.availSwitchoverBandwidth} B/s lets QEMU switch over`, 'Nothing blocks; the downtime prediction counts all guest RAM.');
  }
  return check(id, 'dirty-tracking', 'domain', 'fail', `pinned devices (${names}) without device dirty tracking: the type1 IOMMU reports all guest RAM dirty at every pass, so pre-copy never converges`, "Add <qemu:override> property x-pre-copy-dirty-page-tracking=off to those hostdevs, or set avail-switchover-bandwidth (virsh qemu-monitor-command '{\"execute\":\"migrate-set-parameters\",...}') before migrating.");
}
