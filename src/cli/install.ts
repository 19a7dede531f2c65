// vfio-mig install [--root DIR] [--layout local|package] [--dry-run] [--no-reload] [--force]
//
// Puts vfio-mig on a host that does not use the .deb: the same files the package holds,
// from the one list in plugin/install.json (the package builder, plugin/package-deb.mjs,
// runs this command with --layout package into its staging tree). The runtime (bundle,
// shims, schema, the production node_modules) goes under /usr/lib/vfio-mig; units and
// the udev rule go where an administrator's own files live (/etc/systemd/system,
// /etc/udev/rules.d), since /lib belongs to the package manager. Idempotent: a file
// already right is left alone, and /etc/vfio-mig/config.json is never overwritten.

import { chmodSync, existsSync, lstatSync, mkdirSync, readdirSync, readFileSync, readlinkSync, realpathSync, renameSync, statSync, symlinkSync, unlinkSync, writeFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs, UsageError } from './args.ts';

export const usage = 'vfio-mig install [--root DIR] [--layout local|package] [--dry-run] [--no-reload] [--force]   install the CLI, hooks, units, udev rule and default config';

export const help = `usage: ${usage.split('   ')[0]}

Installs vfio-mig on a host that does not use the Debian package, from the tree this
command runs from (a checkout after "npm ci", which builds dist/). The file list is
plugin/install.json, the same one the .deb is built from:

  /usr/lib/vfio-mig/          the runtime: dist/js (the bundle), bin/, hooks/, the
                              config schema, node_modules (koffi, fast-xml-parser)
  /usr/bin/vfio-mig           symlink to /usr/lib/vfio-mig/bin/vfio-mig.js
  /etc/libvirt/hooks/daemon.d/vfio-mig, /etc/libvirt/hooks/qemu.d/50-vfio-mig
                              symlinks to the hook shims
  /etc/systemd/system/vfio-mig-bind.service, vfio-mig-bind@.service
  /etc/udev/rules.d/70-vfio-mig.rules
  /etc/vfio-mig/config.json   the default config, only if there is none (never replaced)
  /usr/share/vfio-mig/config.schema.json
  /var/lib/vfio-mig/          the state dir (bindings.json)

Running it again changes only what differs. With the root "/" it then runs
"systemctl daemon-reload", "systemctl enable vfio-mig-bind.service" and
"udevadm control --reload" (not with --no-reload), and reminds you to reload libvirtd,
which reads its hooks only at start and on SIGHUP.

options:
  --root DIR        install under DIR (a chroot, an image, a test); nothing is reloaded
  --layout package  the Debian package's paths (/lib/systemd/system, /lib/udev/rules.d)
                    and /usr/bin/node in the scripts' first line (used by npm run package)
  --dry-run         print what would change, change nothing
  --no-reload       do not run systemctl / udevadm
  --force           install even though the Debian package vfio-mig is installed there

exit codes: 0 installed (or nothing to change); 1 failed; 2 usage error
`;

export type Layout = 'local' | 'package';

interface Manifest {
  prefix: string;
  runtime: { from: string; mode: string; skip?: string }[];
  nodeModules: { skip: string };
  files: { from: string; to: string; local?: string; kind: 'copy' | 'symlink'; mode?: string; config?: boolean }[];
  directories: { path: string; mode: string }[];
  bootUnit: string;
}

/** One thing to put on the host. Paths in `to` are absolute paths on the target host. */
export type Entry =
  | { kind: 'dir'; to: string; mode: number; state?: boolean }
  | { kind: 'file'; to: string; mode: number; from?: string; content?: Buffer; config?: boolean; runtime?: boolean }
  | { kind: 'symlink'; to: string; target: string };

/** The vfio-mig tree this code runs from (src/cli/ or dist/js/ are two levels down). */
export function thisTree(): string {
  return fileURLToPath(new URL('../../', import.meta.url)).replace(/\/$/, '');
}

export function readManifest(tree: string): Manifest {
  return JSON.parse(readFileSync(join(tree, 'plugin', 'install.json'), 'utf8')) as Manifest;
}

function walk(dir: string, base = dir): string[] {
  const out: string[] = [];
  for (const e of readdirSync(dir, { withFileTypes: true }).sort((a, b) => a.name.localeCompare(b.name))) {
    const p = join(dir, e.name);
    if (e.isDirectory()) out.push(...walk(p, base));
    else if (e.isFile()) out.push(relative(base, p));
  }
  return out;
}

/** The packages under node_modules that package.json's dependencies need at run time. */
export function productionPackages(tree: string): { name: string; dir: string }[] {
  const found = new Map<string, { name: string; dir: string }>();
  const pkg = JSON.parse(readFileSync(join(tree, 'package.json'), 'utf8')) as { dependencies?: Record<string, string> };
  const queue: { name: string; from: string; optional: boolean }[] = Object.keys(pkg.dependencies ?? {}).map((name) => ({ name, from: tree, optional: false }));
  while (queue.length) {
    const { name, from, optional } = queue.shift()!;
    let dir: string | undefined;
    for (let d = from; ; d = dirname(d)) {
      if (existsSync(join(d, 'node_modules', name, 'package.json'))) {
        dir = join(d, 'node_modules', name);
        break;
      }
      if (d === tree || d === dirname(d)) break;
    }
    if (!dir) {
      if (optional) continue;
      throw new Error(`${name} is not installed in ${tree}/node_modules: run "npm ci"`);
    }
    if (found.has(dir)) continue;
    found.set(dir, { name, dir });
    const p = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8')) as { dependencies?: Record<string, string>; optionalDependencies?: Record<string, string> };
    for (const n of Object.keys(p.dependencies ?? {})) queue.push({ name: n, from: dir, optional: false });
    for (const n of Object.keys(p.optionalDependencies ?? {})) queue.push({ name: n, from: dir, optional: true });
  }
  return [...found.values()].sort((a, b) => a.dir.localeCompare(b.dir));
}

/** Relative within one top-level directory (/usr/bin -> ../lib/...), absolute across (policy 10.5). */
export function linkTarget(link: string, target: string): string {
  return link.split('/')[1] === target.split('/')[1] ? relative(dirname(link), target) : target;
}

const mode = (m: string | undefined, dflt: number): number => (m ? parseInt(m, 8) : dflt);

/** The whole file set for `layout`, from the tree's plugin/install.json. */
export function plan(tree: string, layout: Layout): Entry[] {
  const m = readManifest(tree);
  if (!existsSync(join(tree, 'dist', 'js', 'vfio-mig.mjs'))) throw new Error(`${tree}/dist/js is missing: run "npm run build" (npm ci runs it) first`);
  const shebang = (from: string, fileMode: number): Buffer | undefined => {
    // The package's scripts start with /usr/bin/node (Debian's nodejs): policy wants no
    // env lookup in packaged scripts. A local install keeps "env node" (nvm, /usr/local).
    if (layout !== 'package' || !(fileMode & 0o111)) return undefined;
    const text = readFileSync(join(tree, from), 'utf8');
    return text.startsWith('#!/usr/bin/env node\n') ? Buffer.from(`#!/usr/bin/node\n${text.slice('#!/usr/bin/env node\n'.length)}`) : undefined;
  };
  const out: Entry[] = [{ kind: 'dir', to: m.prefix, mode: 0o755 }];
  const own = JSON.parse(readFileSync(join(tree, 'package.json'), 'utf8')) as { version: string; description?: string; dependencies?: Record<string, string> };
  // "type": "module" makes node load bin/vfio-mig.js as ESM; the dependencies let an
  // installed copy find its node_modules set when it installs itself elsewhere.
  const pkgJson = { name: 'vfio-mig', version: own.version, private: true, type: 'module', description: own.description, dependencies: own.dependencies };
  out.push({ kind: 'file', to: `${m.prefix}/package.json`, mode: 0o644, content: Buffer.from(`${JSON.stringify(pkgJson, null, 2)}\n`), runtime: true });
  for (const r of m.runtime) {
    const src = join(tree, r.from);
    const skip = r.skip ? new RegExp(r.skip) : undefined;
    const fileMode = mode(r.mode, 0o644);
    if (statSync(src).isDirectory()) {
      for (const f of walk(src)) if (!skip?.test(f)) out.push({ kind: 'file', from: join(r.from, f), to: `${m.prefix}/${r.from}/${f}`, mode: fileMode, runtime: true });
    } else {
      const content = shebang(r.from, fileMode);
      out.push({ kind: 'file', from: r.from, to: `${m.prefix}/${r.from}`, mode: fileMode, ...(content ? { content } : {}), runtime: true });
    }
  }
  const skipModule = new RegExp(m.nodeModules.skip);
  for (const p of productionPackages(tree)) {
    const rel = relative(tree, p.dir);
    for (const f of walk(p.dir)) {
      if (f.split('/').includes('node_modules') || skipModule.test(`${p.name}/${f}`)) continue;
      out.push({ kind: 'file', from: join(rel, f), to: `${m.prefix}/${rel}/${f}`, mode: 0o644, runtime: true });
    }
  }
  for (const f of m.files) {
    if (f.kind === 'symlink') out.push({ kind: 'symlink', to: f.to, target: linkTarget(f.to, `${m.prefix}/${f.from}`) });
    else out.push({ kind: 'file', from: f.from, to: layout === 'local' ? (f.local ?? f.to) : f.to, mode: mode(f.mode, 0o644), ...(f.config ? { config: true } : {}) });
  }
  for (const d of m.directories) out.push({ kind: 'dir', to: d.path, mode: mode(d.mode, 0o755), state: true });
  return out;
}

export interface Change {
  path: string;
  action: 'created' | 'updated' | 'unchanged' | 'kept';
}

const under = (root: string, p: string): string => join(root, p);

function sameFile(a: string, b: string): boolean {
  try {
    return realpathSync(a) === realpathSync(b);
  } catch {
    return false;
  }
}

/** Puts every entry under `root`; only what differs is written (atomically: temp + rename). */
export function apply(tree: string, entries: Entry[], root: string, dryRun = false): Change[] {
  const changes: Change[] = [];
  for (const e of entries) {
    const dest = under(root, e.to);
    const exists = existsSync(dest) || isLink(dest);
    if (e.kind === 'dir') {
      if (!exists) {
        if (!dryRun) mkdirSync(dest, { recursive: true, mode: e.mode });
        changes.push({ path: e.to, action: 'created' });
      }
      continue;
    }
    if (e.kind === 'symlink') {
      if (isLink(dest) && readlinkSync(dest) === e.target) {
        changes.push({ path: e.to, action: 'unchanged' });
        continue;
      }
      if (exists && !isLink(dest)) throw new Error(`${dest} exists and is not a symlink (not ours?): move it away and run again`);
      if (!dryRun) {
        mkdirSync(dirname(dest), { recursive: true });
        const tmp = `${dest}.vfio-mig-new`;
        if (isLink(tmp)) unlinkSync(tmp);
        symlinkSync(e.target, tmp);
        renameSync(tmp, dest);
      }
      changes.push({ path: e.to, action: exists ? 'updated' : 'created' });
      continue;
    }
    if (e.config && exists) {
      changes.push({ path: e.to, action: 'kept' });
      continue;
    }
    const src = e.from ? join(tree, e.from) : undefined;
    if (src && !e.content && sameFile(src, dest)) {
      changes.push({ path: e.to, action: 'unchanged' });
      continue;
    }
    const data = e.content ?? readFileSync(src!);
    if (exists && !isLink(dest) && statSync(dest).isFile() && (statSync(dest).mode & 0o7777) === e.mode && readFileSync(dest).equals(data)) {
      changes.push({ path: e.to, action: 'unchanged' });
      continue;
    }
    if (!dryRun) {
      mkdirSync(dirname(dest), { recursive: true, mode: 0o755 });
      const tmp = `${dest}.vfio-mig-new`;
      writeFileSync(tmp, data, { mode: e.mode });
      chmodSync(tmp, e.mode);
      renameSync(tmp, dest);
    }
    changes.push({ path: e.to, action: exists ? 'updated' : 'created' });
  }
  return changes;
}

export function isLink(p: string): boolean {
  try {
    return lstatSync(p).isSymbolicLink();
  } catch {
    return false;
  }
}

/** Runs a host command, returning a one-line outcome (never throws: the files are in). */
export function runStep(argv: string[], err: NodeJS.WritableStream): boolean {
  const r = spawnSync(argv[0]!, argv.slice(1), { stdio: ['ignore', 'inherit', 'pipe'], encoding: 'utf8', timeout: 120_000 });
  if (r.status === 0) return true;
  const why = r.error ? (r.error as NodeJS.ErrnoException).code ?? r.error.message : (r.stderr ?? '').trim().split('\n').pop() || `exit ${r.status}`;
  err.write(`vfio-mig: "${argv.join(' ')}" failed: ${why} (do it by hand)\n`);
  return false;
}

export function packageInstalled(root: string): boolean {
  return existsSync(join(root, 'var/lib/dpkg/info/vfio-mig.list'));
}

export async function run(argv: string[], out: NodeJS.WritableStream, err: NodeJS.WritableStream): Promise<number> {
  if (argv.includes('--help') || argv.includes('-h')) {
    out.write(help);
    return 0;
  }
  const args = parseArgs(argv, { flags: ['dry-run', 'no-reload', 'force'], options: ['root', 'layout'] });
  if (args.positional.length) throw new UsageError(`unexpected argument ${JSON.stringify(args.positional[0])}`);
  const root = resolve(args.options.get('root')?.at(-1) ?? '/');
  const layout = (args.options.get('layout')?.at(-1) ?? 'local') as Layout;
  if (layout !== 'local' && layout !== 'package') throw new UsageError(`--layout must be "local" or "package", not ${JSON.stringify(layout)}`);
  const dryRun = args.flags.has('dry-run');
  if (layout === 'local' && packageInstalled(root) && !args.flags.has('force')) {
    err.write(`vfio-mig install: the Debian package vfio-mig is installed${root === '/' ? '' : ` in ${root}`}: upgrade it with apt or dpkg instead (--force installs a second copy whose units override the package's)\n`);
    return 1;
  }
  const tree = thisTree();
  const changes = apply(tree, plan(tree, layout), root, dryRun);
  const changed = changes.filter((c) => c.action === 'created' || c.action === 'updated');
  for (const c of changes) if (c.action !== 'unchanged' && !c.path.includes('/node_modules/') && !c.path.includes('/dist/js/')) out.write(`${dryRun && c.action !== 'kept' ? `would be ${c.action}` : c.action}  ${root === '/' ? c.path : join(root, c.path)}${c.action === 'kept' ? ' (yours: left as it is)' : ''}\n`);
  const runtime = changed.filter((c) => c.path.includes('/node_modules/') || c.path.includes('/dist/js/')).length;
  out.write(`${changed.length} file(s) ${dryRun ? 'would change' : 'installed or updated'}${runtime ? ` (${runtime} of them in the runtime tree)` : ''}, ${changes.length - changed.length} already in place\n`);
  if (dryRun || layout === 'package') return 0;
  const m = readManifest(tree);
  const steps = [['systemctl', 'daemon-reload'], ['systemctl', 'enable', m.bootUnit], ['udevadm', 'control', '--reload']];
  if (root === '/' && !args.flags.has('no-reload')) {
    let ok = true;
    for (const s of steps) ok = runStep(s, err) && ok;
    if (ok) out.write(`systemd and udev reloaded; ${m.bootUnit} enabled (binds at the next boot; "vfio-mig bind --all" binds now)\n`);
  } else {
    out.write(`then run: ${steps.map((s) => s.join(' ')).join('; ')}\n`);
  }
  out.write('reload libvirtd so it sees the hooks: systemctl reload libvirtd (or virtqemud)\n');
  return 0;
}
