// What a vendor module gets and gives. Each module knows one driver family's operator
// pitfalls that no generic rule catches, and says what to do about them.

import type { DeviceDescriptor } from '../types.ts';

export interface VendorFinding {
  verdict: 'pass' | 'warn' | 'fail';
  /** A short name of what was checked, e.g. `mlx5-firmware-version`. */
  check: string;
  /** What was seen and what to do; the values compared are in it. */
  advice: string;
}

/** What the caller knows beyond one device pair. */
export interface VendorContext {
  /** Every VFIO device of the VM (the source device included), when known. */
  vmDevices?: DeviceDescriptor[];
}

export interface VendorModule {
  name: string;
  /** Whether this module has something to say about the device (by its driver). */
  applies(d: DeviceDescriptor): boolean;
  findings(source: DeviceDescriptor, destination: DeviceDescriptor | undefined, context: VendorContext): VendorFinding[];
}

export const pass = (check: string, advice: string): VendorFinding => ({ verdict: 'pass', check, advice });
export const warn = (check: string, advice: string): VendorFinding => ({ verdict: 'warn', check, advice });
export const fail = (check: string, advice: string): VendorFinding => ({ verdict: 'fail', check, advice });

/** Whether GET MIGRATION was refused when the device was last probed (cache or live). */
export function migrationRefused(d: DeviceDescriptor): boolean {
  return d.migration === null && /refused GET MIGRATION|GET MIGRATION refused/.test(d.migrationNote ?? '');
}
