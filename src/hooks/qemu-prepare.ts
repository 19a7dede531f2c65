// `qemu <domain> prepare begin -`: before libvirt labels resources and starts QEMU (on a
// plain start, and on the destination of a migration after `migrate begin`). Every
// VFIO hostdev must be on its migration-capable driver, or the start is refused with
// one line naming the device and the reason. Then the domain's devices are reserved
// for it, so an incoming migration cannot pick them while QEMU starts.
//
// Who binds: with managed='no' (or no managed attribute) vfio-mig binds, through the
// binder (whole IOMMU groups, proven by the driver link). With managed='yes' libvirt
// >= 10 picks and binds the variant driver itself (<driver model>, else modules.alias)
// and gives the device back on release: we do not fight it, we check that libvirt's
// pick is the one the table wants. libvirt < 10 rebinds managed devices to plain
// vfio-pci, which cannot migrate: refused with the fix.

import * as sysfs from '../host/sysfs.ts';
import { pciKernel } from '../pci/kernel.ts';
import { readPciDevice, type PciDeviceInfo } from '../pci/pcidev.ts';
import { chooseDriver } from '../pci/choose.ts';
import { loadAliasIndex, type AliasIndex } from '../pci/modalias.ts';
import { pciDriverForModule } from '../pci/drivernames.ts';
import { HookRefusal } from './refusal.ts';
import { asRefusal, hookLock, libvirtVersion, loadConfig, logEvent, parseDomainXml, remainingMs, vfioHostdevs, type HookContext, type HookResult, type VfioHostdev } from './qemu-common.ts';
import { devicesOfRunningDomains, liveReservations, readReservations, writeReservations } from './reservations.ts';

/** Whether the device's VFIO group is held open (a running QEMU or another VFIO user). */
export function deviceInUse(kind: 'pci' | 'mdev', id: string): boolean {
  const group = sysfs.iommuGroupOf(kind === 'pci' ? { kind, bdf: id } : { kind, uuid: id });
  return group !== undefined && pciKernel().groupInUse(group);
}

export async function prepare(ctx: HookContext): Promise<HookResult> {
  const doc = parseDomainXml(ctx.xml);
  const devs = vfioHostdevs(doc);
  if (devs.length === 0) return { code: 0 };
  const { table, hooks } = loadConfig();
  let aliases: AliasIndex | undefined;
  const aliasIndex = () => (aliases ??= loadAliasIndex());
  const lv = libvirtVersion();
  const libvirtPicksVariant = lv === undefined || lv.major >= 10;

  const toBind: Array<{ dev: VfioHostdev; expected: string }> = [];
  for (const dev of devs) {
    if (dev.kind === 'mdev') {
      if (!sysfs.deviceExists({ kind: 'mdev', uuid: dev.id })) {
        throw new HookRefusal(`${dev.label}: no such mdev on this host (${sysfs.sysfsRoot()}/bus/mdev/devices/${dev.id}); create it (mdevctl start) before starting the domain`, dev.id);
      }
      continue;
    }
    let info: PciDeviceInfo;
    try {
      info = readPciDevice(dev.id);
    } catch (err) {
      throw new HookRefusal(`${dev.label}: ${(err as Error).message}`, dev.id);
    }
    const choice = chooseDriver(info, table, aliasIndex());
    if (choice.reason === 'excluded') continue; // the operator keeps vfio-mig away from it
    const model = dev.view.driverModel;
    if (dev.view.managed === true && choice.driver !== 'vfio-pci') {
      if (!libvirtPicksVariant) {
        throw new HookRefusal(`${dev.label}: libvirt ${lv!.major}.${lv!.minor} rebinds managed='yes' hostdevs to plain vfio-pci, which cannot migrate; set managed='no' (vfio-mig binds ${choice.driver ?? 'the variant driver'})`, dev.id);
      }
      // libvirt >= 10 binds <driver model>, else the best modules.alias variant, else vfio-pci.
      const best = aliasIndex().best(info.modalias);
      const libvirtPick = model ?? (best.kind === 'variant' ? pciDriverForModule(best.module) : 'vfio-pci');
      if (choice.driver && libvirtPick !== choice.driver) {
        throw new HookRefusal(`${dev.label}: libvirt will bind ${libvirtPick} (managed='yes') but vfio-mig's table chooses ${choice.driver} (${choice.detail}); add <driver model='${choice.driver}'/> to the hostdev`, dev.id);
      }
      if (libvirtPick === 'vfio-pci') {
        throw new HookRefusal(`${dev.label}: no migration-capable variant driver (${choice.detail}); libvirt would bind plain vfio-pci, which cannot migrate - install the variant driver or add a rule`, dev.id);
      }
      continue;
    }
    const expected = model ?? choice.driver;
    if (!expected) {
      throw new HookRefusal(`${dev.label}: no migration-capable VFIO driver for ${info.vendor}:${info.device} (${choice.detail}); add a rule to /etc/vfio-mig/config.json (or an "exclude" rule to start it without vfio-mig)`, dev.id);
    }
    if (model && choice.driver && model !== choice.driver) {
      throw new HookRefusal(`${dev.label}: the hostdev asks for <driver model='${model}'> but vfio-mig's table chooses ${choice.driver} (${choice.detail}); make them agree`, dev.id);
    }
    if (info.driver === expected) continue;
    if (!hooks.bind) {
      throw new HookRefusal(`${dev.label}: bound to ${info.driver ?? 'no driver'}, needs ${expected}; hooks.bind is off - run "vfio-mig bind --device ${dev.id}"`, dev.id);
    }
    toBind.push({ dev, expected });
  }

  if (toBind.length > 0) {
    const { bind } = await import('../pci/binder.ts');
    let report;
    try {
      report = await bind({ devices: toBind.map((b) => b.dev.id), table, aliases: aliasIndex(), lockTimeoutMs: Math.max(500, remainingMs(ctx) - 2000) });
    } catch (err) {
      throw asRefusal(err);
    }
    for (const { dev, expected } of toBind) {
      const r = report.results.find((x) => x.address === dev.id);
      if (r && (r.action === 'failed' || r.action === 'refused')) throw new HookRefusal(`${dev.label}: ${r.error ?? r.action}`, dev.id);
      const now = sysfs.driverOf({ kind: 'pci', bdf: dev.id });
      if (now !== expected) throw new HookRefusal(`${dev.label}: bound to ${now ?? 'no driver'} after binding, needs ${expected}`, dev.id);
      logEvent(ctx, 'bound', { device: dev.id, driver: expected, previous: r?.previous ?? null });
    }
  }

  // Reserve the domain's devices: refused when another domain holds one.
  const lock = await hookLock(ctx);
  try {
    const all = readReservations();
    const live = liveReservations(all, hooks.reservationSeconds).filter((r) => r.domain !== ctx.domain);
    const running = devicesOfRunningDomains(ctx.domain);
    for (const dev of devs) {
      const other = live.find((r) => r.device === dev.id);
      if (other) throw new HookRefusal(`${dev.label} is reserved for domain ${JSON.stringify(other.domain)} (${other.op === 'migrate' ? 'an incoming migration' : 'starting'} since ${other.since})`, dev.id);
      const user = running.get(dev.id);
      if (user !== undefined) throw new HookRefusal(`${dev.label} is used by running domain ${JSON.stringify(user)}`, dev.id);
      if (deviceInUse(dev.kind, dev.id)) throw new HookRefusal(`${dev.label} is in use: its VFIO group is held open (another QEMU?)`, dev.id);
    }
    const since = new Date().toISOString();
    writeReservations([...live, ...devs.map((d) => ({ device: d.id, domain: ctx.domain, op: 'prepare' as const, since }))]);
  } finally {
    lock.release();
  }
  logEvent(ctx, 'prepared', { devices: devs.map((d) => d.id) });
  return { code: 0 };
}
