// What preflight needs from a domain definition: its VFIO hostdevs (host device, QEMU
// device id, managed), the QEMU properties each of them gets from the XML -
// `<qemu:override>` frontend properties and `<qemu:commandline>` `-set device.ID.P=V` /
// `-global vfio-pci.P=V` arguments - and the guest's memory size.

import { QEMU_NS, formatBdf, unescapeXml, type DomainXml, type Hostdev, type XmlElement } from '../../libvirt/domain-xml.ts';

export interface VfioHostdev {
  index: number;
  /** QEMU device id: the live XML's alias, else libvirt's default (hostdev<N>). */
  alias: string;
  /** Whether the alias was read from the XML (live) or assumed. */
  aliasKnown: boolean;
  kind: 'pci' | 'mdev';
  /** Host device: a PCI address (0000:3b:00.2) or an mdev UUID. */
  device: string;
  managed: boolean | undefined;
  driverModel: string | undefined;
  mdevType?: string;
  /** QEMU properties set for this device by the XML (lower-case names), last one wins. */
  properties: Map<string, string>;
  /** "hostdev0 0000:3b:00.2": how the checks name it. */
  label: string;
}

export interface DomainView {
  name: string;
  xml: DomainXml;
  hostdevs: VfioHostdev[];
  /** Guest memory in bytes, when the XML says. */
  memoryBytes: number | undefined;
  /** Hostdevs that are not VFIO (usb, scsi, ...) or lack a usable source address. */
  skipped: string[];
}

const UNITS: Record<string, number> = { b: 1, bytes: 1, k: 1024, kib: 1024, kb: 1000, m: 1024 ** 2, mib: 1024 ** 2, mb: 1e6, g: 1024 ** 3, gib: 1024 ** 3, gb: 1e9, t: 1024 ** 4, tib: 1024 ** 4, tb: 1e12 };

function elements(el: XmlElement): XmlElement[] {
  return el.children.filter((c): c is XmlElement => c.kind === 'element');
}

function attr(el: XmlElement, name: string): string | undefined {
  const a = el.attrs.find(([k]) => k === name);
  return a === undefined ? undefined : unescapeXml(a[1]);
}

function text(el: XmlElement): string {
  return unescapeXml(el.children.map((c) => (c.kind === 'text' ? c.raw : '')).join('')).trim();
}

function isQemuNs(el: XmlElement, root: XmlElement, local: string): boolean {
  const i = el.name.indexOf(':');
  const name = i < 0 ? el.name : el.name.slice(i + 1);
  if (name !== local) return false;
  const prefix = i < 0 ? '' : el.name.slice(0, i);
  const decl = prefix ? `xmlns:${prefix}` : 'xmlns';
  return (attr(el, decl) ?? attr(root, decl)) === QEMU_NS;
}

function memoryOf(root: XmlElement): number | undefined {
  const m = elements(root).find((e) => e.name === 'memory') ?? elements(root).find((e) => e.name === 'currentMemory');
  if (!m) return undefined;
  const n = Number(text(m));
  const unit = UNITS[(attr(m, 'unit') ?? 'KiB').toLowerCase()];
  return Number.isFinite(n) && unit !== undefined ? n * unit : undefined;
}

/** `-set device.ID.PROP=VAL` and `-global vfio-pci.PROP=VAL` from every <qemu:commandline>. */
function commandlineProps(root: XmlElement): { perDevice: Map<string, Map<string, string>>; global: Map<string, string> } {
  const perDevice = new Map<string, Map<string, string>>();
  const global = new Map<string, string>();
  for (const cl of elements(root).filter((e) => isQemuNs(e, root, 'commandline'))) {
    const args = elements(cl).filter((e) => isQemuNs(e, root, 'arg') || e.name.endsWith(':arg')).map((e) => attr(e, 'value') ?? '');
    for (let i = 0; i < args.length; i++) {
      const a = args[i]!;
      const next = args[i + 1];
      const setM = a === '-set' && next ? /^device\.([^.=]+)\.([^=]+)=(.*)$/.exec(next) : null;
      if (setM) {
        const m = perDevice.get(setM[1]!) ?? new Map<string, string>();
        m.set(setM[2]!.toLowerCase(), setM[3]!);
        perDevice.set(setM[1]!, m);
        i++;
        continue;
      }
      const globalM = a === '-global' && next ? /^vfio-pci\.([^=]+)=(.*)$/.exec(next) : null;
      if (globalM) {
        global.set(globalM[1]!.toLowerCase(), globalM[2]!);
        i++;
      }
    }
  }
  return { perDevice, global };
}

export function domainView(xml: DomainXml): DomainView {
  const cmd = commandlineProps(xml.root);
  const hostdevs: VfioHostdev[] = [];
  const skipped: string[] = [];
  const all = xml.hostdevs();
  for (const h of all) {
    const vfio = toVfio(h);
    if (!vfio) {
      skipped.push(`#${h.index} type=${h.type}${h.alias ? ` (${h.alias})` : ''}`);
      continue;
    }
    const props = new Map(cmd.global);
    for (const [k, v] of cmd.perDevice.get(vfio.alias) ?? []) props.set(k, v);
    for (const p of xml.qemuDeviceProperties(vfio.alias)) if (p.value !== undefined) props.set(p.name.toLowerCase(), p.value);
    vfio.properties = props;
    hostdevs.push(vfio);
  }
  return { name: xml.name ?? '(unnamed)', xml, hostdevs, memoryBytes: memoryOf(xml.root), skipped };
}

function toVfio(h: Hostdev): VfioHostdev | undefined {
  let device: string | undefined;
  let kind: 'pci' | 'mdev';
  if (h.type === 'pci' && h.pci) {
    device = formatBdf(h.pci);
    kind = 'pci';
  } else if (h.type === 'mdev' && h.mdevUuid && (h.mdevModel === undefined || h.mdevModel === 'vfio-pci')) {
    device = h.mdevUuid;
    kind = 'mdev';
  } else {
    return undefined;
  }
  // libvirt names hostdevs hostdev0, hostdev1, ... in document order when no alias is set.
  const alias = h.alias ?? `hostdev${h.index}`;
  return { index: h.index, alias, aliasKnown: h.alias !== undefined, kind, device, managed: h.managed, driverModel: h.driverModel, properties: new Map(), label: `${alias} ${device}` };
}

/** A QEMU boolean property value: true, false, or undefined when unset or not a boolean. */
export function boolProp(h: VfioHostdev, name: string): boolean | undefined {
  const v = h.properties.get(name.toLowerCase())?.toLowerCase();
  if (v === undefined) return undefined;
  if (['on', 'true', 'yes', '1'].includes(v)) return true;
  if (['off', 'false', 'no', '0'].includes(v)) return false;
  return undefined;
}
