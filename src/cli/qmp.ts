// vfio-mig qmp --socket PATH [--timeout S] COMMAND [ARGS-JSON]: one QMP command on a QEMU
// monitor socket, through the project's own client (src/qmp/client.ts), for operators and
// scripts. The reply's `return` value goes to stdout as JSON; everything else is one line
// on stderr and an exit code that says which kind of failure it was (QEMU refused, the
// transport failed, or time ran out), because a script reacts differently to each.
//
// The same socket rules apply as for any QMP client: QEMU serves one client per monitor
// socket, so while libvirt (or another client) holds it the greeting never comes and this
// ends at the time limit. For a libvirt-managed VM use `virsh qemu-monitor-command`.

import { parseArgs, UsageError, type ParsedArgs } from './args.ts';
import { QmpClient } from '../qmp/client.ts';
import { QmpError } from '../qmp/errors.ts';

/** Exit codes of `qmp` and `events` (also listed in `vfio-mig --help` and docs/qmp-libvirt.md). */
export const EXIT = {
  OK: 0,
  /** `qmp`: QEMU answered with an error (`<class>: <desc>` on stderr). */
  REFUSED: 1,
  USAGE: 2,
  /** No such socket, connection refused or closed, or the peer does not speak QMP. */
  TRANSPORT: 3,
  /** No greeting, reply or awaited event within --timeout. */
  TIMEOUT: 4,
} as const;

export const EXIT_CODES_HELP = [
  'exit codes: 0 done; 1 QEMU refused the command (qmp; "<class>: <desc>" on stderr);',
  '            2 usage; 3 transport (no socket, refused, closed, not QMP);',
  '            4 time limit reached (no greeting, no reply, --until event not seen)',
];

export const usage = 'vfio-mig qmp --socket PATH [--timeout S] COMMAND [ARGS-JSON]';

const DEFAULT_TIMEOUT_S = 10;

const HELP = [
  `usage: ${usage}`,
  '',
  'Connects to a QEMU QMP unix socket, runs COMMAND (with ARGS-JSON, a JSON object, as its',
  'arguments) and prints the return value as JSON.',
  '',
  '  --socket PATH   the QMP unix socket (QEMU -qmp unix:PATH,server=on,wait=off)',
  `  --timeout S     limit for connect + command, seconds (default ${DEFAULT_TIMEOUT_S})`,
  '',
  ...EXIT_CODES_HELP,
  '',
].join('\n');

const COMMAND_NAME = /^[A-Za-z][A-Za-z0-9_-]{0,127}$/;
/** setTimeout's largest delay (about 24.8 days). */
const MAX_TIMEOUT_MS = 2 ** 31 - 1;

/** --socket: a unix socket path that fits sun_path (108 bytes with the NUL). */
export function socketOption(args: ParsedArgs): string {
  const values = args.options.get('socket');
  if (!values) throw new UsageError('--socket PATH is required');
  if (values.length > 1) throw new UsageError('--socket given more than once');
  const path = values[0]!;
  if (path === '' || path.includes('\0')) throw new UsageError('--socket needs a path');
  if (Buffer.byteLength(path) > 107) throw new UsageError(`--socket path is longer than 107 bytes (the unix socket limit): ${path}`);
  return path;
}

/** --timeout S in ms (seconds, decimals allowed), or `fallback` when absent. */
export function timeoutOption(args: ParsedArgs, fallback: number | undefined): number | undefined {
  const values = args.options.get('timeout');
  if (!values) return fallback;
  if (values.length > 1) throw new UsageError('--timeout given more than once');
  const raw = values[0]!;
  const s = /^\d+(\.\d+)?$/.test(raw) ? Number(raw) : NaN;
  const ms = Math.ceil(s * 1000);
  if (!(ms >= 1 && ms <= MAX_TIMEOUT_MS)) throw new UsageError(`--timeout must be a number of seconds, more than 0 and at most ${Math.floor(MAX_TIMEOUT_MS / 1000)}, got ${JSON.stringify(raw)}`);
  return ms;
}

/** Exit code and one-line message for a failure of the connection (not a QMP refusal). */
export function transportFailure(err: unknown): { code: number; message: string } {
  const name = err instanceof Error ? err.name : '';
  const message = (err instanceof Error ? err.message : String(err)).replace(/\s*\n\s*/g, ' ');
  return { code: name === 'QmpTimeoutError' ? EXIT.TIMEOUT : EXIT.TRANSPORT, message };
}

/** Connects within `timeoutMs` (greeting and capability negotiation included). */
export function connectQmp(path: string, timeoutMs: number): Promise<QmpClient> {
  return QmpClient.connect({ path }, { connectTimeoutMs: timeoutMs, commandTimeoutMs: timeoutMs });
}

export async function run(argv: string[], out: NodeJS.WritableStream, err: NodeJS.WritableStream = process.stderr): Promise<number> {
  const args = parseArgs(argv, { flags: ['help'], options: ['socket', 'timeout'] });
  if (args.flags.has('help')) {
    out.write(HELP);
    return EXIT.OK;
  }
  const path = socketOption(args);
  const timeoutMs = timeoutOption(args, DEFAULT_TIMEOUT_S * 1000)!;
  const [command, argsJson, ...extra] = args.positional;
  if (command === undefined) throw new UsageError('name a QMP command, e.g. query-status');
  if (!COMMAND_NAME.test(command)) throw new UsageError(`not a QMP command name: ${JSON.stringify(command)}`);
  if (extra.length > 0) throw new UsageError(`unexpected argument ${JSON.stringify(extra[0])} (pass all arguments as one JSON object)`);
  const cmdArgs = argsJson === undefined ? undefined : parseArguments(argsJson);

  const started = Date.now();
  let client: QmpClient | undefined;
  try {
    client = await connectQmp(path, timeoutMs);
    // One limit for the whole call: what connecting used is gone.
    const left = Math.max(1, timeoutMs - (Date.now() - started));
    const value = await client.execute(command, cmdArgs, { timeoutMs: left });
    out.write(`${JSON.stringify(value ?? null, null, 2)}\n`);
    return EXIT.OK;
  } catch (e) {
    if (e instanceof QmpError) {
      err.write(`${e.class}: ${e.desc}\n`);
      return EXIT.REFUSED;
    }
    const f = transportFailure(e);
    err.write(`vfio-mig qmp: ${f.message}\n`);
    return f.code;
  } finally {
    await client?.close();
  }
}

function parseArguments(text: string): Record<string, unknown> {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw new UsageError(`ARGS-JSON is not valid JSON (${(e as Error).message}): ${text.slice(0, 80)}`);
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new UsageError(`ARGS-JSON must be a JSON object (the command's arguments), got ${Array.isArray(value) ? 'an array' : value === null ? 'null' : typeof value}`);
  }
  return value as Record<string, unknown>;
}
