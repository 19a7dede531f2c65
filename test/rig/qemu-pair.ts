// Two nested QEMU 10 processes inside the rig guest, for QEMU-driven VFIO migrations that
// `vfio-mig watch` observes: no OS (SeaBIOS assigns the BARs and idles), 64 MiB, TCG.
// Each QEMU has two QMP sockets: one the test drives the migration through, one for the
// watch (QEMU serves one client per socket). The command lines follow what worked for
// mtty and edu on the rig's 6.12 kernel: enable-migration=on, migration-events=on, and
// for mtty x-device-dirty-page-tracking=off (Debian's 6.12 has no DMA-logging report),
// for edu x-pre-copy-dirty-page-tracking=off (type1 reports all pinned RAM dirty, so the
// default never converges).

import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startVm, type NestedVm } from './nested-qemu.ts';

/**
 * Who cleans up: an ava test context, or the demo's own list (anything with `teardown`).
 * Teardowns run in reverse order of registration, as ava does.
 */
export interface Cleanup {
  teardown(fn: () => unknown): void;
}

/** A Cleanup for code outside ava: call run() when done. */
export function cleanupList(): Cleanup & { run(): Promise<void> } {
  const fns: Array<() => unknown> = [];
  return {
    teardown: (fn) => void fns.push(fn),
    async run() {
      while (fns.length) {
        try {
          await fns.pop()!();
        } catch {
          /* keep cleaning up */
        }
      }
    },
  };
}

export type Vm = NestedVm;

/**
 * Starts one QEMU with a driving QMP socket (connected here); `t` stops it. Nested TCG with
 * a VFIO device is slow to start (the type1 container pins all guest RAM through the
 * vIOMMU), hence nested-qemu's generous limits.
 */
async function startQemu(t: Cleanup, dir: string, name: string, extra: string[]): Promise<Vm> {
  const vm = await startVm(dir, name, extra);
  t.teardown(() => vm.stop());
  return vm;
}

export interface Pair {
  dir: string;
  src: Vm;
  dst: Vm;
  srcWatch: string;
  dstWatch: string;
  migSock: string;
}

export function mttyDevice(uuid: string, id: string): string {
  return `vfio-pci,sysfsdev=/sys/bus/mdev/devices/${uuid},id=${id},enable-migration=on,x-device-dirty-page-tracking=off,migration-events=on`;
}

export function eduDevice(bdf: string, id: string): string {
  return `vfio-pci,host=${bdf},id=${id},enable-migration=on,x-pre-copy-dirty-page-tracking=off,migration-events=on`;
}

async function waitFor(path: string, ms: number): Promise<void> {
  const deadline = Date.now() + ms;
  while (!existsSync(path)) {
    if (Date.now() > deadline) throw new Error(`no ${path} after ${ms} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

export async function startPair(t: Cleanup, srcDevices: string[], dstDevices: string[]): Promise<Pair> {
  const dir = mkdtempSync(join(tmpdir(), 'vfio-mig-watch-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const srcWatch = join(dir, 'src-watch.qmp');
  const dstWatch = join(dir, 'dst-watch.qmp');
  const devs = (list: string[]): string[] => list.flatMap((d) => ['-device', d]);
  const src = await startQemu(t, dir, 'src', [...devs(srcDevices), '-qmp', `unix:${srcWatch},server=on,wait=off`]);
  const dst = await startQemu(t, dir, 'dst', [...devs(dstDevices), '-qmp', `unix:${dstWatch},server=on,wait=off`, '-incoming', 'defer']);
  await waitFor(srcWatch, 10_000);
  await waitFor(dstWatch, 10_000);
  return { dir, src, dst, srcWatch, dstWatch, migSock: join(dir, 'mig.sock') };
}

/** migrate-incoming on the destination, then migrate on the source (over a unix socket). */
export async function migrate(p: Pair): Promise<void> {
  for (const vm of [p.src, p.dst]) await vm.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
  await p.dst.qmp.execute('migrate-incoming', { uri: `unix:${p.migSock}` });
  await p.src.qmp.execute('migrate', { uri: `unix:${p.migSock}` });
}

export async function hmp(vm: Vm, command: string): Promise<string> {
  return String(await vm.qmp.execute('human-monitor-command', { 'command-line': command }));
}

interface PciRegion {
  bar: number;
  type: string;
  address: number;
  size: number;
}

/** The I/O BARs of device `id` once the firmware has placed them (address > 0). */
export async function ioBars(vm: Vm, id: string, timeoutMs = 60_000): Promise<PciRegion[]> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const buses = (await vm.qmp.execute('query-pci')) as Array<{ devices: Array<{ qdev_id?: string; regions?: PciRegion[] }> }>;
    const dev = buses.flatMap((b) => b.devices).find((d) => d.qdev_id === id);
    const io = (dev?.regions ?? []).filter((r) => r.type === 'io');
    // Unplaced BARs read 0 or -1 (QEMU's PCI_BAR_UNMAPPED) until the firmware assigns them.
    if (io.length && io.every((r) => r.address > 0)) return io;
    if (Date.now() > deadline) throw new Error(`${vm.name}: ${id} has no placed I/O BARs after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Reads one I/O port byte through HMP (`i /b`): "portb[0xc067] = 0x5a" -> 0x5a. */
export async function inb(vm: Vm, port: number): Promise<number> {
  const text = await hmp(vm, `i /b 0x${port.toString(16)}`);
  const m = /=\s*(0x[0-9a-f]+)/i.exec(text);
  if (!m) throw new Error(`${vm.name}: unexpected answer to i /b: ${text}`);
  return Number(m[1]);
}

export async function outb(vm: Vm, port: number, value: number): Promise<void> {
  await hmp(vm, `o /b 0x${port.toString(16)} 0x${value.toString(16)}`);
}

/** The UART scratch register in each mtty port's I/O BAR: 8-bit, read/write, no side effects; mtty migrates it. */
export const SCRATCH = 7;

/**
 * Writes `value` to I/O port `port` until it reads back: until SeaBIOS has turned I/O
 * decoding on, a write is lost. Returns how many writes it took; after `timeoutMs` it
 * throws with what the port reads, the run state and `info pci`.
 */
export async function writeUntilRead(vm: Vm, port: number, value: number, timeoutMs = 60_000): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  for (let tries = 1; ; tries++) {
    await outb(vm, port, value);
    const got = await inb(vm, port);
    if (got === value) return tries;
    if (Date.now() > deadline) {
      const pci = await hmp(vm, 'info pci');
      throw new Error(`${vm.name}: port 0x${port.toString(16)} reads 0x${got.toString(16)}, not 0x${value.toString(16)}, after ${tries} writes; status ${JSON.stringify(await vm.qmp.execute('query-status'))}; ${pci}`);
    }
    await new Promise((r) => setTimeout(r, 200));
  }
}
