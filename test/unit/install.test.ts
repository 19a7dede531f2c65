// vfio-mig install / uninstall into a temporary root (--root): the file set of
// plugin/install.json, idempotence, the operator's config never overwritten, the package
// layout, refusal next to the Debian package, and --help for every command.
import test from 'ava';
import { chmodSync, existsSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, statSync, symlinkSync, unlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { runCli } from '../cli-harness.ts';

const roots: string[] = [];
function root(): string {
  const r = mkdtempSync(join(tmpdir(), 'vfio-mig-install-'));
  roots.push(r);
  return r;
}
test.after.always(() => {
  for (const r of roots) rmSync(r, { recursive: true, force: true });
});

const LOCAL = [
  '/usr/lib/vfio-mig/package.json',
  '/usr/lib/vfio-mig/bin/vfio-mig.js',
  '/usr/lib/vfio-mig/bin/launch.mjs',
  '/usr/lib/vfio-mig/dist/js/vfio-mig.mjs',
  '/usr/lib/vfio-mig/dist/js/hook-daemon.mjs',
  '/usr/lib/vfio-mig/dist/js/hook-qemu.mjs',
  '/usr/lib/vfio-mig/hooks/daemon',
  '/usr/lib/vfio-mig/hooks/qemu',
  '/usr/lib/vfio-mig/plugin/config.schema.json',
  '/usr/lib/vfio-mig/node_modules/koffi/package.json',
  '/usr/lib/vfio-mig/node_modules/@koromix/koffi-linux-x64/linux_x64/koffi.node',
  '/usr/lib/vfio-mig/node_modules/fast-xml-parser/package.json',
  '/etc/systemd/system/vfio-mig-bind.service',
  '/etc/systemd/system/vfio-mig-bind@.service',
  '/etc/systemd/system/vfio-mig-forget@.service',
  '/etc/udev/rules.d/70-vfio-mig.rules',
  '/etc/vfio-mig/config.json',
  '/usr/share/vfio-mig/config.schema.json',
];

function files(dir: string): string[] {
  return readdirSync(dir, { recursive: true }).map(String);
}

test('install --root puts the whole file set there, and a second run changes nothing', async (t) => {
  const r = root();
  const first = await runCli(['install', '--root', r]);
  t.is(first.code, 0, first.err);
  for (const f of LOCAL) t.true(existsSync(join(r, f)), f);
  t.is(readlinkSync(join(r, 'usr/bin/vfio-mig')), '../lib/vfio-mig/bin/vfio-mig.js');
  t.is(readlinkSync(join(r, 'etc/libvirt/hooks/daemon.d/vfio-mig')), '/usr/lib/vfio-mig/hooks/daemon');
  t.is(readlinkSync(join(r, 'etc/libvirt/hooks/qemu.d/50-vfio-mig')), '/usr/lib/vfio-mig/hooks/qemu');
  t.true(statSync(join(r, 'var/lib/vfio-mig')).isDirectory());
  t.is(statSync(join(r, 'usr/lib/vfio-mig/bin/vfio-mig.js')).mode & 0o777, 0o755);
  t.is(statSync(join(r, 'etc/systemd/system/vfio-mig-bind.service')).mode & 0o777, 0o644);
  // A local install keeps "env node" (node may live in /usr/local); the package uses /usr/bin/node.
  t.true(readFileSync(join(r, 'usr/lib/vfio-mig/bin/vfio-mig.js'), 'utf8').startsWith('#!/usr/bin/env node\n'));
  t.is(JSON.parse(readFileSync(join(r, 'usr/lib/vfio-mig/package.json'), 'utf8')).type, 'module');
  const runtime = files(join(r, 'usr/lib/vfio-mig'));
  t.deepEqual(runtime.filter((f) => /\.map$|\.ts$|musl_x64|(^|\/)vendor\/|\.cc$/.test(f)), [], 'no source maps, sources, musl binary or vendored C');
  t.false(existsSync(join(r, 'usr/lib/vfio-mig/node_modules/ava')), 'development dependencies stay out');
  t.regex(first.out, /then run: systemctl daemon-reload; systemctl enable vfio-mig-bind.service; udevadm control --reload/);
  t.regex(first.out, /reload libvirtd/);

  const second = await runCli(['install', '--root', r]);
  t.is(second.code, 0, second.err);
  t.regex(second.out, /^0 file\(s\) installed or updated/m);
  t.regex(second.out, /kept {2}.*\/etc\/vfio-mig\/config\.json \(yours: left as it is\)/);
});

test('an installed copy installs itself elsewhere and uninstalls itself (the checkout may be gone)', (t) => {
  const r = root();
  const r2 = root();
  const run = (cli: string, ...args: string[]): { code: number | null; out: string } => {
    const p = spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8' });
    return { code: p.status, out: `${p.stdout}${p.stderr}` };
  };
  t.is(run('bin/vfio-mig.js', 'install', '--root', r).code, 0);
  const installed = join(r, 'usr/lib/vfio-mig/bin/vfio-mig.js');
  const copy = run(installed, 'install', '--root', r2);
  t.is(copy.code, 0, copy.out);
  for (const f of LOCAL) t.true(existsSync(join(r2, f)), f);
  const un = run(installed, 'uninstall', '--root', r);
  t.is(un.code, 0, un.out);
  t.false(existsSync(join(r, 'usr/lib/vfio-mig')));
  t.false(existsSync(join(r, 'etc/systemd/system/vfio-mig-bind.service')));
});

test('install never overwrites the operator\'s config, and repairs a changed or missing file', async (t) => {
  const r = root();
  t.is((await runCli(['install', '--root', r])).code, 0);
  const mine = '{ "version": 1, "rules": [ { "vendor": "8086", "device": "10ca", "driver": "vfio-pci" } ] }\n';
  writeFileSync(join(r, 'etc/vfio-mig/config.json'), mine);
  writeFileSync(join(r, 'etc/systemd/system/vfio-mig-bind.service'), '# edited\n');
  unlinkSync(join(r, 'etc/udev/rules.d/70-vfio-mig.rules'));
  chmodSync(join(r, 'usr/lib/vfio-mig/hooks/daemon'), 0o644);
  const again = await runCli(['install', '--root', r]);
  t.is(again.code, 0, again.err);
  t.is(readFileSync(join(r, 'etc/vfio-mig/config.json'), 'utf8'), mine);
  t.regex(again.out, /updated {2}.*vfio-mig-bind\.service/);
  t.regex(again.out, /created {2}.*70-vfio-mig\.rules/);
  t.is(statSync(join(r, 'usr/lib/vfio-mig/hooks/daemon')).mode & 0o777, 0o755);
  t.is(readFileSync(join(r, 'etc/systemd/system/vfio-mig-bind.service'), 'utf8'), readFileSync('plugin/systemd/vfio-mig-bind.service', 'utf8'));
});

test('install --dry-run changes nothing', async (t) => {
  const r = root();
  const res = await runCli(['install', '--root', r, '--dry-run']);
  t.is(res.code, 0, res.err);
  t.regex(res.out, /would be created {2}.*\/usr\/bin\/vfio-mig/);
  t.deepEqual(readdirSync(r), []);
});

test('install --layout package uses the package paths and /usr/bin/node', async (t) => {
  const r = root();
  const res = await runCli(['install', '--root', r, '--layout', 'package']);
  t.is(res.code, 0, res.err);
  for (const f of ['lib/systemd/system/vfio-mig-bind.service', 'lib/systemd/system/vfio-mig-bind@.service', 'lib/udev/rules.d/70-vfio-mig.rules']) t.true(existsSync(join(r, f)), f);
  t.false(existsSync(join(r, 'etc/systemd')));
  for (const f of ['usr/lib/vfio-mig/bin/vfio-mig.js', 'usr/lib/vfio-mig/hooks/daemon', 'usr/lib/vfio-mig/hooks/qemu']) t.true(readFileSync(join(r, f), 'utf8').startsWith('#!/usr/bin/node\n'), f);
  t.notRegex(res.out, /then run/);
});

test('install refuses next to the Debian package unless --force, and a foreign file where a hook link goes', async (t) => {
  const r = root();
  mkdirSync(join(r, 'var/lib/dpkg/info'), { recursive: true });
  writeFileSync(join(r, 'var/lib/dpkg/info/vfio-mig.list'), '/.\n');
  const res = await runCli(['install', '--root', r]);
  t.is(res.code, 1);
  t.regex(res.err, /Debian package vfio-mig is installed/);
  t.false(existsSync(join(r, 'usr')));
  const r2 = root();
  mkdirSync(join(r2, 'etc/libvirt/hooks/daemon.d'), { recursive: true });
  writeFileSync(join(r2, 'etc/libvirt/hooks/daemon.d/vfio-mig'), '#!/bin/sh\n');
  const foreign = await runCli(['install', '--root', r2]);
  t.is(foreign.code, 1);
  t.regex(foreign.err, /exists and is not a symlink/);
  t.is(readFileSync(join(r2, 'etc/libvirt/hooks/daemon.d/vfio-mig'), 'utf8'), '#!/bin/sh\n');
});

test('uninstall --root removes what install put there and keeps the config; --purge removes it too', async (t) => {
  const r = root();
  t.is((await runCli(['install', '--root', r])).code, 0);
  writeFileSync(join(r, 'var/lib/vfio-mig/bindings.json'), '{"devices":{},"pfs":{}}\n');
  // Someone else's hook in the same directory stays.
  symlinkSync('/opt/other/hook', join(r, 'etc/libvirt/hooks/daemon.d/other'));
  const res = await runCli(['uninstall', '--root', r]);
  t.is(res.code, 0, res.err);
  for (const f of LOCAL.filter((f) => f !== '/etc/vfio-mig/config.json')) t.false(existsSync(join(r, f)), f);
  for (const l of ['usr/bin/vfio-mig', 'etc/libvirt/hooks/daemon.d/vfio-mig', 'etc/libvirt/hooks/qemu.d/50-vfio-mig']) t.throws(() => lstatSync(join(r, l)), undefined, l);
  t.false(existsSync(join(r, 'usr/lib/vfio-mig')));
  t.false(existsSync(join(r, 'usr/share/vfio-mig')));
  t.true(existsSync(join(r, 'etc/vfio-mig/config.json')));
  t.true(existsSync(join(r, 'var/lib/vfio-mig/bindings.json')));
  t.true(lstatSync(join(r, 'etc/libvirt/hooks/daemon.d/other')).isSymbolicLink());
  t.regex(res.out, /kept \/etc\/vfio-mig\/config\.json/);
  const purge = await runCli(['uninstall', '--root', r, '--purge']);
  t.is(purge.code, 0, purge.err);
  t.false(existsSync(join(r, 'etc/vfio-mig')));
  t.false(existsSync(join(r, 'var/lib/vfio-mig')));
  const nothing = await runCli(['uninstall', '--root', r]);
  t.regex(nothing.out, /nothing of vfio-mig was installed there/);
});

test('uninstall leaves a hook link that points somewhere else, and refuses next to the package', async (t) => {
  const r = root();
  t.is((await runCli(['install', '--root', r])).code, 0);
  unlinkSync(join(r, 'etc/libvirt/hooks/qemu.d/50-vfio-mig'));
  symlinkSync('/opt/mine/qemu-hook', join(r, 'etc/libvirt/hooks/qemu.d/50-vfio-mig'));
  t.is((await runCli(['uninstall', '--root', r])).code, 0);
  t.is(readlinkSync(join(r, 'etc/libvirt/hooks/qemu.d/50-vfio-mig')), '/opt/mine/qemu-hook');
  mkdirSync(join(r, 'var/lib/dpkg/info'), { recursive: true });
  writeFileSync(join(r, 'var/lib/dpkg/info/vfio-mig.list'), '/.\n');
  const res = await runCli(['uninstall', '--root', r]);
  t.is(res.code, 1);
  t.regex(res.err, /apt purge vfio-mig/);
});

test('every command answers --help with exit 0', async (t) => {
  const top = await runCli(['--help']);
  const names = [...new Set([...top.out.matchAll(/^ {2}vfio-mig ([a-z][a-z-]+)/gm)].map((m) => m[1]!))];
  t.true(names.includes('install') && names.includes('uninstall') && names.length >= 14, names.join(' '));
  for (const n of names) {
    const r = await runCli([n, '--help']);
    t.is(r.code, 0, `${n} --help: ${r.err}`);
    t.regex(r.out, new RegExp(`usage: vfio-mig ${n}\\b`), n);
  }
});
