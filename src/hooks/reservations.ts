// Which local devices are spoken for, so that two incoming migrations (or a migration
// and a VM start) never pick the same VF:
//   - reservations: $VFIO_MIG_STATE_DIR/reservations.json, written by the qemu hook
//     under the binder lock (src/pci/lock.ts) - `migrate begin` reserves the devices it
//     picked, `prepare begin` the devices a domain starts with, `release end` drops them;
//   - running domains: the hostdevs in libvirt's status files (/run/libvirt/qemu/<name>.xml,
//     read as files - a hook must never call libvirt);
//   - running QEMUs: a VFIO group held open (src/pci/kernel.ts groupInUse).
// A reservation whose domain never started (the migration failed before `release`
// could run) expires after hooks.reservationSeconds; one whose domain runs does not.

import { closeSync, existsSync, fsyncSync, mkdirSync, openSync, readFileSync, readdirSync, renameSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { stateDir } from '../pci/state.ts';
import { HookRefusal, hasControlChars } from './refusal.ts';

export interface Reservation {
  /** PCI address or mdev UUID. */
  device: string;
  domain: string;
  /** Which hook operation took it. */
  op: 'migrate' | 'prepare';
  /** ISO time. */
  since: string;
}

const DEVICE = /^(?:[0-9a-f]{4}:[0-9a-f]{2}:[01][0-9a-f]\.[0-7]|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$/;
const MAX_FILE_BYTES = 4 << 20;

export function reservationsPath(): string {
  return join(stateDir(), 'reservations.json');
}

/** A libvirt domain name as a hook receives it: no '/', no control characters, not "." or "..". */
export function isDomainName(name: string): boolean {
  return typeof name === 'string' && name.length > 0 && name.length <= 256 && !name.includes('/') && !hasControlChars(name) && name !== '.' && name !== '..';
}

export function readReservations(): Reservation[] {
  let text: string;
  try {
    const buf = readFileSync(reservationsPath());
    if (buf.length > MAX_FILE_BYTES) throw new HookRefusal(`${reservationsPath()} is larger than ${MAX_FILE_BYTES} bytes; fix or remove it`);
    text = buf.toString('utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    if (err instanceof HookRefusal) throw err;
    throw new HookRefusal(`cannot read ${reservationsPath()}: ${(err as Error).message}`);
  }
  const bad = (why: string) => new HookRefusal(`${reservationsPath()} is damaged (${why}); fix or remove it (it lists devices reserved for incoming migrations)`);
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (err) {
    throw bad(`not JSON: ${(err as Error).message}`);
  }
  const list = (doc as { version?: unknown; reservations?: unknown } | null)?.reservations;
  if ((doc as { version?: unknown } | null)?.version !== 1 || !Array.isArray(list)) throw bad('not a version 1 reservations file');
  return list.map((r: Partial<Reservation>, i) => {
    if (typeof r !== 'object' || r === null || typeof r.device !== 'string' || !DEVICE.test(r.device) || typeof r.domain !== 'string' || !isDomainName(r.domain) || (r.op !== 'migrate' && r.op !== 'prepare') || typeof r.since !== 'string') {
      throw bad(`entry ${i + 1}`);
    }
    return { device: r.device, domain: r.domain, op: r.op, since: r.since.slice(0, 40) };
  });
}

/** Replaces the file atomically; the caller holds the lock. */
export function writeReservations(list: Reservation[]): void {
  const dir = stateDir();
  mkdirSync(dir, { recursive: true, mode: 0o755 });
  const tmp = join(dir, `.reservations.json.${process.pid}.tmp`);
  const sorted = [...list].sort((a, b) => a.device.localeCompare(b.device));
  const fd = openSync(tmp, 'w', 0o644);
  try {
    writeSync(fd, `${JSON.stringify({ version: 1, reservations: sorted }, null, 2)}\n`);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  renameSync(tmp, reservationsPath());
}

export function libvirtRunDir(): string {
  return process.env.VFIO_MIG_LIBVIRT_RUN_DIR || '/run/libvirt/qemu';
}

function domainRunning(domain: string): boolean {
  return isDomainName(domain) && existsSync(join(libvirtRunDir(), `${domain}.xml`));
}

/** Reservations still in force: young enough, or their domain runs. */
export function liveReservations(list: Reservation[], ttlSeconds: number, now = Date.now()): Reservation[] {
  return list.filter((r) => {
    const t = Date.parse(r.since);
    return (Number.isFinite(t) && now - t < ttlSeconds * 1000) || domainRunning(r.domain);
  });
}

// --- running domains, from libvirt's status files ------------------------------------

const ATTR = /([A-Za-z_:][-A-Za-z0-9_:.]*)\s*=\s*(?:'([^']*)'|"([^"]*)")/g;

function attrs(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const m of text.matchAll(ATTR)) out[m[1]!] = m[2] ?? m[3] ?? '';
  return out;
}

function num(v: string | undefined, max: number): number | undefined {
  if (v === undefined) return undefined;
  const n = /^0x[0-9a-f]+$/i.test(v) ? Number.parseInt(v.slice(2), 16) : /^[0-9]+$/.test(v) ? Number(v) : NaN;
  return Number.isInteger(n) && n >= 0 && n <= max ? n : undefined;
}

/** The source device of one hostdev/interface block, or undefined. */
function sourceDevice(block: string): string | undefined {
  const src = /<source\b[^>]*>([\s\S]*?)<\/source>/.exec(block);
  const addr = src && /<address\b([^>]*?)\/?>/.exec(src[1]!);
  if (!addr) return undefined;
  const a = attrs(addr[1]!);
  if (a.uuid && /^[0-9a-fA-F-]{36}$/.test(a.uuid)) return a.uuid.toLowerCase();
  const d = num(a.domain ?? '0', 0xffff);
  const b = num(a.bus, 0xff);
  const s = num(a.slot, 0x1f);
  const f = num(a.function, 7);
  if (d === undefined || b === undefined || s === undefined || f === undefined) return undefined;
  const h = (n: number, w: number) => n.toString(16).padStart(w, '0');
  return `${h(d, 4)}:${h(b, 2)}:${h(s, 2)}.${f}`;
}

/**
 * Devices that running domains other than `except` hold, from libvirt's status files.
 * A cheap scan (no XML parser): libvirt writes these files itself, in one style.
 */
export function devicesOfRunningDomains(except: string): Map<string, string> {
  const dir = libvirtRunDir();
  const out = new Map<string, string>();
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return out;
  }
  for (const f of names.slice(0, 4096)) {
    if (!f.endsWith('.xml')) continue;
    const domain = f.slice(0, -4);
    if (domain === except) continue;
    let text: string;
    try {
      text = readFileSync(join(dir, f), 'utf8');
    } catch {
      continue;
    }
    if (text.length > 16 << 20) continue;
    for (const m of text.matchAll(/<hostdev\b[^>]*>([\s\S]*?)<\/hostdev>|<interface\b[^>]*type=['"]hostdev['"][^>]*>([\s\S]*?)<\/interface>/g)) {
      const dev = sourceDevice(m[1] ?? m[2] ?? '');
      if (dev) out.set(dev, domain);
    }
  }
  return out;
}
