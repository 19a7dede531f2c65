// Preflight: every check family run against one domain and one destination, or against a
// domain definition with this host as the destination (the --xml form). Gathering
// (libvirt, QMP, sysfs, the peer) is done by the caller or through PreflightDeps, so the
// checks themselves are plain functions of what was gathered.

import { DomainXml, type PciAddress } from '../../libvirt/domain-xml.ts';
import { isMdevUuid } from '../../host/sysfs.ts';
import type { QmpExecutor } from '../../qmp/commands.ts';
import type { CompatPort, HostdevDescriptor } from './compat-port.ts';
import { deviceCapabilityCheck, findDevice, p2pCheck } from './devices.ts';
import { destinationDeviceChecks, factsCheck, type Assignment } from './destination.ts';
import { analysePinned, dirtyTrackingCheck, pinnedConvergenceCheck } from './dirty-tracking.ts';
import { domainView, type DomainView, type VfioHostdev } from './domain-view.ts';
import { downtimeChecks } from './downtime.ts';
import type { CompatQuery, HostFacts } from './facts.ts';
import type { PeerFacts, PeerRequest } from './peer.ts';
import { blockersCheck, inProgressCheck, postcopyCheck } from './qemu-checks.ts';
import { gatherQemuFacts, numParam, type Answer, type QemuFacts } from './qmp-facts.ts';
import { check, exitCodeOf, PREFLIGHT_SCHEMA, worst, type Check, type PreflightReport } from './types.ts';
import { vendorChecks } from './vendor.ts';
import { kernelVersionCheck, libvirtVersionCheck, qemuVersionCheck, type HostdevBinding } from './versions.ts';

export interface PreflightOptions {
  /** The operator means to migrate with --postcopy. */
  postcopy: boolean;
  /** The operator means to migrate with --parallel (multifd). */
  parallel: boolean;
  /** Migration link rate, bytes per second. */
  linkBytesPerSec: number;
  /** The link rate is a default, not given by the operator. */
  linkAssumed: boolean;
}

export const DEFAULT_LINK_BYTES_PER_SEC = 10e9 / 8;

export interface PreflightDeps {
  compat: CompatPort;
  /**
   * This host's facts, with compatibility answers for `queries`; `uri` is this host's
   * libvirt. As the source (`role`), which devices are free does not matter.
   */
  localFacts(queries: CompatQuery[], uri?: string, role?: 'source' | 'destination'): Promise<HostFacts>;
  destinationFacts(req: PeerRequest): Promise<PeerFacts>;
}

export interface DomainInput {
  name: string;
  /** The live XML of a running domain (aliases present), else the persistent one. */
  xml: string;
  running: boolean;
  /** The running domain's QMP (libvirt's monitor pass-through). */
  qmp: QmpExecutor | undefined;
  sourceLibvirt: Answer<string>;
  destination: { uri: string; libvirt: Answer<string>; qemu: Answer<string> };
  /** --dest-facts FILE */
  destFactsFile?: string;
  options: PreflightOptions;
}

export interface PreflightResult {
  report: PreflightReport;
  view: DomainView;
  assignments: Assignment[];
  descriptors: HostdevDescriptor[];
}

const val = <T>(a: Answer<T> | undefined): T | undefined => (a?.ok ? a.value : undefined);
const err = <T>(a: Answer<T> | undefined): string | undefined => (a && !a.ok ? a.error : undefined);

function finish(domain: string, destination: string, checks: Check[], extra: Partial<PreflightReport>): PreflightReport {
  const verdict = worst(checks.map((c) => c.verdict));
  return { schema: PREFLIGHT_SCHEMA, domain, destination, verdict, exitCode: exitCodeOf(verdict), ...extra, checks };
}

function bindings(view: DomainView, facts: HostFacts): HostdevBinding[] {
  return view.hostdevs.map((h) => {
    const d = findDevice(facts.devices, h.device);
    return { label: h.label, managed: h.managed, driver: d?.driver ?? undefined, variantBound: !!d && d.driver !== 'vfio-pci' && d.capabilities.ok };
  });
}

async function describeAll(compat: CompatPort, hostdevs: VfioHostdev[]): Promise<{ descriptors: HostdevDescriptor[]; errors: Map<string, string> }> {
  const descriptors: HostdevDescriptor[] = [];
  const errors = new Map<string, string>();
  for (const h of hostdevs) {
    try {
      descriptors.push({ alias: h.alias, index: h.index, type: h.kind, address: h.device, descriptor: await compat.describeDevice(h.device) });
    } catch (e) {
      errors.set(h.alias, e instanceof Error ? e.message : String(e));
    }
  }
  return { descriptors, errors };
}

function noDevicesCheck(view: DomainView): Check[] {
  if (view.hostdevs.length > 0) return [];
  const skipped = view.skipped.length ? ` (non-VFIO hostdevs: ${view.skipped.join(', ')})` : '';
  return [check('vfio-hostdevs', 'devices', 'domain', 'pass', `the domain has no VFIO hostdevs${skipped}: no device, dirty-tracking or destination-device check applies`, 'Nothing to do; vfio-mig has nothing to add to this migration.')];
}

/** Preflight of a (normally running) domain towards a destination libvirt URI. */
export async function preflightDomain(input: DomainInput, deps: PreflightDeps): Promise<PreflightResult> {
  const view = domainView(DomainXml.parse(input.xml));
  const hostdevs = view.hostdevs;
  const source = await deps.localFacts([], undefined, 'source');
  const qemu: QemuFacts | undefined = input.running && input.qmp ? await gatherQemuFacts(input.qmp) : undefined;
  const { descriptors, errors } = await describeAll(deps.compat, hostdevs);
  const queries: CompatQuery[] = descriptors.map((d) => ({ key: d.alias!, descriptor: d.descriptor }));
  const peer = await deps.destinationFacts({
    uri: input.destination.uri,
    queries,
    local: (q, uri) => deps.localFacts(q, uri, 'destination'),
    ...(input.destFactsFile ? { factsFile: input.destFactsFile } : {}),
  });
  const dest = peer.facts;
  const checks: Check[] = [];

  // the destination's libvirt must answer at all
  if (input.destination.libvirt.ok) {
    checks.push(check('destination-libvirt', 'destination', 'destination', 'pass', `libvirt at ${input.destination.uri} answers`, 'Nothing to do.'));
  } else {
    checks.push(check('destination-libvirt', 'destination', 'destination', 'fail', `cannot reach libvirt at ${input.destination.uri}: ${input.destination.libvirt.error}`, `Check the URI and that libvirtd runs there (virsh -c ${input.destination.uri} version).`));
  }

  // versions, both ends
  const n = hostdevs.length;
  if (qemu) checks.push(qemuVersionCheck('source', val(qemu.version), err(qemu.version), n));
  else checks.push(check('qemu-version', 'versions', 'source', 'warn', input.running ? 'no QMP access to the running domain' : 'the domain is not running: its QEMU cannot be asked', input.running ? 'Check the running QEMU by hand (virsh qemu-monitor-command DOMAIN \'{"execute":"query-version"}\').' : 'Start the domain and run preflight again; a live migration needs it running.'));
  checks.push(qemuVersionCheck('destination', val(input.destination.qemu) ?? dest?.qemu.version ?? undefined, err(input.destination.qemu), n));
  checks.push(kernelVersionCheck('source', source.kernel.release));
  checks.push(kernelVersionCheck('destination', dest?.kernel.release, dest ? undefined : peer.error));
  const b = bindings(view, source);
  checks.push(libvirtVersionCheck('source', val(input.sourceLibvirt), err(input.sourceLibvirt), b));
  checks.push(libvirtVersionCheck('destination', val(input.destination.libvirt) ?? dest?.libvirt.version ?? undefined, err(input.destination.libvirt), b));

  // devices
  checks.push(...noDevicesCheck(view));
  for (const h of hostdevs) checks.push(deviceCapabilityCheck(h, findDevice(source.devices, h.device)));
  if (n > 1) checks.push(p2pCheck(hostdevs, source.devices));

  // QEMU's own view
  if (qemu) {
    checks.push(blockersCheck(qemu));
    const busy = inProgressCheck(qemu);
    if (busy) checks.push(busy);
  }
  checks.push(postcopyCheck(qemu, input.options.postcopy, n));

  // dirty tracking and the pinned-device trap
  const iommufd = source.kernelConfig.iommufdDriver;
  for (const h of hostdevs) checks.push(dirtyTrackingCheck(h, iommufd, findDevice(source.devices, h.device)));
  const pinned = analysePinned(hostdevs, source.devices, iommufd, qemu ? numParam(qemu, 'avail-switchover-bandwidth') : undefined);
  if (n > 0) checks.push(pinnedConvergenceCheck(pinned));

  // downtime
  let prediction;
  if (n > 0) {
    const d = downtimeChecks({
      hostdevs,
      devices: source.devices,
      memoryBytes: view.memoryBytes,
      limitMs: qemu ? numParam(qemu, 'downtime-limit') : undefined,
      linkBytesPerSec: input.options.linkBytesPerSec,
      linkAssumed: input.options.linkAssumed,
      pinned,
      qemuVersion: qemu ? val(qemu.version) : undefined,
      capabilities: qemu ? val(qemu.capabilities) : undefined,
      parallel: input.options.parallel,
      libvirtVersion: val(input.sourceLibvirt),
    });
    checks.push(...d.checks);
    prediction = d.prediction;
  }

  // destination
  checks.push(factsCheck(dest, peer.via, peer.error));
  const destDevices = destinationDeviceChecks(hostdevs, dest, errors);
  checks.push(...destDevices.checks);

  // vendors: the source device against the destination device it would use
  for (const d of descriptors) {
    const h = hostdevs.find((x) => x.alias === d.alias)!;
    const target = destDevices.assignments.find((a) => a.alias === d.alias)?.descriptor;
    checks.push(...(await vendorChecks(deps.compat, h, d.descriptor, descriptors.map((x) => x.descriptor), target)));
  }

  const report = finish(input.name, input.destination.uri, checks, prediction ? { downtime: prediction } : {});
  return { report, view, assignments: destDevices.assignments, descriptors };
}

export interface XmlInput {
  /** The file name (for the report). */
  file: string;
  xml: string;
  /** This host's libvirt URI (versions), when given. */
  uri?: string;
  libvirt: Answer<string> | undefined;
  qemu: Answer<string> | undefined;
}

/** The --xml form: can this host receive the domain defined by `xml`? */
export async function preflightXml(input: XmlInput, deps: PreflightDeps): Promise<PreflightResult> {
  const view = domainView(DomainXml.parse(input.xml));
  const hostdevs = view.hostdevs;
  const embedded = await deps.compat.readMetadata(input.xml);
  const descriptors: HostdevDescriptor[] = [];
  const missing: VfioHostdev[] = [];
  for (const h of hostdevs) {
    // Matched as the migrate hook matches them: by alias when both have one, else by source address.
    const m = embedded.find((e) => (e.alias !== undefined && h.aliasKnown ? e.alias === h.alias : e.address === h.device));
    if (m) descriptors.push({ alias: h.alias, index: h.index, type: h.kind, address: h.device, descriptor: m.descriptor });
    else missing.push(h);
  }
  const facts = await deps.localFacts(descriptors.map((d) => ({ key: d.alias!, descriptor: d.descriptor })), input.uri, 'destination');
  const n = hostdevs.length;
  const checks: Check[] = [];
  checks.push(qemuVersionCheck('destination', val(input.qemu) ?? facts.qemu.version ?? undefined, err(input.qemu) ?? facts.qemu.error, n));
  checks.push(kernelVersionCheck('destination', facts.kernel.release));
  checks.push(libvirtVersionCheck('destination', val(input.libvirt) ?? facts.libvirt.version ?? undefined, err(input.libvirt) ?? facts.libvirt.error, bindings(view, facts)));
  checks.push(...noDevicesCheck(view));
  for (const h of missing) {
    checks.push(check('source-descriptor', 'destination', h.label, 'warn', 'the XML carries no vfio-mig descriptor for this hostdev: compatibility with the source device cannot be tested', 'Take the XML from vfio-mig preflight --print-xml on the source (it embeds the descriptors).'));
    checks.push(deviceCapabilityCheck(h, findDevice(facts.devices, h.device)));
  }
  const withDescriptor = hostdevs.filter((h) => !missing.includes(h));
  const destDevices = destinationDeviceChecks(withDescriptor, facts, new Map());
  checks.push(...destDevices.checks);
  if (n > 1) {
    // The devices this host would use must all have P2P, as on the source.
    const used = hostdevs.map((h) => ({ ...h, device: destDevices.assignments.find((a) => a.alias === h.alias)?.target ?? h.device }));
    checks.push(p2pCheck(used, facts.devices));
  }
  // Dirty tracking matters on the sending side only: here it is about a later migration onward.
  for (const h of hostdevs) {
    const c = dirtyTrackingCheck(h, facts.kernelConfig.iommufdDriver, findDevice(facts.devices, h.device), 'destination');
    checks.push(c.verdict === 'pass' ? c : { ...c, verdict: 'warn', detail: `for a later migration from this host: ${c.detail}` });
  }
  for (const d of descriptors) {
    const h = hostdevs.find((x) => x.alias === d.alias)!;
    const target = destDevices.assignments.find((a) => a.alias === d.alias)?.descriptor;
    checks.push(...(await vendorChecks(deps.compat, h, d.descriptor, descriptors.map((x) => x.descriptor), target)));
  }
  const report = finish(view.name === '(unnamed)' ? input.file : view.name, 'local', checks, {});
  return { report, view, assignments: destDevices.assignments, descriptors };
}

const BDF = /^([0-9a-f]{4}):([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])$/;

function pciOf(bdf: string): PciAddress | undefined {
  const m = BDF.exec(bdf.toLowerCase());
  return m ? { domain: parseInt(m[1]!, 16), bus: parseInt(m[2]!, 16), slot: parseInt(m[3]!, 16), function: parseInt(m[4]!, 16) } : undefined;
}

/**
 * The destination XML: each hostdev pointed at its assigned destination device (PCI
 * addresses; an mdev at the free mdev assigned there, or it keeps its UUID when the
 * destination only offers to create one) and the vfio-mig
 * metadata with the source descriptors embedded. Returns the XML and notes for the operator.
 */
export async function rewriteXml(xml: string, result: PreflightResult, compat: CompatPort): Promise<{ xml: string; notes: string[] }> {
  const doc = DomainXml.parse(xml);
  const notes: string[] = [];
  const hostdevs = domainView(doc).hostdevs;
  for (const a of result.assignments) {
    const src = result.view.hostdevs.find((h) => h.alias === a.alias);
    const here = src && hostdevs.find((h) => h.device === src.device);
    if (!src || !here) {
      notes.push(`${a.alias}: not in this XML, left alone`);
      continue;
    }
    const to = pciOf(a.target);
    if (here.kind === 'pci' && to) {
      doc.setHostdevSourceAddress({ index: here.index }, to);
      if (a.target !== src.device) notes.push(`${a.alias}: ${src.device} -> ${a.target}`);
    } else if (here.kind === 'mdev' && isMdevUuid(a.target)) {
      // An existing free mdev there: the destination's migrate hook tries the address the
      // XML names first, so the live and the persistent definition agree on it.
      doc.setHostdevMdevUuid({ index: here.index }, a.target);
      if (a.target !== src.device) notes.push(`${a.alias}: mdev ${src.device} -> ${a.target}`);
    } else if (a.target !== src.device) {
      notes.push(`${a.alias}: the destination offers ${a.target}; the XML keeps ${src.device} (create that mdev there under the same UUID)`);
    }
  }
  // An entry names its hostdev by alias only where this XML has one (a persistent definition
  // has none): the destination's hook then pairs the others by document order.
  const descriptors = result.descriptors.map((d) => ({ ...d, alias: hostdevs.find((h) => h.device === d.address)?.aliasKnown ? d.alias : undefined }));
  const out = descriptors.length > 0 ? await compat.embedMetadata(doc.serialize(), descriptors) : doc.serialize();
  return { xml: out, notes };
}
