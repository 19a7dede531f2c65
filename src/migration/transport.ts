// Transports for the state stream: a byte pipe to the peer host with backpressure, and
// for sockets, authentication before any byte can reach a device.
//
// - stdio: `ssh host vfio-mig receive ...` carries the stream on the remote command's
//   stdin and the verdict on its stdout; ssh has authenticated both ends.
// - TCP and unix sockets: a device state is input to a vendor driver's parser in the
//   kernel, so a socket peer proves who it is first: TLS with mutual certificate
//   verification against libvirt's migration PKI, and/or a one-time 256-bit token handed
//   over the ssh channel (compared in constant time, single use). The listener binds only
//   the address it is given (a wildcard only when asked explicitly), takes exactly one
//   authenticated connection and then stops listening; a peer that fails drops before
//   the receiver reads a single stream byte, so nothing of it can reach a device.
//
// Handshake on a socket (after TLS when TLS is on): the sender writes "VFMIGHEL" and 32
// token bytes (zeros without a token), the receiver answers "VFMIGOK1" and only then
// does the stream flow. Backpressure: Transport.write resolves once the socket accepted
// the bytes (at once, or after 'drain'), and reading pauses the socket while the
// receiver is busy writing devices.

import net from 'node:net';
import tls from 'node:tls';
import { randomBytes, timingSafeEqual } from 'node:crypto';
import { readFileSync, chmodSync } from 'node:fs';
import { spawn } from 'node:child_process';
import type { Readable, Writable } from 'node:stream';

/** A connected (and, for sockets, authenticated) byte pipe to the peer. */
export interface Transport {
  /** For messages: "tcp 192.0.2.7:40112", "unix /run/...", "stdio". */
  readonly peer: string;
  /** Bytes from the peer. Iterating again continues where the last iteration stopped. */
  readonly readable: AsyncIterable<Buffer>;
  /** Resolves when `b` was accepted (the socket drained if it had to). */
  write(b: Buffer): Promise<void>;
  /** Ends our sending side (the peer reads EOF); the peer may still answer. */
  end(): Promise<void>;
  /** Tears the connection down. */
  close(): void;
}

export type TransportErrorCode = 'AUTH' | 'ADDRESS' | 'CONFIG' | 'TIMEOUT' | 'CLOSED';

export class TransportError extends Error {
  readonly code: TransportErrorCode;
  constructor(code: TransportErrorCode, message: string, cause?: unknown) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = 'TransportError';
    this.code = code;
  }
}

/** Reads a Readable on demand; returning early leaves the stream open (unlike Node's iterator). */
function readableOf(r: Readable): AsyncIterable<Buffer> {
  let error: unknown;
  // Normally one reader; after a failed receive the verdict's drain may read while the
  // stream reader's last read is still pending, so every waiter is woken.
  let waiters: (() => void)[] = [];
  const poke = () => {
    const w = waiters;
    waiters = [];
    for (const f of w) f();
  };
  r.on('readable', poke);
  r.on('end', poke);
  r.on('close', poke);
  r.on('error', (e) => {
    error ??= e;
    poke();
  });
  return {
    [Symbol.asyncIterator](): AsyncIterator<Buffer> {
      return {
        async next(): Promise<IteratorResult<Buffer>> {
          for (;;) {
            const c = r.read() as Buffer | string | null;
            if (c !== null) return { done: false, value: typeof c === 'string' ? Buffer.from(c) : c };
            if (r.readableEnded) return { done: true, value: undefined };
            if (error !== undefined) throw new TransportError('CLOSED', `the connection failed: ${(error as Error).message ?? String(error)}`, error);
            if (r.destroyed) throw new TransportError('CLOSED', 'the connection was closed before the peer finished');
            await new Promise<void>((resolve) => waiters.push(resolve));
          }
        },
        async return(): Promise<IteratorResult<Buffer>> {
          return { done: true, value: undefined };
        },
      };
    },
  };
}

/** A Transport over a readable and a writable stream (a socket, a child's stdio, stdio). */
export function streamTransport(input: Readable, output: Writable, peer: string, destroy?: () => void): Transport {
  let error: unknown;
  output.on('error', (e) => (error ??= e));
  const closed = () => new TransportError('CLOSED', `the connection to ${peer} is closed${error ? `: ${(error as Error).message}` : ''}`, error);
  return {
    peer,
    readable: readableOf(input),
    write(b: Buffer): Promise<void> {
      if (error !== undefined || output.destroyed || output.writableEnded) return Promise.reject(closed());
      if (output.write(b)) return Promise.resolve();
      return new Promise<void>((resolve, reject) => {
        const done = (err?: unknown) => {
          output.off('drain', onDrain);
          output.off('error', onError);
          output.off('close', onClose);
          if (err !== undefined) reject(err);
          else resolve();
        };
        const onDrain = () => done();
        const onError = (e: unknown) => done(new TransportError('CLOSED', `writing to ${peer} failed: ${(e as Error).message}`, e));
        const onClose = () => done(closed());
        output.on('drain', onDrain);
        output.on('error', onError);
        output.on('close', onClose);
      });
    },
    end(): Promise<void> {
      if (output.writableEnded) return Promise.resolve();
      return new Promise<void>((resolve, reject) => {
        output.end((err?: Error | null) => (err ? reject(closed()) : resolve()));
      });
    },
    close(): void {
      if (destroy) destroy();
      else {
        input.destroy();
        output.destroy();
      }
    },
  };
}

/** This process's stdin/stdout: the receiving end of `ssh host vfio-mig receive`. */
export function stdioTransport(): Transport {
  return streamTransport(process.stdin, process.stdout, 'stdio', () => {
    process.stdin.destroy();
  });
}

/**
 * Runs `command args` (directly, no shell) and talks to it over its stdin and stdout: the
 * sending end of `ssh host vfio-mig receive ...`. The child's stderr (the receiver's
 * progress and log) passes through unless told otherwise; close() terminates the child.
 */
export function spawnTransport(command: string, args: readonly string[], opts: { stderr?: 'inherit' | 'ignore' } = {}): Transport {
  const child = spawn(command, args, { stdio: ['pipe', 'pipe', opts.stderr ?? 'inherit'] });
  // A command that cannot start (ENOENT) shows as a failed read and write, not a crash.
  child.on('error', (e) => {
    child.stdout.destroy(e);
    child.stdin.destroy(e);
  });
  return streamTransport(child.stdout, child.stdin, `${command} ${args.join(' ')}`.trim(), () => {
    child.stdin.destroy();
    child.stdout.destroy();
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
  });
}

/** libvirt's migration PKI (the same files `virsh migrate --tls` uses). */
export interface PkiFiles {
  caCert: string;
  serverCert: string;
  serverKey: string;
  clientCert: string;
  clientKey: string;
}

export const DEFAULT_PKI: Readonly<PkiFiles> = {
  caCert: '/etc/pki/CA/cacert.pem',
  serverCert: '/etc/pki/libvirt/servercert.pem',
  serverKey: '/etc/pki/libvirt/private/serverkey.pem',
  clientCert: '/etc/pki/libvirt/clientcert.pem',
  clientKey: '/etc/pki/libvirt/private/clientkey.pem',
};

export type Endpoint = { host: string; port: number } | { path: string };

export interface AuthOptions {
  /** Mutual TLS with these PKI files (`true`: libvirt's defaults). */
  tls?: true | Partial<PkiFiles>;
  /** A one-time token (32 bytes, or 64 hex characters) the peer must present. */
  token?: Buffer | string;
}

/** A fresh random 256-bit token, as 64 hex characters (what the receiver prints). */
export function newToken(): string {
  return randomBytes(32).toString('hex');
}

function tokenBytes(t: Buffer | string): Buffer {
  const b = typeof t === 'string' ? (/^[0-9a-fA-F]{64}$/.test(t) ? Buffer.from(t, 'hex') : undefined) : t;
  if (!b || b.length !== 32) throw new TransportError('CONFIG', 'a token is 32 bytes (64 hex characters)');
  return Buffer.from(b);
}

function pki(files: true | Partial<PkiFiles>): PkiFiles {
  return { ...DEFAULT_PKI, ...(files === true ? {} : files) };
}

function readPem(path: string, what: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    throw new TransportError('CONFIG', `cannot read the ${what} ${path}: ${(err as Error).message}`, err);
  }
}

const HELLO_MAGIC = Buffer.from('VFMIGHEL');
/**
 * Socket buffer sizes (Node's highWaterMark) in each direction. Node's 16 KiB default
 * stops reading the socket after every 64 KiB read until the receiver asks again, so
 * the receiver handled the stream in 64 KiB pieces, each costing an event-loop turn, a
 * digest update and a queue push; with room for a few MiB, whatever arrived while the
 * receiver was busy comes as one piece. Both are bounds, so memory stays bounded.
 */
const SOCKET_BUFFER = 4 << 20;
const HELLO_SIZE = 40;
const ACK = Buffer.from('VFMIGOK1');

function describeEndpoint(e: Endpoint): string {
  return 'path' in e ? `unix ${e.path}` : `tcp ${e.host.includes(':') ? `[${e.host}]` : e.host}:${e.port}`;
}

const WILDCARDS = new Set(['', '0.0.0.0', '::', '::0', '0:0:0:0:0:0:0:0', '*', '[::]']);

/** Reads exactly `n` bytes from a fresh socket within `ms` (the handshake). */
function readExactly(sock: net.Socket, n: number, ms: number, what: string): Promise<Buffer> {
  return new Promise<Buffer>((resolve, reject) => {
    const finish = (err: unknown, b?: Buffer) => {
      clearTimeout(timer);
      sock.off('readable', onReadable);
      sock.off('end', onGone);
      sock.off('close', onGone);
      sock.off('error', onError);
      if (err) reject(err);
      else resolve(b!);
    };
    const onReadable = () => {
      const b = sock.read(n) as Buffer | null;
      if (b) finish(undefined, b);
    };
    const onGone = () => finish(new TransportError('AUTH', `the peer closed the connection during ${what}`));
    const onError = (e: Error) => finish(new TransportError('AUTH', `${what} failed: ${e.message}`, e));
    const timer = setTimeout(() => finish(new TransportError('TIMEOUT', `no ${what} within ${ms} ms`)), ms);
    sock.on('readable', onReadable);
    sock.on('end', onGone);
    sock.on('close', onGone);
    sock.on('error', onError);
    onReadable();
  });
}

export interface ListenOptions extends AuthOptions {
  /** Bind 0.0.0.0 / :: if asked; refused otherwise. */
  allowWildcard?: boolean;
  /** Time a peer has to complete TLS and present its token (default 10 s). */
  authTimeoutMs?: number;
  /** Time to wait for the authenticated peer at all (default 120 s). */
  acceptTimeoutMs?: number;
  /** Refused peers before the listener gives up (default 16). */
  maxRefused?: number;
  /** Told about every refused peer (for the log). */
  onRefused?: (peer: string, reason: string) => void;
}

export interface Listener {
  /** The bound address (the real port when 0 was asked). */
  readonly endpoint: Endpoint;
  /** Peers that were dropped, and why. */
  readonly refused: { peer: string; reason: string }[];
  /** The one authenticated connection. */
  accept(): Promise<Transport>;
  /** Stops listening (a connection already accepted stays open). */
  close(): Promise<void>;
}

/**
 * Listens on `endpoint` for one sender. At least one of `tls` and `token` is required.
 * Peers that fail TLS verification, present a wrong token, or send nothing in time are
 * dropped and recorded; the first that passes is the transport, and the listener closes.
 */
export async function listen(endpoint: Endpoint, opts: ListenOptions): Promise<Listener> {
  if (!opts.tls && opts.token === undefined) throw new TransportError('CONFIG', 'a socket transport needs TLS or a token: a device state is input to the driver, so the peer must be authenticated');
  if ('host' in endpoint) {
    if (typeof endpoint.host !== 'string' || (WILDCARDS.has(endpoint.host.trim()) && !opts.allowWildcard)) {
      throw new TransportError('ADDRESS', `refusing to listen on the wildcard address ${JSON.stringify(endpoint.host)}: give the address of the migration network (or allow the wildcard explicitly)`);
    }
    if (!Number.isInteger(endpoint.port) || endpoint.port < 0 || endpoint.port > 65535) throw new TransportError('ADDRESS', `bad port ${endpoint.port}`);
  } else if (typeof endpoint.path !== 'string' || !endpoint.path.startsWith('/')) {
    throw new TransportError('ADDRESS', 'a unix socket path must be absolute');
  }
  const token = opts.token === undefined ? undefined : tokenBytes(opts.token);
  const authMs = opts.authTimeoutMs ?? 10_000;
  const maxRefused = opts.maxRefused ?? 16;
  const refused: { peer: string; reason: string }[] = [];
  let settled = false;
  // Set once listening; a listen error may call fail() before.
  const timers: { accept?: NodeJS.Timeout } = {};
  let resolveAccept!: (t: Transport) => void;
  let rejectAccept!: (e: unknown) => void;
  const accepted = new Promise<Transport>((res, rej) => {
    resolveAccept = res;
    rejectAccept = rej;
  });
  accepted.catch(() => undefined);

  const peerOf = (s: net.Socket) => ('path' in endpoint ? `unix ${endpoint.path}` : `tcp ${s.remoteAddress}:${s.remotePort}`);
  const refuse = (peer: string, reason: string, sock?: net.Socket) => {
    sock?.destroy();
    if (settled) return;
    refused.push({ peer, reason });
    opts.onRefused?.(peer, reason);
    if (refused.length >= maxRefused) fail(new TransportError('AUTH', `${refused.length} peers were refused; the listener gave up (last: ${reason})`));
  };

  const handle = async (sock: net.Socket) => {
    const peer = peerOf(sock);
    sock.on('error', () => undefined); // reported through the handshake or the transport
    if (settled) {
      sock.destroy();
      return;
    }
    if (sock instanceof tls.TLSSocket && !sock.authorized) {
      refuse(peer, `TLS: ${String(sock.authorizationError ?? 'client certificate not verified')}`, sock);
      return;
    }
    let hello: Buffer;
    try {
      hello = await readExactly(sock, HELLO_SIZE, authMs, 'the handshake');
    } catch (err) {
      refuse(peer, (err as Error).message, sock);
      return;
    }
    const magicOk = timingSafeEqual(hello.subarray(0, 8), HELLO_MAGIC);
    const tokenOk = token ? timingSafeEqual(hello.subarray(8), token) : true;
    if (!magicOk || !tokenOk) {
      refuse(peer, magicOk ? 'wrong token' : 'not a vfio-mig sender', sock);
      return;
    }
    if (settled) {
      sock.destroy();
      return;
    }
    // Single use: the token is forgotten and nobody else gets in.
    settled = true;
    token?.fill(0);
    clearTimeout(timers.accept);
    server.close();
    sock.write(ACK);
    resolveAccept(streamTransport(sock, sock, peer, () => sock.destroy()));
  };

  let server: net.Server;
  try {
    server = createServer();
  } catch (err) {
    throw err instanceof TransportError ? err : new TransportError('CONFIG', `cannot use the TLS files: ${(err as Error).message}`, err);
  }
  function createServer(): net.Server {
    if (!opts.tls) return net.createServer({ allowHalfOpen: true, highWaterMark: SOCKET_BUFFER }, (s) => void handle(s));
    const f = pki(opts.tls);
    const srv = tls.createServer(
      {
        key: readPem(f.serverKey, 'server key'),
        cert: readPem(f.serverCert, 'server certificate'),
        ca: readPem(f.caCert, 'CA certificate'),
        requestCert: true,
        rejectUnauthorized: true,
        minVersion: 'TLSv1.2',
        handshakeTimeout: authMs,
        allowHalfOpen: true,
        highWaterMark: SOCKET_BUFFER,
      },
      (s) => void handle(s),
    );
    srv.on('tlsClientError', (err: Error, s: tls.TLSSocket) => refuse(peerOf(s), `TLS: ${err.message}`, s));
    return srv;
  }
  const fail = (err: unknown) => {
    if (settled) return;
    settled = true;
    token?.fill(0);
    clearTimeout(timers.accept);
    server.close();
    rejectAccept(err);
  };
  server.on('error', (e) => fail(new TransportError('CLOSED', `the listener failed: ${e.message}`, e)));

  await new Promise<void>((resolve, reject) => {
    const onError = (e: Error) => reject(new TransportError('ADDRESS', `cannot listen on ${describeEndpoint(endpoint)}: ${e.message}`, e));
    server.once('error', onError);
    const done = () => {
      server.off('error', onError);
      resolve();
    };
    if ('path' in endpoint) server.listen(endpoint.path, done);
    else server.listen(endpoint.port, endpoint.host, done);
  });
  if ('path' in endpoint) chmodSync(endpoint.path, 0o600);
  const addr = server.address();
  const bound: Endpoint = 'path' in endpoint ? endpoint : { host: endpoint.host, port: typeof addr === 'object' && addr ? addr.port : endpoint.port };
  const acceptMs = opts.acceptTimeoutMs ?? 120_000;
  timers.accept = setTimeout(() => fail(new TransportError('TIMEOUT', `no authenticated sender on ${describeEndpoint(bound)} within ${acceptMs} ms`)), acceptMs);

  return {
    endpoint: bound,
    refused,
    accept: () => accepted,
    close: async () => {
      fail(new TransportError('CLOSED', 'the listener was closed'));
      if (server.listening) await new Promise<void>((r) => server.close(() => r()));
    },
  };
}

function tlsConnect(endpoint: Endpoint, target: { path: string } | { host: string; port: number }, files: true | Partial<PkiFiles>, name: string | undefined, ready: () => void): tls.TLSSocket {
  const f = pki(files);
  const servername = name ?? ('host' in endpoint ? endpoint.host : undefined);
  const options: tls.ConnectionOptions = {
    ...target,
    key: readPem(f.clientKey, 'client key'),
    cert: readPem(f.clientCert, 'client certificate'),
    ca: readPem(f.caCert, 'CA certificate'),
    rejectUnauthorized: true,
    minVersion: 'TLSv1.2',
  };
  // allowHalfOpen: the receiver answers after we ended our side (TLSSocket honours it).
  Object.assign(options, { allowHalfOpen: true, highWaterMark: SOCKET_BUFFER });
  if (servername === undefined) {
    // A unix socket without a name: the CA chain is verified, the name is not.
    options.checkServerIdentity = () => undefined;
  } else if (net.isIP(servername) === 0) {
    options.servername = servername;
  } else {
    options.checkServerIdentity = (_h, cert) => tls.checkServerIdentity(servername, cert);
  }
  return tls.connect(options, ready);
}

export interface ConnectOptions extends AuthOptions {
  /** Name the receiver's certificate must carry (default: the TCP host; none for unix sockets). */
  servername?: string;
  /** Time for the connection, TLS and the receiver's acknowledgement (default 10 s). */
  timeoutMs?: number;
}

/**
 * Connects to a receiver, authenticates (TLS with our client certificate, verifying the
 * receiver's against the CA; the token if one is given) and waits for the receiver's
 * acknowledgement. A receiver that drops us is a TransportError 'AUTH'.
 */
export async function connect(endpoint: Endpoint, opts: ConnectOptions): Promise<Transport> {
  if (!opts.tls && opts.token === undefined) throw new TransportError('CONFIG', 'a socket transport needs TLS or a token');
  const token = opts.token === undefined ? Buffer.alloc(32) : tokenBytes(opts.token);
  const ms = opts.timeoutMs ?? 10_000;
  const where = describeEndpoint(endpoint);
  const target = 'path' in endpoint ? { path: endpoint.path } : { host: endpoint.host, port: endpoint.port };
  const sock: net.Socket = await new Promise<net.Socket>((resolve, reject) => {
    let s: net.Socket | undefined;
    const timer = setTimeout(() => {
      s?.destroy();
      reject(new TransportError('TIMEOUT', `no connection to ${where} within ${ms} ms`));
    }, ms);
    const onError = (e: Error) => {
      clearTimeout(timer);
      reject(new TransportError(opts.tls ? 'AUTH' : 'CLOSED', `cannot connect to ${where}: ${e.message}`, e));
    };
    const ready = () => {
      clearTimeout(timer);
      s!.off('error', onError);
      resolve(s!);
    };
    try {
      s = opts.tls ? tlsConnect(endpoint, target, opts.tls, opts.servername, ready) : net.connect(Object.assign({ ...target, allowHalfOpen: true }, { highWaterMark: SOCKET_BUFFER }), ready); // highWaterMark: in Node's Socket options, not in its types
    } catch (err) {
      clearTimeout(timer);
      reject(err instanceof TransportError ? err : new TransportError('CONFIG', `cannot use the TLS files: ${(err as Error).message}`, err));
      return;
    }
    s.once('error', onError);
  });
  sock.on('error', () => undefined);
  sock.write(Buffer.concat([HELLO_MAGIC, token]));
  try {
    const ack = await readExactly(sock, ACK.length, ms, "the receiver's acknowledgement");
    if (!ack.equals(ACK)) throw new TransportError('AUTH', `${where} is not a vfio-mig receiver`);
  } catch (err) {
    sock.destroy();
    if (err instanceof TransportError && err.code !== 'TIMEOUT') {
      throw new TransportError('AUTH', `the receiver at ${where} refused us (wrong token or certificate?) or closed the connection: ${err.message}`, err);
    }
    throw err;
  }
  return streamTransport(sock, sock, where, () => sock.destroy());
}
