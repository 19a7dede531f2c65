// QMP client on node:net (unix or tcp socket).
//
// Why our own (DESIGN.md section 3): commands are matched to replies by `id`, so an
// interleaved event or an odd reply can never shift every later answer by one; events keep
// their data and QEMU's timestamp; every command has a time limit; a peer that breaks the
// protocol (bad JSON, a line over the size limit, a reply nobody asked for) is dropped at
// once with a clear error, and every caller still waiting is rejected - nothing hangs.
//
// Wire format (qemu docs/interop/qmp-spec.rst): one JSON object per line (QEMU ends them
// with CRLF). The server greets with {"QMP": {...}} and accepts only qmp_capabilities until
// negotiation is done; events are not sent before that. We never enable OOB.

import net from 'node:net';
import { sendFd } from '../host/sys.ts';
import { QmpClosedError, QmpProtocolError, QmpTimeoutError, qmpErrorFrom } from './errors.ts';
import { parseVersion, type ExecuteOptions, type QemuVersion, type QmpFdExecutor } from './commands.ts';
import { parseEventEnvelope, type QmpEvent } from './events.ts';
import { EventHub, MAX_TIMER_MS, type EventFor, type WaitOptions } from './event-hub.ts';

export type { EventFor, WaitOptions } from './event-hub.ts';

export type QmpEndpoint = { path: string } | { host: string; port: number };

export interface QmpClientOptions {
  /** Connect + greeting + capability negotiation (ms). QEMU serves one client per QMP socket: a second client waits here. */
  connectTimeoutMs?: number;
  /** Default per-command limit (ms). */
  commandTimeoutMs?: number;
  /** Longest accepted line (bytes); a longer one is a protocol error. */
  maxLineBytes?: number;
  /** Recent events kept for `waitFor(..., { since })`. */
  eventBacklog?: number;
  /** Receives exceptions thrown by onEvent listeners (default: a process warning). */
  onListenerError?: (err: unknown) => void;
}

export interface QmpGreeting {
  version: QemuVersion;
  capabilities: string[];
}

const DEFAULTS = { connectTimeoutMs: 5_000, commandTimeoutMs: 30_000, maxLineBytes: 8 * 1024 * 1024, eventBacklog: 256 };
const COMMAND_NAME = /^[A-Za-z][A-Za-z0-9_-]{0,127}$/;
/** Ids of timed-out commands remembered so their late replies are dropped, not treated as desync. */
const ABANDONED_IDS_KEPT = 1024;

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

type Phase = 'greeting' | 'negotiating' | 'ready' | 'closed';

export class QmpClient implements QmpFdExecutor {
  readonly endpoint: QmpEndpoint;
  private readonly opts: typeof DEFAULTS;
  private readonly events: EventHub;
  private readonly socket: net.Socket;
  private phase: Phase = 'greeting';
  private greetingValue: QmpGreeting | undefined;
  private nextId = 0;
  private readonly pending = new Map<string, Pending>();
  private readonly abandoned = new Set<string>();
  private chunks: Buffer[] = [];
  private chunkBytes = 0;
  private writesInFlight = 0;
  private flushWaiters: Array<() => void> = [];
  private closeReason: Error | undefined;
  private resolveDone!: (reason: Error | undefined) => void;
  /** Settles when the connection is gone: undefined after close(), else the reason. */
  readonly done: Promise<Error | undefined>;

  private constructor(endpoint: QmpEndpoint, opts: typeof DEFAULTS, onListenerError: ((err: unknown) => void) | undefined) {
    this.endpoint = endpoint;
    this.opts = opts;
    this.events = new EventHub({
      backlog: opts.eventBacklog,
      defaultTimeoutMs: opts.commandTimeoutMs,
      onListenerError: onListenerError ?? ((err) => process.emitWarning(`QMP event listener threw: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`)),
    });
    this.done = new Promise((resolve) => (this.resolveDone = resolve));
    this.socket = 'path' in endpoint ? net.createConnection({ path: endpoint.path }) : net.createConnection({ host: endpoint.host, port: endpoint.port });
    this.socket.on('data', (chunk: Buffer) => this.onData(chunk));
    this.socket.on('error', (err) => this.fail(new QmpClosedError(`QMP connection to ${describe(endpoint)} failed: ${err.message}`, { cause: err })));
    this.socket.on('close', () => this.fail(new QmpClosedError(`QMP connection to ${describe(endpoint)} closed by the peer`)));
  }

  /** Connects, reads the greeting and negotiates capabilities. */
  static async connect(endpoint: QmpEndpoint, options: QmpClientOptions = {}): Promise<QmpClient> {
    validateEndpoint(endpoint);
    const { onListenerError, ...limits } = options;
    const opts = { ...DEFAULTS, ...limits };
    for (const [k, v] of Object.entries(opts)) {
      if (!Number.isSafeInteger(v) || v <= 0 || v > MAX_TIMER_MS) throw new RangeError(`QmpClient option ${k} must be a positive integer, got ${v}`);
    }
    const client = new QmpClient(endpoint, opts, onListenerError);
    const timer = setTimeout(() => {
      const what = client.phase === 'greeting' ? 'greeting (is another client connected? QEMU serves one client per QMP socket)' : 'capability negotiation';
      client.fail(new QmpTimeoutError(`connect to ${describe(endpoint)}: ${what}`, opts.connectTimeoutMs));
    }, opts.connectTimeoutMs);
    try {
      await client.handshake();
      return client;
    } catch (err) {
      client.fail(err instanceof Error ? err : new Error(String(err)));
      throw client.closeReason ?? err;
    } finally {
      clearTimeout(timer);
    }
  }

  /** What QEMU announced (version, server capabilities). */
  get greeting(): QmpGreeting {
    if (!this.greetingValue) throw new Error('QmpClient: greeting read before connect() resolved');
    return this.greetingValue;
  }

  get closed(): boolean {
    return this.phase === 'closed';
  }

  /** Seq of the last event received (0 before any); pass it as `since` to waitFor. */
  get lastSeq(): number {
    return this.events.lastSeq;
  }

  /** The last `eventBacklog` events, oldest first. */
  recentEvents(): QmpEvent[] {
    return this.events.recent();
  }

  execute(command: string, args?: Record<string, unknown>, options?: ExecuteOptions): Promise<unknown> {
    return this.send(command, args, undefined, options);
  }

  /**
   * Sends a command with `fd` attached (SCM_RIGHTS on the same sendmsg as the command), for
   * getfd/add-fd. Unix sockets only. QEMU duplicates the descriptor: the caller still owns
   * (and should close) `fd`.
   */
  executeWithFd(command: string, args: Record<string, unknown> | undefined, fd: number, options?: ExecuteOptions): Promise<unknown> {
    if (!('path' in this.endpoint)) return Promise.reject(new TypeError('file descriptors can only be passed over a unix socket QMP connection'));
    if (!Number.isInteger(fd) || fd < 0) return Promise.reject(new TypeError(`invalid file descriptor ${fd}`));
    return this.send(command, args, fd, options);
  }

  /** Calls `listener` for every event, in receive order. Returns the unsubscribe function. */
  onEvent(listener: (ev: QmpEvent) => void): () => void {
    return this.events.onEvent(listener);
  }

  /**
   * Resolves with the first event `name` (typed and validated for known names) that satisfies
   * `predicate`; rejects with QmpTimeoutError after `timeoutMs`, or when the connection closes.
   * Only events after `since` count when it is given (the backlog is searched first), else
   * only events received from now on.
   */
  waitFor<N extends string>(name: N, predicate?: (ev: EventFor<N>) => boolean, timeoutMs = this.opts.commandTimeoutMs, options: WaitOptions = {}): Promise<EventFor<N>> {
    return this.events.waitFor(name, predicate, timeoutMs, options);
  }

  /** Closes the connection; pending commands and waits reject with QmpClosedError. */
  async close(): Promise<void> {
    if (this.phase !== 'closed') this.fail(undefined);
    await this.done;
  }

  // --- internals ------------------------------------------------------------------------

  private async handshake(): Promise<void> {
    await new Promise<void>((resolve, reject) => {
      this.onGreeting = resolve;
      this.onHandshakeError = reject;
    });
    this.phase = 'negotiating';
    await this.send('qmp_capabilities', undefined, undefined, { timeoutMs: this.opts.connectTimeoutMs });
    this.phase = 'ready';
  }

  private onGreeting: (() => void) | undefined;
  private onHandshakeError: ((err: Error) => void) | undefined;

  private send(command: string, args: Record<string, unknown> | undefined, fd: number | undefined, options?: ExecuteOptions): Promise<unknown> {
    if (this.phase === 'closed') return Promise.reject(this.closedError(command));
    if (!COMMAND_NAME.test(command)) return Promise.reject(new TypeError(`invalid QMP command name ${JSON.stringify(command)}`));
    if (args !== undefined && (typeof args !== 'object' || args === null || Array.isArray(args))) {
      return Promise.reject(new TypeError(`QMP ${command}: arguments must be an object`));
    }
    if (this.phase !== 'ready' && command !== 'qmp_capabilities') return Promise.reject(new Error(`QMP ${command} sent before capability negotiation finished`));
    const timeoutMs = options?.timeoutMs ?? this.opts.commandTimeoutMs;
    if (!(timeoutMs > 0) || timeoutMs > MAX_TIMER_MS) return Promise.reject(new RangeError(`QMP ${command}: timeoutMs must be in 1..${MAX_TIMER_MS}`));
    const id = `vfio-mig-${++this.nextId}`;
    const line = Buffer.from(JSON.stringify(args === undefined ? { execute: command, id } : { execute: command, arguments: args, id }) + '\r\n');
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        this.abandoned.add(id);
        if (this.abandoned.size > ABANDONED_IDS_KEPT) this.abandoned.delete(this.abandoned.values().next().value as string);
        reject(new QmpTimeoutError(command, timeoutMs));
      }, timeoutMs);
      this.pending.set(id, { command, resolve, reject, timer });
      if (fd === undefined) {
        this.write(line);
      } else {
        this.writeWithFd(line, fd).catch((err: unknown) => {
          const p = this.pending.get(id);
          if (!p) return;
          clearTimeout(p.timer);
          this.pending.delete(id);
          p.reject(err instanceof Error ? err : new Error(String(err)));
        });
      }
    });
  }

  private write(data: Buffer): void {
    this.writesInFlight++;
    this.socket.write(data, () => {
      this.writesInFlight--;
      if (this.writesInFlight === 0) {
        const waiters = this.flushWaiters;
        this.flushWaiters = [];
        for (const w of waiters) w();
      }
    });
  }

  /** fd-carrying commands go out one at a time (a partial send's remainder must not interleave). */
  private fdChain: Promise<void> = Promise.resolve();

  private writeWithFd(line: Buffer, fd: number): Promise<void> {
    const run = async (): Promise<void> => {
      let sent = 0;
      for (let attempt = 0; ; attempt++) {
        // sendmsg goes around node's write queue, so that queue must be empty right before
        // it (checked in the same tick) or the command would overtake earlier bytes.
        while (this.writesInFlight > 0) await new Promise<void>((resolve) => this.flushWaiters.push(resolve));
        if (this.closed) throw this.closedError('fd passing');
        // net.Socket has no public accessor for its descriptor; on Linux the libuv handle
        // (Pipe/TCP wrap) exposes it as `_handle.fd`. Only ever read here, for one sendmsg.
        const socketFd = (this.socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
        if (typeof socketFd !== 'number' || socketFd < 0) throw new Error('cannot pass a file descriptor: the socket has no descriptor (closed?)');
        try {
          sent = sendFd(socketFd, line, fd);
          break;
        } catch (err) {
          // The socket is non-blocking: a full send buffer gives EAGAIN (nothing was sent).
          if ((err as { code?: string }).code !== 'EAGAIN' || attempt >= 100) throw err;
          await new Promise((r) => setTimeout(r, 10));
        }
      }
      if (sent < line.length) this.write(line.subarray(sent));
    };
    const p = this.fdChain.then(run, run);
    this.fdChain = p.catch(() => undefined);
    return p;
  }

  private onData(chunk: Buffer): void {
    let start = 0;
    while (this.phase !== 'closed') {
      const nl = chunk.indexOf(0x0a, start);
      if (nl === -1) break;
      const piece = chunk.subarray(start, nl);
      const line = this.chunks.length ? Buffer.concat([...this.chunks, piece]) : piece;
      this.chunks = [];
      this.chunkBytes = 0;
      start = nl + 1;
      if (line.length > this.opts.maxLineBytes) return this.protocolError(`a line of ${line.length} bytes exceeds the limit of ${this.opts.maxLineBytes}`);
      this.onLine(line);
    }
    if (this.phase === 'closed' || start >= chunk.length) return;
    const rest = chunk.subarray(start);
    this.chunkBytes += rest.length;
    if (this.chunkBytes > this.opts.maxLineBytes) return this.protocolError(`more than ${this.opts.maxLineBytes} bytes without a line end`);
    this.chunks.push(rest);
  }

  private onLine(line: Buffer): void {
    const text = line.toString('utf8').trim();
    if (text === '') return;
    let msg: unknown;
    try {
      msg = JSON.parse(text);
    } catch (err) {
      return this.protocolError(`malformed JSON from QEMU: ${JSON.stringify(text.slice(0, 120))} (${(err as Error).message})`);
    }
    if (typeof msg !== 'object' || msg === null || Array.isArray(msg)) return this.protocolError(`a message is not a JSON object: ${text.slice(0, 120)}`);
    const m = msg as Record<string, unknown>;
    if (this.phase === 'greeting') return this.onGreetingMessage(m);
    if ('return' in m || 'error' in m) return this.onReply(m);
    if ('event' in m) return this.onEventMessage(m);
    if ('QMP' in m) return this.protocolError('a second greeting arrived');
    this.protocolError(`unrecognized message: ${text.slice(0, 120)}`);
  }

  private onGreetingMessage(m: Record<string, unknown>): void {
    const g = m.QMP as Record<string, unknown> | undefined;
    if (typeof g !== 'object' || g === null || Array.isArray(g)) return this.protocolError(`expected the QMP greeting, got ${JSON.stringify(m).slice(0, 120)}`);
    try {
      const version = parseVersion('greeting', g.version);
      const caps = g.capabilities;
      if (!Array.isArray(caps) || !caps.every((c) => typeof c === 'string')) throw new QmpProtocolError('greeting capabilities are not a list of strings');
      this.greetingValue = { version, capabilities: caps };
    } catch (err) {
      return this.fail(err as Error);
    }
    this.phase = 'negotiating';
    this.onGreeting?.();
  }

  private onReply(m: Record<string, unknown>): void {
    const id = m.id;
    if (typeof id !== 'string') {
      // We always send an id; QEMU omits it only when it could not parse what it got.
      return this.protocolError(`reply without our id: ${JSON.stringify(m).slice(0, 200)}`);
    }
    const p = this.pending.get(id);
    if (!p) {
      if (this.abandoned.delete(id)) return; // late answer to a command that timed out
      return this.protocolError(`reply to unknown id ${JSON.stringify(id)}`);
    }
    const err = 'error' in m ? qmpErrorFrom(p.command, m.error) : undefined;
    // A malformed error member is the peer breaking QMP: drop the connection (this rejects p too).
    if (err instanceof QmpProtocolError) return this.protocolError(err.message.replace(/^QMP protocol error: /, ''));
    clearTimeout(p.timer);
    this.pending.delete(id);
    if (err) p.reject(err);
    else p.resolve(m.return);
  }

  private onEventMessage(m: Record<string, unknown>): void {
    const parsed = parseEventEnvelope(m);
    if (typeof parsed === 'string') return this.protocolError(parsed);
    this.events.publish(parsed);
  }

  private protocolError(message: string): void {
    this.fail(new QmpProtocolError(`${message} (from ${describe(this.endpoint)}; connection closed)`));
  }

  private closedError(what: string): QmpClosedError {
    const reason = this.closeReason;
    if (reason instanceof QmpClosedError) return new QmpClosedError(`${what}: ${reason.message}`, { cause: reason });
    return new QmpClosedError(`${what}: the QMP connection to ${describe(this.endpoint)} is closed${reason ? ` (${reason.message})` : ''}`, { cause: reason });
  }

  /** Ends the connection once: rejects every pending command and waiter with `reason` (or "closed"). */
  private fail(reason: Error | undefined): void {
    if (this.phase === 'closed') return;
    this.phase = 'closed';
    this.closeReason = reason;
    this.socket.destroy();
    const err = (what: string): Error => (reason && !(reason instanceof QmpClosedError) ? reason : this.closedError(what));
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(err(`QMP ${p.command}`));
    }
    this.pending.clear();
    this.events.close(err);
    for (const f of this.flushWaiters) f();
    this.flushWaiters = [];
    this.onHandshakeError?.(reason ?? this.closedError('QMP handshake'));
    this.resolveDone(reason);
  }
}

function describe(e: QmpEndpoint): string {
  return 'path' in e ? e.path : `${e.host}:${e.port}`;
}

function validateEndpoint(e: QmpEndpoint): void {
  if ('path' in e) {
    if (typeof e.path !== 'string' || e.path.length === 0 || e.path.includes('\0')) throw new TypeError('QMP endpoint path must be a non-empty string without NUL');
    // sun_path holds 108 bytes including the NUL.
    if (Buffer.byteLength(e.path) > 107) throw new RangeError(`QMP socket path is longer than 107 bytes: ${e.path}`);
    return;
  }
  if (typeof e.host !== 'string' || e.host.length === 0) throw new TypeError('QMP endpoint host must be a non-empty string');
  if (!Number.isInteger(e.port) || e.port < 1 || e.port > 65535) throw new RangeError(`QMP endpoint port must be 1..65535, got ${e.port}`);
}
