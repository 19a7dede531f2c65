// Typed errors of the PCI layer (driver table, modules.alias, binder). Each names what
// was being done, to which device, and why it failed, in one sentence an operator can
// act on - the same shape as VfioError one layer down.

export interface PciErrorDetails {
  /** What we were doing, e.g. "unbind from ixgbevf" or "modprobe mlx5_vfio_pci". */
  operation: string;
  /** PCI address, or "-" when no single device is involved. */
  device: string;
  /** Why it failed (kernel errno name, modprobe's message, a refusal reason). */
  reason: string;
  /** errno name when a system call failed (EBUSY, ENODEV, ...). */
  code?: string;
  cause?: unknown;
}

export class PciError extends Error {
  readonly operation: string;
  readonly device: string;
  readonly reason: string;
  readonly code: string | undefined;

  constructor(d: PciErrorDetails) {
    super(`${d.operation}${d.device === '-' ? '' : ` for ${d.device}`} failed: ${d.reason}`, { cause: d.cause });
    this.name = 'PciError';
    this.operation = d.operation;
    this.device = d.device;
    this.reason = d.reason;
    this.code = d.code;
  }

  toJSON(): Record<string, unknown> {
    return { error: this.message, operation: this.operation, device: this.device, reason: this.reason, code: this.code };
  }
}

/** A rejected config file: where (file, line, column, field) and what is wrong. */
export class ConfigError extends Error {
  readonly file: string;
  readonly line: number | undefined;
  readonly column: number | undefined;
  /** Field path like rules[2].vendor, or "" for the whole document. */
  readonly field: string;
  readonly problem: string;

  constructor(file: string, problem: string, where: { line?: number; column?: number; field?: string } = {}) {
    const pos = where.line === undefined ? '' : `:${where.line}${where.column === undefined ? '' : `:${where.column}`}`;
    const field = where.field ? ` ${where.field}:` : '';
    super(`config ${file}${pos}:${field} ${problem} (the whole file was rejected; nothing was changed)`);
    this.name = 'ConfigError';
    this.file = file;
    this.line = where.line;
    this.column = where.column;
    this.field = where.field ?? '';
    this.problem = problem;
  }
}

/** errno name of a Node fs/child_process error, when it has one. */
export function errCode(err: unknown): string | undefined {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  return typeof code === 'string' ? code : undefined;
}
