// The binder's seam to the kernel: the only place where sysfs is written, modules are
// loaded and VFIO groups are probed for users. Reads go straight to sysfs (through
// sysfs.ts); every action goes through here, so unit tests install a fake that behaves
// like the PCI core (test/fake/sysfs.ts) with setPciKernel() - the same split as
// src/host/sys.ts's setSyscalls(). A real sysfs file cannot react to a write, a fake
// kernel can.

import { execFile } from 'node:child_process';
import { closeSync, constants, existsSync, openSync, writeSync } from 'node:fs';
import { PciError, errCode } from './errors.ts';
import { parseModuleName, vfioGroupPath } from '../host/sysfs.ts';

export interface PciKernel {
  /**
   * Writes `value` to one sysfs attribute in a single write(2), as sysfs requires.
   * Throws an Error whose `code` is the errno name (ENODEV, EBUSY, EINVAL, ...).
   */
  writeAttr(path: string, value: string): void;
  /** Loads a module (and its dependencies). Rejects with modprobe's own message. */
  modprobe(module: string, timeoutMs: number): Promise<void>;
  /**
   * Whether the VFIO group is held open right now (a VM, or another VFIO user).
   * Rebinding such a device would yank it from under its user, so the binder refuses.
   */
  groupInUse(group: number): boolean;
}

/** modprobe lives in /usr/sbin or /sbin; hooks run with a minimal PATH, so look there first. */
function modprobePath(): string {
  const override = process.env.VFIO_MIG_MODPROBE;
  if (override) return override;
  for (const p of ['/usr/sbin/modprobe', '/sbin/modprobe']) if (existsSync(p)) return p;
  return 'modprobe';
}

export const realPciKernel: PciKernel = {
  writeAttr(path, value) {
    // O_WRONLY without O_CREAT: a vanished attribute must fail, not become a new file.
    const fd = openSync(path, constants.O_WRONLY);
    try {
      const buf = Buffer.from(value);
      const n = writeSync(fd, buf, 0, buf.length);
      if (n !== buf.length) throw Object.assign(new Error(`short write to ${path}`), { code: 'EIO' });
    } finally {
      closeSync(fd);
    }
  },

  modprobe(module, timeoutMs) {
    const name = parseModuleName(module);
    return new Promise((resolve, reject) => {
      // No shell: the validated name is one argv element.
      execFile(modprobePath(), [name], { timeout: timeoutMs, killSignal: 'SIGKILL', encoding: 'utf8' }, (err, _stdout, stderr) => {
        if (!err) return resolve();
        const killed = (err as { killed?: boolean }).killed;
        const msg = killed ? `modprobe did not finish within ${timeoutMs} ms` : firstLine(stderr) || err.message;
        reject(new PciError({ operation: `modprobe ${name}`, device: '-', reason: msg, code: errCode(err), cause: err }));
      });
    });
  },

  groupInUse(group) {
    // The legacy group node admits one opener at a time (and refuses while a device of
    // the group is open through its cdev): EBUSY means someone holds it. Our own open
    // is closed at once.
    let fd: number;
    try {
      fd = openSync(vfioGroupPath(group), constants.O_RDWR | constants.O_NONBLOCK);
    } catch (err) {
      return errCode(err) === 'EBUSY';
    }
    closeSync(fd);
    return false;
  },
};

function firstLine(text: string): string {
  return (text ?? '').split('\n').map((l) => l.trim()).find((l) => l.length > 0) ?? '';
}

let current: PciKernel = realPciKernel;

export function pciKernel(): PciKernel {
  return current;
}

/** Swaps the backend (unit tests install the fake sysfs); returns the previous one. */
export function setPciKernel(kernel: PciKernel): PciKernel {
  const previous = current;
  current = kernel;
  return previous;
}
