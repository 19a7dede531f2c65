// Device set-up inside the rig guest: load modules, bind the edu devices to our test
// variant driver, create mtty mdevs, and drive the edu driver's knobs. Runs only in the
// guest (test/rig/run.sh sets VFIO_MIG_IN_RIG); elsewhere every rig test fails loudly.

import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync, readdirSync, existsSync, readlinkSync } from 'node:fs';
import { basename, join } from 'node:path';
import type { TestFn } from 'ava';
import { parseMigState, MigState } from '../../src/vfio/uapi.ts';

export const EDU_DRIVER = 'edu-vfio-pci';
export const MTTY_UUIDS = [1, 2, 3, 4].map((n) => `83b8f4f2-509f-382f-3c1e-e6bfe0fa000${n}`);

/** Fails every test of the file when not inside the rig, instead of silently passing. */
export function requireRig(test: TestFn): void {
  test.before((t) => {
    if (!process.env.VFIO_MIG_IN_RIG) t.fail('rig tests run inside the rig guest: npm run rig -- "node_modules/.bin/ava test/rig/<file>"');
  });
}

export function modprobe(...modules: string[]): void {
  for (const m of modules) execFileSync('modprobe', [m], { stdio: ['ignore', 'inherit', 'inherit'] });
}

const PCI = '/sys/bus/pci/devices';

/** The edu devices (1234:11e8) the rig's QEMU provides, sorted by address. */
export function eduDevices(): string[] {
  return readdirSync(PCI)
    .filter((bdf) => readFileSync(join(PCI, bdf, 'vendor'), 'utf8').trim() === '0x1234' && readFileSync(join(PCI, bdf, 'device'), 'utf8').trim() === '0x11e8')
    .sort();
}

export function driverOf(bdf: string): string | undefined {
  try {
    return basename(readlinkSync(join(PCI, bdf, 'driver')));
  } catch {
    return undefined;
  }
}

/** Binds one PCI device to `driver` through driver_override and checks that it took. */
export function bindPci(bdf: string, driver: string): void {
  if (driverOf(bdf) === driver) return;
  const current = driverOf(bdf);
  if (current) writeFileSync(join(PCI, bdf, 'driver', 'unbind'), bdf);
  writeFileSync(join(PCI, bdf, 'driver_override'), driver);
  writeFileSync('/sys/bus/pci/drivers_probe', bdf);
  const now = driverOf(bdf);
  if (now !== driver) throw new Error(`binding ${bdf} to ${driver} did not take (driver: ${now ?? 'none'})`);
}

/** Loads VFIO and the edu variant driver and binds every edu device to it. */
export function prepareEdu(): string[] {
  modprobe('vfio-pci', 'vfio_iommu_type1', 'edu_vfio_pci');
  const devs = eduDevices();
  if (devs.length < 2) throw new Error(`the rig should provide at least 2 edu devices, found ${devs.length}`);
  for (const bdf of devs) bindPci(bdf, EDU_DRIVER);
  return devs;
}

/** Loads mtty and creates `count` dual-port mdevs with fixed UUIDs. */
export function prepareMtty(count = 2): string[] {
  modprobe('vfio', 'vfio_iommu_type1', 'mdev', 'mtty');
  const create = '/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2/create';
  const uuids = MTTY_UUIDS.slice(0, count);
  for (const u of uuids) if (!existsSync(join('/sys/bus/mdev/devices', u))) writeFileSync(create, u);
  return uuids;
}

// Knobs of native/edu-vfio-pci (see its README): /sys/bus/pci/devices/<bdf>/edu_mig/<knob>.

export function eduKnob(bdf: string, knob: string, value?: string | number): string {
  const path = join(PCI, bdf, 'edu_mig', knob);
  if (value !== undefined) writeFileSync(path, String(value));
  return readFileSync(path, 'utf8').trim();
}

/** Arms the edu driver's failure injection on one arc ("FROM>TO"). */
export function eduInject(bdf: string, arc: string, opts: { errno?: number; mode?: 'once' | 'always'; outcome?: 'stay' | 'error' } = {}): void {
  eduKnob(bdf, 'fail_errno', opts.errno ?? 5);
  eduKnob(bdf, 'fail_mode', opts.mode ?? 'once');
  eduKnob(bdf, 'fail_outcome', opts.outcome ?? 'stay');
  eduKnob(bdf, 'fail_arc', arc);
}

export interface EduArc {
  from: MigState;
  to: MigState;
  errno: number;
}

/** Parses edu_mig/arc_log: one "FROM>TO rc" line per executed arc. */
export function eduArcLog(bdf: string): EduArc[] {
  const text = eduKnob(bdf, 'arc_log');
  const out: EduArc[] = [];
  for (const line of text.split('\n')) {
    const m = /^([A-Z_0-9]+)>([A-Z_0-9]+)\s+(-?\d+)/.exec(line.trim());
    if (!m) continue;
    const from = parseMigState(m[1]!);
    const to = parseMigState(m[2]!);
    if (from === undefined || to === undefined) throw new Error(`unparsable arc_log line: ${line}`);
    out.push({ from, to, errno: Math.abs(Number(m[3])) });
  }
  return out;
}

export function openFdCount(): number {
  return readdirSync('/proc/self/fd').length;
}
