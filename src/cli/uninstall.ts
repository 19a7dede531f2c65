// vfio-mig uninstall [--root DIR] [--purge] [--keep-bindings] [--dry-run] [--no-reload]
//
// Undoes `vfio-mig install`: gives every device vfio-mig bound its previous driver back
// (`vfio-mig unbind`), disables the boot unit, removes the files plugin/install.json
// lists (symlinks only when they still point into our tree), and with --purge the
// operator's config and the state dir too. Hosts with the Debian package use apt.

import { existsSync, readlinkSync, readdirSync, rmdirSync, rmSync, unlinkSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { parseArgs, UsageError } from './args.ts';
import { isLink, packageInstalled, plan, readManifest, runStep, thisTree } from './install.ts';

export const usage = 'vfio-mig uninstall [--root DIR] [--purge] [--keep-bindings] [--dry-run] [--no-reload]   remove what `vfio-mig install` put on this host';

export const help = `usage: ${usage.split('   ')[0]}

Removes what "vfio-mig install" installed (the list in plugin/install.json). With the
root "/", first gives every device vfio-mig bound its previous driver back (as
"vfio-mig unbind" does; a device a running VM holds is refused and stays) and disables
vfio-mig-bind.service; afterwards reloads systemd and udev. The config
/etc/vfio-mig/config.json and the state dir /var/lib/vfio-mig stay unless --purge.
Hosts that installed the Debian package remove it with apt (apt purge vfio-mig).

options:
  --root DIR        remove from under DIR; nothing is unbound or reloaded
  --purge           also remove /etc/vfio-mig/config.json and /var/lib/vfio-mig
  --keep-bindings   do not unbind: devices stay on their VFIO drivers
  --dry-run         print what would be removed, change nothing
  --no-reload       do not run systemctl / udevadm

exit codes: 0 removed (or nothing there); 1 a device could not be given back or a
step failed (the files are removed anyway); 2 usage error
`;

export async function run(argv: string[], out: NodeJS.WritableStream, err: NodeJS.WritableStream): Promise<number> {
  if (argv.includes('--help') || argv.includes('-h')) {
    out.write(help);
    return 0;
  }
  const args = parseArgs(argv, { flags: ['purge', 'keep-bindings', 'dry-run', 'no-reload'], options: ['root'] });
  if (args.positional.length) throw new UsageError(`unexpected argument ${JSON.stringify(args.positional[0])}`);
  const root = resolve(args.options.get('root')?.at(-1) ?? '/');
  const dryRun = args.flags.has('dry-run');
  const purge = args.flags.has('purge');
  const live = root === '/' && !dryRun;
  if (packageInstalled(root)) {
    err.write(`vfio-mig uninstall: the Debian package vfio-mig is installed${root === '/' ? '' : ` in ${root}`}: remove it with apt (apt purge vfio-mig)\n`);
    return 1;
  }
  const tree = thisTree();
  const m = readManifest(tree);
  let ok = true;
  if (live && !args.flags.has('keep-bindings')) {
    // Before the files go: unbind needs the runtime (modprobe of the previous drivers).
    const unbind = await import('./unbind.ts');
    if ((await unbind.run([], out)) !== 0) {
      ok = false;
      err.write('vfio-mig uninstall: some devices could not be given back (see above); they stay on their VFIO drivers\n');
    }
  }
  if (live && !args.flags.has('no-reload')) ok = runStep(['systemctl', 'disable', m.bootUnit], err) && ok;
  const entries = plan(tree, 'local');
  const removed: string[] = [];
  const remove = (p: string, recursive = false): void => {
    const abs = join(root, p);
    if (!existsSync(abs) && !isLink(abs)) return;
    if (!dryRun && recursive) rmSync(abs, { recursive: true, force: true });
    else if (!dryRun) unlinkSync(abs);
    removed.push(p);
  };
  for (const e of entries) {
    if (e.kind === 'symlink') {
      const abs = join(root, e.to);
      if (isLink(abs) && readlinkSync(abs) === e.target) remove(e.to);
    } else if (e.kind === 'file' && !e.runtime && (!e.config || purge)) {
      remove(e.to);
    } else if (e.kind === 'dir' && e.state && purge) {
      remove(e.to, true);
    }
  }
  // The runtime tree last: this very command may be running from it (node has it loaded).
  remove(m.prefix, true);
  if (!dryRun) {
    // Directories that only ever held our files.
    for (const d of new Set(m.files.filter((f) => f.kind === 'copy').map((f) => dirname(f.to)))) {
      if (!/vfio-mig/.test(d)) continue;
      try {
        if (readdirSync(join(root, d)).length === 0) rmdirSync(join(root, d));
      } catch {
        // absent or not empty: leave it
      }
    }
  }
  for (const p of removed) out.write(`${dryRun ? 'would remove' : 'removed'}  ${root === '/' ? p : join(root, p)}\n`);
  if (!removed.length) out.write('nothing of vfio-mig was installed there\n');
  if (!purge && existsSync(join(root, '/etc/vfio-mig/config.json'))) out.write('kept /etc/vfio-mig/config.json and /var/lib/vfio-mig (--purge removes them)\n');
  if (live && !args.flags.has('no-reload')) {
    ok = runStep(['systemctl', 'daemon-reload'], err) && ok;
    ok = runStep(['udevadm', 'control', '--reload'], err) && ok;
  }
  if (!dryRun && removed.length) out.write('reload libvirtd so it forgets the hooks: systemctl reload libvirtd (or virtqemud)\n');
  return ok ? 0 : 1;
}
