// Which driver a device should have, and why. Precedence:
//   1. the first matching table rule (a driver, or "exclude"),
//   2. the most specific modules.alias variant (libvirt's choice), within aliasPolicy,
//   3. nothing: the device is never touched. Plain vfio-pci is only ever chosen by a
//      rule - it has no migration support, so choosing it silently would hide the
//      very problem this tool exists to fix.

import { pciDriverForModule, moduleForPciDriver, canonicalModule, isVfioDriver, DMA_SAFE_DRIVERS } from './drivernames.ts';
import type { AliasIndex } from './modalias.ts';
import type { PciDeviceInfo } from './pcidev.ts';
import { findRule, describeRule, type DriverTable, type RuleTarget } from './table.ts';
import * as sysfs from '../host/sysfs.ts';

export type Reason = 'rule' | 'alias' | 'none' | 'excluded';

export interface Choice {
  /** PCI driver name to bind (as driver_override wants it), or null. */
  driver: string | null;
  /** Module that provides it (what modprobe gets), or null. */
  module: string | null;
  reason: Reason;
  /** One sentence: which rule or alias line, or why nothing was chosen. */
  detail: string;
  /** 1-based rule number when reason is rule/excluded. */
  rule?: number;
  /** The modules.alias pattern when reason is alias. */
  alias?: string;
  /** Equally specific variant modules when modules.alias was ambiguous. */
  candidates?: string[];
}


/** A driver that uses the device for the host (as opposed to VFIO, or parking it). */
export function isHostDriver(driver: string | undefined): boolean {
  return driver !== undefined && !isVfioDriver(driver) && !DMA_SAFE_DRIVERS.has(driver);
}

/**
 * The PCI driver and module for a name a rule gives. Operators may write either the
 * driver name (xe-vfio-pci) or the module name (xe_vfio_pci); both are accepted.
 */
export function resolveDriverName(name: string): { driver: string; module: string } {
  if (sysfs.pciDriverRegistered(name)) return { driver: name, module: moduleForPciDriver(name) };
  if (sysfs.isModuleName(name)) {
    const asModule = canonicalModule(name);
    const driver = pciDriverForModule(asModule);
    if (driver !== asModule || sysfs.moduleLoaded(asModule)) return { driver, module: asModule };
  }
  return { driver: name, module: moduleForPciDriver(name) };
}

export function chooseDriver(dev: PciDeviceInfo, table: DriverTable, aliases: AliasIndex): Choice {
  const rule = findRule(table, dev);
  if (rule) {
    const which = describeRule(rule);
    if (rule.exclude) return { driver: null, module: null, reason: 'excluded', rule: rule.index + 1, detail: `excluded by ${which}${rule.comment ? `: ${rule.comment}` : ''}` };
    const { driver, module } = resolveDriverName(rule.driver!);
    return { driver, module, reason: 'rule', rule: rule.index + 1, detail: `${which}${rule.comment ? `: ${rule.comment}` : ''}` };
  }
  return chooseByAlias(dev, table, aliases, dev.physfn !== undefined);
}

function chooseByAlias(dev: Pick<PciDeviceInfo, 'modalias' | 'driver'>, table: DriverTable, aliases: AliasIndex, isVf: boolean): Choice {
  if (table.aliasPolicy === 'off') return { driver: null, module: null, reason: 'none', detail: 'no rule matches (aliasPolicy is off)' };
  const match = aliases.best(dev.modalias);
  if (match.kind === 'none') return { driver: null, module: null, reason: 'none', detail: 'no rule and no modules.alias variant driver matches' };
  if (match.kind === 'ambiguous') {
    return {
      driver: null,
      module: null,
      reason: 'none',
      candidates: match.modules,
      detail: `modules.alias has equally specific variants ${match.modules.join(', ')} (${match.wildcards} wildcards): add a rule to pick one`,
    };
  }
  const driver = pciDriverForModule(match.module);
  // aliasPolicy "safe": a PF the host uses, or would use once its driver loads, stays
  // with the host unless a rule says otherwise. virtio_vfio_pci lists the ids of the
  // host's own virtio disks and NICs, xe_vfio_pci those of the GPU that may drive the
  // console; at boot their host driver may simply not be loaded yet. VFs exist to be
  // assigned, so they are taken.
  if (table.aliasPolicy === 'safe' && !isVf) {
    if (isHostDriver(dev.driver) && dev.driver !== driver) {
      return { driver: null, module: null, reason: 'none', alias: match.pattern, detail: `modules.alias suggests ${driver}, but this PF is in use by host driver ${dev.driver}: add a rule to take it` };
    }
    const host = aliases.hostModules(dev.modalias).filter((m) => m !== match.module);
    if (host.length > 0 && !(dev.driver !== undefined && isVfioDriver(dev.driver))) {
      return {
        driver: null,
        module: null,
        reason: 'none',
        alias: match.pattern,
        detail: `modules.alias suggests ${driver}, but host driver module ${host.join(', ')} also claims this PF: add a rule to take it`,
      };
    }
  }
  return { driver, module: match.module, reason: 'alias', alias: match.pattern, detail: `modules.alias: ${match.pattern} ${match.module}` };
}

/**
 * What the VFs of a PF would get, judged before they exist (to decide whether host
 * drivers may autoprobe them). VFs carry the PF's vendor and sriov_vf_device; their
 * subsystem ids and class are taken from the PF, which is what SR-IOV devices do in
 * practice.
 */
export function chooseForFutureVfs(pf: PciDeviceInfo, table: DriverTable, aliases: AliasIndex): Choice | undefined {
  const vfDevice = pf.sriov?.vfDevice;
  if (!vfDevice) return undefined;
  const target: RuleTarget = { vendor: pf.vendor, device: vfDevice, subsystemVendor: pf.subsystemVendor, subsystemDevice: pf.subsystemDevice, class: pf.class };
  const rule = findRule(table, target);
  if (rule) {
    if (rule.exclude) return { driver: null, module: null, reason: 'excluded', rule: rule.index + 1, detail: `excluded by ${describeRule(rule)}` };
    const { driver, module } = resolveDriverName(rule.driver!);
    return { driver, module, reason: 'rule', rule: rule.index + 1, detail: describeRule(rule) };
  }
  const modalias = pf.modalias.replace(/d[0-9A-F]{8}sv/, `d0000${vfDevice.toUpperCase()}sv`);
  return chooseByAlias({ modalias, driver: undefined }, table, aliases, true);
}
