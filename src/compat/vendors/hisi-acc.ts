// hisi_acc (HiSilicon SEC/HPRE/ZIP VFs on hisi_acc_vfio_pci).
//
// What operators trip over:
//   - The driver has no P2P state (flags STOP_COPY|PRE_COPY, never P2P). QEMU migrates
//     several VFIO devices of one VM only if all of them support P2P, so a VM with a
//     hisi_acc VF can migrate only when that VF is its only VFIO device (no second
//     hisi_acc VF, no NIC VF beside it).
//   - Only VFs on QM hardware v3 and later have migration; on older hardware the driver
//     behaves like plain vfio-pci and GET MIGRATION fails.

import type { DeviceDescriptor } from '../types.ts';
import { fail, pass, warn, migrationRefused, type VendorContext, type VendorFinding, type VendorModule } from './types.ts';

const DRIVER = 'hisi_acc_vfio_pci';

export const hisiAcc: VendorModule = {
  name: 'hisi_acc',
  applies: (d) => d.driver === DRIVER,
  findings(src, dst, context) {
    const out: VendorFinding[] = [];
    if (migrationRefused(src)) {
      out.push(fail('hisi_acc-migration', `${src.id} refused GET MIGRATION: hisi_acc VFs support migration only on QM hardware v3 and later; this VM cannot be live-migrated with it`));
    }
    const p2p = src.migration ? (src.migration.flags & 2) !== 0 : false;
    const others = context.vmDevices?.filter((d) => d.id !== src.id);
    if (p2p) {
      out.push(pass('hisi_acc-p2p', `${src.id} reports P2P (${src.migration!.flagNames.join('|')}): several VFIO devices per VM are possible`));
    } else if (others === undefined) {
      out.push(warn('hisi_acc-p2p', `${src.id} has no P2P state (hisi_acc never has): QEMU migrates a VM with it only if it is the VM's only VFIO device - do not assign a second VFIO device (another hisi_acc VF, a NIC VF) to this VM`));
    } else if (others.length > 0) {
      out.push(
        fail(
          'hisi_acc-p2p',
          `${src.id} has no P2P state and the VM has ${others.length} other VFIO device(s) (${others.map((d) => d.id).join(', ')}): QEMU blocks migration of several VFIO devices unless all support P2P - give each hisi_acc VF its own VM, or detach the other devices before migrating`,
        ),
      );
    } else {
      out.push(pass('hisi_acc-p2p', `${src.id} has no P2P state but is the VM's only VFIO device, which QEMU allows`));
    }
    if (dst && dst.driver !== DRIVER) out.push(fail('hisi_acc-destination-driver', `the destination ${dst.id} is bound to ${dst.driver ?? 'no driver'}, not ${DRIVER}`));
    return out;
  },
};

/** The hisi_acc findings; `context.vmDevices` turns the one-per-VM warning into a verdict. */
export function hisiAccFindings(source: DeviceDescriptor, destination?: DeviceDescriptor, context: VendorContext = {}): VendorFinding[] {
  return hisiAcc.findings(source, destination, context);
}
