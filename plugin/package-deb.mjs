// `npm run package`: builds dist/vfio-mig_<version>_amd64.deb with dpkg-deb (no network).
//
// The file set is not listed here: `vfio-mig install --layout package --root <staging>`
// puts exactly what plugin/install.json says into the staging tree (the same code and
// list a host without the package uses), and this script adds what only a package has:
// DEBIAN/ (control, conffiles, the maintainer scripts in plugin/debian/), the copyright
// file, the changelog and a man page made from every command's --help. Run
// `npm run build` first (npm run package does).
//
//   node plugin/package-deb.mjs [--version V] [--out DIR]
//     --version  the package version (default: package.json's; a bumped one for tests)
//     --out      where the .deb goes (default: dist/)
// Prints the path of the .deb on its last line.
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, copyFileSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { gzipSync } from 'node:zlib';
import { Buffer } from 'node:buffer';

const tree = dirname(dirname(fileURLToPath(import.meta.url)));
const own = JSON.parse(readFileSync(join(tree, 'package.json'), 'utf8'));
const MAINTAINER = 'vfio-mig maintainers <maintainers@vfio-mig.org>';

function option(name) {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : undefined;
}

/** Runs the CLI of this tree (the bundle in dist/js) and returns its stdout. */
function cli(...args) {
  return execFileSync(process.execPath, [join(tree, 'bin', 'vfio-mig.js'), ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] });
}

function duKiB(dir) {
  let bytes = 0;
  let entries = 0;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    entries++;
    if (e.isDirectory()) {
      const r = duKiB(p);
      bytes += r.bytes;
      entries += r.entries;
    } else if (e.isFile()) bytes += statSync(p).size;
  }
  return { bytes, entries };
}

/** roff-escapes a --help text for a .nf block. */
const roff = (text) =>
  text
    .replace(/\\/g, '\\e')
    .split('\n')
    .map((l) => (/^[.']/.test(l) ? `\\&${l}` : l))
    .join('\n');

function manPage(version, date) {
  const top = cli('--help');
  const names = [...new Set([...top.matchAll(/^ {2}vfio-mig ([a-z][a-z-]+)/gm)].map((m) => m[1]))];
  const sections = names.map((n) => `.SS vfio-mig ${n}\n.nf\n${roff(cli(n, '--help').trimEnd())}\n.fi`);
  return `.TH VFIO-MIG 1 "${date}" "vfio-mig ${version}" "vfio-mig"
.SH NAME
vfio-mig \\- live migration of libvirt/QEMU VMs with VFIO devices
.SH SYNOPSIS
.B vfio-mig
.I command
.RI [ options ]
.SH DESCRIPTION
vfio-mig binds SR-IOV VFs and other PCI devices to their VFIO variant driver (at boot
through vfio-mig-bind.service, when VFs appear through a udev rule, and when libvirtd
starts through its daemon hook), checks before a migration that a VM can move to another
host, watches QEMU-driven migrations and migrates device state itself.
The driver table is
.IR /etc/vfio-mig/config.json ;
what was bound, and what to give back, is kept in
.IR /var/lib/vfio-mig .
.PP
Every command prints its own page with
.BR "vfio-mig \\fIcommand\\fB \\-\\-help" ;
they follow.
.SH COMMANDS
.nf
${roff(top.trimEnd())}
.fi
${sections.join('\n')}
.SH FILES
.TP
.I /etc/vfio-mig/config.json
the driver table (schema: /usr/share/vfio-mig/config.schema.json)
.TP
.I /var/lib/vfio-mig/bindings.json
the previous driver of every device vfio-mig bound
.TP
.I /lib/systemd/system/vfio-mig-bind.service, vfio-mig-bind@.service
boot-time and per-device binding
.TP
.I /lib/udev/rules.d/70-vfio-mig.rules
hands new VFs to vfio-mig-bind@.service
.TP
.I /etc/libvirt/hooks/daemon.d/vfio-mig, /etc/libvirt/hooks/qemu.d/50-vfio-mig
the libvirt hooks
`;
}

async function main() {
  const version = option('version') ?? own.version;
  if (!/^[0-9][A-Za-z0-9.+~]*$/.test(version)) throw new Error(`not a native Debian version: ${version}`);
  const outDir = option('out') ?? join(tree, 'dist');
  const arch = execFileSync('dpkg', ['--print-architecture'], { encoding: 'utf8' }).trim();
  if (arch !== 'amd64') throw new Error(`the package carries koffi's linux x64 binary; this is ${arch}`);
  const stage = mkdtempSync(join(tmpdir(), 'vfio-mig-deb.'));
  try {
    cli('install', '--layout', 'package', '--root', stage);
    // Only what is installed: the staging tree's node_modules, for the copyright file.
    const modules = [];
    const nm = join(stage, 'usr/lib/vfio-mig/node_modules');
    for (const d of readdirSync(nm)) for (const n of d.startsWith('@') ? readdirSync(join(nm, d)).map((x) => `${d}/${x}`) : [d]) modules.push(n);

    const doc = join(stage, 'usr/share/doc/vfio-mig');
    mkdirSync(doc, { recursive: true });
    const date = new Date();
    const rfc2822 = date.toUTCString().replace('GMT', '+0000');
    writeFileSync(
      join(doc, 'changelog.gz'),
      gzipSync(Buffer.from(`vfio-mig (${version}) unstable; urgency=medium\n\n  * Build of vfio-mig ${version} (npm run package).\n\n -- ${MAINTAINER}  ${rfc2822}\n`), { level: 9 }),
    );
    const mit = readFileSync(join(tree, 'plugin', 'debian', 'MIT'), 'utf8').trimEnd();
    const moduleStanzas = modules.map((n) => {
      const j = JSON.parse(readFileSync(join(nm, n, 'package.json'), 'utf8'));
      const who = typeof j.author === 'string' ? j.author : (j.author?.name ?? 'its authors');
      const lic = readdirSync(join(nm, n)).find((f) => /^LICEN[CS]E/i.test(f));
      const notice = lic ? readFileSync(join(nm, n, lic), 'utf8').match(/^\s*Copyright\s*(?:\(c\)|©)?\s*(.+)$/im)?.[1]?.trim() : undefined;
      if (j.license !== 'MIT') throw new Error(`${n} is licensed ${j.license}: add its license to plugin/package-deb.mjs`);
      return `Files: usr/lib/vfio-mig/node_modules/${n}/*\nCopyright: ${notice ?? who}\nLicense: Expat`;
    });
    writeFileSync(
      join(doc, 'copyright'),
      [
        'Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nUpstream-Name: vfio-mig',
        'Files: *\nCopyright: 2026 the vfio-mig authors\nLicense: GPL-2\n On Debian systems the full text of the GNU General Public License version 2\n is in /usr/share/common-licenses/GPL-2.',
        ...moduleStanzas,
        `License: Expat\n${mit.split('\n').map((l) => (l.trim() === '' ? ' .' : ` ${l}`)).join('\n')}`,
      ].join('\n\n') + '\n',
    );
    const man = join(stage, 'usr/share/man/man1');
    mkdirSync(man, { recursive: true });
    writeFileSync(join(man, 'vfio-mig.1.gz'), gzipSync(Buffer.from(manPage(version, date.toISOString().slice(0, 10))), { level: 9 }));

    const debian = join(stage, 'DEBIAN');
    mkdirSync(debian);
    for (const s of ['postinst', 'prerm', 'postrm']) {
      copyFileSync(join(tree, 'plugin', 'debian', s), join(debian, s));
      chmodSync(join(debian, s), 0o755);
    }
    // md5sums of every regular file, for debsums and dpkg --verify.
    const sums = execFileSync('find', ['.', '-path', './DEBIAN', '-prune', '-o', '-type', 'f', '-printf', '%P\\0'], { cwd: stage, encoding: 'utf8' }).split('\0').filter(Boolean).sort();
    writeFileSync(join(debian, 'md5sums'), sums.map((f) => `${createHash('md5').update(readFileSync(join(stage, f))).digest('hex')}  ${f}\n`).join(''));
    const manifest = JSON.parse(readFileSync(join(tree, 'plugin', 'install.json'), 'utf8'));
    writeFileSync(join(debian, 'conffiles'), manifest.files.filter((f) => f.config).map((f) => `${f.to}\n`).join(''));
    const size = duKiB(stage);
    const control = {
      Package: 'vfio-mig',
      Version: version,
      Architecture: arch,
      Maintainer: MAINTAINER,
      'Installed-Size': String(Math.ceil(size.bytes / 1024) + size.entries),
      // koffi.node needs GLIBC_2.25, CXXABI_1.3.11 (GCC 7) and libgcc_s (objdump -T).
      Depends: 'nodejs (>= 18), libc6 (>= 2.25), libstdc++6 (>= 7), libgcc-s1',
      Recommends: 'kmod',
      Suggests: 'libvirt-daemon-system, libvirt0',
      Section: 'admin',
      Priority: 'optional',
      Description: `live migration of libvirt/QEMU VMs with VFIO devices
 vfio-mig binds SR-IOV VFs and mdev-capable devices to their VFIO variant
 driver (at boot, when VFs appear and when libvirtd starts), checks before
 a migration that a VM with VFIO devices can move to another host, watches
 QEMU-driven migrations and can migrate device state itself.
 .
 It installs the vfio-mig command, libvirt daemon and qemu hooks, a systemd
 boot unit, a udev rule for new VFs and a default driver table.`,
    };
    writeFileSync(join(debian, 'control'), `${Object.entries(control).map(([k, v]) => `${k}: ${v}`).join('\n')}\n`);
    mkdirSync(outDir, { recursive: true });
    const deb = join(outDir, `vfio-mig_${version}_${arch}.deb`);
    execFileSync('dpkg-deb', ['--root-owner-group', '-Zxz', '--build', stage, deb], { stdio: ['ignore', 'ignore', 'inherit'] });
    console.log(`vfio-mig package: ${size.entries} entries, ${Math.round(statSync(deb).size / 1024)} KiB`);
    console.log(deb);
  } finally {
    rmSync(stage, { recursive: true, force: true });
  }
}

main().catch((err) => {
  console.error(`vfio-mig package failed: ${err instanceof Error ? err.message : String(err)}`);
  process.exit(1);
});
