// vfio-mig's own element in a domain's <metadata>: for each hostdev, the compatibility
// descriptor of the device it uses on the source host. The destination's `migrate`
// hook cannot learn that from the plain XML (it names the source's addresses only), so
// `vfio-mig preflight` embeds this element in the XML it prints for
// `virsh migrate --xml`, and the hook reads it to pick a compatible local device.
//
//   <metadata>
//     <vfio-mig:hostdevs xmlns:vfio-mig="https://vfio-mig.org/xmlns/domain/1" version="1" host="src-host">
//       <vfio-mig:hostdev alias="hostdev0" type="pci" address="0000:3b:00.2">
//         <vfio-mig:descriptor>{"...": "..."}</vfio-mig:descriptor>
//       </vfio-mig:hostdev>
//     </vfio-mig:hostdevs>
//   </metadata>
//
// libvirt keeps one element per namespace in <metadata> and carries it through
// migration unchanged (it may re-indent it). An entry is matched to its hostdev by alias
// when both have one, otherwise by source address (PCI address or mdev UUID). The
// descriptor is JSON text: its shape belongs to src/compat/descriptor.ts; here it is an
// opaque object that is only checked to be one.
//
// Read and written through the order-preserving model of src/libvirt/domain-xml.ts, so
// adding or replacing the element moves nothing else in the document.

import { escapeXml, unescapeXml, type DomainXml, type XmlElement, type XmlNode } from '../libvirt/domain-xml.ts';

export const VFIO_MIG_NS = 'https://vfio-mig.org/xmlns/domain/1';
export const METADATA_VERSION = 1;
/** Upper bounds: a hostile document must not make the hook do unbounded work. */
const MAX_ENTRIES = 256;
const MAX_DESCRIPTOR_CHARS = 64 * 1024;

export class DomainMetadataError extends Error {
  constructor(message: string) {
    super(`vfio-mig metadata: ${message}`);
    this.name = 'DomainMetadataError';
  }
}

/** A compatibility descriptor as JSON (src/compat/descriptor.ts owns its shape). */
export type DescriptorJson = { [key: string]: unknown };

export interface HostdevMetadata {
  /** QEMU device alias (`<alias name>`), when the source had one. */
  alias: string | undefined;
  type: 'pci' | 'mdev';
  /** The source host's PCI address (0000:3b:00.2) or mdev UUID, lower case. */
  address: string;
  descriptor: DescriptorJson;
}

export interface DomainMetadata {
  version: number;
  /** The host the descriptors were taken on (informational). */
  host: string | undefined;
  hostdevs: HostdevMetadata[];
}

const BDF = /^[0-9a-f]{4}:[0-9a-f]{2}:[01][0-9a-f]\.[0-7]$/;
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const ALIAS = /^[A-Za-z0-9_.-]{1,64}$/;
const HOST = /^[A-Za-z0-9_.:-]{1,255}$/;

// --- small helpers on the node model ---------------------------------------------------

function attr(el: XmlElement, name: string): string | undefined {
  const a = el.attrs.find(([k]) => k === name);
  return a === undefined ? undefined : unescapeXml(a[1]);
}

function elementsOf(el: XmlElement): XmlElement[] {
  return el.children.filter((c): c is XmlElement => c.kind === 'element');
}

const localName = (q: string): string => q.slice(q.indexOf(':') + 1);
const prefixOf = (q: string): string => (q.includes(':') ? q.slice(0, q.indexOf(':')) : '');

/** Namespace of `el` from its own declarations, then its ancestors' (innermost first). */
function namespaceOf(el: XmlElement, ancestors: XmlElement[]): string {
  const p = prefixOf(el.name);
  const decl = p ? `xmlns:${p}` : 'xmlns';
  for (const e of [el, ...[...ancestors].reverse()]) {
    const v = attr(e, decl);
    if (v !== undefined) return v;
  }
  return '';
}

function textOf(el: XmlElement): string {
  return el.children.map((c) => (c.kind === 'text' ? unescapeXml(c.raw) : c.kind === 'cdata' ? c.text : '')).join('');
}

function metadataElement(doc: DomainXml): XmlElement | undefined {
  return elementsOf(doc.root).find((e) => e.name === 'metadata');
}

function ourElement(doc: DomainXml): { metadata: XmlElement; el: XmlElement } | undefined {
  const metadata = metadataElement(doc);
  if (!metadata) return undefined;
  const el = elementsOf(metadata).find((e) => localName(e.name) === 'hostdevs' && namespaceOf(e, [doc.root, metadata]) === VFIO_MIG_NS);
  return el ? { metadata, el } : undefined;
}

/** Whether the document carries vfio-mig metadata (cheap: no validation of its entries). */
export function hasMetadata(doc: DomainXml): boolean {
  return ourElement(doc) !== undefined;
}

/**
 * Reads the vfio-mig metadata; undefined when the domain has none. Throws
 * DomainMetadataError when it is there but malformed (the hook then refuses rather
 * than guess: a wrong descriptor would pick a wrong device).
 */
export function readMetadata(doc: DomainXml): DomainMetadata | undefined {
  const found = ourElement(doc);
  if (!found) return undefined;
  const { metadata, el } = found;
  const versionRaw = attr(el, 'version') ?? String(METADATA_VERSION);
  if (versionRaw !== String(METADATA_VERSION)) throw new DomainMetadataError(`version ${JSON.stringify(versionRaw.slice(0, 20))} is not supported (this vfio-mig reads version ${METADATA_VERSION})`);
  const hostRaw = attr(el, 'host');
  const host = hostRaw !== undefined && HOST.test(hostRaw) ? hostRaw : undefined;
  const entries = elementsOf(el).filter((e) => localName(e.name) === 'hostdev' && namespaceOf(e, [doc.root, metadata, el]) === VFIO_MIG_NS);
  if (entries.length > MAX_ENTRIES) throw new DomainMetadataError(`more than ${MAX_ENTRIES} hostdev entries`);
  const hostdevs = entries.map((e, i): HostdevMetadata => {
    const where = `hostdev entry ${i + 1}`;
    const type = attr(e, 'type');
    if (type !== 'pci' && type !== 'mdev') throw new DomainMetadataError(`${where}: type must be pci or mdev, not ${JSON.stringify((type ?? '').slice(0, 20))}`);
    const address = (attr(e, 'address') ?? '').toLowerCase();
    if (!(type === 'pci' ? BDF : UUID).test(address)) {
      throw new DomainMetadataError(`${where}: address ${JSON.stringify(address.slice(0, 60))} is not ${type === 'pci' ? 'a PCI address like 0000:3b:00.2' : 'an mdev UUID'}`);
    }
    const alias = attr(e, 'alias');
    if (alias !== undefined && !ALIAS.test(alias)) throw new DomainMetadataError(`${where}: alias ${JSON.stringify(alias.slice(0, 60))} is not a QEMU device id`);
    const d = elementsOf(e).find((c) => localName(c.name) === 'descriptor');
    if (!d) throw new DomainMetadataError(`${where} (${address}) has no descriptor`);
    const text = textOf(d);
    if (text.length > MAX_DESCRIPTOR_CHARS) throw new DomainMetadataError(`${where} (${address}): descriptor longer than ${MAX_DESCRIPTOR_CHARS} characters`);
    let descriptor: unknown;
    try {
      descriptor = JSON.parse(text);
    } catch (err) {
      throw new DomainMetadataError(`${where} (${address}): descriptor is not JSON (${(err as Error).message.slice(0, 100)})`);
    }
    if (typeof descriptor !== 'object' || descriptor === null || Array.isArray(descriptor)) throw new DomainMetadataError(`${where} (${address}): descriptor is not a JSON object`);
    return { alias, type, address, descriptor: descriptor as DescriptorJson };
  });
  return { version: METADATA_VERSION, host, hostdevs };
}

/**
 * Adds or replaces the vfio-mig element (creating `<metadata>` when the domain has
 * none). Everything else in the document stays where it was.
 */
export function writeMetadata(doc: DomainXml, md: Omit<DomainMetadata, 'version'> & { version?: number }): void {
  if (md.hostdevs.length > MAX_ENTRIES) throw new DomainMetadataError(`more than ${MAX_ENTRIES} hostdev entries`);
  if (md.host !== undefined && !HOST.test(md.host)) throw new DomainMetadataError(`host ${JSON.stringify(md.host.slice(0, 60))} is not a host name`);
  const unit = indentUnit(doc);
  const found = ourElement(doc);
  let metadata = found?.metadata ?? metadataElement(doc);
  if (!metadata) {
    metadata = { kind: 'element', name: 'metadata', attrs: [], children: [] };
    insertAfterIdentity(doc.root, metadata, unit);
  }
  // Reuse the prefix of an element we replace; else "vfio-mig".
  const prefix = found ? prefixOf(found.el.name) : 'vfio-mig';
  const q = (local: string) => (prefix ? `${prefix}:${local}` : local);
  const el: XmlElement = {
    kind: 'element',
    name: q('hostdevs'),
    attrs: [
      [prefix ? `xmlns:${prefix}` : 'xmlns', escapeXml(VFIO_MIG_NS)],
      ['version', String(md.version ?? METADATA_VERSION)],
      ...(md.host !== undefined ? [['host', escapeXml(md.host)] as [string, string]] : []),
    ],
    children: [],
  };
  const depth = 2; // <domain> 0, <metadata> 1, ours 2
  for (const h of md.hostdevs) {
    const address = h.address.toLowerCase();
    if (!(h.type === 'pci' ? BDF : UUID).test(address)) throw new DomainMetadataError(`address ${JSON.stringify(address.slice(0, 60))} is not valid for a ${h.type} hostdev`);
    if (h.alias !== undefined && !ALIAS.test(h.alias)) throw new DomainMetadataError(`alias ${JSON.stringify(h.alias.slice(0, 60))} is not a QEMU device id`);
    const json = JSON.stringify(h.descriptor);
    if (json.length > MAX_DESCRIPTOR_CHARS) throw new DomainMetadataError(`descriptor of ${address} is longer than ${MAX_DESCRIPTOR_CHARS} characters`);
    const entry: XmlElement = {
      kind: 'element',
      name: q('hostdev'),
      attrs: [...(h.alias !== undefined ? [['alias', escapeXml(h.alias)] as [string, string]] : []), ['type', h.type], ['address', address]],
      children: [],
    };
    const descriptor: XmlElement = { kind: 'element', name: q('descriptor'), attrs: [], children: [{ kind: 'text', raw: escapeXml(json) }] };
    appendIndented(entry, descriptor, depth + 1, unit);
    appendIndented(el, entry, depth, unit);
  }
  if (found) {
    const i = metadata.children.indexOf(found.el);
    metadata.children[i] = el;
  } else {
    appendIndented(metadata, el, 1, unit);
  }
}

/** Removes the vfio-mig element (and `<metadata>` when that leaves it empty). */
export function removeMetadata(doc: DomainXml): boolean {
  const found = ourElement(doc);
  if (!found) return false;
  const kids = found.metadata.children;
  const i = kids.indexOf(found.el);
  // Take the whitespace before it along.
  const start = i > 0 && kids[i - 1]!.kind === 'text' && (kids[i - 1] as { raw: string }).raw.trim() === '' ? i - 1 : i;
  kids.splice(start, i - start + 1);
  if (elementsOf(found.metadata).length === 0 && kids.every((c) => c.kind === 'text' && c.raw.trim() === '')) {
    const rk = doc.root.children;
    const j = rk.indexOf(found.metadata);
    const s = j > 0 && rk[j - 1]!.kind === 'text' && (rk[j - 1] as { raw: string }).raw.trim() === '' ? j - 1 : j;
    rk.splice(s, j - s + 1);
  }
  return true;
}

/**
 * The metadata entry for a hostdev: by alias when both have one, else by source
 * address. `used` entries are skipped so two hostdevs never share one entry.
 */
export function findEntry(md: DomainMetadata, hostdev: { alias: string | undefined; type: string; address: string | undefined }, used: Set<HostdevMetadata> = new Set()): HostdevMetadata | undefined {
  const free = md.hostdevs.filter((e) => !used.has(e) && e.type === hostdev.type);
  if (hostdev.alias !== undefined) {
    const byAlias = free.find((e) => e.alias === hostdev.alias);
    if (byAlias) return byAlias;
  }
  const addr = hostdev.address?.toLowerCase();
  return addr === undefined ? undefined : free.find((e) => e.address === addr && (e.alias === undefined || hostdev.alias === undefined));
}

// --- layout ---------------------------------------------------------------------------

function indentUnit(doc: DomainXml): string {
  const ws = doc.root.children.find((c) => c.kind === 'text' && /^\n[ \t]+$/.test(c.raw));
  return ws && ws.kind === 'text' ? ws.raw.slice(1) : '  ';
}

function appendIndented(parent: XmlElement, el: XmlElement, parentDepth: number, unit: string): void {
  const kids = parent.children;
  const childWs: XmlNode = { kind: 'text', raw: `\n${unit.repeat(parentDepth + 1)}` };
  const last = kids[kids.length - 1];
  if (kids.length === 0) kids.push(childWs, el, { kind: 'text', raw: `\n${unit.repeat(parentDepth)}` });
  else if (last && last.kind === 'text' && last.raw.trim() === '') kids.splice(kids.length - 1, 0, childWs, el);
  else kids.push(childWs, el);
}

/** libvirt writes <metadata> after name/uuid/genid/title/description: put it there. */
function insertAfterIdentity(root: XmlElement, el: XmlElement, unit: string): void {
  const kids = root.children;
  let at = -1;
  kids.forEach((c, i) => {
    if (c.kind === 'element' && ['name', 'uuid', 'genid', 'title', 'description'].includes(c.name)) at = i;
  });
  if (at < 0) {
    appendIndented(root, el, 0, unit);
    return;
  }
  kids.splice(at + 1, 0, { kind: 'text', raw: `\n${unit}` }, el);
}
