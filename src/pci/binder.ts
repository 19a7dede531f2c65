// The driver_override binder: moves PCI functions to the driver the table chose, whole
// IOMMU groups at a time, and back again on `unbind`.
//
// Per device (the order libvirt and driverctl use, see spec qemu-libvirt.md section 4):
//   1. modprobe the driver's module unless the driver is registered,
//   2. write driver_override first, so nothing else can grab the device once unbound,
//   3. unbind the current driver, 4. write the address to drivers_probe,
//   5. verify the `driver` link - drivers_probe succeeds even when nothing binds.
// Any failure restores the driver and override the device had before this run, and
// the group's members already moved in this run, so a failed bind changes nothing.
//
// Every action goes through the kernel seam (kernel.ts); state is re-read from sysfs.

import { setTimeout as sleep } from 'node:timers/promises';
import * as sysfs from '../host/sysfs.ts';
import { pciKernel } from './kernel.ts';
import { PciError, errCode } from './errors.ts';
import { readPciDevice, parseOverride, type PciDeviceInfo } from './pcidev.ts';
import { chooseDriver, chooseForFutureVfs, isHostDriver, type Choice, type Reason } from './choose.ts';
import { isVfioDriver } from './drivernames.ts';
import { loadDriverTable, type DriverTable } from './table.ts';
import { loadAliasIndex, type AliasIndex } from './modalias.ts';
import { pciDriverForModule, moduleForPciDriver } from './drivernames.ts';
import { readState, writeState, type BindingState, type DeviceRecord } from './state.ts';
import { acquireLock } from './lock.ts';

export interface BinderOptions {
  /** Loaded from $VFIO_MIG_CONFIG when not given (a broken config throws before anything). */
  table?: DriverTable;
  aliases?: AliasIndex;
  dryRun?: boolean;
  lockTimeoutMs?: number;
  modprobeTimeoutMs?: number;
  /** How long to wait for the `driver` link after drivers_probe (async probing drivers). */
  probeWaitMs?: number;
  /**
   * Runs for each device this run bound to a VFIO driver, after its whole IOMMU group is
   * bound. `vfio-mig bind` probes and caches the device's migration capabilities here
   * (src/compat is above src/pci, so the binder takes a callback instead of importing
   * it). Its line goes to the result's `afterBind`; a throw is recorded there and never
   * fails the bind.
   */
  afterBind?: (bdf: string, driver: string) => Promise<string | void>;
}

export interface BindOptions extends BinderOptions {
  /** Every PCI device on the host. */
  all?: boolean;
  /** Or these addresses (validated). */
  devices?: string[];
}

export type BindAction = 'bound' | 'already' | 'skipped' | 'refused' | 'failed' | 'would-bind';

export interface BindResult {
  address: string;
  vendor: string | null;
  device: string | null;
  iommuGroup: number | null;
  /** Driver before this run. */
  previous: string | null;
  /** Driver after this run (for a dry run: unchanged). */
  current: string | null;
  chosen: string | null;
  reason: Reason;
  detail: string;
  action: BindAction;
  /** Dry run: what would be done, in order. */
  steps?: string[];
  error?: string;
  /** What the after-bind hook reported (e.g. the capability probe). */
  afterBind?: string;
}

export interface PfResult {
  address: string;
  action: 'autoprobe-off' | 'would-turn-autoprobe-off' | 'failed';
  detail: string;
}

export interface BindReport {
  results: BindResult[];
  pfs: PfResult[];
  /** No device failed or was refused. */
  ok: boolean;
}

interface Planned {
  info: PciDeviceInfo;
  choice: Choice;
  result: BindResult;
}

const DEFAULTS = { lockTimeoutMs: 30_000, modprobeTimeoutMs: 30_000, probeWaitMs: 2_000 };

// ---------------------------------------------------------------------------------
// Kernel actions, each a typed error on failure.

function write(operation: string, device: string, path: string, value: string): void {
  try {
    pciKernel().writeAttr(path, value);
  } catch (err) {
    const code = errCode(err);
    throw new PciError({ operation, device, reason: `${code ?? 'error'} writing ${path}${code ? '' : `: ${(err as Error).message}`}`, code, cause: err });
  }
}

function writeOverride(bdf: string, driver: string | undefined): void {
  // An empty override is written as "\n": a 0-byte write never reaches the kernel.
  write(driver ? `set driver_override to ${driver}` : 'clear driver_override', bdf, sysfs.pciAttrPath(bdf, 'driver_override'), driver ? `${driver}\n` : '\n');
}

function unbindFrom(bdf: string, driver: string): void {
  write(`unbind from ${driver}`, bdf, sysfs.pciDriverUnbindPath(driver), bdf);
}

function readOverride(bdf: string): string | undefined {
  return parseOverride(sysfs.readDeviceAttr({ kind: 'pci', bdf }, 'driver_override'));
}

function currentDriver(bdf: string): string | undefined {
  return sysfs.driverOf({ kind: 'pci', bdf });
}

async function waitForDriver(bdf: string, want: string | undefined, waitMs: number): Promise<string | undefined> {
  const deadline = Date.now() + waitMs;
  let now = currentDriver(bdf);
  while (now !== want && Date.now() < deadline) {
    await sleep(20);
    now = currentDriver(bdf);
  }
  return now;
}

/** Loads the module unless the driver is registered; returns the driver's real name. */
async function ensureDriver(bdf: string, driver: string, module: string, timeoutMs: number): Promise<string> {
  if (sysfs.pciDriverRegistered(driver)) return driver;
  try {
    await pciKernel().modprobe(module, timeoutMs);
  } catch (err) {
    const reason = err instanceof PciError ? err.reason : (err as Error).message;
    throw new PciError({ operation: `modprobe ${module}`, device: bdf, reason, code: errCode(err), cause: err });
  }
  if (sysfs.pciDriverRegistered(driver)) return driver;
  // The guess from the module name may be wrong; the loaded module says what it registered.
  const registered = pciDriverForModule(module);
  if (sysfs.pciDriverRegistered(registered)) return registered;
  throw new PciError({ operation: `modprobe ${module}`, device: bdf, reason: `the module loaded but no PCI driver named ${driver} appeared in ${sysfs.sysfsRoot()}/bus/pci/drivers` });
}

interface Snapshot {
  driver: string | undefined;
  override: string | undefined;
}

/** Puts a device back to `to` (driver + override). Used by rollback and by unbind. */
async function restoreDevice(bdf: string, to: Snapshot, opts: { modprobeTimeoutMs: number; probeWaitMs: number; module?: string | null }): Promise<void> {
  const cur = currentDriver(bdf);
  if (readOverride(bdf) !== to.override) writeOverride(bdf, to.override);
  if (cur !== undefined && cur !== to.driver) unbindFrom(bdf, cur);
  if (to.driver !== undefined && currentDriver(bdf) !== to.driver) {
    // Loading the module attaches it to matching unbound devices: maybe this one.
    if (!sysfs.pciDriverRegistered(to.driver)) await ensureDriver(bdf, to.driver, opts.module ?? moduleForPciDriver(to.driver), opts.modprobeTimeoutMs);
    if (currentDriver(bdf) === undefined) {
      try {
        write(`bind to ${to.driver}`, bdf, sysfs.pciDriverBindPath(to.driver), bdf);
      } catch (err) {
        // bind refuses e.g. when a dynamic id is gone; drivers_probe may still find it.
        if (currentDriver(bdf) !== undefined) throw err;
        write('drivers_probe', bdf, sysfs.pciDriversProbePath(), bdf);
      }
    }
  }
  const now = await waitForDriver(bdf, to.driver, opts.probeWaitMs);
  if (now !== to.driver) {
    throw new PciError({ operation: `restore ${to.driver ?? 'no driver'}`, device: bdf, reason: `the device is bound to ${now ?? 'nothing'}` });
  }
}

/** The four steps for one device; returns the driver it ended up with. */
async function moveDevice(bdf: string, driver: string, probeWaitMs: number): Promise<void> {
  writeOverride(bdf, driver);
  const cur = currentDriver(bdf);
  if (cur !== undefined) unbindFrom(bdf, cur);
  write('drivers_probe', bdf, sysfs.pciDriversProbePath(), bdf);
  const now = await waitForDriver(bdf, driver, probeWaitMs);
  if (now !== driver) {
    throw new PciError({
      operation: `bind to ${driver}`,
      device: bdf,
      reason: now ? `${now} took the device instead (a concurrent bind?)` : `no driver bound after drivers_probe (did ${driver}'s probe refuse the device? see dmesg)`,
    });
  }
}

// ---------------------------------------------------------------------------------
// Planning.

function baseResult(info: PciDeviceInfo, choice: Choice): BindResult {
  return {
    address: info.address,
    vendor: info.vendor,
    device: info.device,
    iommuGroup: info.iommuGroup ?? null,
    previous: info.driver ?? null,
    current: info.driver ?? null,
    chosen: choice.driver,
    reason: choice.reason,
    detail: choice.detail,
    action: 'skipped',
  };
}

function errorResult(address: string, err: unknown): BindResult {
  return {
    address,
    vendor: null,
    device: null,
    iommuGroup: null,
    previous: null,
    current: null,
    chosen: null,
    reason: 'none',
    detail: (err as Error).message,
    action: 'failed',
    error: (err as Error).message,
  };
}

function selection(opts: BindOptions): string[] {
  if (opts.all && opts.devices?.length) throw new PciError({ operation: 'bind', device: '-', reason: 'give --all or --device, not both' });
  if (opts.all) return sysfs.listPciDevices();
  if (!opts.devices?.length) throw new PciError({ operation: 'bind', device: '-', reason: 'nothing selected: give --all or --device BDF' });
  return [...new Set(opts.devices.map((d) => sysfs.parseBdf(d)))];
}

// ---------------------------------------------------------------------------------
// bind

export async function bind(opts: BindOptions): Promise<BindReport> {
  const targets = selection(opts);
  const table = opts.table ?? loadDriverTable();
  const aliases = opts.aliases ?? loadAliasIndex();
  const o = { ...DEFAULTS, ...stripUndefined(opts) };
  const lock = opts.dryRun ? undefined : await acquireLock(o.lockTimeoutMs);
  try {
    return await bindLocked(targets, table, aliases, o);
  } finally {
    lock?.release();
  }
}

function stripUndefined<T extends object>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as Partial<T>;
}

async function bindLocked(targets: string[], table: DriverTable, aliases: AliasIndex, o: BinderOptions & typeof DEFAULTS): Promise<BindReport> {
  const infos = new Map<string, PciDeviceInfo>();
  const info = (bdf: string): PciDeviceInfo => {
    let i = infos.get(bdf);
    if (!i) {
      i = readPciDevice(bdf);
      infos.set(bdf, i);
    }
    return i;
  };
  const results: BindResult[] = [];
  const planned = new Map<string, Planned>();
  for (const bdf of targets) {
    let dev: PciDeviceInfo;
    try {
      dev = info(bdf);
    } catch (err) {
      results.push(errorResult(bdf, err));
      continue;
    }
    const choice = chooseDriver(dev, table, aliases);
    const result = baseResult(dev, choice);
    results.push(result);
    if (choice.driver) planned.set(bdf, { info: dev, choice, result });
  }

  // Read (and so validate) the state file before any action: a corrupt one stops here.
  const state = o.dryRun ? { devices: {}, pfs: {} } : readState();
  const pfs = table.manageSriovAutoprobe ? await manageAutoprobe(targets, table, aliases, info, state, o.dryRun === true) : [];

  // Whole IOMMU groups: siblings the table covers come along, a sibling held by a host
  // driver the table does not cover makes the group unusable for VFIO - refuse early.
  const groups = new Map<number | undefined, Planned[]>();
  for (const p of planned.values()) {
    const g = p.info.iommuGroup;
    groups.set(g, [...(groups.get(g) ?? []), p]);
  }
  for (const [group, members] of groups) {
    if (group === undefined) {
      for (const p of members) refuse(p, 'the device has no IOMMU group (is the IOMMU on? intel_iommu=on / amd_iommu=on)');
      continue;
    }
    const set = new Map(members.map((p) => [p.info.address, p]));
    const blockers: string[] = [];
    for (const sib of sysfs.groupMembers(group)) {
      if (sib.kind !== 'pci' || set.has(sib.bdf)) continue;
      let sInfo: PciDeviceInfo;
      try {
        sInfo = info(sib.bdf);
      } catch (err) {
        blockers.push(`${sib.bdf} cannot be read (${(err as Error).message})`);
        continue;
      }
      const sChoice = chooseDriver(sInfo, table, aliases);
      if (sChoice.driver) {
        const r = baseResult(sInfo, sChoice);
        r.detail = `${sChoice.detail} (IOMMU group ${group} sibling of ${members[0]!.info.address})`;
        results.push(r);
        set.set(sib.bdf, { info: sInfo, choice: sChoice, result: r });
      } else if (isHostDriver(sInfo.driver)) {
        blockers.push(
          `${sib.bdf} is bound to host driver ${sInfo.driver}, which the table ${sChoice.reason === 'excluded' ? `excludes (${sChoice.detail})` : 'does not cover'}`,
        );
      }
    }
    const ordered = [...set.values()].sort((a, b) => a.info.address.localeCompare(b.info.address));
    if (blockers.length) {
      for (const p of ordered) refuse(p, `IOMMU group ${group} cannot go to VFIO: ${blockers.join('; ')} - add a rule for it, or unbind it`);
      continue;
    }
    // Rebinding away from a VFIO driver while a VM holds the group would yank the device from the guest.
    if (ordered.some((p) => p.info.driver !== undefined && p.info.driver !== p.choice.driver && isVfioDriver(p.info.driver)) && pciKernel().groupInUse(group)) {
      for (const p of ordered) {
        if (p.info.driver === p.choice.driver) p.result.action = 'already';
        else refuse(p, `IOMMU group ${group} is in use (/dev/vfio/${group} is open - a running VM?); not rebinding it`);
      }
      continue;
    }
    await bindGroup(ordered, state, o);
  }
  results.sort((a, b) => a.address.localeCompare(b.address));
  return { results, pfs, ok: results.every((r) => r.action !== 'failed' && r.action !== 'refused') && pfs.every((p) => p.action !== 'failed') };
}

function refuse(p: Planned, why: string): void {
  p.result.action = 'refused';
  p.result.error = `bind ${p.info.address} to ${p.choice.driver} refused: ${why}`;
}

async function bindGroup(members: Planned[], state: BindingState, o: BinderOptions & typeof DEFAULTS): Promise<void> {
  const todo = members.filter((p) => p.info.driver !== p.choice.driver);
  for (const p of members) if (p.info.driver === p.choice.driver) p.result.action = 'already';
  if (todo.length === 0) return;

  if (o.dryRun) {
    for (const p of todo) {
      const steps: string[] = [];
      if (!sysfs.pciDriverRegistered(p.choice.driver!)) steps.push(`modprobe ${p.choice.module}`);
      steps.push(`driver_override=${p.choice.driver}`);
      if (p.info.driver) steps.push(`unbind from ${p.info.driver}`);
      steps.push('drivers_probe', `verify driver is ${p.choice.driver}`);
      p.result.action = 'would-bind';
      p.result.steps = steps;
    }
    return;
  }

  // Load every module first: a missing module then fails before any device moved.
  for (const p of todo) {
    try {
      p.choice.driver = await ensureDriver(p.info.address, p.choice.driver!, p.choice.module!, o.modprobeTimeoutMs);
      p.result.chosen = p.choice.driver;
    } catch (err) {
      failGroup(todo, p, err, undefined);
      return;
    }
  }

  const saved = new Map<string, DeviceRecord | undefined>(); // state entries as they were before this run
  const moved: Planned[] = [];
  for (const p of todo) {
    const bdf = p.info.address;
    const before: Snapshot = { driver: p.info.driver, override: p.info.override };
    saved.set(bdf, state.devices[bdf]);
    // Record before acting: if we die mid-way, unbind still knows the way back. A device
    // we moved earlier keeps its original "previous" (unbind goes back to the start).
    const prior = state.devices[bdf];
    state.devices[bdf] = {
      driver: p.choice.driver!,
      previousDriver: prior ? prior.previousDriver : (before.driver ?? null),
      previousModule: prior ? prior.previousModule : before.driver ? moduleForPciDriver(before.driver) : null,
      previousOverride: prior ? prior.previousOverride : (before.override ?? null),
      reason: p.choice.reason === 'rule' ? `rule ${p.choice.rule}` : p.choice.detail,
      since: new Date().toISOString(),
    };
    try {
      writeState(state);
      moved.push(p);
      await moveDevice(bdf, p.choice.driver!, o.probeWaitMs);
      p.result.action = 'bound';
      p.result.current = p.choice.driver;
    } catch (err) {
      const rollbackErrors = await rollback(moved, o);
      for (const m of moved) {
        const old = saved.get(m.info.address);
        if (old) state.devices[m.info.address] = old;
        else delete state.devices[m.info.address];
      }
      try {
        writeState(state);
      } catch (e) {
        rollbackErrors.push(`state file: ${(e as Error).message}`);
      }
      failGroup(todo, p, err, rollbackErrors);
      return;
    }
  }
  if (o.afterBind) await runAfterBind(todo, o.afterBind);
}

async function runAfterBind(bound: Planned[], hook: NonNullable<BinderOptions['afterBind']>): Promise<void> {
  for (const p of bound) {
    if (p.result.action !== 'bound' || !sysfs.isVfioBound({ kind: 'pci', bdf: p.info.address })) continue;
    try {
      const note = await hook(p.info.address, p.choice.driver!);
      if (note) p.result.afterBind = note;
    } catch (err) {
      p.result.afterBind = `after-bind hook failed: ${(err as Error).message}`;
    }
  }
}

/** Undo this run's moves, last first. Returns what could not be undone. */
async function rollback(moved: Planned[], o: BinderOptions & typeof DEFAULTS): Promise<string[]> {
  const errors: string[] = [];
  for (const p of [...moved].reverse()) {
    try {
      await restoreDevice(p.info.address, { driver: p.info.driver, override: p.info.override }, { ...o, module: p.info.driver ? moduleForPciDriver(p.info.driver) : null });
      p.result.current = p.info.driver ?? null;
    } catch (err) {
      errors.push((err as Error).message);
      p.result.current = currentDriver(p.info.address) ?? null;
    }
  }
  return errors;
}

/** rollbackErrors: undefined when nothing had been changed yet. */
function failGroup(todo: Planned[], culprit: Planned, err: unknown, rollbackErrors: string[] | undefined): void {
  const msg = (err as Error).message;
  const broken = rollbackErrors !== undefined && rollbackErrors.length > 0;
  const tail =
    rollbackErrors === undefined
      ? '; nothing was changed'
      : broken
        ? `; restoring the previous drivers also failed: ${rollbackErrors.join('; ')}`
        : '; the previous driver and driver_override were restored';
  for (const p of todo) {
    p.result.action = 'failed';
    p.result.error = p === culprit ? `${msg}${tail}` : `not bound: ${culprit.info.address} in the same IOMMU group failed (${msg})${tail}`;
  }
}

/**
 * Host drivers must not grab VFs that the table gives to a VFIO driver: turn
 * sriov_drivers_autoprobe off on their PF (recorded; `unbind` turns it back on). A VF
 * with a driver_override still probes, which is how the udev rule binds it.
 */
async function manageAutoprobe(
  targets: string[],
  table: DriverTable,
  aliases: AliasIndex,
  info: (bdf: string) => PciDeviceInfo,
  state: BindingState,
  dryRun: boolean,
): Promise<PfResult[]> {
  const out: PfResult[] = [];
  for (const bdf of targets) {
    let pf: PciDeviceInfo;
    try {
      pf = info(bdf);
    } catch {
      continue; // reported with the device results
    }
    if (!pf.sriov || !pf.sriov.autoprobe) continue;
    const vfChoice = chooseForFutureVfs(pf, table, aliases);
    if (!vfChoice?.driver) continue;
    const detail = `its VFs (${pf.vendor}:${pf.sriov.vfDevice}) go to ${vfChoice.driver} (${vfChoice.reason === 'rule' ? vfChoice.detail : 'modules.alias'})`;
    if (dryRun) {
      out.push({ address: bdf, action: 'would-turn-autoprobe-off', detail });
      continue;
    }
    try {
      state.pfs[bdf] ??= { previousAutoprobe: true, since: new Date().toISOString() };
      writeState(state);
      write('turn sriov_drivers_autoprobe off', bdf, sysfs.pciAttrPath(bdf, 'sriov_drivers_autoprobe'), '0');
      pf.sriov.autoprobe = false;
      out.push({ address: bdf, action: 'autoprobe-off', detail });
    } catch (err) {
      out.push({ address: bdf, action: 'failed', detail: (err as Error).message });
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------
// unbind

export interface UnbindOptions extends Omit<BinderOptions, 'table' | 'aliases'> {
  /** Only these devices; default: everything vfio-mig bound. */
  devices?: string[];
}

export type UnbindAction = 'restored' | 'would-restore' | 'not-managed' | 'gone' | 'refused' | 'failed';

export interface UnbindResult {
  address: string;
  action: UnbindAction;
  /** Driver before this run. */
  current: string | null;
  /** The driver it goes back to (null: unbound). */
  restore: string | null;
  detail: string;
  error?: string;
}

export interface UnbindReport {
  results: UnbindResult[];
  pfs: Array<{ address: string; action: 'autoprobe-restored' | 'would-restore-autoprobe' | 'gone' | 'failed'; detail: string }>;
  ok: boolean;
}

export async function unbind(opts: UnbindOptions = {}): Promise<UnbindReport> {
  const o = { ...DEFAULTS, ...stripUndefined(opts) };
  const named = opts.devices?.length ? [...new Set(opts.devices.map((d) => sysfs.parseBdf(d)))] : undefined;
  const lock = opts.dryRun ? undefined : await acquireLock(o.lockTimeoutMs);
  try {
    const state = readState();
    const targets = named ?? Object.keys(state.devices).sort();
    const results: UnbindResult[] = [];
    const busyGroups = new Map<number, boolean>();
    let dirty = false;
    for (const bdf of targets) {
      const rec = state.devices[bdf];
      const cur = currentDriver(bdf) ?? null;
      if (!rec) {
        results.push({ address: bdf, action: 'not-managed', current: cur, restore: null, detail: 'vfio-mig did not bind this device; left as it is' });
        continue;
      }
      const base = { address: bdf, current: cur, restore: rec.previousDriver, detail: `back to ${rec.previousDriver ?? 'no driver'}${rec.previousOverride ? ` (driver_override ${rec.previousOverride})` : ''}` };
      if (!sysfs.deviceExists({ kind: 'pci', bdf })) {
        results.push({ ...base, action: 'gone', detail: 'the device no longer exists (a removed VF?); record dropped' });
        if (!o.dryRun) {
          delete state.devices[bdf];
          dirty = true;
        }
        continue;
      }
      const group = sysfs.iommuGroupOf({ kind: 'pci', bdf });
      if (cur && isVfioDriver(cur) && group !== undefined) {
        if (!busyGroups.has(group)) busyGroups.set(group, pciKernel().groupInUse(group));
        if (busyGroups.get(group)) {
          results.push({ ...base, action: 'refused', error: `unbind ${bdf} refused: IOMMU group ${group} is in use (/dev/vfio/${group} is open - a running VM?)` });
          continue;
        }
      }
      if (o.dryRun) {
        results.push({ ...base, action: 'would-restore' });
        continue;
      }
      try {
        await restoreDevice(bdf, { driver: rec.previousDriver ?? undefined, override: rec.previousOverride ?? undefined }, { ...o, module: rec.previousModule });
        delete state.devices[bdf];
        writeState(state);
        results.push({ ...base, action: 'restored' });
      } catch (err) {
        results.push({ ...base, action: 'failed', error: (err as Error).message });
      }
    }
    const pfs: UnbindReport['pfs'] = [];
    for (const [pf, rec] of Object.entries(state.pfs)) {
      if (named && !named.includes(pf)) continue;
      if (!sysfs.deviceExists({ kind: 'pci', bdf: pf })) {
        pfs.push({ address: pf, action: 'gone', detail: 'the PF no longer exists; record dropped' });
        if (!o.dryRun) {
          delete state.pfs[pf];
          dirty = true;
        }
        continue;
      }
      if (o.dryRun) {
        pfs.push({ address: pf, action: 'would-restore-autoprobe', detail: `sriov_drivers_autoprobe back to ${rec.previousAutoprobe ? 1 : 0}` });
        continue;
      }
      try {
        write('restore sriov_drivers_autoprobe', pf, sysfs.pciAttrPath(pf, 'sriov_drivers_autoprobe'), rec.previousAutoprobe ? '1' : '0');
        delete state.pfs[pf];
        dirty = true;
        pfs.push({ address: pf, action: 'autoprobe-restored', detail: `sriov_drivers_autoprobe back to ${rec.previousAutoprobe ? 1 : 0}` });
      } catch (err) {
        pfs.push({ address: pf, action: 'failed', detail: (err as Error).message });
      }
    }
    if (dirty) writeState(state);
    return { results, pfs, ok: results.every((r) => r.action !== 'failed' && r.action !== 'refused') && pfs.every((p) => p.action !== 'failed') };
  } finally {
    lock?.release();
  }
}
