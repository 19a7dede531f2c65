// Vendor-specific findings (mlx5, hisi_acc, NVIDIA vGPU: firmware, PSID, migration mode,
// ...) come from src/compat/vendors through the compat port; here they become checks.

import { check, type Check } from './types.ts';
import type { CompatPort } from './compat-port.ts';
import type { VfioHostdev } from './domain-view.ts';

export async function vendorChecks(compat: CompatPort, h: VfioHostdev, source: unknown, vmDevices: unknown[], destination?: unknown): Promise<Check[]> {
  try {
    const found = await compat.vendorFindings(source, destination, { vmDevices });
    return found.map((f) => check(`vendor-${f.check}`, 'vendor', h.label, f.verdict, f.check, f.advice || 'Nothing to do.'));
  } catch (err) {
    return [check('vendor', 'vendor', h.label, 'warn', `vendor checks failed: ${err instanceof Error ? err.message : String(err)}`, 'Check the device against its vendor\'s live-migration requirements by hand.')];
  }
}
