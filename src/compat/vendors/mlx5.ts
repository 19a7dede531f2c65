// mlx5 (NVIDIA ConnectX-7 / BlueField-3 VFs on mlx5_vfio_pci).
//
// What operators trip over:
//   - The VF must be made migratable on the PF's eswitch before it is used: devlink's
//     port function capability `migratable` (`devlink port function set pci/<PF>/<port>
//     migratable enable`), which the kernel accepts only while the VF is not bound to a
//     driver. Without it mlx5_vfio_pci binds fine but registers no migration support:
//     GET MIGRATION fails (ENOTTY) and QEMU blocks migration. The capability lives in
//     devlink (netlink): sysfs does not show it. What sysfs does show is its effect: the
//     VF's migration flags, which vfio-mig probes when it binds the VF (capability cache).
//     The firmware must also allow VF migration (mlxconfig VF_MIGRATION_MODE), again not
//     visible in sysfs.
//   - NVIDIA requires the same firmware version and PSID on both hosts. Both are in
//     devlink info (netlink); sysfs shows them only through the PF's RDMA device
//     (infiniband/mlx5_N/fw_ver and board_id) when mlx5_ib is loaded.

import type { DeviceDescriptor } from '../types.ts';
import { fail, pass, warn, migrationRefused, type VendorFinding, type VendorModule } from './types.ts';

const DRIVER = 'mlx5_vfio_pci';

function pf(d: DeviceDescriptor): string {
  return d.physfn ?? '<PF>';
}

function migratable(src: DeviceDescriptor): VendorFinding {
  const how = `set it while the VF is unbound: unbind ${src.id}, run \`devlink port function set pci/${pf(src)}/<port of this VF> migratable enable\` (the port is in \`devlink port show\`), bind it to ${DRIVER} again (vfio-mig bind), and make sure the firmware allows VF migration (mlxconfig VF_MIGRATION_MODE)`;
  if (src.migration && src.migration.flags & 1) {
    return pass('mlx5-migratable', `${src.id} reports migration flags ${src.migration.flagNames.join('|')} (probed ${src.migration.probedAt}), so its devlink \`migratable\` capability was set when it was bound`);
  }
  if (migrationRefused(src)) {
    return fail('mlx5-migratable', `${src.id} refused GET MIGRATION: mlx5_vfio_pci registers migration only for VFs whose devlink port function capability \`migratable\` is enabled - ${how}`);
  }
  return warn(
    'mlx5-migratable',
    `whether ${src.id} is migratable cannot be seen in sysfs (the devlink port function capability is read over netlink) and its migration flags are not known (${src.migrationNote ?? 'not probed'}); run \`vfio-mig probe ${src.id}\` while it is idle, or check \`devlink port show\` for "migratable enable"; if it is off, ${how}`,
  );
}

function sameOnBoth(check: string, what: string, a: string | null, b: string | null, src: DeviceDescriptor, dst: DeviceDescriptor | undefined): VendorFinding {
  const how = `compare \`devlink dev info pci/<PF>\` (fw.version, fw.psid) on both hosts, or load mlx5_ib on the PFs so vfio-mig can read infiniband/*/fw_ver and board_id`;
  if (a === null) return warn(check, `the ${what} of ${src.id} is not readable from sysfs (${src.firmware.note}); NVIDIA requires the same ${what} on both hosts: ${how}`);
  if (!dst) return pass(check, `source ${what} ${a}; the destination VF's PF must have the same ${what}`);
  if (b === null) return warn(check, `source ${what} ${a}; the destination's ${what} of ${dst.id} is not readable from sysfs (${dst.firmware.note}): ${how}`);
  if (a !== b) return fail(check, `${what} differs: source ${a}, destination ${b}; NVIDIA supports mlx5 VF migration only between identical ${what}s - update the firmware (or pick a destination host whose adapter matches)`);
  return pass(check, `same ${what} on both ends (${a})`);
}

export const mlx5: VendorModule = {
  name: 'mlx5',
  applies: (d) => d.driver === DRIVER,
  findings(src, dst) {
    const out: VendorFinding[] = [migratable(src)];
    if (dst && dst.driver !== DRIVER) out.push(fail('mlx5-destination-driver', `the destination ${dst.id} is bound to ${dst.driver ?? 'no driver'}, not ${DRIVER}: set its \`migratable\` capability while unbound, then bind it to ${DRIVER}`));
    else if (dst) out.push(migratable(dst));
    out.push(sameOnBoth('mlx5-firmware-version', 'firmware version', src.firmware.version, dst?.firmware.version ?? null, src, dst));
    out.push(sameOnBoth('mlx5-psid', 'PSID', src.firmware.psid, dst?.firmware.psid ?? null, src, dst));
    return out;
  },
};

/** The mlx5 findings for a source VF and, when known, its destination VF. */
export function mlx5Findings(source: DeviceDescriptor, destination?: DeviceDescriptor): VendorFinding[] {
  return mlx5.findings(source, destination, {});
}
