// What the binder changed, so `vfio-mig unbind` can put it back: for each device the
// driver and driver_override it had before we first touched it, and for each PF the
// sriov_drivers_autoprobe we turned off. Kept in $VFIO_MIG_STATE_DIR/bindings.json
// (default /var/lib/vfio-mig), written atomically (temp file + rename), and recorded
// *before* a change is made, so a crash mid-bind still leaves a way back.

import { closeSync, fsyncSync, mkdirSync, openSync, readFileSync, renameSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { errCode, PciError } from './errors.ts';
import { isBdf, isDriverName, isModuleName } from '../host/sysfs.ts';

export interface DeviceRecord {
  /** The driver we bound (or are binding) it to. */
  driver: string;
  /** Driver before vfio-mig first touched the device (null: unbound). */
  previousDriver: string | null;
  /** The module of previousDriver, so unbind can load it again if it was removed. */
  previousModule: string | null;
  /** driver_override before (null: none set). */
  previousOverride: string | null;
  reason: string;
  since: string;
}

export interface PfRecord {
  previousAutoprobe: boolean;
  since: string;
}

export interface BindingState {
  devices: Record<string, DeviceRecord>;
  pfs: Record<string, PfRecord>;
}

export function stateDir(): string {
  return process.env.VFIO_MIG_STATE_DIR || '/var/lib/vfio-mig';
}

export function statePath(): string {
  return join(stateDir(), 'bindings.json');
}

function corrupt(reason: string): PciError {
  return new PciError({ operation: `read ${statePath()}`, device: '-', reason: `${reason}; fix or remove the file (it lists what unbind restores)` });
}

const nullableName = (v: unknown, check: (s: string) => boolean): v is string | null => v === null || (typeof v === 'string' && check(v));

export function readState(): BindingState {
  let text: string;
  try {
    text = readFileSync(statePath(), 'utf8');
  } catch (err) {
    if (errCode(err) === 'ENOENT') return { devices: {}, pfs: {} };
    throw new PciError({ operation: `read ${statePath()}`, device: '-', reason: (err as Error).message, code: errCode(err) });
  }
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (err) {
    throw corrupt(`not JSON (${(err as Error).message})`);
  }
  if (typeof doc !== 'object' || doc === null || (doc as { version?: unknown }).version !== 1) throw corrupt('not a version 1 state file');
  const { devices = {}, pfs = {} } = doc as { devices?: unknown; pfs?: unknown };
  if (typeof devices !== 'object' || devices === null || typeof pfs !== 'object' || pfs === null) throw corrupt('devices/pfs are not objects');
  const out: BindingState = { devices: {}, pfs: {} };
  for (const [bdf, r] of Object.entries(devices as Record<string, unknown>)) {
    const rec = r as Partial<DeviceRecord>;
    if (
      !isBdf(bdf) ||
      typeof rec !== 'object' ||
      rec === null ||
      typeof rec.driver !== 'string' ||
      !isDriverName(rec.driver) ||
      !nullableName(rec.previousDriver, isDriverName) ||
      !nullableName(rec.previousModule ?? null, isModuleName) ||
      !nullableName(rec.previousOverride, isDriverName)
    ) {
      throw corrupt(`bad entry for ${JSON.stringify(bdf.slice(0, 40))}`);
    }
    out.devices[bdf.toLowerCase()] = {
      driver: rec.driver,
      previousDriver: rec.previousDriver,
      previousModule: rec.previousModule ?? null,
      previousOverride: rec.previousOverride,
      reason: typeof rec.reason === 'string' ? rec.reason.slice(0, 200) : '',
      since: typeof rec.since === 'string' ? rec.since.slice(0, 40) : '',
    };
  }
  for (const [bdf, r] of Object.entries(pfs as Record<string, unknown>)) {
    const rec = r as Partial<PfRecord>;
    if (!isBdf(bdf) || typeof rec !== 'object' || rec === null || typeof rec.previousAutoprobe !== 'boolean') throw corrupt(`bad PF entry for ${JSON.stringify(bdf.slice(0, 40))}`);
    out.pfs[bdf.toLowerCase()] = { previousAutoprobe: rec.previousAutoprobe, since: typeof rec.since === 'string' ? rec.since.slice(0, 40) : '' };
  }
  return out;
}

/** Replaces the state file atomically; the caller holds the binder lock. */
export function writeState(state: BindingState): void {
  const dir = stateDir();
  mkdirSync(dir, { recursive: true, mode: 0o755 });
  const tmp = join(dir, `.bindings.json.${process.pid}.tmp`);
  const sorted = (o: Record<string, unknown>) => Object.fromEntries(Object.entries(o).sort(([a], [b]) => a.localeCompare(b)));
  const body = `${JSON.stringify({ version: 1, devices: sorted(state.devices), pfs: sorted(state.pfs) }, null, 2)}\n`;
  const fd = openSync(tmp, 'w', 0o644);
  try {
    writeSync(fd, body);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  renameSync(tmp, statePath());
}
