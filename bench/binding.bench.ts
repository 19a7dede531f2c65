// Cost of choosing a driver for every PCI device (what `vfio-mig drivers`, `bind --all`, the
// boot unit and the daemon hook do): src/pci/modalias.ts's alias index, built once from the
// modules.alias text, plus src/pci/choose.ts - against the obvious implementation, which
// re-reads the whole alias file for every device (split every line, glob-match every
// pattern with its own fnmatch-style matcher), measured in the same run. Both apply the
// same policy (aliasPolicy "safe", no rules), and every device's choice is compared: the
// mismatch count must be 0.
//
// Synthetic inputs, built here (no sysfs, no kernel): a 10,000-line modules.alias shaped like
// a distribution kernel's (ordinary `alias pci:` lines of many vendors, class wildcards,
// non-PCI aliases, a few hundred override-only `alias vfio_pci:` lines of variant drivers,
// some more specific than others, some equally specific = ambiguous) and 1,024 devices:
// VFs and PFs, unbound, bound to host drivers or to vfio-pci, matching zero, one or
// several variant patterns. The host's /sys is not read: VFIO_MIG_SYSFS points at an empty
// directory while the benchmark runs (the module -> driver name mapping then comes from the
// built-in list, for both implementations).
//
// Headline: `binding: per_device_ms=<ours, index build included, per device> ratio=<naive/ours>`.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AliasIndex, GENERIC_VFIO_MODULE } from '../src/pci/modalias.ts';
import { chooseDriver, isHostDriver, type Choice } from '../src/pci/choose.ts';
import { isVfioDriver, pciDriverForModule } from '../src/pci/drivernames.ts';
import type { PciDeviceInfo } from '../src/pci/pcidev.ts';
import type { DriverTable } from '../src/pci/table.ts';

const ALIAS_LINES = 10_000;
const DEVICES = 1_024;
const TABLE: DriverTable = { source: undefined, rules: [], aliasPolicy: 'safe', manageSriovAutoprobe: true };

// --- synthetic inputs ------------------------------------------------------------------------

/** Small deterministic PRNG (mulberry32): the same inputs on every run. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const hex = (n: number, width: number): string => n.toString(16).toUpperCase().padStart(width, '0');

interface Model {
  vendor: number;
  device: number;
}

/** Vendors with variant drivers, and the device ids those drivers list. */
const VARIANT_VENDORS = [0x15b3, 0x1af4, 0x8086, 0x19e5, 0x1dd8, 0x10de, 0x1d0f, 0x1234];

function aliasFile(rand: () => number): { text: string; variantModels: Model[]; hostModels: Model[] } {
  const lines: string[] = ['# Aliases extracted from modules themselves.'];
  const variantModels: Model[] = [];
  const hostModels: Model[] = [];
  // Override-only vfio_pci lines: the generic catch-all, then ~400 variant entries.
  lines.push(`alias vfio_pci:v*d*sv*sd*bc*sc*i* ${GENERIC_VFIO_MODULE}`);
  for (let i = 0; i < 400; i++) {
    const vi = i % VARIANT_VENDORS.length;
    const vendor = VARIANT_VENDORS[vi]!;
    const device = 0x1000 + i;
    const module = `var${vi}_vfio_pci`;
    variantModels.push({ vendor, device });
    lines.push(`alias vfio_pci:v${hex(vendor, 8)}d${hex(device, 8)}sv*sd*bc*sc*i* ${module}`);
    // Every 10th: a more specific entry of another module (subsystem id): fewer '*' wins.
    if (i % 10 === 0) lines.push(`alias vfio_pci:v${hex(vendor, 8)}d${hex(device, 8)}sv${hex(vendor, 8)}sd00000001bc*sc*i* special_vfio_pci`);
    // Every 25th: an equally specific entry of another module: ambiguous, never guessed.
    if (i % 25 === 7) lines.push(`alias vfio_pci:v${hex(vendor, 8)}d${hex(device, 8)}sv*sd*bc*sc*i* rival${vi}_vfio_pci`);
    // Every 8th: the host driver also claims the PF (aliasPolicy "safe" then leaves PFs alone).
    if (i % 8 === 3) lines.push(`alias pci:v${hex(vendor, 8)}d${hex(device, 8)}sv*sd*bc*sc*i* host${vi}_core`);
  }
  // A class-wide vfio entry of one vendor: bc03 (display) devices of 0x8086.
  lines.push(`alias vfio_pci:v${hex(0x8086, 8)}d*sv*sd*bc03sc*i* xe_vfio_pci`);
  // Class wildcards of ordinary drivers (any vendor).
  lines.push('alias pci:v*d*sv*sd*bc0Csc03i30* xhci_pci', 'alias pci:v*d*sv*sd*bc01sc08i02* nvme', 'alias pci:v*d*sv*sd*bc02sc00i* generic_nic');
  // Non-PCI aliases, as in a real file.
  for (let i = 0; i < 300; i++) lines.push(`alias usb:v${hex(0x0500 + i, 4)}p*d*dc*dsc*dp*ic*isc*ip*in* usb_drv${i}`);
  for (let i = 0; i < 100; i++) lines.push(`alias acpi*:PNP${hex(i, 4)}:* acpi_drv${i}`, `alias of:N*T*Cvendor,part${i}C* of_drv${i}`);
  // Ordinary pci lines of many vendors up to the size wanted.
  let n = 0;
  while (lines.length < ALIAS_LINES) {
    const vendor = 0x1000 + (n % 250);
    const device = 0x2000 + Math.floor(n / 250);
    hostModels.push({ vendor, device });
    const sub = rand() < 0.2 ? `sv${hex(vendor, 8)}sd${hex(n & 0xff, 8)}` : 'sv*sd*';
    lines.push(`alias pci:v${hex(vendor, 8)}d${hex(device, 8)}${sub}bc*sc*i* drv_${n % 700}`);
    n++;
  }
  return { text: `${lines.slice(0, ALIAS_LINES).join('\n')}\n`, variantModels, hostModels };
}

function devices(rand: () => number, variantModels: Model[], hostModels: Model[]): PciDeviceInfo[] {
  const out: PciDeviceInfo[] = [];
  for (let i = 0; i < DEVICES; i++) {
    const r = rand();
    // 60% variant-capable models, 10% Intel display (class-wide entry), 30% ordinary devices.
    const model = r < 0.6 ? variantModels[Math.floor(rand() * variantModels.length)]! : r < 0.7 ? { vendor: 0x8086, device: 0x5600 + i } : hostModels[Math.floor(rand() * hostModels.length)]!;
    const cls = r >= 0.6 && r < 0.7 ? 0x030000 : rand() < 0.5 ? 0x020000 : 0x120000;
    const subDevice = rand() < 0.15 ? 1 : 0x100 + (i & 0xff);
    const isVf = rand() < 0.7;
    const d = rand();
    const driver = d < 0.4 ? undefined : d < 0.6 ? 'vfio-pci' : d < 0.8 ? 'generic_nic' : 'pcieport';
    const bus = Math.floor(i / 32);
    const address = `0000:${hex(bus, 2).toLowerCase()}:${hex((i >> 3) & 0x1f, 2).toLowerCase()}.${i & 7}`;
    const vendor = hex(model.vendor, 4).toLowerCase();
    const device = hex(model.device, 4).toLowerCase();
    out.push({
      address,
      vendor,
      device,
      subsystemVendor: vendor,
      subsystemDevice: hex(subDevice, 4).toLowerCase(),
      class: hex(cls, 6).toLowerCase(),
      revision: '00',
      modalias: `pci:v${hex(model.vendor, 8)}d${hex(model.device, 8)}sv${hex(model.vendor, 8)}sd${hex(subDevice, 8)}bc${hex(cls >> 16, 2)}sc${hex((cls >> 8) & 0xff, 2)}i${hex(cls & 0xff, 2)}`,
      driver,
      override: undefined,
      iommuGroup: i,
      physfn: isVf ? '0000:00:01.0' : undefined,
      virtfns: [],
      sriov: undefined,
    });
  }
  return out;
}

// --- the obvious implementation ------------------------------------------------------------

/** fnmatch(3) subset (`*`, `?`, `[...]`, `[!...]`), iterative with one backtrack point. */
function globMatch(pattern: string, s: string): boolean {
  let p = 0;
  let i = 0;
  let starP = -1;
  let starI = 0;
  while (i < s.length) {
    const c = pattern[p];
    if (c === '*') {
      starP = p++;
      starI = i;
      continue;
    }
    if (c === '?' || (c !== undefined && c !== '[' && c === s[i])) {
      p++;
      i++;
      continue;
    }
    if (c === '[') {
      const close = pattern.indexOf(']', p + 2);
      if (close !== -1) {
        let body = pattern.slice(p + 1, close);
        const negate = body.startsWith('!');
        if (negate) body = body.slice(1);
        if (body.includes(s[i]!) !== negate) {
          p = close + 1;
          i++;
          continue;
        }
      } else if (s[i] === '[') {
        p++;
        i++;
        continue;
      }
    }
    if (starP === -1) return false;
    p = starP + 1;
    i = ++starI;
  }
  while (pattern[p] === '*') p++;
  return p === pattern.length;
}

/** Re-reads every line of the alias file for this one device, then applies the same policy. */
function naiveChoose(dev: PciDeviceInfo, aliasText: string): { driver: string | null; reason: string } {
  const vfioTarget = `vfio_${dev.modalias}`;
  let bestStars = Infinity;
  let bestModules = new Set<string>();
  let winner: string | undefined;
  const hostModules = new Set<string>();
  for (const raw of aliasText.split('\n')) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) continue;
    const fields = line.split(/\s+/);
    if (fields.length !== 3 || fields[0] !== 'alias') continue;
    const pattern = fields[1]!;
    const module = fields[2]!;
    if (pattern.startsWith('vfio_pci:')) {
      if (module === GENERIC_VFIO_MODULE || !globMatch(pattern, vfioTarget)) continue;
      const stars = pattern.split('*').length - 1;
      if (stars < bestStars) {
        bestStars = stars;
        bestModules = new Set([module]);
        winner = module;
      } else if (stars === bestStars) bestModules.add(module);
    } else if (pattern.startsWith('pci:') && !/vfio/.test(module) && globMatch(pattern, dev.modalias)) {
      hostModules.add(module);
    }
  }
  if (!winner) return { driver: null, reason: 'none' };
  if (bestModules.size > 1) return { driver: null, reason: 'none' };
  const driver = pciDriverForModule(winner);
  if (dev.physfn === undefined) {
    if (isHostDriver(dev.driver) && dev.driver !== driver) return { driver: null, reason: 'none' };
    hostModules.delete(winner);
    if (hostModules.size > 0 && !(dev.driver !== undefined && isVfioDriver(dev.driver))) return { driver: null, reason: 'none' };
  }
  return { driver, reason: 'alias' };
}

// --- measurement ------------------------------------------------------------------------------

function ours(aliasText: string, devs: PciDeviceInfo[]): Choice[] {
  const index = AliasIndex.parse(aliasText, 'synthetic modules.alias');
  return devs.map((d) => chooseDriver(d, TABLE, index));
}

function naive(aliasText: string, devs: PciDeviceInfo[]): Array<{ driver: string | null; reason: string }> {
  return devs.map((d) => naiveChoose(d, aliasText));
}

function timeMs<T>(fn: () => T): { ms: number; value: T } {
  const t0 = process.hrtime.bigint();
  const value = fn();
  return { ms: Number(process.hrtime.bigint() - t0) / 1e6, value };
}

export async function run(): Promise<string> {
  const rand = prng(0x5eed);
  const { text, variantModels, hostModels } = aliasFile(rand);
  const devs = devices(rand, variantModels, hostModels);
  const emptySysfs = mkdtempSync(join(tmpdir(), 'bench-binding-sysfs-'));
  const savedSysfs = process.env.VFIO_MIG_SYSFS;
  process.env.VFIO_MIG_SYSFS = emptySysfs;
  try {
    // Warm-up (JIT) on a slice of the devices.
    ours(text, devs.slice(0, 64));
    naive(text, devs.slice(0, 16));
    // Best of three for ours (a fresh index each time: a CLI call or hook builds it once per
    // process); the naive path is ~1000x slower, one full pass is plenty of signal.
    const runs = [timeMs(() => ours(text, devs)), timeMs(() => ours(text, devs)), timeMs(() => ours(text, devs))];
    const best = runs.reduce((a, b) => (b.ms < a.ms ? b : a));
    const slow = timeMs(() => naive(text, devs));
    let mismatches = 0;
    const examples: string[] = [];
    for (const [i, d] of devs.entries()) {
      const a = best.value[i]!;
      const b = slow.value[i]!;
      if (a.driver !== b.driver || a.reason !== b.reason) {
        mismatches++;
        if (examples.length < 3) examples.push(`${d.modalias} ours=${a.driver ?? '-'}/${a.reason} naive=${b.driver ?? '-'}/${b.reason}`);
      }
    }
    const chosen = best.value.filter((c) => c.driver !== null).length;
    const ambiguous = best.value.filter((c) => c.candidates !== undefined).length;
    const keptForHost = best.value.filter((c) => c.driver === null && c.alias !== undefined).length;
    const perDevice = best.ms / devs.length;
    const naivePerDevice = slow.ms / devs.length;
    const lines = text.split('\n').length - 1;
    console.log(
      `binding: synthetic inputs (no sysfs, no kernel): ${devs.length} devices, ${lines}-line modules.alias; ` +
        `ours (index build + choose) ${best.ms.toFixed(1)} ms = ${perDevice.toFixed(4)} ms/device; ` +
        `naive re-scan ${slow.ms.toFixed(0)} ms = ${naivePerDevice.toFixed(3)} ms/device; ` +
        `choices: ${chosen} variant, ${ambiguous} ambiguous, ${keptForHost} PFs left to the host, ${devs.length - chosen - ambiguous - keptForHost} no match; mismatches=${mismatches}${examples.length ? ` e.g. ${examples.join('; ')}` : ''}`,
    );
    return `binding: per_device_ms=${perDevice.toFixed(4)} ratio=${(naivePerDevice / perDevice).toFixed(1)}`;
  } finally {
    if (savedSysfs === undefined) delete process.env.VFIO_MIG_SYSFS;
    else process.env.VFIO_MIG_SYSFS = savedSysfs;
    rmSync(emptySysfs, { recursive: true, force: true });
  }
}
