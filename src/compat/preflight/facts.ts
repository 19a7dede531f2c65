// Host facts: what only a host itself can tell about itself, as versioned JSON. The
// destination's `vfio-mig host-facts --json` prints them (src/cli/host-facts.ts) and the
// source's preflight reads them (peer.ts); parseHostFacts() is the one gate such input
// passes through, because it comes from another machine.

import type { CapabilityFact, CompatVerdict } from './compat-port.ts';

/** Major version changes when a member changes meaning; new optional members keep it. */
export const HOST_FACTS_SCHEMA = 'vfio-mig/host-facts/1';

export interface FactDevice {
  /** PCI address or mdev UUID. */
  id: string;
  kind: 'pci' | 'mdev';
  driver: string | null;
  vendor?: string;
  device?: string;
  mdevType?: string;
  iommuGroup: number | null;
  /** Whether a process (a VM) holds the device's VFIO group now; null when it could not be told. */
  inUse: boolean | null;
  capabilities: CapabilityFact;
}

/** A source device's descriptor, sent to the destination for its migration_version write test. */
export interface CompatQuery {
  /** The source hostdev this is about (its alias). */
  key: string;
  descriptor: unknown;
}

export interface CompatCandidate extends CompatVerdict {
  /** A device id, or "new mdev <type> on <parent>". */
  target: string;
  /** The device is free (no VM holds it). */
  free: boolean;
  /** The target's own descriptor, for a compatible existing device (vendor checks compare both ends). */
  descriptor?: unknown;
}

export interface CompatAnswer {
  key: string;
  candidates: CompatCandidate[];
  /** Set when the answer could not be computed at all. */
  error?: string;
}

export interface HostFacts {
  schema: typeof HOST_FACTS_SCHEMA;
  hostname: string;
  collectedAt: string;
  kernel: { release: string };
  kernelConfig: { source: string | null; iommufdDriver: boolean | null; error?: string };
  libvirt: { version: string | null; error?: string };
  qemu: { version: string | null; error?: string };
  devices: FactDevice[];
  compatibility: CompatAnswer[];
}

export class HostFactsError extends Error {
  constructor(message: string) {
    super(`host facts: ${message}`);
    this.name = 'HostFactsError';
  }
}

type Obj = Record<string, unknown>;
const isObj = (v: unknown): v is Obj => typeof v === 'object' && v !== null && !Array.isArray(v);
const str = (v: unknown, max = 4096): string | undefined => (typeof v === 'string' && v.length <= max ? v : undefined);
const strOrNull = (v: unknown): string | null => str(v) ?? null;
const boolOrNull = (v: unknown): boolean | null => (typeof v === 'boolean' ? v : null);

function capability(v: unknown): CapabilityFact {
  if (!isObj(v)) return { ok: false, reason: 'missing' };
  if (v.ok === true) {
    const flags = Array.isArray(v.flags) ? v.flags.filter((f): f is string => typeof f === 'string' && /^[A-Z0-9_]{1,32}$/.test(f)) : [];
    const size = typeof v.stopCopyBytes === 'number' && Number.isFinite(v.stopCopyBytes) && v.stopCopyBytes >= 0 ? v.stopCopyBytes : null;
    return { ok: true, flags, stopCopyBytes: size };
  }
  return { ok: false, reason: str(v.reason) ?? 'no capability entry' };
}

/** Validates facts received from another host; throws HostFactsError on anything off-schema. */
export function parseHostFacts(input: unknown): HostFacts {
  const o = typeof input === 'string' ? parseJson(input) : input;
  if (!isObj(o)) throw new HostFactsError('not a JSON object');
  const schema = str(o.schema, 64);
  if (!schema || !/^vfio-mig\/host-facts\/[0-9]+$/.test(schema)) throw new HostFactsError(`no schema member (got ${JSON.stringify(o.schema)})`);
  if (schema !== HOST_FACTS_SCHEMA) throw new HostFactsError(`schema ${schema} is not ${HOST_FACTS_SCHEMA}: install the same vfio-mig version on both hosts`);
  const kernel = isObj(o.kernel) ? o.kernel : {};
  const cfg = isObj(o.kernelConfig) ? o.kernelConfig : {};
  const lv = isObj(o.libvirt) ? o.libvirt : {};
  const qe = isObj(o.qemu) ? o.qemu : {};
  if (!Array.isArray(o.devices) || o.devices.length > 65536) throw new HostFactsError('devices is not a list');
  const devices: FactDevice[] = o.devices.filter(isObj).map((d) => {
    const id = str(d.id, 64);
    if (!id || !/^[0-9a-fA-F:.-]+$/.test(id)) throw new HostFactsError(`bad device id ${JSON.stringify(d.id)}`);
    return {
      id,
      kind: d.kind === 'mdev' ? 'mdev' : 'pci',
      driver: strOrNull(d.driver),
      ...(str(d.vendor, 8) ? { vendor: str(d.vendor, 8) } : {}),
      ...(str(d.device, 8) ? { device: str(d.device, 8) } : {}),
      ...(str(d.mdevType, 128) ? { mdevType: str(d.mdevType, 128) } : {}),
      iommuGroup: typeof d.iommuGroup === 'number' && Number.isSafeInteger(d.iommuGroup) ? d.iommuGroup : null,
      inUse: boolOrNull(d.inUse),
      capabilities: capability(d.capabilities),
    };
  });
  const compatibility: CompatAnswer[] = (Array.isArray(o.compatibility) ? o.compatibility : []).filter(isObj).map((a) => ({
    key: str(a.key, 256) ?? '',
    candidates: (Array.isArray(a.candidates) ? a.candidates : []).filter(isObj).map((c) => ({
      target: str(c.target, 256) ?? '?',
      free: c.free === true,
      compatible: c.compatible === true,
      decidedBy: str(c.decidedBy, 128) ?? 'unknown',
      reason: str(c.reason) ?? '',
      ...(str(c.errno, 32) ? { errno: str(c.errno, 32) } : {}),
      // Opaque here: whoever uses it validates it (validateDescriptor).
      ...(isObj(c.descriptor) ? { descriptor: c.descriptor } : {}),
    })),
    ...(str(a.error) ? { error: str(a.error) } : {}),
  }));
  return {
    schema: HOST_FACTS_SCHEMA,
    hostname: str(o.hostname, 256) ?? '?',
    collectedAt: str(o.collectedAt, 64) ?? '',
    kernel: { release: str(kernel.release, 256) ?? '' },
    kernelConfig: { source: strOrNull(cfg.source), iommufdDriver: boolOrNull(cfg.iommufdDriver), ...(str(cfg.error) ? { error: str(cfg.error) } : {}) },
    libvirt: { version: strOrNull(lv.version), ...(str(lv.error) ? { error: str(lv.error) } : {}) },
    qemu: { version: strOrNull(qe.version), ...(str(qe.error) ? { error: str(qe.error) } : {}) },
    devices,
    compatibility,
  };
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new HostFactsError(`not JSON: ${(err as Error).message}; first bytes: ${JSON.stringify(text.slice(0, 80))}`);
  }
}

/** Validates the compatibility queries a source sends (stdin of host-facts). */
export function parseCompatQueries(input: string): CompatQuery[] {
  const o = parseJson(input);
  const list = Array.isArray(o) ? o : isObj(o) && Array.isArray(o.sources) ? o.sources : undefined;
  if (!list || list.length > 256) throw new HostFactsError('the source descriptors must be a JSON list (at most 256) of {key, descriptor}');
  return list.map((q) => {
    if (!isObj(q) || !str(q.key, 256) || !('descriptor' in q)) throw new HostFactsError('each source entry needs a key and a descriptor');
    return { key: q.key as string, descriptor: q.descriptor };
  });
}
