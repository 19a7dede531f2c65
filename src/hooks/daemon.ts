// The libvirt `daemon` hook (/etc/libvirt/hooks/daemon.d/vfio-mig -> hooks/daemon).
// libvirtd calls it as `<hook> - start - start` when it starts (also after a restart),
// `- shutdown - shutdown` and `- reload begin SIGHUP`. On start we run the same
// `vfio-mig bind --all` as the boot unit, for hosts without our systemd unit and for
// devices that appeared since boot. Everything else returns at once.
//
// libvirtd waits for the hook with no timeout of its own, so the bind runs in a child
// process that is killed after a bound: a sysfs write can block in the kernel (an
// unbind waits for the driver's remove), and a blocked write cannot be interrupted
// from inside the process that made it. The hook never calls libvirt (it would
// deadlock: the daemon is waiting for us).

import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';

export interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
}

export interface DaemonHookOptions {
  /** Upper bound for the whole bind; default $VFIO_MIG_HOOK_TIMEOUT (seconds) or 60 s. */
  timeoutMs?: number;
  /** Runs `vfio-mig <args>`; default: a child node process running bin/vfio-mig.js. */
  run?: (args: string[], timeoutMs: number) => Promise<RunResult>;
}

const ARG = /^[A-Za-z0-9_.-]{1,64}$/;
const DEFAULT_TIMEOUT_MS = 60_000;

function timeoutFromEnv(): number {
  const raw = process.env.VFIO_MIG_HOOK_TIMEOUT;
  if (raw && /^[1-9][0-9]{0,4}$/.test(raw)) return Number(raw) * 1000;
  return DEFAULT_TIMEOUT_MS;
}

/** Runs bin/vfio-mig.js in a child node, killed (SIGKILL) when it overruns. */
export function runCli(args: string[], timeoutMs: number): Promise<RunResult> {
  const bin = fileURLToPath(new URL('../../bin/vfio-mig.js', import.meta.url));
  return new Promise((resolve) => {
    execFile(process.execPath, [bin, ...args], { timeout: timeoutMs, killSignal: 'SIGKILL', encoding: 'utf8', maxBuffer: 16 << 20 }, (err, stdout, stderr) => {
      const e = err as (Error & { code?: number | string; killed?: boolean }) | null;
      resolve({ code: e ? (typeof e.code === 'number' ? e.code : null) : 0, stdout, stderr, timedOut: Boolean(e?.killed) });
    });
  });
}

function withTimeout(p: Promise<RunResult>, ms: number): Promise<RunResult> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<RunResult>((resolve) => {
    timer = setTimeout(() => resolve({ code: null, stdout: '', stderr: '', timedOut: true }), ms);
  });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

interface ReportShape {
  ok?: boolean;
  results?: Array<{ address?: string; action?: string; error?: string }>;
  pfs?: Array<{ address?: string; action?: string; detail?: string }>;
}

/** One line for libvirt's log: what failed, compactly. */
function summarize(report: ReportShape): string {
  const bad = (report.results ?? []).filter((r) => r.action === 'failed' || r.action === 'refused');
  const pfBad = (report.pfs ?? []).filter((p) => p.action === 'failed');
  const first = bad[0]?.error ?? pfBad[0]?.detail ?? 'unknown failure';
  const counts = [`${bad.filter((r) => r.action === 'failed').length} failed`, `${bad.filter((r) => r.action === 'refused').length} refused`];
  if (pfBad.length) counts.push(`${pfBad.length} PF autoprobe change(s) failed`);
  return `${counts.join(', ')}; first: ${first.replace(/\s+/g, ' ')}`;
}

/**
 * The hook entry: argv as libvirt passes it (object, operation, sub-operation, extra).
 * Returns the exit code; writes at most one line to `err`.
 */
export async function daemonHook(argv: string[], err: NodeJS.WritableStream = process.stderr, opts: DaemonHookOptions = {}): Promise<number> {
  const say = (msg: string) => err.write(`vfio-mig daemon hook: ${msg.slice(0, 1000)}\n`);
  if (argv.length < 2 || argv.slice(0, 4).some((a) => !ARG.test(a))) {
    say(`unexpected arguments ${JSON.stringify(argv.slice(0, 4).map((a) => String(a).slice(0, 64)))}; expected "- start - start" and the like`);
    return 2;
  }
  if (argv[1] !== 'start') return 0; // shutdown, reload and future operations: nothing to do
  const timeoutMs = opts.timeoutMs ?? timeoutFromEnv();
  const run = opts.run ?? runCli;
  const res = await withTimeout(run(['bind', '--all', '--json'], timeoutMs), timeoutMs + 1000);
  if (res.timedOut) {
    say(`bind --all did not finish within ${Math.round(timeoutMs / 1000)} s and was stopped; run "vfio-mig bind --all" by hand to see where it hangs`);
    return 1;
  }
  let report: ReportShape | undefined;
  try {
    report = JSON.parse(res.stdout) as ReportShape;
  } catch {
    report = undefined;
  }
  if (res.code === 0 && report?.ok) return 0;
  if (report && report.ok === false) {
    say(`bind --all: ${summarize(report)}`);
    return 1;
  }
  const why = res.stderr.split('\n').find((l) => l.trim()) ?? `exit code ${res.code}`;
  say(`bind --all failed: ${why.trim()}`);
  return 1;
}
