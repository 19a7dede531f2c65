// The capability cache: what a device said about its migration support while it was
// idle, for the times it cannot be asked. A VFIO device held by a running QEMU cannot be
// opened a second time (the group or cdev is exclusive), yet the source's preflight and
// the destination's hook need its flags, MIG_DATA_SIZE and descriptor. So vfio-mig asks
// when it binds a device (the binder's after-bind hook, wired by `vfio-mig bind`) or
// when told to (`vfio-mig probe`), and keeps the answer here.
//
// One JSON file per device, $VFIO_MIG_STATE_DIR/capabilities/<id>.json (default
// /var/lib/vfio-mig), written atomically (temp file, fsync, rename; mode 0644). Each
// entry records the time and the driver build it was probed under (driver, module,
// srcversion, version, build-id, kernel); an entry whose build no longer matches the
// device's is refused with the reason, never used: a new driver or firmware may answer
// differently.

import { closeSync, fchmodSync, fsyncSync, mkdirSync, openSync, readFileSync, readdirSync, renameSync, rmSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { stateDir } from '../pci/state.ts';
import * as sysfs from '../host/sysfs.ts';
import { driverIdentity, identityChange, type DriverIdentity } from './identity.ts';
import { validateDescriptor, DescriptorError, type DeviceDescriptor } from './types.ts';

export interface CapabilityEntry {
  schema: 1;
  /** PCI address or mdev UUID. */
  id: string;
  /** When the device was opened and asked (ISO 8601). */
  probedAt: string;
  /** The driver build the answers belong to. */
  identity: DriverIdentity;
  /** GET MIGRATION flags; null when the device refused (flagsError says how). */
  flags: number | null;
  flagNames: string[];
  flagsError?: string;
  /** MIG_DATA_SIZE in bytes (decimal string); null when not answered. */
  dataSize: string | null;
  dataSizeError?: string;
  descriptor: DeviceDescriptor;
}

export type CapabilityRead = { ok: true; entry: CapabilityEntry } | { ok: false; reason: string };

export function capabilitiesDir(): string {
  return join(stateDir(), 'capabilities');
}

/** The entry's file; the id is validated (and made canonical) before it becomes a name. */
export function capabilityPath(id: string): string {
  return join(capabilitiesDir(), `${sysfs.deviceIdString(sysfs.parseDeviceId(id))}.json`);
}

class EntryError extends Error {}

function nstr(v: unknown, what: string, max = 256): string | null {
  if (v === null || v === undefined) return null;
  if (typeof v !== 'string' || v.length > max) throw new EntryError(`${what} is not a string`);
  return v;
}

/** Checks an entry read back from disk; returns a clean copy. */
export function validateEntry(input: unknown): CapabilityEntry {
  if (typeof input !== 'object' || input === null) throw new EntryError('not an object');
  const e = input as Record<string, unknown>;
  if (e.schema !== 1) throw new EntryError(`schema ${JSON.stringify(e.schema)} is not 1`);
  if (typeof e.id !== 'string' || !(sysfs.isBdf(e.id) || sysfs.isMdevUuid(e.id))) throw new EntryError('id is not a device id');
  if (typeof e.probedAt !== 'string' || Number.isNaN(Date.parse(e.probedAt))) throw new EntryError('probedAt is not a time');
  const i = e.identity as Record<string, unknown> | null;
  if (typeof i !== 'object' || i === null || typeof i.kernel !== 'string') throw new EntryError('identity is not valid');
  const identity: DriverIdentity = {
    driver: nstr(i.driver, 'identity.driver', 64),
    module: nstr(i.module, 'identity.module', 64),
    srcversion: nstr(i.srcversion, 'identity.srcversion'),
    moduleVersion: nstr(i.moduleVersion, 'identity.moduleVersion'),
    buildId: nstr(i.buildId, 'identity.buildId', 128),
    kernel: i.kernel.slice(0, 256),
  };
  if (e.flags !== null && (typeof e.flags !== 'number' || !Number.isInteger(e.flags) || e.flags < 0 || e.flags > 0xffffffff)) throw new EntryError('flags is not a u32');
  if (!Array.isArray(e.flagNames) || !e.flagNames.every((n) => typeof n === 'string')) throw new EntryError('flagNames is not a list');
  const dataSize = nstr(e.dataSize, 'dataSize', 20);
  if (dataSize !== null && !/^[0-9]{1,20}$/.test(dataSize)) throw new EntryError('dataSize is not a byte count');
  let descriptor: DeviceDescriptor;
  try {
    descriptor = validateDescriptor(e.descriptor);
  } catch (err) {
    throw new EntryError(err instanceof DescriptorError ? err.message : String(err));
  }
  if (descriptor.id !== e.id) throw new EntryError(`the descriptor is of ${descriptor.id}, not ${e.id}`);
  const out: CapabilityEntry = { schema: 1, id: e.id, probedAt: e.probedAt, identity, flags: e.flags as number | null, flagNames: [...(e.flagNames as string[])], dataSize, descriptor };
  const fe = nstr(e.flagsError, 'flagsError', 1024);
  const de = nstr(e.dataSizeError, 'dataSizeError', 1024);
  if (fe !== null) out.flagsError = fe;
  if (de !== null) out.dataSizeError = de;
  return out;
}

/** Stores an entry atomically: a reader sees the old file or the new one, never a part. */
export function writeCapabilities(entry: CapabilityEntry): string {
  const clean = validateEntry(entry);
  const dir = capabilitiesDir();
  mkdirSync(dir, { recursive: true, mode: 0o755 });
  const path = capabilityPath(clean.id);
  const tmp = join(dir, `.${clean.id}.json.${process.pid}.tmp`);
  const fd = openSync(tmp, 'w', 0o644);
  try {
    fchmodSync(fd, 0o644); // whatever the umask: root writes, libvirtd's hooks and operators read
    writeSync(fd, `${JSON.stringify(clean, null, 2)}\n`);
    fsyncSync(fd);
  } catch (err) {
    closeSync(fd);
    rmSync(tmp, { force: true });
    throw err;
  }
  closeSync(fd);
  renameSync(tmp, path);
  return path;
}

/**
 * The cached capabilities of a device, if they are still its own: refused (with the
 * reason) when there is no entry, the file is damaged, or the device's driver build is
 * not the one the entry was probed under.
 */
export function readCapabilities(id: string): CapabilityRead {
  let path: string;
  let devId: sysfs.DeviceId;
  try {
    devId = sysfs.parseDeviceId(id);
    path = capabilityPath(id);
  } catch (err) {
    return { ok: false, reason: (err as Error).message };
  }
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    return { ok: false, reason: code === 'ENOENT' ? `no cached capabilities for ${sysfs.deviceIdString(devId)} (run: vfio-mig probe ${sysfs.deviceIdString(devId)} while it is idle)` : `cannot read ${path}: ${code ?? (err as Error).message}` };
  }
  let entry: CapabilityEntry;
  try {
    entry = validateEntry(JSON.parse(text));
  } catch (err) {
    return { ok: false, reason: `${path} is damaged (${(err as Error).message}); probe the device again` };
  }
  if (entry.id !== sysfs.deviceIdString(devId)) return { ok: false, reason: `${path} holds ${entry.id}` };
  if (!sysfs.deviceExists(devId)) return { ok: false, reason: `${entry.id} no longer exists` };
  const change = identityChange(entry.identity, driverIdentity(devId));
  if (change) return { ok: false, reason: `cached capabilities of ${entry.id} (probed ${entry.probedAt}) are stale: ${change}; probe it again while it is idle` };
  return { ok: true, entry };
}

/** Drops a device's entry (e.g. before a re-probe that must not fall back to it). */
export function removeCapabilities(id: string): void {
  rmSync(capabilityPath(id), { force: true });
}

/** Ids that have an entry (valid or not). */
export function listCachedIds(): string[] {
  try {
    return readdirSync(capabilitiesDir())
      .filter((n) => n.endsWith('.json') && !n.startsWith('.'))
      .map((n) => n.slice(0, -5))
      .filter((n) => sysfs.isBdf(n) || sysfs.isMdevUuid(n))
      .sort();
  } catch {
    return [];
  }
}
