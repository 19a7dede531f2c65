// vfio-mig enable-events <domain> [--uri URI] [--fix] [--dry-run] [--json]: turns on QEMU's
// per-device migration events (`migration-events=on`, QEMU >= 9.1) for every VFIO hostdev
// of a domain's *persistent* definition, and with --fix the device properties that get
// around the two dirty-tracking traps preflight detects:
//   - dirty-tracking: x-device-dirty-page-tracking=off with enable-migration=on (a kernel
//     without CONFIG_IOMMUFD_DRIVER, e.g. Debian's 6.12, fails every device dirty report,
//     and the migration fails at RAM setup);
//   - pinned-convergence: x-pre-copy-dirty-page-tracking=off (a pinned device without
//     dirty tracking makes all guest RAM dirty at every pass: no convergence).
// QEMU device properties are fixed when the device is created, so the edit takes effect at
// the domain's next start; the running QEMU keeps what it has. We say so.
//
// Properties go into <qemu:override> (libvirt >= 8.2), keyed by the device's alias. A
// persistent definition keeps only user aliases ("ua-" prefix); a hostdev without one gets
// `ua-hostdev<N>`, so the override names the device whatever libvirt would call it. The
// rest of the document stays byte for byte (src/libvirt/domain-xml.ts).
//
// `migrate` uses editDefinition() for the XMLs it hands the destination.

import { parseArgs, UsageError } from './args.ts';
import { DomainXml, unescapeXml, type XmlElement, type XmlNode } from '../libvirt/domain-xml.ts';
import { domainView, boolProp, type VfioHostdev } from '../compat/preflight/domain-view.ts';
import { analysePinned, dirtyTrackingCheck } from '../compat/preflight/dirty-tracking.ts';
import type { FactDevice } from '../compat/preflight/facts.ts';

export const usage = 'vfio-mig enable-events <domain> [--uri URI] [--fix] [--dry-run] [--json]';

const HELP = `usage: ${usage}

Edits the domain's persistent definition so that QEMU reports each VFIO device's
migration state (the VFIO_MIGRATION event, which vfio-mig watch and migrate record):
migration-events=on for every VFIO hostdev, as a <qemu:override> property (QEMU >= 9.1,
libvirt >= 8.2). QEMU device properties are set when the device is created: the change
takes effect at the domain's next start (shut it down and start it; a reboot from inside
the guest is not enough). The running domain is not touched.

  --uri URI   libvirt URI (default $LIBVIRT_DEFAULT_URI, else qemu:///system)
  --fix       also set what preflight's dirty-tracking checks ask for, on this host:
                x-device-dirty-page-tracking=off + enable-migration=on where device
                dirty tracking would fail (kernel without CONFIG_IOMMUFD_DRIVER);
                x-pre-copy-dirty-page-tracking=off on pinned devices without dirty
                tracking (otherwise pre-copy never converges; guest RAM then moves
                once, while the guest is stopped)
  --dry-run   print what would change; define nothing
  --json      print the changes as one JSON object

A hostdev without an alias gets the user alias ua-hostdev<N> (libvirt keeps only "ua-"
aliases in a persistent definition, and <qemu:override> names devices by alias).
Everything else in the definition is kept as it was.

exit codes: 0 defined (or nothing to change); 1 libvirt refused; 2 usage
details: docs/operations.md
`;

/** One QEMU property to set on one hostdev. */
export interface PropertyEdit {
  name: string;
  type: 'bool' | 'string';
  value: string;
  /** Why (one phrase, for the output). */
  why: string;
}

export const EVENTS_PROPERTY: PropertyEdit = { name: 'migration-events', type: 'bool', value: 'true', why: 'per-device migration events' };
export const DIRTY_TRACKING_FIX: PropertyEdit[] = [
  { name: 'x-device-dirty-page-tracking', type: 'string', value: 'off', why: 'device dirty tracking fails on this kernel (no CONFIG_IOMMUFD_DRIVER)' },
  { name: 'enable-migration', type: 'string', value: 'on', why: 'needed with x-device-dirty-page-tracking=off (else QEMU blocks migration)' },
];
export const PINNED_FIX: PropertyEdit = { name: 'x-pre-copy-dirty-page-tracking', type: 'string', value: 'off', why: 'pinned device without dirty tracking: pre-copy would never converge' };

export interface EditPlan {
  /** migration-events=on on every VFIO hostdev (mdevs of model vfio-pci included). */
  events: boolean;
  /** Extra properties per hostdev index (the --fix ones). */
  fixes: Map<number, PropertyEdit[]>;
  /** Give hostdevs without an alias a user alias (a persistent definition); else use libvirt's default name. */
  addUserAliases: boolean;
}

export interface EditResult {
  xml: string;
  changed: boolean;
  /** "hostdev0 0000:3b:00.2: migration-events=on (per-device migration events)" and the like. */
  changes: string[];
}

const ON = new Set(['on', 'true', 'yes', '1']);
const OFF = new Set(['off', 'false', 'no', '0']);

/** Does the property already have this value (in any spelling QEMU accepts)? */
function already(h: VfioHostdev, p: PropertyEdit): boolean {
  const cur = h.properties.get(p.name.toLowerCase())?.toLowerCase();
  if (cur === undefined) return false;
  const want = p.value.toLowerCase();
  if (ON.has(want)) return ON.has(cur);
  if (OFF.has(want)) return OFF.has(cur);
  return cur === want;
}

function elementsOf(el: XmlElement): XmlElement[] {
  return el.children.filter((c): c is XmlElement => c.kind === 'element');
}

/** The <hostdev> and <interface type='hostdev'> elements, in DomainXml.hostdevs() order. */
function hostdevElements(doc: DomainXml): XmlElement[] {
  const devices = elementsOf(doc.root).find((c) => c.name === 'devices');
  if (!devices) return [];
  return elementsOf(devices).filter((c) => c.name === 'hostdev' || (c.name === 'interface' && c.attrs.some(([k, v]) => k === 'type' && unescapeXml(v) === 'hostdev')));
}

/** Every alias the document uses (so a new one cannot clash). */
function allAliases(el: XmlElement, out = new Set<string>()): Set<string> {
  for (const c of elementsOf(el)) {
    if (c.name === 'alias') {
      const n = c.attrs.find(([k]) => k === 'name');
      if (n) out.add(unescapeXml(n[1]));
    }
    allAliases(c, out);
  }
  return out;
}

/** Adds <alias name='NAME'/> as the last child of a hostdev element, indented like its siblings. */
function addAlias(el: XmlElement, name: string): void {
  const node: XmlElement = { kind: 'element', name: 'alias', attrs: [['name', name]], children: [] };
  const kids = el.children;
  // The whitespace before the first child is the children's indentation; the last text node is the closing tag's.
  const first = kids[0];
  const indent: XmlNode = first && first.kind === 'text' && first.raw.trim() === '' ? { kind: 'text', raw: first.raw } : { kind: 'text', raw: '\n' };
  const last = kids[kids.length - 1];
  if (last && last.kind === 'text' && last.raw.trim() === '') kids.splice(kids.length - 1, 0, indent, node);
  else kids.push(indent, node);
}

/**
 * Applies the plan to a domain XML: properties already set to the wanted value are left
 * alone, so a second run changes nothing. Returns the new XML and what changed.
 */
export function editDefinition(xml: string, plan: EditPlan): EditResult {
  const doc = DomainXml.parse(xml);
  const view = domainView(doc);
  const elements = hostdevElements(doc);
  const taken = allAliases(doc.root);
  const changes: string[] = [];
  for (const h of view.hostdevs) {
    const edits: PropertyEdit[] = [];
    if (plan.events) edits.push(EVENTS_PROPERTY);
    edits.push(...(plan.fixes.get(h.index) ?? []));
    const todo = edits.filter((p) => !already(h, p));
    if (todo.length === 0) continue;
    let alias = h.alias;
    let label = h.label;
    if (!h.aliasKnown && plan.addUserAliases) {
      const el = elements[h.index];
      if (!el) throw new Error(`hostdev #${h.index}: element not found`);
      alias = `ua-hostdev${h.index}`;
      for (let i = 1; taken.has(alias); i++) alias = `ua-hostdev${h.index}-${i}`;
      taken.add(alias);
      addAlias(el, alias);
      label = `${alias} ${h.device}`;
      changes.push(`${label}: alias ${alias} added (a persistent definition keeps only user aliases; <qemu:override> needs one)`);
    }
    for (const p of todo) {
      doc.setQemuDeviceProperty(alias, p.name, p.type, p.type === 'bool' ? ON.has(p.value) : p.value);
      changes.push(`${label}: ${p.name}=${p.type === 'bool' ? (ON.has(p.value) ? 'on' : 'off') : p.value} (${p.why})`);
    }
  }
  if (changes.length === 0) return { xml, changed: false, changes };
  return { xml: doc.serialize(), changed: true, changes };
}

/**
 * The --fix properties for each hostdev of `xml`, from this host's facts: the
 * dirty-tracking fix where preflight's dirty-tracking check does not pass, then the
 * pinned fix on every pinned device that would still have all of its RAM reported dirty.
 */
export function trapFixes(xml: string, iommufdDriver: boolean | null, devices: FactDevice[]): Map<number, PropertyEdit[]> {
  const view = domainView(DomainXml.parse(xml));
  const fixes = new Map<number, PropertyEdit[]>();
  const add = (h: VfioHostdev, p: PropertyEdit): void => {
    if (already(h, p)) return;
    fixes.set(h.index, [...(fixes.get(h.index) ?? []), p]);
    h.properties.set(p.name.toLowerCase(), p.value);
  };
  for (const h of view.hostdevs) {
    const c = dirtyTrackingCheck(h, iommufdDriver, devices.find((d) => d.id === h.device));
    if (c.verdict !== 'pass') for (const p of DIRTY_TRACKING_FIX) add(h, p);
  }
  // With the properties above applied (x-device-dirty-page-tracking=off makes a device pinned-all-dirty).
  const pinned = analysePinned(view.hostdevs, devices, iommufdDriver, undefined);
  for (const h of pinned.allDirty) if (boolProp(h, 'x-pre-copy-dirty-page-tracking') !== false) add(h, PINNED_FIX);
  return fixes;
}

export interface EnableEventsDeps {
  /** This host's kernel config (CONFIG_IOMMUFD_DRIVER) and devices, for --fix. */
  localFacts(): Promise<{ iommufdDriver: boolean | null; devices: FactDevice[] }>;
}

let depsOverride: EnableEventsDeps | undefined;

/** Tests: use these facts instead of the host's. */
export function setEnableEventsDeps(deps: EnableEventsDeps | undefined): void {
  depsOverride = deps;
}

async function defaultDeps(uri: string): Promise<EnableEventsDeps> {
  return {
    localFacts: async () => {
      const { compatPort } = await import('../compat/preflight/compat-port.ts');
      const { collectHostFacts } = await import('../compat/preflight/collect.ts');
      const f = await collectHostFacts({ compat: await compatPort(), queries: [], libvirtUri: uri, groupInUse: () => null });
      return { iommufdDriver: f.kernelConfig.iommufdDriver, devices: f.devices };
    },
  };
}

export async function run(argv: string[], out: NodeJS.WritableStream, err: NodeJS.WritableStream): Promise<number> {
  const args = parseArgs(argv, { flags: ['help', 'fix', 'dry-run', 'json'], options: ['uri'] });
  if (args.flags.has('help')) {
    out.write(HELP);
    return 0;
  }
  const [name, ...extra] = args.positional;
  if (!name) throw new UsageError('which domain?');
  if (extra.length) throw new UsageError(`unexpected argument ${JSON.stringify(extra[0])}`);
  const uris = args.options.get('uri') ?? [];
  if (uris.length > 1) throw new UsageError('--uri given more than once');
  const uri = uris[0] ?? process.env.LIBVIRT_DEFAULT_URI ?? 'qemu:///system';
  if (uri === '') throw new UsageError('--uri needs a value');
  const fix = args.flags.has('fix');
  const dry = args.flags.has('dry-run');
  const json = args.flags.has('json');

  const { Connection } = await import('../libvirt/binding.ts');
  let conn;
  try {
    conn = Connection.open(uri);
  } catch (e) {
    err.write(`vfio-mig enable-events: cannot reach libvirt at ${uri}: ${(e as Error).message}\n`);
    return 1;
  }
  try {
    let dom;
    try {
      dom = conn.lookupDomain(name);
    } catch (e) {
      err.write(`vfio-mig enable-events: ${(e as Error).message}\n`);
      return 1;
    }
    try {
      // SECURE: the definition goes back as a whole; without it passwords would be lost.
      const xml = dom.xml({ inactive: true, secure: true });
      const running = ['running', 'paused', 'blocked'].includes(dom.state().state);
      let fixes = new Map<number, PropertyEdit[]>();
      if (fix) {
        const facts = await (depsOverride ?? (await defaultDeps(uri))).localFacts();
        fixes = trapFixes(xml, facts.iommufdDriver, facts.devices);
      }
      const r = editDefinition(xml, { events: true, fixes, addUserAliases: true });
      const hostdevs = domainView(DomainXml.parse(xml)).hostdevs.length;
      if (r.changed && !dry) conn.defineDomain(r.xml).dispose();
      const when = running ? `takes effect at the next start of ${name} (shut it down and start it; the running QEMU keeps its current properties)` : `takes effect when ${name} next starts`;
      if (json) {
        out.write(`${JSON.stringify({ domain: name, uri, hostdevs, changed: r.changed, defined: r.changed && !dry, changes: r.changes, effective: r.changed ? 'next-start' : 'now', running }, null, 2)}\n`);
        return 0;
      }
      if (hostdevs === 0) {
        out.write(`${name}: no VFIO hostdevs in the persistent definition; nothing to change\n`);
        return 0;
      }
      if (!r.changed) {
        out.write(`${name}: every VFIO hostdev already has ${fix ? 'migration-events=on and the trap fixes this host needs' : 'migration-events=on'}; nothing to change\n`);
        return 0;
      }
      out.write(`${name}: ${dry ? 'would change' : 'persistent definition changed'}:\n`);
      for (const c of r.changes) out.write(`  ${c}\n`);
      out.write(dry ? `(dry run: nothing defined)\n` : `this ${when}\n`);
      return 0;
    } catch (e) {
      err.write(`vfio-mig enable-events: ${name}: ${(e as Error).message}\n`);
      return 1;
    } finally {
      dom.dispose();
    }
  } finally {
    conn.close();
  }
}
