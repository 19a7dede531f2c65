// The .deb that `npm run package` builds: control fields, contents, conffile, maintainer
// scripts, the runtime it carries (it runs from an unpacked copy, koffi loads), and
// lintian: no error, and only the warnings docs/packaging.md lists and justifies.
// Needs dist/ (npm run build; npm test builds first), dpkg-deb and lintian
// (apt-get install lintian): without them the tests fail, saying so.
import test from 'ava';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

// Warnings docs/packaging.md justifies (tag and what it is about).
const ALLOWED_WARNINGS = [/^W: vfio-mig: systemd-service-file-refers-to-unusual-wantedby-target (libvirtd|virtqemud)\.service \[lib\/systemd\/system\/vfio-mig-bind\.service\]$/];

const out = mkdtempSync(join(tmpdir(), 'vfio-mig-deb-test-'));
let deb = '';
let buildError: string | undefined;
const version = '0.0.0+unittest';

test.before(() => {
  const r = spawnSync(process.execPath, ['plugin/package-deb.mjs', '--out', out, '--version', version], { encoding: 'utf8' });
  if (r.status !== 0) buildError = `${r.stderr}${r.stdout}`;
  else deb = r.stdout.trim().split('\n').pop()!;
});
test.after.always(() => rmSync(out, { recursive: true, force: true }));

const dpkgDeb = (...args: string[]): string => execFileSync('dpkg-deb', args, { encoding: 'utf8', maxBuffer: 64 << 20 });

test('npm run package builds vfio-mig_<version>_amd64.deb with the control fields a Debian host needs', (t) => {
  if (buildError) return t.fail(`plugin/package-deb.mjs failed: ${buildError}`);
  t.is(deb, join(out, `vfio-mig_${version}_amd64.deb`));
  const field = (f: string): string => dpkgDeb('-f', deb, f).trim();
  t.is(field('Package'), 'vfio-mig');
  t.is(field('Version'), version);
  t.is(field('Architecture'), 'amd64');
  t.regex(field('Depends'), /^nodejs \(>= 18\)/);
  t.is(dpkgDeb('--ctrl-tarfile', deb).length > 0, true);
  const ctrl = mkdtempSync(join(out, 'ctrl-'));
  dpkgDeb('-e', deb, ctrl);
  t.deepEqual(readdirSync(ctrl).sort(), ['conffiles', 'control', 'md5sums', 'postinst', 'postrm', 'prerm']);
  t.is(execFileSync('cat', [join(ctrl, 'conffiles')], { encoding: 'utf8' }), '/etc/vfio-mig/config.json\n');
  for (const s of ['postinst', 'prerm', 'postrm']) t.is(spawnSync('sh', ['-n', join(ctrl, s)]).status, 0, `${s} parses`);
});

test('the package holds the runtime, units, udev rule, hooks, config, schema and man page - and nothing of the development tree', (t) => {
  if (buildError) return t.fail(`plugin/package-deb.mjs failed: ${buildError}`);
  const listing = dpkgDeb('-c', deb);
  const paths = listing.split('\n').filter(Boolean).map((l) => l.split(/\s+/).slice(5).join(' ').replace(/^\./, ''));
  for (const p of [
    '/usr/bin/vfio-mig -> ../lib/vfio-mig/bin/vfio-mig.js',
    '/usr/lib/vfio-mig/dist/js/vfio-mig.mjs',
    '/usr/lib/vfio-mig/dist/js/hook-qemu.mjs',
    '/usr/lib/vfio-mig/dist/js/hook-daemon.mjs',
    '/usr/lib/vfio-mig/node_modules/@koromix/koffi-linux-x64/linux_x64/koffi.node',
    '/usr/lib/vfio-mig/node_modules/fast-xml-parser/lib/fxp.cjs',
    '/lib/systemd/system/vfio-mig-bind.service',
    '/lib/systemd/system/vfio-mig-bind@.service',
    '/lib/systemd/system/vfio-mig-forget@.service',
    '/lib/udev/rules.d/70-vfio-mig.rules',
    '/etc/libvirt/hooks/daemon.d/vfio-mig -> /usr/lib/vfio-mig/hooks/daemon',
    '/etc/libvirt/hooks/qemu.d/50-vfio-mig -> /usr/lib/vfio-mig/hooks/qemu',
    '/etc/vfio-mig/config.json',
    '/usr/share/vfio-mig/config.schema.json',
    '/usr/share/man/man1/vfio-mig.1.gz',
    '/usr/share/doc/vfio-mig/copyright',
    '/usr/share/doc/vfio-mig/changelog.gz',
    '/var/lib/vfio-mig/',
  ]) t.true(paths.includes(p), p);
  t.deepEqual(paths.filter((p) => /\.ts$|\.map$|musl_x64|\/src\/cli\/|\/(ava|tsx|typescript|esbuild)\//.test(p)), []);
  t.regex(listing, /^-rwxr-xr-x root\/root .* \.\/usr\/lib\/vfio-mig\/bin\/vfio-mig\.js$/m);
  t.regex(listing, /^-rw-r--r-- root\/root .* \.\/etc\/vfio-mig\/config\.json$/m);
  const kib = Number(dpkgDeb('-f', deb, 'Installed-Size').trim());
  t.true(kib < 8192, `installed size ${kib} KiB`);
});

test('the unpacked runtime runs: --help of every command, koffi and fast-xml-parser load from its node_modules', (t) => {
  if (buildError) return t.fail(`plugin/package-deb.mjs failed: ${buildError}`);
  const x = mkdtempSync(join(out, 'x-'));
  dpkgDeb('-x', deb, x);
  const cli = join(x, 'usr/lib/vfio-mig/bin/vfio-mig.js');
  const help = execFileSync(process.execPath, [cli, '--help'], { encoding: 'utf8' });
  t.regex(help, /vfio-mig install/);
  const loads = execFileSync(process.execPath, ['-e', `const r = require('node:module').createRequire(${JSON.stringify(join(x, 'usr/lib/vfio-mig/dist/js/x.mjs'))}); console.log(r('koffi').version, typeof r('fast-xml-parser').XMLParser)`], { encoding: 'utf8' });
  t.regex(loads, /^\d+\.\d+\.\d+ function$/m);
  const man = execFileSync('sh', ['-c', `zcat ${join(x, 'usr/share/man/man1/vfio-mig.1.gz')}`], { encoding: 'utf8' });
  for (const n of ['bind', 'unbind', 'drivers', 'install', 'uninstall', 'preflight']) t.regex(man, new RegExp(`^\\.SS vfio-mig ${n}$`, 'm'), n);
});

test('lintian: no errors, only the warnings docs/packaging.md justifies', (t) => {
  if (buildError) return t.fail(`plugin/package-deb.mjs failed: ${buildError}`);
  const r = spawnSync('lintian', ['--tag-display-limit', '0', deb], { encoding: 'utf8', maxBuffer: 16 << 20 });
  if (r.error) return t.fail(`lintian is not installed (apt-get install lintian): ${r.error.message}`);
  const lines = `${r.stdout}`.split('\n').filter((l) => /^[EWX]: /.test(l));
  t.log(`lintian: ${lines.length ? lines.join('; ') : 'nothing'}`);
  t.deepEqual(lines.filter((l) => l.startsWith('E: ')), [], 'no lintian error');
  t.deepEqual(lines.filter((l) => l.startsWith('W: ') && !ALLOWED_WARNINGS.some((a) => a.test(l))), [], 'no warning docs/packaging.md does not justify');
});
