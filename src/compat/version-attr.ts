// Reading and writing a `migration_version` attribute: the I/O half of the protocol in
// migration-version.ts.
//
// The attribute comes from the 2019-2020 mdev proposal that was never merged upstream
// (so no in-tree driver has one; our edu test driver does). A driver that has one puts
// it on the PCI function (`<device>/migration_version`) or on an mdev type
// (`<parent>/mdev_supported_types/<type>/migration_version`, which an existing mdev
// reaches through its `mdev_type` link). The string is opaque: only the driver that
// wrote it may interpret it. We never parse it, never trim it, and write back exactly
// the bytes we read. What we do enforce, as the proposal did: ASCII, at most PATH_MAX
// (4096) bytes. Anything else counts as a read error. So does an empty value, because
// a 0-byte write never reaches the driver and so cannot be tested.

import { closeSync, constants, openSync, readSync, statSync } from 'node:fs';
import { pciKernel } from '../pci/kernel.ts';
import type { MigrationVersionFacts } from './types.ts';

export const MIGRATION_VERSION_MAX = 4096; // PATH_MAX, including everything the driver printed

function errCode(err: unknown): string | undefined {
  const c = (err as { code?: unknown }).code;
  return typeof c === 'string' && /^E[A-Z0-9]+$/.test(c) ? c : undefined;
}

/** Whether the attribute exists at `path` (a missing file is "absent", anything else is not). */
export function attributeExists(path: string): boolean {
  try {
    statSync(path);
    return true;
  } catch (err) {
    return errCode(err) !== 'ENOENT' && errCode(err) !== 'ENOTDIR';
  }
}

/** Reads the attribute at `path` (a path built by src/host/sysfs.ts). */
export function readMigrationVersionAt(path: string): MigrationVersionFacts {
  let fd: number;
  try {
    fd = openSync(path, constants.O_RDONLY);
  } catch (err) {
    const code = errCode(err);
    if (code === 'ENOENT' || code === 'ENOTDIR') return { present: false };
    return { present: true, error: `cannot open ${path}: ${code ?? (err as Error).message}`, ...(code ? { errno: code } : {}) };
  }
  const buf = Buffer.alloc(MIGRATION_VERSION_MAX + 1);
  let len = 0;
  try {
    // sysfs hands out the whole value on the first read; loop for other file systems.
    while (len < buf.length) {
      const n = readSync(fd, buf, len, buf.length - len, null);
      if (n === 0) break;
      len += n;
    }
  } catch (err) {
    const code = errCode(err);
    return { present: true, error: `reading ${path} failed: ${code ?? (err as Error).message}`, ...(code ? { errno: code } : {}) };
  } finally {
    closeSync(fd);
  }
  if (len > MIGRATION_VERSION_MAX) return { present: true, error: `${path} holds more than ${MIGRATION_VERSION_MAX} bytes (PATH_MAX): not a migration_version` };
  if (len === 0) return { present: true, error: `${path} is empty: an empty string cannot be written back to test a target` };
  const bytes = buf.subarray(0, len);
  // NUL is refused with the non-ASCII bytes: the driver's store receives a C buffer, and
  // a NUL would end the string early on its side while we think we sent all of it.
  const bad = bytes.findIndex((b) => b === 0 || b > 0x7f);
  if (bad >= 0) return { present: true, error: `${path} holds a byte that is not printable ASCII (0x${bytes[bad]!.toString(16)} at offset ${bad}): not a migration_version` };
  return { present: true, value: bytes.toString('latin1') };
}

export type WriteOutcome = { ok: true } | { ok: false; errno?: string; message: string };

/**
 * Writes `value` to the attribute at `path` in one write(2), through the PCI layer's
 * kernel seam (the unit tests' fake sysfs implements it). The errno is the driver's
 * answer and is passed on as it came, not interpreted.
 */
export function writeMigrationVersionAt(path: string, value: string): WriteOutcome {
  try {
    pciKernel().writeAttr(path, value);
    return { ok: true };
  } catch (err) {
    const code = errCode(err);
    return { ok: false, ...(code ? { errno: code } : {}), message: code ? `${code} writing ${path}` : `writing ${path} failed: ${(err as Error).message}` };
  }
}
