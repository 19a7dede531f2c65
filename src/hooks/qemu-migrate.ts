// `qemu <domain> migrate begin -` on the destination, before anything of the incoming
// migration exists. stdin is the migratable XML (it names the *source* host's devices);
// what we print on stdout replaces it (libvirt: empty output = unchanged). For each VFIO
// hostdev we pick a free local device that can load the source device's state, reserve
// it, and rewrite the source address (PCI address or mdev UUID) in place; with
// hooks.migrationEvents each hostdev also gets migration-events=on as a <qemu:override>.
// No compatible device: refused (exit 1, one line) - the migration aborts before any
// downtime and the VM keeps running on the source.
//
// Which source device: the vfio-mig metadata (src/compat/domain-metadata.ts) that
// `vfio-mig preflight` embeds in the XML for `virsh migrate --xml` carries each source
// device's compatibility descriptor. Without it the hook only accepts the same address
// when it exists here, is VFIO-bound and free; anything else is refused with a pointer
// to preflight.
//
// libvirt passes only the live definition through this hook: with --persistent the
// destination's persistent definition keeps the source's addresses. We say so on stderr.

import * as sysfs from '../host/sysfs.ts';
import { DomainXmlError, type DomainXml } from '../libvirt/domain-xml.ts';
import { parsePciAddress } from './xml-edit.ts';
import { findEntry, readMetadata, writeMetadata, DomainMetadataError, type DomainMetadata, type HostdevMetadata, type DescriptorJson } from '../compat/domain-metadata.ts';
import { HookRefusal } from './refusal.ts';
import { hookLock, hostName, loadCompat, loadConfig, logEvent, parseDomainXml, say, vfioHostdevs, type CompatApi, type HookContext, type HookResult, type VfioHostdev } from './qemu-common.ts';
import { deviceInUse } from './qemu-prepare.ts';
import { devicesOfRunningDomains, liveReservations, readReservations, writeReservations } from './reservations.ts';

interface Pick {
  dev: VfioHostdev;
  target: string;
  entry: HostdevMetadata | undefined;
  decidedBy: string;
}

const PREFLIGHT_HINT = 'migrate with the XML written by "vfio-mig preflight <domain> --to <destination> --print-xml FILE" (virsh migrate --xml FILE), which tells this host what the source device is';

function hexAttr(id: { kind: 'pci'; bdf: string }, name: string): string | undefined {
  const v = sysfs.readDeviceAttr(id, name);
  return v && /^0x[0-9a-fA-F]{4}$/.test(v) ? v.slice(2).toLowerCase() : undefined;
}

/** Cheap pre-filter: a descriptor that names vendor/device ids only matches those. */
function idsMatch(descriptor: DescriptorJson, bdf: string): boolean {
  const norm = (v: unknown) => (typeof v === 'string' ? v.toLowerCase().replace(/^0x/, '').padStart(4, '0') : undefined);
  const want = { vendor: norm(descriptor.vendor), device: norm(descriptor.device) };
  if (!want.vendor || !want.device) return true;
  const id = { kind: 'pci' as const, bdf };
  return hexAttr(id, 'vendor') === want.vendor && hexAttr(id, 'device') === want.device;
}

/** Local devices of the same kind that could take the hostdev, the source's own address first. */
function candidates(dev: VfioHostdev, entry: HostdevMetadata): string[] {
  if (dev.kind === 'mdev') {
    const all = sysfs.listMdevs();
    return [...all.filter((u) => u === dev.id), ...all.filter((u) => u !== dev.id)];
  }
  const libvirtBinds = dev.view.managed === true;
  const ok = (bdf: string) => {
    const id = { kind: 'pci' as const, bdf };
    // A device on a host driver is not for VMs; an unbound VF is fine when libvirt binds it.
    if (!(sysfs.isVfioBound(id) || (libvirtBinds && sysfs.driverOf(id) === undefined && sysfs.physfnOf(bdf) !== undefined))) return false;
    return idsMatch(entry.descriptor, bdf);
  };
  const all = sysfs.listPciDevices();
  return [...all.filter((b) => b === dev.id), ...all.filter((b) => b !== dev.id)].filter(ok);
}

export async function migrate(ctx: HookContext): Promise<HookResult> {
  const doc = parseDomainXml(ctx.xml);
  const devs = vfioHostdevs(doc);
  let md: DomainMetadata | undefined;
  try {
    md = readMetadata(doc);
  } catch (err) {
    if (err instanceof DomainMetadataError) throw new HookRefusal(`${err.message}; ${PREFLIGHT_HINT}`);
    throw err;
  }
  if (devs.length === 0 && !md) return { code: 0 };
  const { hooks } = loadConfig();

  // Pair each hostdev with its metadata entry; an entry left over is stale metadata.
  const used = new Set<HostdevMetadata>();
  const entries = new Map<VfioHostdev, HostdevMetadata | undefined>();
  for (const dev of devs) {
    const e = md ? findEntry(md, { alias: dev.view.alias, type: dev.kind, address: dev.id }, used) : undefined;
    if (e) used.add(e);
    entries.set(dev, e);
  }
  // An XML without aliases whose addresses preflight already pointed at this host's
  // devices matches neither way: pair what is left in document order, kind by kind.
  for (const dev of devs) {
    if (entries.get(dev) || dev.view.alias !== undefined) continue;
    const e = md?.hostdevs.find((x) => !used.has(x) && x.type === dev.kind && x.alias === undefined);
    if (e) {
      used.add(e);
      entries.set(dev, e);
    }
  }
  const stale = md?.hostdevs.find((e) => !used.has(e));
  if (stale) {
    throw new HookRefusal(`the vfio-mig metadata lists hostdev ${stale.alias ?? ''}${stale.alias ? ' ' : ''}(${stale.type} ${stale.address}) but the domain has no such hostdev: the XML is stale; ${PREFLIGHT_HINT}`, stale.address);
  }

  const compat: CompatApi | undefined = [...entries.values()].some((e) => e !== undefined) ? await loadCompat() : undefined;
  const picks: Pick[] = [];
  const lock = devs.length ? await hookLock(ctx) : undefined;
  try {
    if (devs.length) {
      // Our own earlier reservations (a retried migration) do not count against us.
      const all = readReservations();
      const live = liveReservations(all, hooks.reservationSeconds).filter((r) => r.domain !== ctx.domain);
      const taken = new Map<string, string>();
      for (const r of live) taken.set(r.device, `reserved for ${JSON.stringify(r.domain)}`);
      for (const [d, owner] of devicesOfRunningDomains(ctx.domain)) taken.set(d, `used by running domain ${JSON.stringify(owner)}`);
      for (const dev of devs) {
        const entry = entries.get(dev);
        const pick = entry ? await pickCompatible(dev, entry, compat!, taken) : pickSameAddress(dev, taken);
        taken.set(pick.target, `picked for ${dev.label}`);
        picks.push(pick);
      }
      const since = new Date().toISOString();
      writeReservations([...live, ...picks.map((p) => ({ device: p.target, domain: ctx.domain, op: 'migrate' as const, since }))]);
    }
  } finally {
    lock?.release();
  }

  // Rewrite the document: addresses, metadata (now describing this host's devices), overrides.
  let changed = false;
  const moved: string[] = [];
  for (const p of picks) {
    if (p.target === p.dev.id) continue;
    setHostdevSource(doc, p.dev, p.target);
    moved.push(`${p.dev.label} -> ${p.target}`);
    changed = true;
  }
  if (md) {
    const local: HostdevMetadata[] = [];
    for (const p of picks) {
      if (!p.entry) continue;
      let descriptor = p.entry.descriptor;
      try {
        descriptor = await compat!.describeDevice(p.target);
      } catch {
        // Keep the source's descriptor: the next hop's check still has something to go on.
      }
      local.push({ alias: p.entry.alias, type: p.dev.kind, address: p.target, descriptor });
    }
    writeMetadata(doc, { host: hostName(), hostdevs: local });
    changed = true;
  }
  if (hooks.migrationEvents) {
    for (const p of picks) {
      if (p.dev.kind !== 'pci' && p.dev.view.mdevModel !== 'vfio-pci') continue;
      if (!p.dev.view.alias) {
        say(ctx, `warning: ${p.dev.label} has no <alias>, so migration-events cannot be set on it`);
        continue;
      }
      doc.setQemuDeviceProperty(p.dev.view.alias, 'migration-events', 'bool', true);
      changed = true;
    }
  }
  for (const p of picks) logEvent(ctx, 'picked', { hostdev: p.dev.label, source: p.dev.id, target: p.target, decidedBy: p.decidedBy });
  if (changed) logEvent(ctx, 'rewritten', { remapped: moved.length, metadata: md !== undefined, migrationEvents: hooks.migrationEvents, fromHost: md?.host ?? null });
  if (moved.length) {
    say(ctx, `remapped ${moved.join(', ')} in the live definition; libvirt does not pass the persistent definition through this hook, so with "virsh migrate --persistent" it still names the source host's devices - migrate with --persistent-xml from "vfio-mig preflight", or fix it with "virsh edit"`);
  }
  return { code: 0, xml: changed ? doc.serialize() : undefined };
}

async function pickCompatible(dev: VfioHostdev, entry: HostdevMetadata, compat: CompatApi, taken: Map<string, string>): Promise<Pick> {
  const rejected: string[] = [];
  let busy = 0;
  const list = candidates(dev, entry);
  for (const target of list) {
    if (taken.has(target)) {
      busy++;
      continue;
    }
    if (deviceInUse(dev.kind, target)) {
      busy++;
      continue;
    }
    let verdict;
    try {
      verdict = await compat.checkCompatibility(entry.descriptor, target);
    } catch (err) {
      rejected.push(`${target}: ${(err as Error).message}`);
      continue;
    }
    if (verdict.compatible) return { dev, target, entry, decidedBy: verdict.decidedBy };
    rejected.push(`${target}: ${verdict.reason}`);
  }
  const why = list.length === 0 ? `no ${dev.kind === 'pci' ? 'VFIO-bound PCI function' : 'mdev'} of that kind on this host` : `${busy} in use or reserved, ${rejected.length} incompatible${rejected.length ? ` (${rejected.slice(0, 3).join('; ')}${rejected.length > 3 ? '; ...' : ''})` : ''}`;
  throw new HookRefusal(`${dev.label}: no free compatible device on this host: ${why}`, dev.id);
}

function pickSameAddress(dev: VfioHostdev, taken: Map<string, string>): Pick {
  const id = dev.kind === 'pci' ? ({ kind: 'pci', bdf: dev.id } as const) : ({ kind: 'mdev', uuid: dev.id } as const);
  let why: string | undefined;
  if (!sysfs.deviceExists(id)) why = 'it does not exist here';
  else if (!sysfs.isVfioBound(id) && dev.view.managed !== true) why = `it is bound to ${sysfs.driverOf(id) ?? 'no driver'}, not a VFIO driver`;
  else if (taken.has(dev.id)) why = `it is ${taken.get(dev.id)}`;
  else if (deviceInUse(dev.kind, dev.id)) why = 'its VFIO group is held open (in use)';
  if (why) throw new HookRefusal(`${dev.label}: the XML carries no vfio-mig metadata and the same address cannot be used here (${why}); ${PREFLIGHT_HINT}`, dev.id);
  return { dev, target: dev.id, entry: undefined, decidedBy: 'same address (no metadata)' };
}

/** Points the hostdev at a local device: the PCI address attributes, or the mdev UUID. */
function setHostdevSource(doc: DomainXml, dev: VfioHostdev, target: string): void {
  if (dev.kind === 'pci') {
    doc.setHostdevSourceAddress({ index: dev.view.index }, parsePciAddress(target));
    return;
  }
  try {
    doc.setHostdevMdevUuid({ index: dev.view.index }, sysfs.parseMdevUuid(target));
  } catch (err) {
    if (err instanceof DomainXmlError) throw new HookRefusal(`${dev.label}: ${err.message}`, dev.id);
    throw err;
  }
}

