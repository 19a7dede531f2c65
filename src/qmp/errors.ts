// Typed errors of the QMP layer. Two kinds must never be confused by callers:
//  - QmpError: QEMU understood the command and refused it (`{"error": {class, desc}}`);
//    the connection is fine and the next command can go out.
//  - QmpProtocolError / QmpClosedError / QmpTimeoutError: the transport failed or the peer
//    broke the protocol; the outcome of the command is unknown.

/** QEMU's answer `{"error": {"class": ..., "desc": ...}}` to one command. */
export class QmpError extends Error {
  /** QMP error class, e.g. GenericError, CommandNotFound, DeviceNotFound. Unknown classes are kept as sent. */
  readonly class: string;
  readonly desc: string;
  /** The command that was refused. */
  readonly command: string;
  constructor(command: string, errClass: string, desc: string) {
    super(`QMP ${command} failed: ${errClass}: ${desc}`);
    this.name = 'QmpError';
    this.class = errClass;
    this.desc = desc;
    this.command = command;
  }
}

/** The peer sent something that is not QMP (bad JSON, oversized line, unknown message shape). */
export class QmpProtocolError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(`QMP protocol error: ${message}`, options);
    this.name = 'QmpProtocolError';
  }
}

/** The connection closed (or was closed) before the command got an answer. */
export class QmpClosedError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'QmpClosedError';
  }
}

/** No answer, or no matching event, within the time limit. */
export class QmpTimeoutError extends Error {
  readonly timeoutMs: number;
  constructor(what: string, timeoutMs: number) {
    super(`QMP ${what}: no answer within ${timeoutMs} ms`);
    this.name = 'QmpTimeoutError';
    this.timeoutMs = timeoutMs;
  }
}

/**
 * Parses a QMP `error` member. QEMU always sends an object with string class/desc; anything
 * else is a protocol violation, reported as such rather than as a refusal.
 */
export function qmpErrorFrom(command: string, error: unknown): QmpError | QmpProtocolError {
  if (typeof error === 'object' && error !== null && !Array.isArray(error)) {
    const e = error as Record<string, unknown>;
    if (typeof e.class === 'string' && typeof e.desc === 'string') return new QmpError(command, e.class, e.desc);
  }
  return new QmpProtocolError(`malformed "error" member in the reply to ${command}: ${JSON.stringify(error)?.slice(0, 200)}`);
}
