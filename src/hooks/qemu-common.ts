// What the qemu hook's operations share: the call's context, which hostdevs are VFIO
// devices, the log, this host's name and libvirt version, the compatibility seam.
// Loaded only on the heavy path (the domain XML may hold VFIO hostdevs).

import { appendFileSync, mkdirSync, readdirSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { DomainXml, DomainXmlError, formatBdf, type Hostdev } from '../libvirt/domain-xml.ts';
import { loadDriverTable, DEFAULT_HOOKS, type DriverTable, type HooksConfig } from '../pci/table.ts';
import { acquireLock, type BinderLock } from '../pci/lock.ts';
import { PciError } from '../pci/errors.ts';
import type { DescriptorJson } from '../compat/domain-metadata.ts';
import { HookRefusal, oneLine } from './refusal.ts';

export interface HookContext {
  domain: string;
  operation: string;
  subOperation: string;
  extra: string;
  /** The domain XML from stdin. */
  xml: string;
  out: NodeJS.WritableStream;
  err: NodeJS.WritableStream;
  /** Epoch ms by which the operation must be done (lock waits and binds are bounded by it). */
  deadline: number;
}

export interface HookResult {
  code: number;
  /** migrate: the new domain XML for stdout (undefined: unchanged, print nothing). */
  xml?: string;
}

/** A VFIO hostdev of the domain, validated: its kind and its source device id. */
export interface VfioHostdev {
  view: Hostdev;
  kind: 'pci' | 'mdev';
  /** PCI address (0000:3b:00.2) or mdev UUID, lower case. */
  id: string;
  /** How to name it in a message: "hostdev0 (0000:3b:00.2)". */
  label: string;
}

export function remainingMs(ctx: HookContext): number {
  return Math.max(0, ctx.deadline - Date.now());
}

/** "vfio-mig qemu hook: <domain> <op>: <text>" on stderr, one line. */
export function say(ctx: Pick<HookContext, 'domain' | 'operation' | 'err'>, text: string): void {
  ctx.err.write(`vfio-mig qemu hook: ${oneLine(`${ctx.domain} ${ctx.operation}: ${text}`)}\n`);
}

/**
 * The binder lock (reservations and binds take turns on it), waited for within the
 * operation's bound; a holder that does not let go is a refusal that names it.
 */
export async function hookLock(ctx: HookContext): Promise<BinderLock> {
  try {
    return await acquireLock(Math.max(500, remainingMs(ctx) - 1000));
  } catch (err) {
    throw asRefusal(err);
  }
}

/** The binder's typed errors (lock, sysfs, modprobe) are refusals with their own message. */
export function asRefusal(err: unknown, device?: string): unknown {
  return err instanceof PciError ? new HookRefusal(err.message, device) : err;
}

export function parseDomainXml(xml: string): DomainXml {
  try {
    return DomainXml.parse(xml);
  } catch (err) {
    if (err instanceof DomainXmlError) throw new HookRefusal(`the domain XML on stdin is not usable: ${err.message}`);
    throw err;
  }
}

/**
 * The domain's VFIO hostdevs: PCI hostdevs on the vfio backend, `<interface type='hostdev'>`
 * (SR-IOV VFs as NICs) and mdevs. A VFIO hostdev whose source cannot be read (a
 * malformed or hostile address) is refused here, before any id reaches a path.
 */
export function vfioHostdevs(doc: DomainXml, opts: { lenient?: boolean } = {}): VfioHostdev[] {
  const out: VfioHostdev[] = [];
  for (const h of doc.hostdevs()) {
    const name = h.alias ?? `hostdev #${h.index + 1}`;
    if (h.type === 'pci' && (h.driverName === undefined || h.driverName === 'vfio')) {
      if (!h.pci) {
        if (opts.lenient) continue;
        throw new HookRefusal(`${name} has no valid PCI source address (<source><address domain= bus= slot= function=>)`);
      }
      const id = formatBdf(h.pci);
      out.push({ view: h, kind: 'pci', id, label: `${name} (${id})` });
    } else if (h.type === 'mdev') {
      if (!h.mdevUuid) {
        if (opts.lenient) continue;
        throw new HookRefusal(`${name} has no valid mdev UUID (<source><address uuid=>)`);
      }
      out.push({ view: h, kind: 'mdev', id: h.mdevUuid, label: `${name} (mdev ${h.mdevUuid})` });
    }
  }
  return out;
}

export function loadConfig(): { table: DriverTable; hooks: HooksConfig } {
  try {
    const table = loadDriverTable();
    return { table, hooks: table.hooks ?? DEFAULT_HOOKS };
  } catch (err) {
    throw new HookRefusal(`${(err as Error).message}`);
  }
}

/** This host's name in metadata and logs: $VFIO_MIG_HOST_NAME, else the kernel's host name. */
export function hostName(): string {
  const fromEnv = process.env.VFIO_MIG_HOST_NAME;
  const name = fromEnv && /^[A-Za-z0-9_.:-]{1,255}$/.test(fromEnv) ? fromEnv : hostname();
  return /^[A-Za-z0-9_.:-]{1,255}$/.test(name) ? name : 'localhost';
}

/** The hook's log: one JSON object per line in $VFIO_MIG_LOG_DIR/hooks.log (default /var/log/vfio-mig). */
export function logEvent(ctx: Pick<HookContext, 'domain' | 'operation'>, event: string, fields: Record<string, unknown> = {}): void {
  const dir = process.env.VFIO_MIG_LOG_DIR || '/var/log/vfio-mig';
  try {
    mkdirSync(dir, { recursive: true, mode: 0o755 });
    appendFileSync(join(dir, 'hooks.log'), `${JSON.stringify({ time: new Date().toISOString(), pid: process.pid, domain: ctx.domain, operation: ctx.operation, event, ...fields })}\n`);
  } catch {
    // The log is a convenience; a read-only /var/log must not fail the hook.
  }
}

/**
 * libvirt's version without asking libvirt (a hook must not): the soname of the
 * installed libvirt.so.0.MMMNNN.P, or $VFIO_MIG_LIBVIRT_VERSION ("11.3.0"). undefined
 * when neither says.
 */
export function libvirtVersion(): { major: number; minor: number } | undefined {
  const env = process.env.VFIO_MIG_LIBVIRT_VERSION;
  const m = env ? /^([0-9]{1,3})\.([0-9]{1,3})/.exec(env) : null;
  if (m) return { major: Number(m[1]), minor: Number(m[2]) };
  for (const dir of ['/usr/lib/x86_64-linux-gnu', '/usr/lib/aarch64-linux-gnu', '/usr/lib64', '/usr/lib']) {
    let names: string[];
    try {
      names = readdirSync(dir);
    } catch {
      continue;
    }
    for (const n of names) {
      const v = /^libvirt\.so\.0\.([0-9]{4,7})\.[0-9]+$/.exec(n);
      if (v) {
        const num = Number(v[1]);
        return { major: Math.floor(num / 1000), minor: num % 1000 };
      }
    }
  }
  return undefined;
}

// --- compatibility seam -------------------------------------------------------------------
// src/compat decides whether a source device's state loads on a local device. Loaded
// lazily (only a migration with hostdevs and vfio-mig metadata needs it); unit tests
// install their own with setCompat().

export interface CompatVerdict {
  compatible: boolean;
  decidedBy: string;
  reason: string;
  errno?: string;
}

export interface CompatApi {
  describeDevice(id: string): DescriptorJson | Promise<DescriptorJson>;
  checkCompatibility(source: DescriptorJson, target: string | { parent: string; mdevType: string }): CompatVerdict | Promise<CompatVerdict>;
}

let compatOverride: CompatApi | undefined;

export function setCompat(api: CompatApi | undefined): void {
  compatOverride = api;
}

export async function loadCompat(): Promise<CompatApi> {
  if (compatOverride) return compatOverride;
  const [descriptor, compatible] = await Promise.all([import('../compat/descriptor.ts'), import('../compat/compatible.ts')]);
  return {
    describeDevice: (id) => descriptor.describeDevice(id) as unknown as DescriptorJson,
    checkCompatibility: (source, target) => compatible.checkCompatibility(source as never, target) as CompatVerdict,
  };
}
