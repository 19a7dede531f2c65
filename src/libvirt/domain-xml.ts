// Domain XML model: read the hostdevs of a libvirt domain, retarget one to another host PCI
// function, add `<qemu:override>` device properties, and write the document back.
//
// Order is the point (DESIGN.md section 3): libvirt assigns guest PCI addresses in document
// order, so regrouping sibling elements (what xml2js does on rebuild) changes the guest ABI.
// fast-xml-parser 5 runs with preserveOrder, no value parsing and no entity processing;
// its tree is converted into the small node model below and written by our own serializer,
// so an untouched libvirt document comes back byte for byte (libvirt's style: single-quoted
// attributes, `<x/>` for empty elements), comments, CDATA and namespace prefixes included.
// Attribute and text values are kept raw (still escaped) and decoded only when read.

import { createRequire } from 'node:module';

export const QEMU_NS = 'http://libvirt.org/schemas/domain/qemu/1.0';

export class DomainXmlError extends Error {
  readonly line: number | undefined;
  readonly column: number | undefined;
  constructor(message: string, where?: { line?: number; column?: number }, options?: { cause?: unknown }) {
    const at = where?.line !== undefined ? ` (line ${where.line}${where.column !== undefined ? `, column ${where.column}` : ''})` : '';
    super(`domain XML: ${message}${at}`, options);
    this.name = 'DomainXmlError';
    this.line = where?.line;
    this.column = where?.column;
  }
}

// --- node model ------------------------------------------------------------------------------

export interface XmlElement {
  kind: 'element';
  /** Qualified name as written, e.g. "hostdev" or "qemu:override". */
  name: string;
  /** Attributes in document order; values raw (entities still escaped). */
  attrs: Array<[string, string]>;
  children: XmlNode[];
}
export type XmlNode =
  | XmlElement
  | { kind: 'text'; raw: string }
  | { kind: 'comment'; text: string }
  | { kind: 'cdata'; text: string }
  | { kind: 'pi'; name: string; attrs: Array<[string, string]> };

// --- hostdev view ---------------------------------------------------------------------------

export interface PciAddress {
  domain: number;
  bus: number;
  slot: number;
  function: number;
}

export interface Hostdev {
  /** Position among this document's hostdevs (the order of `hostdevs()`). */
  index: number;
  /** `<hostdev>`, or `<interface type='hostdev'>` (an SR-IOV VF assigned as a NIC). */
  element: 'hostdev' | 'interface';
  /** hostdev `type` (pci, mdev, usb, scsi, ...); "pci" for interfaces. */
  type: string;
  /** `managed='yes'` (libvirt binds the driver) / 'no'; undefined when absent (libvirt's default is no for hostdev). */
  managed: boolean | undefined;
  /** `<driver model='...'>`: a forced VFIO variant driver (libvirt >= 10.0). */
  driverModel: string | undefined;
  /** `<driver name='...'>` (legacy backend: vfio, kvm, xen). */
  driverName: string | undefined;
  /** mdev `model` attribute: vfio-pci, vfio-ccw, vfio-ap. */
  mdevModel: string | undefined;
  /** Host PCI function (`<source><address domain bus slot function>`). */
  pci: PciAddress | undefined;
  /** mdev UUID (`<source><address uuid>`), lower case. */
  mdevUuid: string | undefined;
  /** QEMU device id, from `<alias name='...'>` (live XML only) - what VFIO_MIGRATION calls device-id. */
  alias: string | undefined;
  /** Guest-side address (`<address type='pci' ...>` directly under the device), if assigned. */
  guestPci: PciAddress | undefined;
}

/** Which hostdev: its index, its alias, or its current host PCI address. */
export type HostdevRef = { index: number } | { alias: string } | { pci: PciAddress };

export type QemuPropertyType = 'string' | 'signed' | 'unsigned' | 'bool';

export interface QemuProperty {
  name: string;
  type: string;
  value: string | undefined;
}

// --- parsing ------------------------------------------------------------------------------

interface FxpParser {
  parse(xml: string): unknown;
}
interface Fxp {
  XMLParser: new (options: Record<string, unknown>) => FxpParser;
  XMLValidator: { validate(xml: string): true | { err: { code: string; msg: string; line?: number; col?: number } } };
}

let fxp: Fxp | undefined;
function loadFxp(): Fxp {
  // Loaded on first use: hooks that never touch XML do not pay for it.
  fxp ??= createRequire(import.meta.url)('fast-xml-parser') as Fxp;
  return fxp;
}

const PARSER_OPTIONS = {
  preserveOrder: true,
  ignoreAttributes: false,
  attributeNamePrefix: '',
  attributesGroupName: ':@',
  commentPropName: '#comment',
  cdataPropName: '#cdata',
  parseTagValue: false,
  parseAttributeValue: false,
  trimValues: false,
  processEntities: false,
  ignoreDeclaration: false,
  ignorePiTags: false,
  allowBooleanAttributes: false,
  removeNSPrefix: false,
};

let parser: FxpParser | undefined;

/** Raw text may only contain the predefined entities and character references. */
const BAD_AMP = /&(?!(?:lt|gt|amp|apos|quot|#[0-9]+|#x[0-9a-fA-F]+);)/;
const PROLOG_DOCTYPE = /^\s*(?:<\?xml[^>]*\?>\s*)?(?:<!--[\s\S]*?-->\s*)*<!DOCTYPE/i;
/** Longest document accepted: domain XML is a few KB; this bounds a hostile input. */
export const MAX_XML_BYTES = 16 * 1024 * 1024;

function convert(list: unknown, depth: number): XmlNode[] {
  if (!Array.isArray(list)) throw new DomainXmlError('unexpected parser output');
  if (depth > 256) throw new DomainXmlError('elements nested deeper than 256 levels');
  const out: XmlNode[] = [];
  for (const item of list as Array<Record<string, unknown>>) {
    const attrsObj = item[':@'] as Record<string, string> | undefined;
    const key = Object.keys(item).find((k) => k !== ':@');
    if (key === undefined) continue;
    const body = item[key];
    if (key === '#text') {
      const raw = String(body);
      if (BAD_AMP.test(raw)) throw new DomainXmlError(`bad entity or bare '&' in text ${JSON.stringify(raw.slice(0, 60))}`);
      out.push({ kind: 'text', raw });
    } else if (key === '#comment' || key === '#cdata') {
      const text = (body as Array<Record<string, unknown>>).map((t) => String(t['#text'] ?? '')).join('');
      out.push(key === '#comment' ? { kind: 'comment', text } : { kind: 'cdata', text });
    } else {
      const attrs: Array<[string, string]> = attrsObj ? Object.entries(attrsObj).map(([k, v]) => [k, String(v)]) : [];
      for (const [k, v] of attrs) {
        if (BAD_AMP.test(v)) throw new DomainXmlError(`bad entity or bare '&' in attribute ${k}=${JSON.stringify(v.slice(0, 60))}`);
        if (v.includes('<')) throw new DomainXmlError(`'<' in attribute ${k}`);
      }
      if (key.startsWith('?')) out.push({ kind: 'pi', name: key.slice(1), attrs });
      else out.push({ kind: 'element', name: key, attrs, children: convert(body, depth + 1) });
    }
  }
  return out;
}

// --- serialization --------------------------------------------------------------------------

function quoteAttr(raw: string): string {
  // libvirt writes single quotes; a raw value that contains one came from a double-quoted
  // attribute, so it goes back the same way.
  return raw.includes("'") ? `"${raw}"` : `'${raw}'`;
}

function writeNodes(nodes: XmlNode[], out: string[]): void {
  for (const n of nodes) {
    switch (n.kind) {
      case 'text':
        out.push(n.raw);
        break;
      case 'comment':
        out.push(`<!--${n.text}-->`);
        break;
      case 'cdata':
        out.push(`<![CDATA[${n.text}]]>`);
        break;
      case 'pi':
        out.push(`<?${n.name}${n.attrs.map(([k, v]) => ` ${k}="${v}"`).join('')}?>`);
        break;
      case 'element': {
        out.push(`<${n.name}`);
        for (const [k, v] of n.attrs) out.push(` ${k}=${quoteAttr(v)}`);
        if (n.children.length === 0) {
          out.push('/>');
        } else {
          out.push('>');
          writeNodes(n.children, out);
          out.push(`</${n.name}>`);
        }
      }
    }
  }
}

/** Escapes a value for an attribute or text (libvirt's set: & < > ' "). */
export function escapeXml(value: string): string {
  return value.replace(/[&<>'"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', "'": '&apos;', '"': '&quot;' })[c]!);
}

/** Decodes the predefined entities and character references of a raw value. */
export function unescapeXml(raw: string): string {
  if (!raw.includes('&')) return raw;
  return raw.replace(/&(lt|gt|amp|apos|quot|#[0-9]+|#x[0-9a-fA-F]+);/g, (_m, e: string) => {
    switch (e) {
      case 'lt': return '<';
      case 'gt': return '>';
      case 'amp': return '&';
      case 'apos': return "'";
      case 'quot': return '"';
      default: return String.fromCodePoint(e[1] === 'x' ? Number.parseInt(e.slice(2), 16) : Number.parseInt(e.slice(1), 10));
    }
  });
}

// --- element helpers ------------------------------------------------------------------------

function attr(el: XmlElement, name: string): string | undefined {
  const a = el.attrs.find(([k]) => k === name);
  return a === undefined ? undefined : unescapeXml(a[1]);
}

function setAttr(el: XmlElement, name: string, value: string): void {
  const raw = escapeXml(value);
  const a = el.attrs.find(([k]) => k === name);
  if (a) a[1] = raw;
  else el.attrs.push([name, raw]);
}

function elements(el: XmlElement): XmlElement[] {
  return el.children.filter((c): c is XmlElement => c.kind === 'element');
}

function child(el: XmlElement, name: string): XmlElement | undefined {
  return elements(el).find((c) => c.name === name);
}

const localName = (qname: string): string => qname.slice(qname.indexOf(':') + 1);
const prefixOf = (qname: string): string => (qname.includes(':') ? qname.slice(0, qname.indexOf(':')) : '');

/** Namespace URI of `el`, given the declarations in scope (innermost last). */
function namespaceOf(el: XmlElement, scope: XmlElement[]): string {
  const p = prefixOf(el.name);
  const decl = p ? `xmlns:${p}` : 'xmlns';
  for (const e of [el, ...[...scope].reverse()]) {
    const v = attr(e, decl);
    if (v !== undefined) return v;
  }
  return '';
}

// --- PCI addresses ---------------------------------------------------------------------------

const LIMITS: Record<keyof PciAddress, number> = { domain: 0xffff, bus: 0xff, slot: 0x1f, function: 7 };
const UUID = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/;

/** libvirt writes 0x-hex, but decimal is valid input too (virStrToLong_uip base 0). */
function parseAddrPart(v: string | undefined, max: number): number | undefined {
  if (v === undefined) return undefined;
  const s = v.trim();
  let n: number;
  if (/^0[xX][0-9a-fA-F]+$/.test(s)) n = Number.parseInt(s.slice(2), 16);
  else if (/^[0-9]+$/.test(s)) n = Number.parseInt(s, 10);
  else return undefined;
  return n <= max ? n : undefined;
}

function readPci(address: XmlElement | undefined): PciAddress | undefined {
  if (!address) return undefined;
  const parts = {} as PciAddress;
  for (const k of Object.keys(LIMITS) as Array<keyof PciAddress>) {
    // A missing domain means 0 (libvirt's default); bus, slot and function are required.
    const raw = attr(address, k) ?? (k === 'domain' ? '0' : undefined);
    const n = parseAddrPart(raw, LIMITS[k]);
    if (n === undefined) return undefined;
    parts[k] = n;
  }
  return parts;
}

export function validatePci(a: PciAddress): void {
  for (const k of Object.keys(LIMITS) as Array<keyof PciAddress>) {
    const v = a[k];
    if (!Number.isInteger(v) || v < 0 || v > LIMITS[k]) throw new RangeError(`PCI ${k} must be an integer 0..${LIMITS[k]}, got ${v}`);
  }
}

const sameAddr = (a: PciAddress, b: PciAddress): boolean => a.domain === b.domain && a.bus === b.bus && a.slot === b.slot && a.function === b.function;

/** "0000:06:12.5", the sysfs spelling. */
export function formatBdf(a: PciAddress): string {
  const h = (n: number, w: number): string => n.toString(16).padStart(w, '0');
  return `${h(a.domain, 4)}:${h(a.bus, 2)}:${h(a.slot, 2)}.${a.function.toString(16)}`;
}

const FORMAT: Record<keyof PciAddress, (n: number) => string> = {
  domain: (n) => `0x${n.toString(16).padStart(4, '0')}`,
  bus: (n) => `0x${n.toString(16).padStart(2, '0')}`,
  slot: (n) => `0x${n.toString(16).padStart(2, '0')}`,
  function: (n) => `0x${n.toString(16)}`,
};

// --- the document ---------------------------------------------------------------------------

interface HostdevNode {
  view: Hostdev;
  el: XmlElement;
}

export class DomainXml {
  /** Top-level nodes: an optional declaration, comments, and the one `<domain>` element. */
  readonly nodes: XmlNode[];
  readonly root: XmlElement;
  private readonly trailingNewline: boolean;

  private constructor(nodes: XmlNode[], trailingNewline: boolean) {
    this.nodes = nodes;
    const roots = nodes.filter((n): n is XmlElement => n.kind === 'element');
    if (roots.length !== 1) throw new DomainXmlError(`expected one root element, found ${roots.length}`);
    this.root = roots[0]!;
    if (this.root.name !== 'domain') throw new DomainXmlError(`the root element is <${this.root.name}>, not <domain>`);
    this.trailingNewline = trailingNewline;
  }

  /** Parses and validates; throws DomainXmlError with line/column for malformed input. */
  static parse(xml: string): DomainXml {
    if (typeof xml !== 'string') throw new DomainXmlError('input is not a string');
    if (xml.length > MAX_XML_BYTES) throw new DomainXmlError(`document larger than ${MAX_XML_BYTES} bytes`);
    if (xml.trim() === '') throw new DomainXmlError('empty document');
    // The parser silently drops text before the first and after the last markup.
    if (!/^\s*</.test(xml) || !/>\s*$/.test(xml)) throw new DomainXmlError('text outside the root element');
    // libvirt never writes a DOCTYPE; refusing it rules out entity-expansion tricks.
    if (PROLOG_DOCTYPE.test(xml)) throw new DomainXmlError('DOCTYPE declarations are not accepted');
    const { XMLParser, XMLValidator } = loadFxp();
    const v = XMLValidator.validate(xml);
    if (v !== true) throw new DomainXmlError(`${v.err.msg} [${v.err.code}]`, { line: v.err.line, column: v.err.col });
    let tree: unknown;
    try {
      parser ??= new XMLParser(PARSER_OPTIONS);
      tree = parser.parse(xml);
    } catch (err) {
      throw new DomainXmlError((err as Error).message, undefined, { cause: err });
    }
    // Whitespace between top-level nodes is not kept by the parser (inconsistently); it is
    // rebuilt as one newline on output, the only separator libvirt writes.
    const nodes = convert(tree, 0).filter((n) => !(n.kind === 'text' && n.raw.trim() === ''));
    const stray = nodes.find((n) => n.kind === 'text' || n.kind === 'cdata');
    if (stray) throw new DomainXmlError('text outside the root element');
    return new DomainXml(nodes, /\n\s*$/.test(xml));
  }

  /** Writes the document back; an untouched libvirt document comes back unchanged. */
  serialize(): string {
    const out: string[] = [];
    this.nodes.forEach((n, i) => {
      if (i > 0) out.push('\n');
      writeNodes([n], out);
    });
    if (this.trailingNewline) out.push('\n');
    return out.join('');
  }

  get name(): string | undefined {
    const n = child(this.root, 'name');
    if (!n) return undefined;
    return unescapeXml(n.children.map((c) => (c.kind === 'text' ? c.raw : '')).join(''));
  }

  /** The domain's `type` attribute (kvm, qemu, ...). */
  get type(): string | undefined {
    return attr(this.root, 'type');
  }

  hostdevs(): Hostdev[] {
    return this.hostdevNodes().map((h) => h.view);
  }

  /**
   * Points a hostdev at another host PCI function (the destination-side remap). Only the
   * address attributes whose value changes are rewritten; nothing else in the document moves.
   */
  setHostdevSourceAddress(ref: HostdevRef, to: PciAddress): void {
    validatePci(to);
    const h = this.find(ref);
    if (h.view.type !== 'pci') throw new DomainXmlError(`hostdev ${describeRef(ref)} is type '${h.view.type}', not pci`);
    const source = child(h.el, 'source');
    const address = source && child(source, 'address');
    if (!address) throw new DomainXmlError(`hostdev ${describeRef(ref)} has no <source><address>`);
    const current = readPci(address);
    for (const k of Object.keys(LIMITS) as Array<keyof PciAddress>) {
      const present = attr(address, k) !== undefined;
      if (current && current[k] === to[k] && (present || k === 'domain')) continue; // unchanged (an absent domain is 0)
      setAttr(address, k, FORMAT[k](to[k]));
    }
  }

  /**
   * Points an mdev hostdev at another mdev (`<source><address uuid=>`): the destination-side
   * remap for mediated devices. Only the uuid attribute changes.
   */
  setHostdevMdevUuid(ref: HostdevRef, uuid: string): void {
    if (!UUID.test(uuid)) throw new DomainXmlError(`${JSON.stringify(uuid)} is not an mdev UUID`);
    const h = this.find(ref);
    if (h.view.type !== 'mdev') throw new DomainXmlError(`hostdev ${describeRef(ref)} is type '${h.view.type}', not mdev`);
    const source = child(h.el, 'source');
    const address = source && child(source, 'address');
    if (!address || attr(address, 'uuid') === undefined) throw new DomainXmlError(`hostdev ${describeRef(ref)} has no <source><address uuid=>`);
    setAttr(address, 'uuid', uuid.toLowerCase());
  }

  /**
   * Adds or replaces `<qemu:override><qemu:device alias=A><qemu:frontend><qemu:property
   * name=N type=T value=V/>` (libvirt >= 8.2), e.g. migration-events=true for
   * VFIO_MIGRATION events. The qemu namespace is declared on the root once, reusing the
   * document's own prefix when it has one.
   */
  setQemuDeviceProperty(alias: string, name: string, type: QemuPropertyType, value: string | number | boolean): void {
    if (!/^[A-Za-z0-9_.-]{1,64}$/.test(alias)) throw new RangeError(`device alias ${JSON.stringify(alias)} is not a QEMU id`);
    if (!/^[A-Za-z0-9_.-]{1,64}$/.test(name)) throw new RangeError(`property name ${JSON.stringify(name)} is not a QEMU property name`);
    const v = String(value);
    if (type === 'bool' && v !== 'true' && v !== 'false') throw new RangeError(`bool property ${name} needs true or false, got ${v}`);
    if ((type === 'signed' || type === 'unsigned') && !/^-?[0-9]+$/.test(v)) throw new RangeError(`${type} property ${name} needs an integer, got ${v}`);
    const override = this.qemuChild(this.root, [], 'override', true)!;
    const device = this.qemuChild(override, [this.root], 'device', true, (d) => attr(d, 'alias') === alias, [['alias', alias]])!;
    const frontend = this.qemuChild(device, [this.root, override], 'frontend', true)!;
    const scope = [this.root, override, device];
    const prop = this.qemuChild(frontend, scope, 'property', true, (p) => attr(p, 'name') === name, [['name', name]])!;
    setAttr(prop, 'type', type);
    setAttr(prop, 'value', v);
  }

  /** The `<qemu:override>` frontend properties of one device alias, in document order. */
  qemuDeviceProperties(alias: string): QemuProperty[] {
    const override = this.qemuChild(this.root, [], 'override', false);
    const device = override && this.qemuChild(override, [this.root], 'device', false, (d) => attr(d, 'alias') === alias);
    const frontend = device && this.qemuChild(device, [this.root, override], 'frontend', false);
    if (!frontend) return [];
    return elements(frontend)
      .filter((p) => localName(p.name) === 'property')
      .map((p) => ({ name: attr(p, 'name') ?? '', type: attr(p, 'type') ?? '', value: attr(p, 'value') }));
  }

  // --- internals ------------------------------------------------------------------------

  private hostdevNodes(): HostdevNode[] {
    const devices = child(this.root, 'devices');
    if (!devices) return [];
    const out: HostdevNode[] = [];
    for (const el of elements(devices)) {
      const isHostdev = el.name === 'hostdev';
      const isIface = el.name === 'interface' && attr(el, 'type') === 'hostdev';
      if (!isHostdev && !isIface) continue;
      const source = child(el, 'source');
      const srcAddr = source && child(source, 'address');
      const driver = child(el, 'driver');
      const type = isHostdev ? (attr(el, 'type') ?? '') : 'pci';
      const managed = attr(el, 'managed');
      const uuid = type === 'mdev' && srcAddr ? attr(srcAddr, 'uuid') : undefined;
      const guestAddr = elements(el).find((c) => c.name === 'address' && attr(c, 'type') === 'pci');
      out.push({
        el,
        view: {
          index: out.length,
          element: isHostdev ? 'hostdev' : 'interface',
          type,
          managed: managed === undefined ? undefined : managed === 'yes',
          driverModel: driver && attr(driver, 'model'),
          driverName: driver && attr(driver, 'name'),
          mdevModel: type === 'mdev' ? attr(el, 'model') : undefined,
          pci: type === 'pci' ? readPci(srcAddr) : undefined,
          mdevUuid: uuid !== undefined && UUID.test(uuid) ? uuid.toLowerCase() : undefined,
          alias: (() => {
            const a = child(el, 'alias');
            return a && attr(a, 'name');
          })(),
          guestPci: readPci(guestAddr),
        },
      });
    }
    return out;
  }

  private find(ref: HostdevRef): HostdevNode {
    const all = this.hostdevNodes();
    const hits = all.filter((h) =>
      'index' in ref ? h.view.index === ref.index : 'alias' in ref ? h.view.alias === ref.alias : h.view.pci !== undefined && sameAddr(h.view.pci, ref.pci),
    );
    if (hits.length === 0) throw new DomainXmlError(`no hostdev ${describeRef(ref)} (the domain has ${all.length})`);
    if (hits.length > 1) throw new DomainXmlError(`hostdev ${describeRef(ref)} is ambiguous (${hits.length} match)`);
    return hits[0]!;
  }

  /** The qemu-namespace prefix to use for new elements under the root ("qemu" normally). */
  private qemuPrefix(): string {
    for (const [k, v] of this.root.attrs) {
      if (k.startsWith('xmlns:') && unescapeXml(v) === QEMU_NS) return k.slice(6);
    }
    // Declare it once, on the root, with a prefix nobody else uses.
    let p = 'qemu';
    for (let i = 1; attr(this.root, `xmlns:${p}`) !== undefined; i++) p = `qemu${i}`;
    setAttr(this.root, `xmlns:${p}`, QEMU_NS);
    return p;
  }

  /**
   * Finds (or creates) the child of `parent` named `local` in the qemu namespace. New
   * elements take the parent's prefix (or the root's qemu prefix under <domain>) and are
   * indented like their siblings.
   */
  private qemuChild(parent: XmlElement, scope: XmlElement[], local: string, create: boolean, match?: (e: XmlElement) => boolean, attrs: Array<[string, string]> = []): XmlElement | undefined {
    const found = elements(parent).find((e) => localName(e.name) === local && namespaceOf(e, [...scope, parent]) === QEMU_NS && (!match || match(e)));
    if (found || !create) return found;
    const prefix = parent === this.root ? this.qemuPrefix() : prefixOf(parent.name);
    const el: XmlElement = { kind: 'element', name: prefix ? `${prefix}:${local}` : local, attrs: attrs.map(([k, v]) => [k, escapeXml(v)]), children: [] };
    insertIndented(parent, el, scope.length, this.indentUnit());
    return el;
  }

  /** The document's indentation unit: the root's first child indentation, else two spaces. */
  private indentUnit(): string {
    const ws = this.root.children.find((c) => c.kind === 'text' && /^\n[ \t]+$/.test(c.raw));
    return ws && ws.kind === 'text' ? ws.raw.slice(1) : '  ';
  }
}

function describeRef(ref: HostdevRef): string {
  if ('index' in ref) return `#${ref.index}`;
  if ('alias' in ref) return `alias ${ref.alias}`;
  return formatBdf(ref.pci);
}

/**
 * Appends `el` as the last element child of `parent` (at depth `parentDepth`, the root
 * being 0), indented like the document: `unit` per level.
 */
function insertIndented(parent: XmlElement, el: XmlElement, parentDepth: number, unit: string): void {
  const childWs = { kind: 'text' as const, raw: `\n${unit.repeat(parentDepth + 1)}` };
  const kids = parent.children;
  const last = kids[kids.length - 1];
  if (kids.length === 0) {
    kids.push(childWs, el, { kind: 'text', raw: `\n${unit.repeat(parentDepth)}` });
  } else if (last && last.kind === 'text' && last.raw.trim() === '') {
    // <parent>...<last/>\n  </parent>: the closing tag's indentation stays last.
    kids.splice(kids.length - 1, 0, childWs, el);
  } else {
    kids.push(childWs, el);
  }
}
