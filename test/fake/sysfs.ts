// A fake PCI sysfs that behaves like the kernel's PCI core, for the binder's unit tests.
//
// It builds a real directory tree (devices, drivers, modules, IOMMU groups, SR-IOV
// links) that the code under test reads with ordinary fs calls, and it implements the
// binder's kernel seam (src/pci/kernel.ts): a write to driver_override, unbind, bind,
// drivers_probe, sriov_numvfs or sriov_drivers_autoprobe changes the tree the way the
// kernel would (drivers/pci/pci-driver.c, drivers/base/bus.c):
//   - driver_override set: only the driver of that name matches, whatever its id table
//     (override-only vfio_pci ids match only this way); cleared: normal id matching;
//   - drivers_probe attaches the first matching driver whose probe succeeds, and
//     succeeds even when nothing binds; bind fails ENODEV on a bound or unmatched device;
//   - VFs of a PF with sriov_drivers_autoprobe=0 are only probed with an override;
//   - loading a module registers its drivers and attaches them to unbound devices;
//   - "modprobe" of a module that is not installed fails like modprobe does.
// Paths are resolved through the tree (symlinks and all), so a path the binder builds
// wrongly fails with ENOENT as it would on a real host.

import { mkdtempSync, mkdirSync, writeFileSync, symlinkSync, rmSync, realpathSync, readlinkSync, unlinkSync, readFileSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative, dirname, basename } from 'node:path';
import type { TestFn } from 'ava';
import { setPciKernel, type PciKernel } from '../../src/pci/kernel.ts';

export interface IdMatch {
  vendor?: string;
  device?: string;
  subsystemVendor?: string;
  subsystemDevice?: string;
  /** Class prefix in hex, e.g. "0604" for PCI bridges. */
  classPrefix?: string;
}

export interface FakeDriverSpec {
  name: string;
  /** Module providing it; undefined = built in (always registered). */
  module?: string;
  /** Normal (autoprobe) id table entries. Override-only entries need no listing: an override matches anything. */
  ids?: IdMatch[];
  /** Probe result per device: 0 binds, a negative errno refuses. Default: 0. */
  probe?: (bdf: string) => number;
}

export interface FakeDeviceSpec {
  bdf: string;
  vendor: string;
  device: string;
  subsystemVendor?: string;
  subsystemDevice?: string;
  class?: string;
  revision?: string;
  /** IOMMU group; default: a new group of its own. null: no IOMMU group. */
  group?: number | null;
  /** Initial driver (bound without probing; registered if not yet). */
  driver?: string;
  override?: string;
  /** Make it an SR-IOV PF. */
  sriov?: { totalVfs: number; vfDevice: string; autoprobe?: boolean };
}

export type FakeOp =
  | { kind: 'override'; bdf: string; value: string | undefined }
  | { kind: 'unbind'; bdf: string; driver: string }
  | { kind: 'bind'; bdf: string; driver: string }
  | { kind: 'probe'; bdf: string }
  | { kind: 'autoprobe'; bdf: string; value: boolean }
  | { kind: 'numvfs'; bdf: string; value: number }
  | { kind: 'modprobe'; module: string }
  | { kind: 'migration_version'; path: string; value: string };

/**
 * How a fake `migration_version` attribute answers a write: undefined accepts, an errno
 * name (EINVAL, ENODEV, ...) refuses. Default: accept exactly the attribute's own value
 * (a trailing newline ignored on both), refuse anything else with EINVAL - the rule of
 * the edu test driver.
 */
export type VersionAcceptor = (written: string) => string | undefined;

export interface FakeMdevTypeSpec {
  name: string;
  /** Human name (the type's `name` attribute). */
  label?: string;
  /** Contents of mdev_supported_types/<type>/migration_version; absent when undefined. */
  migrationVersion?: string | Buffer;
  accept?: VersionAcceptor;
}

interface Dev {
  spec: Required<Omit<FakeDeviceSpec, 'group' | 'driver' | 'override' | 'sriov'>>;
  dir: string;
  group: number | undefined;
  driver: string | undefined;
  override: string | undefined;
  physfn: string | undefined;
  sriov: { totalVfs: number; vfDevice: string; autoprobe: boolean; vfs: string[] } | undefined;
}

interface Module {
  drivers: FakeDriverSpec[];
  loaded: boolean;
  /** modprobe fails with this message (init error). */
  initError?: string;
}

export class FakeErrno extends Error {
  readonly code: string;
  constructor(code: string, what: string) {
    super(`${code}: ${what}`);
    this.code = code;
  }
}

const hex = (v: string, n: number) => v.toLowerCase().replace(/^0x/, '').padStart(n, '0');

export class FakeSysfs implements PciKernel {
  readonly root: string;
  readonly sys: string;
  readonly devRoot: string;
  readonly modulesDir: string;
  readonly stateDir: string;
  readonly configPath: string;
  /** Every action, in order (successful or not). */
  readonly log: Array<FakeOp & { error?: string }> = [];
  readonly busyGroups = new Set<number>();
  /** Called for every VF the kernel adds (what udev would see as ACTION=add). */
  onAdd: ((bdf: string) => void) | undefined;

  readonly #devices = new Map<string, Dev>();
  readonly #byDir = new Map<string, string>();
  readonly #modules = new Map<string, Module>();
  /** Registered drivers in registration order (the order the driver core tries them). */
  readonly #drivers = new Map<string, FakeDriverSpec>();
  #nextGroup = 100;
  /** Writable migration_version attributes by real path, and how each answers a write. */
  readonly #versionAttrs = new Map<string, VersionAcceptor>();
  readonly #mdevParents = new Map<string, string>();
  #faults: Array<{ match: (op: FakeOp) => boolean; code: string; once: boolean }> = [];
  #after: Array<{ match: (op: FakeOp) => boolean; fn: (op: FakeOp) => void; once: boolean }> = [];

  constructor() {
    this.root = realpathSync(mkdtempSync(join(tmpdir(), 'vfio-mig-fakesys-')));
    this.sys = join(this.root, 'sys');
    this.devRoot = join(this.root, 'dev');
    this.modulesDir = join(this.root, 'modules');
    this.stateDir = join(this.root, 'state');
    this.configPath = join(this.root, 'etc', 'config.json');
    for (const d of ['devices/pci0000:00', 'bus/pci/devices', 'bus/pci/drivers', 'module', 'kernel/iommu_groups']) mkdirSync(join(this.sys, d), { recursive: true });
    writeFileSync(join(this.sys, 'bus/pci/drivers_probe'), '');
    mkdirSync(join(this.devRoot, 'vfio'), { recursive: true });
    mkdirSync(this.modulesDir, { recursive: true });
    mkdirSync(join(this.root, 'etc'), { recursive: true });
    writeFileSync(join(this.modulesDir, 'modules.alias'), '# Aliases extracted from modules themselves.\n');
  }

  env(): Record<string, string> {
    return {
      VFIO_MIG_SYSFS: this.sys,
      VFIO_MIG_DEV: this.devRoot,
      VFIO_MIG_MODULES_DIR: this.modulesDir,
      VFIO_MIG_STATE_DIR: this.stateDir,
      VFIO_MIG_CONFIG: this.configPath,
    };
  }

  dispose(): void {
    rmSync(this.root, { recursive: true, force: true });
  }

  // --- set-up -----------------------------------------------------------------------

  /** Installs a module (modprobe-able); `loaded` registers its drivers right away. */
  addModule(name: string, drivers: FakeDriverSpec[], opts: { loaded?: boolean; initError?: string } = {}): void {
    this.#modules.set(name, { drivers: drivers.map((d) => ({ ...d, module: name })), loaded: false, initError: opts.initError });
    if (opts.loaded) this.#load(name);
  }

  /** A built-in driver (pcieport, ...): always registered, no module. */
  addBuiltinDriver(spec: FakeDriverSpec): void {
    this.#register({ ...spec, module: undefined });
  }

  /** rmmod: the module's drivers go away (EBUSY while a device is bound to one). */
  unloadModule(name: string): void {
    const m = this.#modules.get(name);
    if (!m?.loaded) throw new Error(`fake: ${name} is not loaded`);
    for (const d of m.drivers) {
      if ([...this.#devices.values()].some((dev) => dev.driver === d.name)) throw new FakeErrno('EBUSY', `${d.name} is in use`);
    }
    for (const d of m.drivers) {
      this.#drivers.delete(d.name);
      rmSync(join(this.sys, 'bus/pci/drivers', d.name), { recursive: true, force: true });
    }
    rmSync(join(this.sys, 'module', name), { recursive: true, force: true });
    m.loaded = false;
  }

  setModuleInitError(name: string, message: string | undefined): void {
    const m = this.#modules.get(name);
    if (m) m.initError = message;
  }

  /** Writes modules.alias (lines without the trailing newline). */
  writeAliases(lines: string[]): void {
    writeFileSync(join(this.modulesDir, 'modules.alias'), `# Aliases extracted from modules themselves.\n${lines.join('\n')}\n`);
  }

  writeConfig(config: unknown): void {
    writeFileSync(this.configPath, typeof config === 'string' ? config : JSON.stringify(config, null, 2));
  }

  removeConfig(): void {
    rmSync(this.configPath, { force: true });
  }

  addDevice(spec: FakeDeviceSpec, physfn?: string): string {
    const bdf = spec.bdf.toLowerCase();
    const full = {
      bdf,
      vendor: hex(spec.vendor, 4),
      device: hex(spec.device, 4),
      subsystemVendor: hex(spec.subsystemVendor ?? spec.vendor, 4),
      subsystemDevice: hex(spec.subsystemDevice ?? '0000', 4),
      class: hex(spec.class ?? '020000', 6),
      revision: hex(spec.revision ?? '01', 2),
    };
    const dir = join(this.sys, 'devices', 'pci0000:00', bdf);
    mkdirSync(dir, { recursive: true });
    const w = (name: string, value: string) => writeFileSync(join(dir, name), `${value}\n`);
    w('vendor', `0x${full.vendor}`);
    w('device', `0x${full.device}`);
    w('subsystem_vendor', `0x${full.subsystemVendor}`);
    w('subsystem_device', `0x${full.subsystemDevice}`);
    w('class', `0x${full.class}`);
    w('revision', `0x${full.revision}`);
    const U = (s: string) => s.toUpperCase();
    const cls = full.class;
    w('modalias', `pci:v0000${U(full.vendor)}d0000${U(full.device)}sv0000${U(full.subsystemVendor)}sd0000${U(full.subsystemDevice)}bc${U(cls.slice(0, 2))}sc${U(cls.slice(2, 4))}i${U(cls.slice(4, 6))}`);
    symlinkSync(relative(join(this.sys, 'bus/pci/devices'), dir), join(this.sys, 'bus/pci/devices', bdf));
    const group = spec.group === null ? undefined : (spec.group ?? this.#nextGroup++);
    if (group !== undefined) {
      const gdir = join(this.sys, 'kernel/iommu_groups', String(group), 'devices');
      mkdirSync(gdir, { recursive: true });
      symlinkSync(relative(dir, join(this.sys, 'kernel/iommu_groups', String(group))), join(dir, 'iommu_group'));
      symlinkSync(relative(gdir, dir), join(gdir, bdf));
    }
    const dev: Dev = { spec: full, dir, group, driver: undefined, override: undefined, physfn, sriov: undefined };
    this.#devices.set(bdf, dev);
    this.#byDir.set(dir, bdf);
    if (physfn) symlinkSync(join('..', physfn), join(dir, 'physfn'));
    if (spec.sriov) {
      dev.sriov = { totalVfs: spec.sriov.totalVfs, vfDevice: hex(spec.sriov.vfDevice, 4), autoprobe: spec.sriov.autoprobe ?? true, vfs: [] };
      w('sriov_totalvfs', String(spec.sriov.totalVfs));
      w('sriov_vf_device', dev.sriov.vfDevice.replace(/^0+(?=.)/, ''));
      this.#writeSriov(dev);
    }
    this.#setOverride(dev, spec.override);
    if (spec.driver) {
      if (!this.#drivers.has(spec.driver)) this.#register({ name: spec.driver });
      this.#setDriver(dev, spec.driver);
    }
    return bdf;
  }

  // --- migration_version, mdevs, module facts (src/compat) --------------------------------

  /** Creates (or replaces) a writable migration_version attribute at `file` (a real path in the tree). */
  setVersionAttr(file: string, value: string | Buffer, accept?: VersionAcceptor): void {
    writeFileSync(file, value);
    const own = Buffer.isBuffer(value) ? value.toString('latin1') : value;
    const strip = (v: string) => (v.endsWith('\n') ? v.slice(0, -1) : v);
    this.#versionAttrs.set(realpathSync(file), accept ?? ((w) => (strip(w) === strip(own) ? undefined : 'EINVAL')));
  }

  /** A PCI function's own migration_version (default: "<value>\n" accepting only itself). */
  setDeviceMigrationVersion(bdf: string, value: string | Buffer, accept?: VersionAcceptor): void {
    this.setVersionAttr(join(this.#dev(bdf).dir, 'migration_version'), value, accept);
  }

  /** /sys/module/<module>/{srcversion,version} and the build-id note (a loaded module's facts). */
  setModuleInfo(module: string, info: { srcversion?: string; version?: string; buildId?: string }): void {
    const dir = join(this.sys, 'module', module);
    mkdirSync(join(dir, 'notes'), { recursive: true });
    if (info.srcversion !== undefined) writeFileSync(join(dir, 'srcversion'), `${info.srcversion}\n`);
    if (info.version !== undefined) writeFileSync(join(dir, 'version'), `${info.version}\n`);
    if (info.buildId !== undefined) {
      const desc = Buffer.from(info.buildId, 'hex');
      const head = Buffer.alloc(12);
      head.writeUInt32LE(4, 0);
      head.writeUInt32LE(desc.length, 4);
      head.writeUInt32LE(3, 8); // NT_GNU_BUILD_ID
      writeFileSync(join(dir, 'notes', '.note.gnu.build-id'), Buffer.concat([head, Buffer.from('GNU\0'), desc, Buffer.alloc((4 - (desc.length % 4)) % 4)]));
    }
  }

  /**
   * An mdev parent in /sys/class/mdev_bus: an existing fake PCI function (`name` is its
   * address) or a virtual class device like mtty's (/sys/devices/virtual/<name>/<name>).
   */
  addMdevParent(name: string, types: FakeMdevTypeSpec[]): string {
    const pci = this.#devices.get(name.toLowerCase());
    const dir = pci ? pci.dir : join(this.sys, 'devices', 'virtual', name, name);
    mkdirSync(dir, { recursive: true });
    mkdirSync(join(this.sys, 'class', 'mdev_bus'), { recursive: true });
    symlinkSync(relative(join(this.sys, 'class', 'mdev_bus'), dir), join(this.sys, 'class', 'mdev_bus', name));
    this.#mdevParents.set(name, dir);
    for (const t of types) this.setMdevType(name, t);
    return dir;
  }

  /** Adds or changes a type of a parent (its migration_version too). */
  setMdevType(parent: string, t: FakeMdevTypeSpec): void {
    const tdir = join(this.#mdevParents.get(parent)!, 'mdev_supported_types', t.name);
    mkdirSync(join(tdir, 'devices'), { recursive: true });
    writeFileSync(join(tdir, 'name'), `${t.label ?? t.name}\n`);
    writeFileSync(join(tdir, 'device_api'), 'vfio-pci\n');
    writeFileSync(join(tdir, 'available_instances'), '4\n');
    writeFileSync(join(tdir, 'create'), '');
    const mv = join(tdir, 'migration_version');
    if (t.migrationVersion !== undefined) this.setVersionAttr(mv, t.migrationVersion, t.accept);
    else {
      this.#versionAttrs.delete(mv);
      rmSync(mv, { force: true });
    }
  }

  /** An mdev of `type` under `parent`, bound to the mdev driver `driver` of `module`. */
  addMdev(uuid: string, parent: string, type: string, opts: { driver?: string; module?: string; group?: number } = {}): void {
    const pdir = this.#mdevParents.get(parent);
    if (!pdir) throw new Error(`fake: no mdev parent ${parent}`);
    const dir = join(pdir, uuid);
    mkdirSync(dir, { recursive: true });
    symlinkSync(join('..', 'mdev_supported_types', type), join(dir, 'mdev_type'));
    symlinkSync(relative(join(pdir, 'mdev_supported_types', type, 'devices'), dir), join(pdir, 'mdev_supported_types', type, 'devices', uuid));
    mkdirSync(join(this.sys, 'bus', 'mdev', 'devices'), { recursive: true });
    symlinkSync(relative(join(this.sys, 'bus', 'mdev', 'devices'), dir), join(this.sys, 'bus', 'mdev', 'devices', uuid));
    const driver = opts.driver ?? parent;
    const ddir = join(this.sys, 'bus', 'mdev', 'drivers', driver);
    if (!existsSync(ddir)) {
      mkdirSync(ddir, { recursive: true });
      if (opts.module) {
        mkdirSync(join(this.sys, 'module', opts.module), { recursive: true });
        symlinkSync(relative(ddir, join(this.sys, 'module', opts.module)), join(ddir, 'module'));
      }
    }
    symlinkSync(relative(dir, ddir), join(dir, 'driver'));
    const group = opts.group ?? this.#nextGroup++;
    const gdir = join(this.sys, 'kernel/iommu_groups', String(group), 'devices');
    mkdirSync(gdir, { recursive: true });
    symlinkSync(relative(dir, join(this.sys, 'kernel/iommu_groups', String(group))), join(dir, 'iommu_group'));
    symlinkSync(relative(gdir, dir), join(gdir, uuid));
  }

  /** Gives a PCI function a file or sub-directory attribute, e.g. ("nvidia/current_vgpu_type", "0"). */
  setDeviceFile(bdf: string, rel: string, value: string): void {
    const file = join(this.#dev(bdf).dir, rel);
    mkdirSync(dirname(file), { recursive: true });
    writeFileSync(file, value);
  }

  // --- fault injection ---------------------------------------------------------------

  /** The next action matching `match` fails with errno `code` (or every one, once=false). */
  failOn(match: (op: FakeOp) => boolean, code: string, once = true): void {
    this.#faults.push({ match, code, once });
  }

  /** Runs `fn` right after an action matching `match` (a concurrent actor). */
  after(match: (op: FakeOp) => boolean, fn: (op: FakeOp) => void, once = true): void {
    this.#after.push({ match, fn, once });
  }

  clearFaults(): void {
    this.#faults = [];
    this.#after = [];
  }

  // --- inspection ------------------------------------------------------------------------

  driverOf(bdf: string): string | undefined {
    return this.#dev(bdf).driver;
  }

  overrideOf(bdf: string): string | undefined {
    return this.#dev(bdf).override;
  }

  autoprobeOf(bdf: string): boolean | undefined {
    return this.#dev(bdf).sriov?.autoprobe;
  }

  vfsOf(bdf: string): string[] {
    return [...(this.#dev(bdf).sriov?.vfs ?? [])];
  }

  moduleLoaded(name: string): boolean {
    return this.#modules.get(name)?.loaded ?? false;
  }

  /** Everything a bind could change, for "the tree is as it was" checks. */
  snapshot(): Record<string, { driver: string | null; override: string | null; autoprobe?: boolean; link: string | null; overrideFile: string }> {
    const out: ReturnType<FakeSysfs['snapshot']> = {};
    for (const [bdf, d] of [...this.#devices].sort(([a], [b]) => a.localeCompare(b))) {
      let link: string | null = null;
      try {
        link = basename(readlinkSync(join(d.dir, 'driver')));
      } catch {
        link = null;
      }
      out[bdf] = { driver: d.driver ?? null, override: d.override ?? null, link, overrideFile: readFileText(join(d.dir, 'driver_override')) };
      if (d.sriov) out[bdf]!.autoprobe = d.sriov.autoprobe;
    }
    return out;
  }

  /** Actions of one kind, for order checks. */
  ops(kind?: FakeOp['kind']): FakeOp[] {
    return this.log.filter((o) => !kind || o.kind === kind);
  }

  // --- PciKernel: the seam -----------------------------------------------------------------

  writeAttr(path: string, value: string): void {
    let real: string;
    try {
      real = realpathSync(path);
    } catch {
      throw new FakeErrno('ENOENT', path);
    }
    const name = basename(real);
    const parent = dirname(real);
    const acceptor = this.#versionAttrs.get(real);
    if (acceptor) {
      return this.#act({ kind: 'migration_version', path: real, value }, () => {
        const code = acceptor(value);
        if (code) throw new FakeErrno(code, `migration_version refused ${JSON.stringify(value.slice(0, 60))}`);
      });
    }
    const devBdf = this.#byDir.get(parent);
    if (devBdf !== undefined) {
      const dev = this.#dev(devBdf);
      if (name === 'driver_override') {
        if (value.length > 4095) throw new FakeErrno('EINVAL', 'override too long');
        const v = value.endsWith('\n') ? value.slice(0, -1) : value;
        return this.#act({ kind: 'override', bdf: devBdf, value: v === '' ? undefined : v }, () => this.#setOverride(dev, v === '' ? undefined : v));
      }
      if (name === 'sriov_drivers_autoprobe' && dev.sriov) {
        const v = value.trim();
        if (v !== '0' && v !== '1') throw new FakeErrno('EINVAL', `autoprobe ${value}`);
        return this.#act({ kind: 'autoprobe', bdf: devBdf, value: v === '1' }, () => {
          dev.sriov!.autoprobe = v === '1';
          this.#writeSriov(dev);
        });
      }
      if (name === 'sriov_numvfs' && dev.sriov) {
        const n = Number(value.trim());
        if (!Number.isInteger(n) || n < 0) throw new FakeErrno('EINVAL', `numvfs ${value}`);
        return this.#act({ kind: 'numvfs', bdf: devBdf, value: n }, () => this.#setNumVfs(dev, n));
      }
      throw new FakeErrno('EACCES', `${name} is not writable in the fake`);
    }
    if (real === join(this.sys, 'bus/pci/drivers_probe')) {
      const bdf = value.trim();
      return this.#act({ kind: 'probe', bdf }, () => {
        const dev = this.#devices.get(bdf);
        if (!dev) throw new FakeErrno('ENODEV', bdf);
        if (!dev.driver) this.#attach(dev);
      });
    }
    if (dirname(parent) === join(this.sys, 'bus/pci/drivers') && (name === 'bind' || name === 'unbind')) {
      const driver = basename(parent);
      const bdf = value.trim();
      if (name === 'unbind') {
        return this.#act({ kind: 'unbind', bdf, driver }, () => {
          const dev = this.#devices.get(bdf);
          if (!dev || dev.driver !== driver) throw new FakeErrno('ENODEV', `${bdf} is not bound to ${driver}`);
          this.#setDriver(dev, undefined);
        });
      }
      return this.#act({ kind: 'bind', bdf, driver }, () => {
        const dev = this.#devices.get(bdf);
        const drv = this.#drivers.get(driver);
        if (!dev || !drv || dev.driver || !this.#matches(drv, dev)) throw new FakeErrno('ENODEV', `${driver} does not match ${bdf}`);
        const rc = this.#probe(drv, dev);
        if (rc < 0) throw new FakeErrno(errnoName(-rc), `${driver} probe of ${bdf}`);
        this.#setDriver(dev, driver);
      });
    }
    throw new FakeErrno('EACCES', `${path} is not writable in the fake`);
  }

  async modprobe(module: string, _timeoutMs: number): Promise<void> {
    const name = module.replace(/-/g, '_');
    this.#act({ kind: 'modprobe', module: name }, () => {
      const m = this.#modules.get(name);
      if (!m) throw Object.assign(new Error(`modprobe: FATAL: Module ${name} not found in directory /lib/modules/fake`), { code: undefined });
      if (m.loaded) return;
      if (m.initError) throw new Error(`modprobe: ERROR: could not insert '${name}': ${m.initError}`);
      this.#load(name);
    });
  }

  groupInUse(group: number): boolean {
    return this.busyGroups.has(group);
  }

  // --- kernel behaviour ---------------------------------------------------------------------

  #act(op: FakeOp, fn: () => void): void {
    const fault = this.#faults.find((f) => f.match(op));
    if (fault) {
      if (fault.once) this.#faults.splice(this.#faults.indexOf(fault), 1);
      this.log.push({ ...op, error: fault.code });
      throw new FakeErrno(fault.code, `injected on ${op.kind}`);
    }
    try {
      fn();
    } catch (err) {
      this.log.push({ ...op, error: (err as { code?: string }).code ?? (err as Error).message });
      throw err;
    }
    this.log.push(op);
    for (const a of [...this.#after]) {
      if (!a.match(op)) continue;
      if (a.once) this.#after.splice(this.#after.indexOf(a), 1);
      a.fn(op);
    }
  }

  #dev(bdf: string): Dev {
    const d = this.#devices.get(bdf);
    if (!d) throw new Error(`fake: no device ${bdf}`);
    return d;
  }

  #register(spec: FakeDriverSpec): void {
    this.#drivers.set(spec.name, spec);
    const dir = join(this.sys, 'bus/pci/drivers', spec.name);
    mkdirSync(dir, { recursive: true });
    for (const f of ['bind', 'unbind', 'new_id', 'remove_id', 'uevent']) writeFileSync(join(dir, f), '');
    if (spec.module) {
      const mdir = join(this.sys, 'module', spec.module, 'drivers');
      mkdirSync(mdir, { recursive: true });
      symlinkSync(relative(dir, join(this.sys, 'module', spec.module)), join(dir, 'module'));
      symlinkSync(relative(mdir, dir), join(mdir, `pci:${spec.name}`));
    }
  }

  #load(name: string): void {
    const m = this.#modules.get(name)!;
    m.loaded = true;
    mkdirSync(join(this.sys, 'module', name), { recursive: true });
    for (const d of m.drivers) {
      this.#register(d);
      // driver_attach(): offer every unbound device to the new driver.
      for (const dev of this.#devices.values()) {
        if (!dev.driver && this.#matches(d, dev) && this.#probe(d, dev) === 0) this.#setDriver(dev, d.name);
      }
    }
  }

  /** pci_match_device(): driver_override decides alone when set; else the id table. */
  #matches(drv: FakeDriverSpec, dev: Dev): boolean {
    if (dev.override !== undefined) return dev.override === drv.name;
    return (drv.ids ?? []).some((id) => idMatches(id, dev));
  }

  /** pci_device_probe(): VFs under autoprobe=0 only with an override; then the driver's probe. */
  #probe(drv: FakeDriverSpec, dev: Dev): number {
    if (dev.physfn && !this.#dev(dev.physfn).sriov!.autoprobe && dev.override === undefined) return -19;
    return drv.probe?.(dev.spec.bdf) ?? 0;
  }

  /** device_attach(): the first matching driver whose probe succeeds. */
  #attach(dev: Dev): void {
    for (const drv of this.#drivers.values()) {
      if (this.#matches(drv, dev) && this.#probe(drv, dev) === 0) {
        this.#setDriver(dev, drv.name);
        return;
      }
    }
  }

  #setDriver(dev: Dev, driver: string | undefined): void {
    const link = join(dev.dir, 'driver');
    if (dev.driver) {
      unlinkSync(link);
      rmSync(join(this.sys, 'bus/pci/drivers', dev.driver, dev.spec.bdf), { force: true });
    }
    dev.driver = driver;
    if (driver) {
      const ddir = join(this.sys, 'bus/pci/drivers', driver);
      symlinkSync(relative(dev.dir, ddir), link);
      symlinkSync(relative(ddir, dev.dir), join(ddir, dev.spec.bdf));
    }
  }

  #setOverride(dev: Dev, value: string | undefined): void {
    dev.override = value;
    writeFileSync(join(dev.dir, 'driver_override'), `${value ?? '(null)'}\n`);
  }

  #writeSriov(dev: Dev): void {
    writeFileSync(join(dev.dir, 'sriov_drivers_autoprobe'), `${dev.sriov!.autoprobe ? 1 : 0}\n`);
    writeFileSync(join(dev.dir, 'sriov_numvfs'), `${dev.sriov!.vfs.length}\n`);
  }

  #setNumVfs(pf: Dev, n: number): void {
    const s = pf.sriov!;
    if (n === s.vfs.length) return;
    if (n > s.totalVfs) throw new FakeErrno('ERANGE', `${n} > ${s.totalVfs}`);
    if (n !== 0 && s.vfs.length !== 0) throw new FakeErrno('EBUSY', 'VFs already enabled');
    if (n === 0) {
      for (const [i, vf] of s.vfs.entries()) this.#removeDevice(vf, join(pf.dir, `virtfn${i}`));
      s.vfs = [];
      this.#writeSriov(pf);
      return;
    }
    const [dom, bus] = pf.spec.bdf.split(':') as [string, string];
    for (let i = 0; i < n; i++) {
      const vf = `${dom}:${(parseInt(bus, 16) + 1).toString(16).padStart(2, '0')}:${(i >> 3).toString(16).padStart(2, '0')}.${i & 7}`;
      this.addDevice(
        { bdf: vf, vendor: pf.spec.vendor, device: s.vfDevice, subsystemVendor: pf.spec.subsystemVendor, subsystemDevice: pf.spec.subsystemDevice, class: pf.spec.class },
        pf.spec.bdf,
      );
      symlinkSync(relative(pf.dir, this.#dev(vf).dir), join(pf.dir, `virtfn${i}`));
      s.vfs.push(vf);
      this.#writeSriov(pf);
      const dev = this.#dev(vf);
      this.#attach(dev); // pci_bus_add_device(): autoprobe (skipped by #probe when autoprobe=0)
      this.onAdd?.(vf);
    }
  }

  #removeDevice(bdf: string, pfLink: string): void {
    const dev = this.#dev(bdf);
    if (dev.driver) this.#setDriver(dev, undefined);
    rmSync(pfLink, { force: true });
    rmSync(join(this.sys, 'bus/pci/devices', bdf), { force: true });
    if (dev.group !== undefined) rmSync(join(this.sys, 'kernel/iommu_groups', String(dev.group)), { recursive: true, force: true });
    rmSync(dev.dir, { recursive: true, force: true });
    this.#devices.delete(bdf);
    this.#byDir.delete(dev.dir);
  }
}

function idMatches(id: IdMatch, dev: Dev): boolean {
  const eq = (want: string | undefined, have: string) => want === undefined || want === '*' || hex(want, 4) === have;
  return (
    eq(id.vendor, dev.spec.vendor) &&
    eq(id.device, dev.spec.device) &&
    eq(id.subsystemVendor, dev.spec.subsystemVendor) &&
    eq(id.subsystemDevice, dev.spec.subsystemDevice) &&
    (id.classPrefix === undefined || dev.spec.class.startsWith(id.classPrefix.toLowerCase()))
  );
}

function errnoName(n: number): string {
  return ({ 1: 'EPERM', 5: 'EIO', 12: 'ENOMEM', 16: 'EBUSY', 19: 'ENODEV', 22: 'EINVAL' } as Record<number, string>)[n] ?? `E${n}`;
}

function readFileText(path: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return '';
  }
}

/** Installs a FakeSysfs as the kernel seam for one test file and points every root at it. */
export function installFakeSysfs(test: TestFn): FakeSysfs {
  const fake = new FakeSysfs();
  Object.assign(process.env, fake.env());
  setPciKernel(fake);
  test.after.always(() => fake.dispose());
  return fake;
}
