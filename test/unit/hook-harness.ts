// Runs the *built* qemu hook the way libvirtd does: a process started as
// `<prefix>/hooks/qemu <domain> <operation> <sub-operation> <extra>` with the domain XML on
// stdin. The prefix is a throw-away install tree (no .git, so bin/launch.mjs runs the
// bundle, never tsx): copies of the shims, plugin/ and node_modules/ linked from this
// checkout, and dist/js/ freshly built by plugin/build.mjs - so the tests see the code
// under test, not a stale bundle.
//
// A load tracer (node --import) records every module the hook process resolves, so a
// test can prove the pass-through path loaded no XML parser, no koffi, no binder.
import { execFile, spawn } from 'node:child_process';
import { copyFileSync, existsSync, lstatSync, mkdirSync, mkdtempSync, openSync, readFileSync, readdirSync, readlinkSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const repo = join(dirname(fileURLToPath(import.meta.url)), '..', '..');

export interface Prefix {
  dir: string;
  hook: string;
  /** --import target that records resolved modules to $VFIO_MIG_TRACE. */
  tracer: string;
  dispose(): void;
}

const TRACE_HOOKS = `
import { appendFileSync } from 'node:fs';
export async function resolve(spec, ctx, next) {
  const r = await next(spec, ctx);
  if (process.env.VFIO_MIG_TRACE) appendFileSync(process.env.VFIO_MIG_TRACE, 'import ' + r.url + '\\n');
  return r;
}
`;
const TRACE_REGISTER = `
import { register, createRequire } from 'node:module';
import { appendFileSync } from 'node:fs';
register('./trace-hooks.mjs', import.meta.url);
const Module = createRequire(import.meta.url)('node:module');
const load = Module._load;
Module._load = function (request, ...rest) {
  if (process.env.VFIO_MIG_TRACE) appendFileSync(process.env.VFIO_MIG_TRACE, 'require ' + request + '\\n');
  return load.call(this, request, ...rest);
};
`;

/** Builds a fresh install prefix (a second or two). */
export function makePrefix(): Promise<Prefix> {
  const dir = mkdtempSync(join(tmpdir(), 'vfio-mig-prefix-'));
  for (const d of ['hooks', 'bin', 'test-trace']) mkdirSync(join(dir, d));
  for (const f of ['hooks/qemu', 'hooks/daemon', 'hooks/package.json', 'bin/vfio-mig.js', 'bin/launch.mjs', 'package.json']) copyFileSync(join(repo, f), join(dir, f));
  symlinkSync(join(repo, 'plugin'), join(dir, 'plugin'));
  symlinkSync(join(repo, 'node_modules'), join(dir, 'node_modules'));
  writeFileSync(join(dir, 'test-trace', 'trace-hooks.mjs'), TRACE_HOOKS);
  writeFileSync(join(dir, 'test-trace', 'register.mjs'), TRACE_REGISTER);
  return new Promise((resolve, reject) => {
    execFile(process.execPath, [join(repo, 'plugin', 'build.mjs'), '--root', dir], { encoding: 'utf8', timeout: 120_000 }, (err, _out, stderr) => {
      if (err) {
        rmSync(dir, { recursive: true, force: true });
        reject(new Error(`build failed: ${stderr || err.message}`));
        return;
      }
      resolve({ dir, hook: join(dir, 'hooks', 'qemu'), tracer: join(dir, 'test-trace', 'register.mjs'), dispose: () => rmSync(dir, { recursive: true, force: true }) });
    });
  });
}

export interface HookRun {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  ms: number;
  /** With `trace`: the modules the process resolved (import <url> / require <name>). */
  loaded: string[];
}

export interface RunOptions {
  /** The domain XML; undefined: stdin is /dev/null; 'closed': no stdin at all. */
  stdin?: string | Buffer | 'closed';
  env?: Record<string, string>;
  timeoutMs?: number;
  trace?: boolean;
}

/** Runs the hook as libvirtd would; never rejects. */
export function runHook(prefix: Prefix, args: string[], opts: RunOptions = {}): Promise<HookRun> {
  const t0 = Date.now();
  const traceFile = opts.trace ? join(prefix.dir, 'test-trace', `trace-${process.pid}-${Math.random().toString(36).slice(2)}.txt`) : undefined;
  const nodeArgs = traceFile ? ['--import', prefix.tracer] : [];
  const stdinMode = opts.stdin === 'closed' ? 'ignore' : opts.stdin === undefined ? 'ignore' : 'pipe';
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [...nodeArgs, prefix.hook, ...args], {
      // libvirt's hook environment is minimal (LC_ALL, PATH, HOME) plus ours for the fake host.
      env: { LC_ALL: 'C', PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: '/', ...opts.env, ...(traceFile ? { VFIO_MIG_TRACE: traceFile } : {}) },
      stdio: [opts.stdin === 'closed' ? 'ignore' : stdinMode === 'pipe' ? 'pipe' : openDevNull(), 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (c) => (stdout += c));
    child.stderr!.on('data', (c) => (stderr += c));
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 60_000);
    if (stdinMode === 'pipe' && child.stdin) {
      child.stdin.on('error', () => {}); // the hook may stop reading (too large): EPIPE is fine
      child.stdin.end(opts.stdin as string | Buffer);
    }
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      let loaded: string[] = [];
      if (traceFile && existsSync(traceFile)) {
        loaded = readFileSync(traceFile, 'utf8').trim().split('\n').filter(Boolean);
        rmSync(traceFile, { force: true });
      }
      resolve({ code, signal, stdout, stderr, ms: Date.now() - t0, loaded });
    });
  });
}

let devNull: number | undefined;
function openDevNull(): number {
  // A fresh fd per call would leak; one shared read-only /dev/null is enough.
  return (devNull ??= openSync('/dev/null', 'r'));
}

/** Every file under `dir` with its content, for "nothing changed" checks. */
export function treeSnapshot(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (d: string) => {
    let names: string[];
    try {
      names = readdirSync(d);
    } catch {
      return;
    }
    for (const n of names.sort()) {
      const p = join(d, n);
      const st = lstatSync(p);
      if (st.isSymbolicLink()) out[p] = `-> ${readlinkSync(p)}`;
      else if (st.isDirectory()) walk(p);
      else out[p] = `${st.mode.toString(8)} ${readFileSync(p, 'utf8')}`;
    }
  };
  walk(dir);
  return out;
}
