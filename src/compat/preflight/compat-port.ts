// The compatibility layer as preflight sees it: device descriptors, the migration_version
// write test, the capability cache, vendor findings and the vfio-mig domain metadata.
// Those live in src/compat/*.ts (their own modules); preflight reaches them through this
// one interface, loaded lazily, so the unit tests can give it fixed answers and the CLI
// pays for the modules only when it runs a preflight.

/** Where a device of the destination could come from: an existing device, or a new mdev of a type on a parent. */
export type CompatTarget = string | { parent: string; mdevType: string };

export interface CompatVerdict {
  compatible: boolean;
  /** What decided: the migration_version write test, the descriptor comparison, ... */
  decidedBy: string;
  reason: string;
  errno?: string;
}

/** A device's migration capability as recorded when it was bound (a running QEMU holds the device). */
export type CapabilityFact =
  | { ok: true; flags: string[]; stopCopyBytes: number | null; precopyInitialBytes?: number | null }
  | { ok: false; reason: string };

export interface VendorFinding {
  verdict: 'pass' | 'warn' | 'fail';
  check: string;
  advice: string;
}

export interface CompatPort {
  describeDevice(id: string): Promise<unknown>;
  checkCompatibility(source: unknown, target: CompatTarget): Promise<CompatVerdict>;
  readCapabilities(id: string): Promise<CapabilityFact>;
  /** `vmDevices`: the descriptors of every VFIO device of the VM (checks that depend on the VM as a whole). */
  vendorFindings(source: unknown, destination?: unknown, context?: { vmDevices?: unknown[] }): Promise<VendorFinding[]>;
  /** The domain XML with the vfio-mig metadata element (each hostdev's source descriptor) embedded. */
  embedMetadata(xml: string, descriptors: HostdevDescriptor[]): Promise<string>;
  /** The source descriptors a vfio-mig metadata element in `xml` carries (none: []). */
  readMetadata(xml: string): Promise<HostdevDescriptor[]>;
}

/** One hostdev's source descriptor, as embedded in (and read from) the domain metadata. */
export interface HostdevDescriptor {
  alias: string | undefined;
  index: number;
  type: 'pci' | 'mdev';
  /** The source host's PCI address or mdev UUID. */
  address: string;
  descriptor: unknown;
}

const FLAG_NAMES: Array<[number, string]> = [
  [1, 'STOP_COPY'],
  [2, 'P2P'],
  [4, 'PRE_COPY'],
];

/** Bits the uAPI does not define are named UNKNOWN_0X<hex>. */
export const UNKNOWN_FLAG = /^UNKNOWN_0X[0-9A-F]+$/;

function flagName(s: string): string {
  const n = s.toUpperCase().replace(/^VFIO_MIGRATION_/, '');
  return /^0X[0-9A-F]+$/.test(n) ? `UNKNOWN_${n}` : n;
}

/** Flag names from a number (VFIO_MIGRATION_* bits) or a list of names. */
export function flagNames(raw: unknown): string[] {
  if (typeof raw === 'number' || typeof raw === 'bigint') {
    const n = BigInt(raw);
    const names = FLAG_NAMES.filter(([bit]) => (n & BigInt(bit)) !== 0n).map(([, name]) => name);
    const rest = n & ~7n;
    return rest !== 0n ? [...names, `UNKNOWN_0X${rest.toString(16).toUpperCase()}`] : names;
  }
  if (Array.isArray(raw)) return raw.filter((x): x is string => typeof x === 'string').map(flagName);
  if (typeof raw === 'string') return raw.split(/[|, ]+/).filter(Boolean).map(flagName);
  return [];
}

function firstNumber(o: Record<string, unknown>, names: string[]): number | null {
  for (const n of names) {
    const v = o[n];
    if (typeof v === 'number' && Number.isFinite(v) && v >= 0) return v;
    if (typeof v === 'bigint') return Number(v);
    if (typeof v === 'string' && /^[0-9]+$/.test(v)) return Number(v);
  }
  return null;
}

/** The capability cache's answer in preflight's terms (the cache's entry shape is its owner's). */
export function capabilityFact(read: unknown): CapabilityFact {
  if (typeof read !== 'object' || read === null) return { ok: false, reason: 'the capability cache gave no answer' };
  const r = read as Record<string, unknown>;
  if (r.ok !== true) return { ok: false, reason: typeof r.reason === 'string' ? r.reason : 'no capability cache entry' };
  const e = (typeof r.entry === 'object' && r.entry !== null ? r.entry : {}) as Record<string, unknown>;
  if (e.flags === null) return { ok: false, reason: `the device refused GET MIGRATION when probed${typeof e.flagsError === 'string' ? `: ${e.flagsError}` : ''}` };
  const flags = flagNames(e.flags ?? e.migrationFlags ?? e.flagNames);
  const stopCopyBytes = firstNumber(e, ['migDataSize', 'stopCopySize', 'stopCopyBytes', 'dataSize', 'mig_data_size']);
  const precopy = firstNumber(e, ['precopyInitialBytes', 'initialBytes']);
  return { ok: true, flags, stopCopyBytes, ...(precopy !== null ? { precopyInitialBytes: precopy } : {}) };
}

function compatVerdict(v: unknown): CompatVerdict {
  if (typeof v !== 'object' || v === null) return { compatible: false, decidedBy: 'none', reason: 'checkCompatibility gave no answer' };
  const o = v as Record<string, unknown>;
  return {
    compatible: o.compatible === true,
    decidedBy: typeof o.decidedBy === 'string' ? o.decidedBy : 'unknown',
    reason: typeof o.reason === 'string' ? o.reason : '',
    ...(typeof o.errno === 'string' ? { errno: o.errno } : {}),
  };
}

function findings(v: unknown): VendorFinding[] {
  if (!Array.isArray(v)) return [];
  return v
    .filter((f): f is Record<string, unknown> => typeof f === 'object' && f !== null)
    .map((f) => ({
      verdict: f.verdict === 'fail' || f.verdict === 'warn' ? f.verdict : 'pass',
      check: typeof f.check === 'string' ? f.check : 'vendor',
      advice: typeof f.advice === 'string' ? f.advice : '',
    }));
}

let override: CompatPort | undefined;

/** Tests: answer with `port` instead of the real compatibility layer (undefined restores it). */
export function setCompatPort(port: CompatPort | undefined): void {
  override = port;
}

/** The compatibility layer in use: a test's, or the real one. */
export async function compatPort(): Promise<CompatPort> {
  return override ?? (await loadCompat());
}

/** The real compatibility layer (src/compat/*.ts), imported on first use. */
export async function loadCompat(): Promise<CompatPort> {
  const [descriptor, types, compatible, cache, metadata, vendors, xmlModel, os] = await Promise.all([
    import('../descriptor.ts'),
    import('../types.ts'),
    import('../compatible.ts'),
    import('../cache.ts'),
    import('../domain-metadata.ts'),
    import('../vendors/index.ts'),
    import('../../libvirt/domain-xml.ts'),
    import('node:os'),
  ]);
  return {
    async describeDevice(id) {
      return descriptor.describeDevice(id);
    },
    async checkCompatibility(source, target) {
      return compatVerdict(compatible.checkCompatibility(source as never, target));
    },
    async readCapabilities(id) {
      return capabilityFact(cache.readCapabilities(id));
    },
    async vendorFindings(source, destination, context) {
      // The VM's other descriptors may come from XML metadata: only valid ones are passed on.
      const vmDevices = (context?.vmDevices ?? []).flatMap((d) => {
        try {
          return [types.validateDescriptor(d)];
        } catch {
          return [];
        }
      });
      return findings(vendors.vendorFindings(source, destination, context?.vmDevices ? { vmDevices } : {}));
    },
    async embedMetadata(xml, descriptors) {
      const doc = xmlModel.DomainXml.parse(xml);
      const host = os.hostname();
      metadata.writeMetadata(doc, {
        host: /^[A-Za-z0-9_.:-]{1,255}$/.test(host) ? host : undefined,
        hostdevs: descriptors.map((d) => ({ alias: d.alias, type: d.type, address: d.address, descriptor: d.descriptor as Record<string, unknown> })),
      });
      return doc.serialize();
    },
    async readMetadata(xml) {
      const md = metadata.readMetadata(xmlModel.DomainXml.parse(xml));
      return (md?.hostdevs ?? []).map((e, index) => ({ alias: e.alias, index, type: e.type, address: e.address, descriptor: e.descriptor }));
    },
  };
}
