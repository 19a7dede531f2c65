// The libvirt `qemu` hook (/etc/libvirt/hooks/qemu.d/50-vfio-mig -> hooks/qemu). libvirtd
// runs it synchronously as `<hook> <domain> <operation> <sub-operation> <extra>` with the
// domain XML on stdin, for every domain and every lifecycle step, and waits with no
// time limit of its own. So:
//   - operations we do not handle, and domains whose XML cannot hold a VFIO hostdev (a
//     text check, no parser), return 0 at once, silently, having loaded nothing heavy;
//   - every handled path runs under a deadline (hooks.timeouts), enforced also by a
//     watchdog thread that survives a syscall blocked in the kernel;
//   - a refusal is one line on stderr (libvirt quotes it in the error) and exit 1;
//   - a crash of ours is caught and logged with the domain name; it refuses only a
//     domain that really has VFIO hostdevs (letting it start unchecked could strand it),
//     never an unrelated one;
//   - the hook never calls libvirt (libvirtd is waiting for us: it would deadlock).
// Operations: prepare begin (qemu-prepare.ts), migrate begin (qemu-migrate.ts, the
// destination's XML filter), release end (qemu-release.ts).

import { HookRefusal, hasControlChars, oneLine } from './refusal.ts';
import { readStdin, type StdinResult } from './stdin.ts';
import type { HookContext, HookResult } from './qemu-common.ts';

/** Operation -> the sub-operation libvirt passes with it. */
const HANDLED: Record<string, string> = { prepare: 'begin', migrate: 'begin', release: 'end' };
const DEFAULT_SECONDS: Record<string, number> = { prepare: 60, migrate: 30, release: 60 };
const VFIO_MIG_NS = 'https://vfio-mig.org/xmlns/domain/1';
/**
 * Domain XML is a few KB (a large domain tens of KB); a hostile or broken one is cut off
 * here, which also bounds the parse (a 16 MB document takes seconds to validate).
 */
export const MAX_STDIN_BYTES = 4 * 1024 * 1024;
const STDIN_TIMEOUT_MS = 10_000;

/** Whether the text may hold a VFIO hostdev (or our metadata): the cheap pre-check (hooks/qemu has a copy). */
export function mayHaveVfio(xml: string): boolean {
  return /<hostdev[\s>/]/.test(xml) || /<interface\b[^>]*\btype\s*=\s*["']hostdev["']/.test(xml) || xml.includes(VFIO_MIG_NS);
}

/** Stricter: a PCI or mdev hostdev (not usb/scsi), an interface hostdev, or our metadata. */
function hasVfioHostdev(xml: string): boolean {
  return /<hostdev\b[^>]*\btype\s*=\s*["'](?:pci|mdev)["']/.test(xml) || /<interface\b[^>]*\btype\s*=\s*["']hostdev["']/.test(xml) || xml.includes(VFIO_MIG_NS);
}

export interface HookIo {
  stdin: () => Promise<StdinResult>;
  out: NodeJS.WritableStream;
  err: NodeJS.WritableStream;
  /** Overrides hooks.timeouts (tests). */
  timeoutMs?: number;
  /** Start the watchdog thread (default true; in-process tests turn it off). */
  watchdog?: boolean;
}

function usage(err: NodeJS.WritableStream, what: string): number {
  err.write(`vfio-mig qemu hook: ${oneLine(what)}; libvirt runs it as "<domain> <operation> <sub-operation> <extra>" with the domain XML on stdin (see docs/hooks.md)\n`);
  return 2;
}

/** How long to wait for stdin's end: libvirt writes the XML at once; $VFIO_MIG_HOOK_STDIN_SECONDS for tests. */
function stdinTimeoutMs(): number {
  const env = process.env.VFIO_MIG_HOOK_STDIN_SECONDS;
  return env && /^[1-9][0-9]{0,2}$/.test(env) ? Number(env) * 1000 : STDIN_TIMEOUT_MS;
}

function configuredSeconds(op: string): number {
  // The config is read again by the operation; here only the deadline matters, and a
  // broken config must not stop us from bounding time.
  const env = process.env.VFIO_MIG_HOOK_TIMEOUT;
  if (env && /^[1-9][0-9]{0,3}$/.test(env)) return Number(env);
  return DEFAULT_SECONDS[op]!;
}

export async function qemuHook(argv: string[], io: Partial<HookIo> = {}): Promise<number> {
  const err = io.err ?? process.stderr;
  const out = io.out ?? process.stdout;
  if (argv.length === 0) return usage(err, 'no arguments');
  const [domain = '', operation = '', subOperation = '-', extra = '-'] = argv;
  const expectedSub = Object.hasOwn(HANDLED, operation) ? HANDLED[operation] : undefined;
  // Operations libvirt may add tomorrow, and the ones we leave alone: nothing to do.
  if (expectedSub === undefined || subOperation !== expectedSub) return 0;
  const refusalCode = operation === 'release' ? 0 : 1;
  if (argv.length > 4 || domain.length === 0 || domain.length > 256 || domain.includes('/') || hasControlChars(domain) || domain === '.' || domain === '..' || extra.length > 64 || hasControlChars(extra)) {
    usage(err, `unexpected arguments ${JSON.stringify(argv.slice(0, 5).map((a) => String(a).slice(0, 64)))}`);
    return operation === 'release' ? 0 : 2;
  }
  const name = JSON.stringify(domain);
  const line = (text: string) => err.write(`vfio-mig qemu hook: ${oneLine(`${name} ${operation}: ${text}`)}\n`);

  const input = await (io.stdin ?? (() => readStdin(MAX_STDIN_BYTES, stdinTimeoutMs())))();
  if (input.kind !== 'text') {
    const why =
      input.kind === 'missing'
        ? `no domain XML (${input.why})`
        : input.kind === 'too-large'
          ? `the domain XML on stdin is larger than ${input.limit} bytes; no libvirt domain is - refusing to look at it`
          : `stdin was not closed within ${input.ms} ms (${input.bytes} bytes read)`;
    line(why);
    // Nothing to check means nothing of ours can go wrong by letting it pass - except
    // an XML we could not read at all, which we cannot vouch for.
    return input.kind === 'missing' ? 0 : refusalCode;
  }
  if (!mayHaveVfio(input.text)) return 0;

  const seconds = io.timeoutMs !== undefined ? io.timeoutMs / 1000 : configuredSeconds(operation);
  const deadline = Date.now() + seconds * 1000;
  const dog = io.watchdog === false ? undefined : (await import('./watchdog.ts')).startWatchdog(seconds * 1000 + 2000, `vfio-mig qemu hook: ${oneLine(`${name} ${operation}: still running after ${seconds} s (a sysfs write blocked in the kernel?); stopped`)}`);
  const ctx: HookContext = { domain, operation, subOperation, extra, xml: input.text, out, err, deadline };
  let timer: NodeJS.Timeout | undefined;
  try {
    const run = async (): Promise<HookResult> => {
      switch (operation) {
        case 'prepare':
          return (await import('./qemu-prepare.ts')).prepare(ctx);
        case 'migrate':
          return (await import('./qemu-migrate.ts')).migrate(ctx);
        default:
          return (await import('./qemu-release.ts')).release(ctx);
      }
    };
    const timeout = new Promise<'timeout'>((resolve) => {
      timer = setTimeout(() => resolve('timeout'), seconds * 1000);
    });
    const result = await Promise.race([run(), timeout]);
    if (result === 'timeout') {
      line(`did not finish within ${seconds} s; stopped (hooks.timeouts in /etc/vfio-mig/config.json)`);
      return refusalCode;
    }
    if (result.xml !== undefined) out.write(result.xml);
    return result.code;
  } catch (e) {
    if (e instanceof HookRefusal) {
      line(e.message);
      return refusalCode;
    }
    // Our bug. Refuse only a domain that really has VFIO devices at stake.
    const msg = e instanceof Error ? `${e.name}: ${e.message}` : String(e);
    const stake = hasVfioHostdev(input.text) && operation !== 'release';
    line(`internal error (a vfio-mig bug - please report it with /var/log/vfio-mig/hooks.log): ${msg}${stake ? '' : '; the domain has no VFIO hostdev, so it is let through'}`);
    try {
      (await import('./qemu-common.ts')).logEvent(ctx, 'crash', { error: msg, stack: e instanceof Error ? e.stack : undefined });
    } catch {
      // nothing more to do
    }
    return stake ? 1 : 0;
  } finally {
    clearTimeout(timer);
    await dog?.stop();
  }
}

/**
 * Entry of the built hook (dist) and of the shim's tsx fallback. The shim has read
 * stdin already (to let a domain without hostdevs pass without loading any of this)
 * and hands over what it read; without it, stdin is read here.
 */
export async function runQemuHook(input?: StdinResult): Promise<void> {
  process.exitCode = await qemuHook(process.argv.slice(2), input ? { stdin: async () => input } : {});
}
