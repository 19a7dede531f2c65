// The running kernel's build configuration: /boot/config-$(uname -r), else /proc/config.gz.
// Preflight needs one option from it: CONFIG_IOMMUFD_DRIVER. Without it the kernel's
// iova_bitmap is a stub, so every device dirty-tracking report (DMA_LOGGING_REPORT)
// fails with EOPNOTSUPP and QEMU's RAM setup fails at the start of a migration (Debian's
// 6.12 kernel is built that way). The roots are $VFIO_MIG_BOOT (default /boot) and
// $VFIO_MIG_PROC (default /proc) so tests can point them at fake files.

import { readFileSync } from 'node:fs';
import { release } from 'node:os';
import { join } from 'node:path';
import { gunzipSync } from 'node:zlib';

export interface KernelConfig {
  /** The file read, or null when none was readable. */
  source: string | null;
  /** Option -> value ("y", "m", a string or number); absent options are not set. */
  options: Map<string, string>;
  /** Why no file could be read. */
  error?: string;
}

/** The running kernel's release (uname -r); $VFIO_MIG_KERNEL_RELEASE overrides it for tests. */
export function kernelRelease(): string {
  return process.env.VFIO_MIG_KERNEL_RELEASE || release();
}

const RELEASE = /^[A-Za-z0-9._+~-]{1,128}$/;
const MAX_CONFIG_BYTES = 8 * 1024 * 1024;

export function parseKernelConfig(text: string): Map<string, string> {
  const options = new Map<string, string>();
  for (const line of text.split('\n')) {
    const m = /^(CONFIG_[A-Za-z0-9_]+)=(.*)$/.exec(line.trim());
    if (m) options.set(m[1]!, m[2]!.replace(/^"(.*)"$/, '$1'));
  }
  return options;
}

export function readKernelConfig(rel: string = kernelRelease()): KernelConfig {
  const boot = process.env.VFIO_MIG_BOOT || '/boot';
  const proc = process.env.VFIO_MIG_PROC || '/proc';
  const tried: string[] = [];
  if (RELEASE.test(rel)) {
    const file = join(boot, `config-${rel}`);
    try {
      const text = readFileSync(file);
      if (text.length <= MAX_CONFIG_BYTES) return { source: file, options: parseKernelConfig(text.toString('utf8')) };
      tried.push(`${file}: larger than ${MAX_CONFIG_BYTES} bytes`);
    } catch (err) {
      tried.push(`${file}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
    }
  } else {
    tried.push(`kernel release ${JSON.stringify(rel)} is not a plain name`);
  }
  const gz = join(proc, 'config.gz');
  try {
    const text = gunzipSync(readFileSync(gz), { maxOutputLength: MAX_CONFIG_BYTES });
    return { source: gz, options: parseKernelConfig(text.toString('utf8')) };
  } catch (err) {
    tried.push(`${gz}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
  }
  return { source: null, options: new Map(), error: tried.join('; ') };
}

/** true / false when the config was read, null when it could not be. */
export function configHas(cfg: KernelConfig, option: string): boolean | null {
  if (cfg.source === null) return null;
  const v = cfg.options.get(option);
  return v === 'y' || v === 'm';
}
