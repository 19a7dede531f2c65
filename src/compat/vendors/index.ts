// Vendor checks, picked by the device's driver: operator pitfalls of one driver family
// that the generic rules (migration_version, descriptor comparison) cannot see. Each
// module is small and owns one family: mlx5.ts, hisi-acc.ts, nvidia.ts.
//
// `vfio-mig preflight` calls vendorFindings(source, destination?) per hostdev; the
// descriptors may come from another host, so they are validated first.

import { validateDescriptor, type DeviceDescriptor } from '../types.ts';
import { mlx5 } from './mlx5.ts';
import { hisiAcc } from './hisi-acc.ts';
import { nvidia } from './nvidia.ts';
import { warn, type VendorContext, type VendorFinding, type VendorModule } from './types.ts';

export type { VendorFinding, VendorContext, VendorModule } from './types.ts';

export const VENDOR_MODULES: readonly VendorModule[] = [mlx5, hisiAcc, nvidia];

/** The modules that apply to a device (by its driver; NVIDIA by its vGPU attributes too). */
export function modulesFor(d: DeviceDescriptor): VendorModule[] {
  return VENDOR_MODULES.filter((m) => m.applies(d));
}

/**
 * Findings for one source device and, when known, the destination device it would
 * migrate to. `context.vmDevices` (every VFIO device of the VM) lets checks that depend
 * on the VM as a whole (hisi_acc: one such device per VM) give a verdict instead of a
 * warning. A device no module knows gets no findings.
 */
export function vendorFindings(source: unknown, destination?: unknown, context: VendorContext = {}): VendorFinding[] {
  let src: DeviceDescriptor;
  try {
    src = validateDescriptor(source);
  } catch (err) {
    return [warn('vendor-descriptor', `vendor checks skipped: the source ${(err as Error).message}`)];
  }
  const out: VendorFinding[] = [];
  let dst: DeviceDescriptor | undefined;
  if (destination !== undefined && destination !== null) {
    try {
      dst = validateDescriptor(destination);
    } catch (err) {
      out.push(warn('vendor-descriptor', `destination checks skipped: the destination ${(err as Error).message}`));
    }
  }
  const vmDevices = context.vmDevices?.flatMap((d) => {
    try {
      return [validateDescriptor(d)];
    } catch {
      return [];
    }
  });
  for (const m of modulesFor(src)) out.push(...m.findings(src, dst, vmDevices ? { vmDevices } : {}));
  return out;
}
