// Collects this host's facts (facts.ts): kernel and its config, libvirt and QEMU versions
// (when a libvirt URI is given), every VFIO device with its recorded capabilities and
// whether a VM holds it, and - for source descriptors sent by a peer - which devices here
// are compatible (the migration_version write test, through checkCompatibility).

import { closeSync, constants, openSync, readFileSync } from 'node:fs';
import { hostname } from 'node:os';
import * as sysfs from '../../host/sysfs.ts';
import type { CompatPort, CompatTarget } from './compat-port.ts';
import { HOST_FACTS_SCHEMA, type CompatAnswer, type CompatQuery, type FactDevice, type HostFacts } from './facts.ts';
import { configHas, kernelRelease, readKernelConfig } from './kernel-config.ts';

export interface CollectOptions {
  compat: CompatPort;
  /** Source descriptors to test against this host's devices. */
  queries?: CompatQuery[];
  /** A libvirt URI of this host, for the libvirt and QEMU versions. */
  libvirtUri?: string;
  /** Whether a VFIO group is held open (tests replace it); null when it cannot be told. */
  groupInUse?: (group: number) => boolean | null;
}

/** Opens the group node: EBUSY means a VM (or another VFIO user) holds it. Our open is closed at once. */
export function vfioGroupInUse(group: number): boolean | null {
  let fd: number;
  try {
    fd = openSync(sysfs.vfioGroupPath(group), constants.O_RDWR | constants.O_NONBLOCK);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    return code === 'EBUSY' ? true : null;
  }
  closeSync(fd);
  return false;
}

/** mdev types with room for another instance (available_instances > 0), on every parent. */
export function mdevTypesAvailable(): Array<{ parent: string; mdevType: string; available: number }> {
  const out: Array<{ parent: string; mdevType: string; available: number }> = [];
  for (const parent of sysfs.listMdevParents()) {
    for (const mdevType of sysfs.mdevTypesOf(parent)) {
      try {
        const available = Number(readFileSync(sysfs.mdevTypeAttrPath(parent, mdevType, 'available_instances'), 'utf8').trim());
        if (Number.isSafeInteger(available) && available > 0) out.push({ parent, mdevType, available });
      } catch {
        // no count: not offered
      }
    }
  }
  return out;
}

async function versions(uri: string | undefined): Promise<Pick<HostFacts, 'libvirt' | 'qemu'>> {
  if (!uri) {
    const why = 'not asked (give host-facts --uri)';
    return { libvirt: { version: null, error: why }, qemu: { version: null, error: why } };
  }
  try {
    const { Connection } = await import('../../libvirt/binding.ts');
    const conn = Connection.open(uri);
    try {
      return { libvirt: { version: conn.libVersion() }, qemu: { version: conn.hypervisorVersion() } };
    } finally {
      conn.close();
    }
  } catch (err) {
    const msg = err instanceof Error ? err.message : String(err);
    return { libvirt: { version: null, error: msg }, qemu: { version: null, error: msg } };
  }
}

let groupProbe: ((group: number) => boolean | null) | undefined;

/** Tests: replace the VFIO group probe (undefined restores the real one). */
export function setGroupInUseProbe(probe: ((group: number) => boolean | null) | undefined): void {
  groupProbe = probe;
}

export async function collectHostFacts(opts: CollectOptions): Promise<HostFacts> {
  const inUse = opts.groupInUse ?? groupProbe ?? vfioGroupInUse;
  const release = kernelRelease();
  const cfg = readKernelConfig(release);
  const ids: sysfs.DeviceId[] = [
    ...sysfs.listPciDevices().map((bdf) => ({ kind: 'pci', bdf }) as const).filter((id) => sysfs.isVfioBound(id)),
    ...sysfs.listMdevs().map((uuid) => ({ kind: 'mdev', uuid }) as const),
  ];
  const devices: FactDevice[] = [];
  for (const id of ids) {
    const name = sysfs.deviceIdString(id);
    const group = sysfs.iommuGroupOf(id) ?? null;
    const d: FactDevice = {
      id: name,
      kind: id.kind,
      driver: sysfs.driverOf(id) ?? null,
      iommuGroup: group,
      inUse: group === null ? null : inUse(group),
      capabilities: await opts.compat.readCapabilities(name),
    };
    if (id.kind === 'pci') {
      const v = sysfs.readDeviceAttr(id, 'vendor')?.replace(/^0x/, '');
      const dv = sysfs.readDeviceAttr(id, 'device')?.replace(/^0x/, '');
      if (v) d.vendor = v;
      if (dv) d.device = dv;
    } else {
      const t = sysfs.mdevTypeOf(id);
      if (t) d.mdevType = t;
    }
    devices.push(d);
  }
  const compatibility: CompatAnswer[] = [];
  const newMdevs = (opts.queries ?? []).length > 0 ? mdevTypesAvailable() : [];
  for (const q of opts.queries ?? []) {
    const answer: CompatAnswer = { key: q.key, candidates: [] };
    try {
      // Only devices of the source's kind are offered: a VF never takes an mdev's state.
      const kind = (q.descriptor as { kind?: unknown } | null)?.kind;
      const targets: Array<{ target: CompatTarget; label: string; free: boolean }> = [
        ...devices.filter((d) => kind === undefined || d.kind === kind).map((d) => ({ target: d.id, label: d.id, free: d.inUse !== true })),
        ...(kind === 'pci' ? [] : newMdevs.map((m) => ({ target: { parent: m.parent, mdevType: m.mdevType }, label: `new mdev ${m.mdevType} on ${m.parent}`, free: true }))),
      ];
      for (const t of targets) {
        const v = await opts.compat.checkCompatibility(q.descriptor, t.target);
        let descriptor: unknown;
        if (v.compatible && typeof t.target === 'string') {
          try {
            descriptor = await opts.compat.describeDevice(t.target);
          } catch {
            // the vendor checks then see the source only
          }
        }
        answer.candidates.push({ target: t.label, free: t.free, ...v, ...(descriptor !== undefined ? { descriptor } : {}) });
      }
    } catch (err) {
      answer.error = err instanceof Error ? err.message : String(err);
    }
    compatibility.push(answer);
  }
  return {
    schema: HOST_FACTS_SCHEMA,
    hostname: hostname(),
    collectedAt: new Date().toISOString(),
    kernel: { release },
    kernelConfig: { source: cfg.source, iommufdDriver: configHas(cfg, 'CONFIG_IOMMUFD_DRIVER'), ...(cfg.error ? { error: cfg.error } : {}) },
    ...(await versions(opts.libvirtUri)),
    devices,
    compatibility,
  };
}
