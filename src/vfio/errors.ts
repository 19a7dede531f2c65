// Typed errors of the VFIO layer: every failure names the operation, the device and the
// errno, and carries one sentence an operator can act on.

import { errnoName } from '../host/errno.ts';
import { SysError } from '../host/sys.ts';

export interface VfioErrorDetails {
  /** What we were doing, e.g. "SET MIG_DEVICE_STATE RUNNING->STOP_COPY". */
  operation: string;
  /** PCI BDF, mdev UUID or a path; "-" when no device is involved. */
  device: string;
  /** errno value when a system call failed. */
  errno?: number;
  /** Operator-facing explanation. */
  hint?: string;
  /** The device state re-read after a failed SET, when known. */
  stateAfter?: string;
  /** The kernel arc that failed ("RUNNING_P2P->STOP"), when the state after tells. */
  failedArc?: string;
  cause?: unknown;
}

export class VfioError extends Error {
  readonly operation: string;
  readonly device: string;
  readonly errno: number | undefined;
  readonly code: string | undefined;
  readonly hint: string | undefined;
  readonly stateAfter: string | undefined;
  readonly failedArc: string | undefined;

  constructor(details: VfioErrorDetails) {
    const code = details.errno === undefined ? undefined : errnoName(details.errno);
    const parts = [`${details.operation} on ${details.device} failed`];
    if (code) parts[0] += ` (${code})`;
    if (details.hint) parts.push(details.hint);
    if (details.failedArc) parts.push(`the arc ${details.failedArc} failed`);
    if (details.stateAfter) parts.push(`device is now in ${details.stateAfter}`);
    super(parts.join(': '), { cause: details.cause });
    this.name = 'VfioError';
    this.operation = details.operation;
    this.device = details.device;
    this.errno = details.errno;
    this.code = code;
    this.hint = details.hint;
    this.stateAfter = details.stateAfter;
    this.failedArc = details.failedArc;
  }

  toJSON(): Record<string, unknown> {
    return {
      error: this.message,
      operation: this.operation,
      device: this.device,
      errno: this.code,
      hint: this.hint,
      stateAfter: this.stateAfter,
      failedArc: this.failedArc,
    };
  }
}

/** Wraps a SysError (or rethrows anything else) with operation and device. */
export function fromSys(err: unknown, operation: string, device: string, hint?: (code: string) => string | undefined): VfioError {
  if (err instanceof VfioError) return err;
  if (err instanceof SysError) {
    return new VfioError({ operation, device, errno: err.errno, hint: hint?.(err.code) ?? defaultHint(err.code), cause: err });
  }
  return new VfioError({ operation, device, hint: String(err instanceof Error ? err.message : err), cause: err });
}

function defaultHint(code: string): string | undefined {
  switch (code) {
    case 'EACCES':
    case 'EPERM':
      return 'permission denied - vfio-mig must run as root (or own the /dev/vfio nodes)';
    case 'ENOENT':
      return 'no such device node - is the device bound to a vfio-pci (variant) driver?';
    case 'EBADF':
      return 'the file descriptor is closed or invalid';
    case 'ENOTTY':
      return 'the driver does not implement this ioctl';
    default:
      return undefined;
  }
}
