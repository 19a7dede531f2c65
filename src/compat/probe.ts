// Asking an idle device what it can do, and remembering the answer (cache.ts). The
// device is opened through the VFIO layer, asked GET MIGRATION and MIG_DATA_SIZE, and
// closed again; nothing changes its migration state. A device held by a VM cannot be
// opened (EBUSY): that is exactly why the answer is cached while it is idle.

import { VfioDevice } from '../vfio/device.ts';
import { VfioError } from '../vfio/errors.ts';
import * as sysfs from '../host/sysfs.ts';
import { describeDevice } from './descriptor.ts';
import { driverIdentity } from './identity.ts';
import { writeCapabilities, type CapabilityEntry } from './cache.ts';
import { migrationFlagNames } from './types.ts';

export interface ProbeResult {
  entry: CapabilityEntry;
  /** Where the entry was written. */
  path: string;
}

function errText(err: unknown): string {
  if (err instanceof VfioError) return err.message;
  return err instanceof Error ? err.message : String(err);
}

/**
 * Opens the device, reads its migration flags and MIG_DATA_SIZE, closes it, and stores
 * the answers with its descriptor in the capability cache. A device that cannot be
 * opened (in use, not VFIO-bound) throws and leaves the cache as it was; a device that
 * opens but refuses GET MIGRATION (no migration support) is recorded as such.
 */
export async function probeCapabilities(idText: string): Promise<ProbeResult> {
  const id = sysfs.parseDeviceId(idText);
  const name = sysfs.deviceIdString(id);
  const identity = driverIdentity(id);
  const probedAt = new Date().toISOString();
  const dev = VfioDevice.open(name);
  let flags: number | null = null;
  let flagsError: string | undefined;
  let dataSize: string | null = null;
  let dataSizeError: string | undefined;
  try {
    try {
      flags = await dev.migrationFlags();
      // Unknown bits are kept: they are part of what the device said.
      const unknown = Number(dev.unknownMigrationFlags & 0xffffffffn);
      flags = (flags | unknown) >>> 0;
    } catch (err) {
      flagsError = errText(err);
    }
    if (flags !== null) {
      try {
        dataSize = (await dev.dataSize()).toString();
      } catch (err) {
        dataSizeError = errText(err);
      }
    }
  } finally {
    await dev.close();
  }
  const descriptor = describeDevice(name, flags === null ? {} : { migration: { flags, flagNames: migrationFlagNames(flags), dataSize, source: 'probe', probedAt } });
  if (flags === null) {
    // Not from an older cache entry: the device has just said otherwise.
    descriptor.migration = null;
    descriptor.migrationNote = `GET MIGRATION refused: ${flagsError ?? 'no answer'}`;
  }
  const entry: CapabilityEntry = {
    schema: 1,
    id: name,
    probedAt,
    identity,
    flags,
    flagNames: flags === null ? [] : migrationFlagNames(flags),
    dataSize,
    descriptor,
    ...(flagsError ? { flagsError } : {}),
    ...(dataSizeError ? { dataSizeError } : {}),
  };
  return { entry, path: writeCapabilities(entry) };
}

/**
 * The binder's after-bind hook (wired by `vfio-mig bind`): probe a device that was just
 * bound to a VFIO driver. Never throws: a failed probe must not fail the bind; the
 * returned line says what happened.
 */
export async function probeAfterBind(bdf: string): Promise<string> {
  try {
    const { entry } = await probeCapabilities(bdf);
    if (entry.flags === null) return `capabilities cached: not migratable (${entry.flagsError ?? 'GET MIGRATION refused'})`;
    return `capabilities cached: flags ${entry.flagNames.join('|') || '0'}, MIG_DATA_SIZE ${entry.dataSize ?? 'not reported'}`;
  } catch (err) {
    return `capabilities not probed: ${errText(err)}`;
  }
}
