// NVIDIA vGPU.
//
// Two models exist:
//   - mdev: a vGPU is an mdev of type nvidia-<id> on the GPU (or on one of its VFs);
//   - on kernels >= 6.8 with NVIDIA's vendor VFIO framework (vGPU 17 and later), a vGPU
//     is an SR-IOV VF whose type is chosen by writing a type id to
//     <VF>/nvidia/current_vgpu_type (0 = none); the VF itself is assigned.
// What operators trip over: the destination must offer the same vGPU type (same
// profile, e.g. GRID T4-2Q), the two models do not migrate into each other, and NVIDIA
// supports vGPU migration only between compatible host driver (vGPU manager) releases -
// in practice the same version on both ends. The host driver's version is the nvidia
// module's (/sys/module/nvidia/version).

import type { DeviceDescriptor } from '../types.ts';
import { fail, pass, warn, type VendorFinding, type VendorModule } from './types.ts';

const VF_TYPE = 'nvidia/current_vgpu_type';
const HOST_VERSION = 'module/nvidia/version';

function model(d: DeviceDescriptor): 'mdev' | 'vf' | 'other' {
  if (d.kind === 'mdev') return 'mdev';
  return d.vendorAttrs[VF_TYPE] !== undefined ? 'vf' : 'other';
}

function vgpuType(d: DeviceDescriptor): string | undefined {
  if (d.kind === 'mdev') return d.mdev?.type;
  return d.vendorAttrs[VF_TYPE];
}

function hostVersion(d: DeviceDescriptor): string | null {
  return d.vendorAttrs[HOST_VERSION] ?? d.mdev?.parentModuleVersion ?? (d.module === 'nvidia' ? d.moduleVersion : null) ?? null;
}

export const nvidia: VendorModule = {
  name: 'nvidia-vgpu',
  applies: (d) =>
    d.vendor === '10de' &&
    (d.kind === 'mdev' ? d.mdev?.parentDriver === 'nvidia' || /^nvidia/.test(d.driver ?? '') : d.vendorAttrs[VF_TYPE] !== undefined),
  findings(src, dst) {
    const out: VendorFinding[] = [];
    const t = vgpuType(src);
    if (model(src) === 'vf' && (t === undefined || t === '0')) {
      out.push(fail('nvidia-vgpu-type', `${src.id} has no vGPU type (${VF_TYPE} is ${t ?? 'missing'}): write a type id from nvidia/creatable_vgpu_types to it before assigning the VF`));
    } else if (!dst) {
      out.push(pass('nvidia-vgpu-type', `source vGPU type ${t}${src.mdev?.typeName ? ` (${src.mdev.typeName})` : ''} as ${model(src) === 'mdev' ? 'an mdev' : `a VF (${VF_TYPE})`}; the destination must offer the same type in the same model`));
    } else if (model(src) !== model(dst)) {
      out.push(
        fail(
          'nvidia-vgpu-model',
          `the source vGPU is ${model(src) === 'mdev' ? 'an mdev' : 'a VF with nvidia/current_vgpu_type'} (kernel ${src.kernel}), the destination ${model(dst) === 'mdev' ? 'an mdev' : model(dst) === 'vf' ? 'a VF with nvidia/current_vgpu_type' : 'not a vGPU'} (kernel ${dst.kernel}); on kernels >= 6.8 NVIDIA's vendor VFIO framework makes vGPUs VFs, not mdevs, and the two cannot migrate into each other - use hosts with the same kernel generation and vGPU release`,
        ),
      );
    } else if (t !== vgpuType(dst)) {
      out.push(fail('nvidia-vgpu-type', `different vGPU types: source ${t}, destination ${vgpuType(dst)}: create (or set) the same type on the destination`));
    } else {
      out.push(pass('nvidia-vgpu-type', `same vGPU type on both ends (${t})`));
    }
    const a = hostVersion(src);
    const b = dst ? hostVersion(dst) : null;
    if (a === null) out.push(warn('nvidia-host-driver', `the NVIDIA host driver version is not readable (/sys/module/nvidia/version): check \`nvidia-smi\` on both hosts; vGPU migration needs compatible vGPU manager releases`));
    else if (!dst) out.push(pass('nvidia-host-driver', `source host driver ${a}; the destination should run the same vGPU manager release`));
    else if (b === null) out.push(warn('nvidia-host-driver', `source host driver ${a}; the destination's is not readable: check \`nvidia-smi\` there`));
    else if (a !== b) out.push(fail('nvidia-host-driver', `host driver differs: source ${a}, destination ${b}; NVIDIA supports vGPU migration only between compatible vGPU manager releases - install the same release on both hosts`));
    else out.push(pass('nvidia-host-driver', `same host driver on both ends (${a})`));
    return out;
  },
};

/** The NVIDIA vGPU findings for a source vGPU and, when known, its destination. */
export function nvidiaFindings(source: DeviceDescriptor, destination?: DeviceDescriptor): VendorFinding[] {
  return nvidia.findings(source, destination, {});
}
