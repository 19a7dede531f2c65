// Destination facts come from the destination's own vfio-mig (`host-facts --json`): over
// ssh for qemu+ssh:// URIs (the way libvirt itself reaches that peer), through a
// configured command for anything else that is not this host (e.g. a network namespace
// of the test pair), in-process for this host's own URIs, or from a file saved earlier.
// The source's hostdev descriptors travel on the command's stdin (ssh hands a remote
// command to the remote shell as one string, so nothing variable goes on that line).
// The answer is parsed by parseHostFacts: it came from another machine.

import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { HostFactsError, parseHostFacts, type CompatQuery, type HostFacts } from './facts.ts';

export type PeerRoute =
  | { kind: 'ssh'; host: string; user?: string; port?: number; keyfile?: string }
  | { kind: 'local' }
  | { kind: 'command'; argv: string[] }
  | { kind: 'unreachable'; reason: string };

const HOST = /^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}))*|\[[0-9A-Fa-f:.]{2,45}\])$/;
const USER = /^[A-Za-z_][A-Za-z0-9_.-]{0,31}$/;
const KEYFILE = /^\/[A-Za-z0-9_./+-]{1,4095}$/;
/** Environment: a JSON list, the argv prefix that runs vfio-mig on the destination (e.g. through `ip netns exec`). */
export const PEER_COMMAND_ENV = 'VFIO_MIG_PEER_COMMAND';
/** Environment: the vfio-mig command on an ssh destination (default "vfio-mig"). */
export const REMOTE_COMMAND_ENV = 'VFIO_MIG_REMOTE_COMMAND';

export class PeerUriError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'PeerUriError';
  }
}

/** The configured peer command from the environment, validated; undefined when unset. */
export function peerCommandFromEnv(env: NodeJS.ProcessEnv = process.env): string[] | undefined {
  const raw = env[PEER_COMMAND_ENV];
  if (!raw) return undefined;
  let v: unknown;
  try {
    v = JSON.parse(raw);
  } catch {
    throw new PeerUriError(`${PEER_COMMAND_ENV} must be a JSON list of strings (the argv that runs vfio-mig on the destination)`);
  }
  if (!Array.isArray(v) || v.length === 0 || v.length > 64 || !v.every((a) => typeof a === 'string' && a.length > 0 && a.length < 4096 && !a.includes('\0'))) {
    throw new PeerUriError(`${PEER_COMMAND_ENV} must be a non-empty JSON list of strings`);
  }
  return v as string[];
}

/** How to reach the destination's vfio-mig for a libvirt URI. */
export function routeFor(uri: string, command?: string[]): PeerRoute {
  let u: URL;
  try {
    u = new URL(uri);
  } catch {
    throw new PeerUriError(`not a libvirt URI: ${JSON.stringify(uri)}`);
  }
  const m = /^([a-z0-9]+)(?:\+([a-z0-9]+))?:$/.exec(u.protocol);
  if (!m) throw new PeerUriError(`not a libvirt URI: ${JSON.stringify(uri)}`);
  const transport = m[2] ?? (u.hostname ? 'tls' : 'unix');
  if (command) return { kind: 'command', argv: command };
  if (transport === 'ssh' || transport === 'libssh' || transport === 'libssh2') {
    const host = u.hostname;
    if (!host || !HOST.test(host)) throw new PeerUriError(`ssh host ${JSON.stringify(host)} is not a plain host name or address`);
    const user = u.username ? decodeURIComponent(u.username) : undefined;
    if (user !== undefined && !USER.test(user)) throw new PeerUriError(`ssh user ${JSON.stringify(user)} is not a plain user name`);
    const port = u.port ? Number(u.port) : undefined;
    const keyfile = u.searchParams.get('keyfile') ?? undefined;
    if (keyfile !== undefined && !KEYFILE.test(keyfile)) throw new PeerUriError(`keyfile ${JSON.stringify(keyfile)} is not a plain absolute path`);
    // ssh takes an IPv6 address without the URI's brackets.
    return { kind: 'ssh', host: host.replace(/^\[(.*)\]$/, '$1'), ...(user ? { user } : {}), ...(port ? { port } : {}), ...(keyfile ? { keyfile } : {}) };
  }
  if (transport === 'unix' || !u.hostname || u.hostname === 'localhost' || u.hostname === '127.0.0.1' || u.hostname === '[::1]') return { kind: 'local' };
  return {
    kind: 'unreachable',
    reason: `${u.protocol}//${u.hostname} is reached by libvirt over ${transport}, not ssh: run \`vfio-mig host-facts --json\` there and pass the file with --dest-facts, or set ${PEER_COMMAND_ENV}`,
  };
}

/** The argv that runs host-facts on the destination through ssh (no shell on this side). */
export function sshArgv(route: Extract<PeerRoute, { kind: 'ssh' }>, connectTimeoutS: number, env: NodeJS.ProcessEnv = process.env): string[] {
  const remote = env[REMOTE_COMMAND_ENV] || 'vfio-mig';
  if (!/^[A-Za-z0-9_./-]{1,256}$/.test(remote)) throw new PeerUriError(`${REMOTE_COMMAND_ENV} must be a plain command path`);
  return [
    'ssh',
    '-o', 'BatchMode=yes',
    '-o', `ConnectTimeout=${Math.max(1, Math.round(connectTimeoutS))}`,
    ...(route.port ? ['-p', String(route.port)] : []),
    ...(route.user ? ['-l', route.user] : []),
    ...(route.keyfile ? ['-i', route.keyfile] : []),
    '--',
    route.host,
    remote, 'host-facts', '--json', '--sources', '-',
  ];
}

export interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

const MAX_OUTPUT = 16 * 1024 * 1024;

/** Runs argv (no shell) with `input` on stdin, bounded in time and output. */
export function runBounded(argv: string[], input: string, timeoutMs: number): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(argv[0]!, argv.slice(1), { stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    let settled = false;
    const done = (f: () => void): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      f();
    };
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      done(() => reject(new Error(`${argv[0]} did not answer within ${timeoutMs} ms`)));
    }, timeoutMs);
    child.stdout.setEncoding('utf8').on('data', (c: string) => {
      stdout += c;
      if (stdout.length > MAX_OUTPUT) {
        child.kill('SIGKILL');
        done(() => reject(new Error(`${argv[0]} printed more than ${MAX_OUTPUT} bytes`)));
      }
    });
    child.stderr.setEncoding('utf8').on('data', (c: string) => {
      if (stderr.length < 65536) stderr += c;
    });
    child.on('error', (err) => done(() => reject(new Error(`cannot run ${argv[0]}: ${err.message}`))));
    child.on('close', (code) => done(() => resolve({ code, stdout, stderr })));
    child.stdin.on('error', () => {
      // the peer did not read its input (it failed early); its exit status tells why
    });
    child.stdin.end(input);
  });
}

export interface PeerRequest {
  uri: string;
  queries: CompatQuery[];
  /** Facts saved earlier on the destination (`vfio-mig host-facts --json > FILE`). */
  factsFile?: string;
  /** The argv prefix that runs vfio-mig on the destination (else $VFIO_MIG_PEER_COMMAND). */
  command?: string[];
  timeoutMs?: number;
  /** Collects this host's facts in-process (local URIs). */
  local: (queries: CompatQuery[], uri: string) => Promise<HostFacts>;
}

export interface PeerFacts {
  facts?: HostFacts;
  /** How they were obtained: "ssh user@host", "command ...", "local", "file PATH". */
  via: string;
  error?: string;
}

function firstLine(s: string): string {
  return s.split('\n').map((l) => l.trim()).find(Boolean) ?? '';
}

export async function destinationFacts(req: PeerRequest): Promise<PeerFacts> {
  const timeoutMs = req.timeoutMs ?? 30_000;
  if (req.factsFile) {
    try {
      return { facts: parseHostFacts(readFileSync(req.factsFile, 'utf8')), via: `file ${req.factsFile}` };
    } catch (err) {
      return { via: `file ${req.factsFile}`, error: err instanceof Error ? err.message : String(err) };
    }
  }
  let route: PeerRoute;
  try {
    route = routeFor(req.uri, req.command ?? peerCommandFromEnv());
  } catch (err) {
    return { via: 'none', error: (err as Error).message };
  }
  const input = JSON.stringify({ sources: req.queries });
  let argv: string[];
  let via: string;
  switch (route.kind) {
    case 'unreachable':
      return { via: 'none', error: route.reason };
    case 'local':
      try {
        return { facts: await req.local(req.queries, req.uri), via: 'local' };
      } catch (err) {
        return { via: 'local', error: err instanceof Error ? err.message : String(err) };
      }
    case 'ssh':
      argv = sshArgv(route, Math.min(10, timeoutMs / 1000));
      via = `ssh ${route.user ? `${route.user}@` : ''}${route.host}`;
      break;
    case 'command':
      // The destination's own libvirt URI is passed as one argv element (no shell), for its versions.
      argv = [...route.argv, 'host-facts', '--json', '--sources', '-', '--uri', req.uri];
      via = `command ${route.argv.join(' ')}`;
      break;
  }
  try {
    const r = await runBounded(argv, input, timeoutMs);
    if (r.code !== 0) {
      const why = firstLine(r.stderr) || `exit status ${r.code}`;
      return { via, error: `${via}: vfio-mig host-facts failed: ${why}` };
    }
    return { facts: parseHostFacts(r.stdout), via };
  } catch (err) {
    const msg = err instanceof HostFactsError ? err.message : err instanceof Error ? err.message : String(err);
    return { via, error: `${via}: ${msg}` };
  }
}
