// Which driver build a device is served by: the driver, its module, the module's
// srcversion and version, and the module binary's GNU build-id. The capability cache
// keys its entries on this (an entry probed under another build is stale), and the
// descriptor carries it to the peer.
//
// Why build-id as well as srcversion: the kernel only emits srcversion for modules that
// declare MODULE_VERSION, unless it is built with CONFIG_MODULE_SRCVERSION_ALL - which
// Debian's kernels are not. So on a stock Debian host most variant drivers (and our edu
// test driver) have no srcversion at all. The build-id note the linker puts into every
// module (/sys/module/<mod>/notes/.note.gnu.build-id) changes with every rebuild, so a
// replaced module is still noticed. Reading it needs root, as every vfio-mig action does.

import { readFileSync } from 'node:fs';
import { endianness, release } from 'node:os';
import * as sysfs from '../host/sysfs.ts';
import type { DeviceId } from '../host/sysfs.ts';

export interface DriverIdentity {
  driver: string | null;
  module: string | null;
  srcversion: string | null;
  moduleVersion: string | null;
  buildId: string | null;
  kernel: string;
}

/** The kernel release; VFIO_MIG_KERNEL_RELEASE overrides it for tests of staleness. */
export function kernelRelease(): string {
  return process.env.VFIO_MIG_KERNEL_RELEASE || release();
}

const NT_GNU_BUILD_ID = 3;

/**
 * The build-id from an ELF note section as the kernel shows it: a sequence of notes, each
 * u32 namesz, u32 descsz, u32 type, name (padded to 4), desc (padded to 4). Host byte
 * order (the module was built for this host). Undefined when there is no GNU build-id.
 */
export function parseBuildIdNote(buf: Buffer): string | undefined {
  let off = 0;
  const pad = (n: number) => (n + 3) & ~3;
  const u32 = (at: number) => (endianness() === 'BE' ? buf.readUInt32BE(at) : buf.readUInt32LE(at));
  while (off + 12 <= buf.length) {
    const namesz = u32(off);
    const descsz = u32(off + 4);
    const type = u32(off + 8);
    const nameStart = off + 12;
    const descStart = nameStart + pad(namesz);
    if (namesz > 64 || descsz > 64 || descStart + descsz > buf.length) return undefined;
    const name = buf.subarray(nameStart, nameStart + namesz).toString('latin1');
    if (type === NT_GNU_BUILD_ID && name === 'GNU\0' && descsz > 0) return buf.subarray(descStart, descStart + descsz).toString('hex');
    off = descStart + pad(descsz);
  }
  return undefined;
}

export function moduleBuildId(module: string): string | null {
  try {
    return parseBuildIdNote(readFileSync(sysfs.moduleBuildIdNotePath(module))) ?? null;
  } catch {
    return null;
  }
}

/** The module facts of a loaded module (nulls for what it does not show). */
export function moduleFacts(module: string | null): { srcversion: string | null; moduleVersion: string | null; buildId: string | null } {
  if (!module) return { srcversion: null, moduleVersion: null, buildId: null };
  return {
    srcversion: sysfs.readModuleAttr(module, 'srcversion') ?? null,
    moduleVersion: sysfs.readModuleAttr(module, 'version') ?? null,
    buildId: moduleBuildId(module),
  };
}

export function driverIdentity(id: DeviceId): DriverIdentity {
  const driver = sysfs.driverOf(id) ?? null;
  const module = driver ? (sysfs.driverModuleOf(id) ?? null) : null;
  return { driver, module, ...moduleFacts(module), kernel: kernelRelease() };
}

/**
 * Why `now` is not the build `then` was recorded under, or undefined when it is the same.
 * Driver, srcversion and build-id are compared when known; when neither side has a
 * srcversion or a build-id the kernel release stands in (a built-in driver changes only
 * with the kernel).
 */
export function identityChange(then: DriverIdentity, now: DriverIdentity): string | undefined {
  if (then.driver !== now.driver) return `driver changed (${then.driver ?? 'none'} -> ${now.driver ?? 'none'})`;
  if (then.module !== now.module) return `module changed (${then.module ?? 'built in'} -> ${now.module ?? 'built in'})`;
  if (then.srcversion !== now.srcversion) return `srcversion of ${now.module} changed (${then.srcversion ?? 'none'} -> ${now.srcversion ?? 'none'})`;
  if (then.buildId !== now.buildId) return `module ${now.module} was rebuilt or replaced (build-id ${short(then.buildId)} -> ${short(now.buildId)})`;
  if (then.moduleVersion !== now.moduleVersion) return `version of ${now.module} changed (${then.moduleVersion ?? 'none'} -> ${now.moduleVersion ?? 'none'})`;
  if (!now.srcversion && !now.buildId && then.kernel !== now.kernel) return `kernel changed (${then.kernel} -> ${now.kernel}) and the driver has no srcversion or build-id to tell whether it did`;
  return undefined;
}

function short(id: string | null): string {
  return id ? id.slice(0, 12) : 'none';
}
