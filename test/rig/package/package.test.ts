// The Debian package on the real 6.12 kernel, under real systemd and udev (run through
// test/rig/package/run.sh, which builds the two .debs and adds igb SR-IOV NICs):
//   - dpkg -i into the guest's overlay root (its Depends met by the host's own packages);
//   - systemd as PID 1 of a PID namespace (the guest's PID 1 is the rig's init) starts
//     systemd-udevd, udev's coldplug and a stand-in libvirtd.service: the enabled boot
//     unit must have bound the edu devices before that stand-in starts;
//   - echo 2 > sriov_numvfs on an igb PF: both VFs end on vfio-pci through the udev rule
//     and vfio-mig-bind@.service, the PF untouched; echo 0 drops them from the journal;
//   - a burst of 7 VFs on every PF at once, all bound;
//   - an upgrade keeps the operator's config and the binding journal; a purge leaves no
//     file of ours and every device on the driver it had before.
import test from 'ava';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { existsSync, lstatSync, openSync, readFileSync, readdirSync, readlinkSync, statSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

const PCI = '/sys/bus/pci/devices';
const STATE = '/var/lib/vfio-mig/bindings.json';
const CONFIG = '/etc/vfio-mig/config.json';
const debs = process.env.VFIO_MIG_PKG_DEBS ?? '';
const version = process.env.VFIO_MIG_PKG_VERSION ?? '';
const results = process.env.VFIO_MIG_RIG_RESULTS ?? '/tmp';
const OLD = join(debs, `vfio-mig_${version}_amd64.deb`);
const NEW = join(debs, `vfio-mig_${version}+up1_amd64.deb`);

// Once systemd runs, commands run in its PID and mount namespaces (nsenter): there /proc/1
// is systemd and /run is its /run, so systemctl, journalctl and the maintainer scripts
// see a booted system, not the rig's chroot.
let systemdPid: number | undefined;
const sh = (cmd: string): string => {
  const argv = systemdPid ? ['nsenter', '-t', String(systemdPid), '-m', '-p', '-r', '-w', '--', 'bash', '-c', cmd] : ['bash', '-c', cmd];
  return execFileSync(argv[0]!, argv.slice(1), { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } });
};
const STANDIN = '/var/tmp/vfio-mig-libvirtd-standin';
const attr = (bdf: string, name: string): string => readFileSync(join(PCI, bdf, name), 'utf8').trim();
const driverOf = (bdf: string): string | undefined => {
  try {
    return basename(readlinkSync(join(PCI, bdf, 'driver')));
  } catch {
    return undefined;
  }
};
const byId = (vendor: string, device: string): string[] =>
  readdirSync(PCI)
    .filter((b) => attr(b, 'vendor') === `0x${vendor}` && attr(b, 'device') === `0x${device}`)
    .sort();
const vfsOf = (pf: string): string[] =>
  readdirSync(join(PCI, pf))
    .filter((l) => l.startsWith('virtfn'))
    .map((l) => basename(readlinkSync(join(PCI, pf, l))))
    .sort();
const journal = (): { devices: Record<string, { previousDriver: string | null; driver: string }>; pfs: Record<string, { previousAutoprobe: boolean }> } =>
  existsSync(STATE) ? JSON.parse(readFileSync(STATE, 'utf8')) : { devices: {}, pfs: {} };
const log = (msg: string): void => console.log(`rig-package: ${msg}`);

async function until<T>(what: string, timeoutMs: number, probe: () => T | undefined | false): Promise<{ value: T; ms: number }> {
  const t0 = Date.now();
  for (;;) {
    const v = probe();
    if (v !== undefined && v !== false) return { value: v, ms: Date.now() - t0 };
    if (Date.now() - t0 > timeoutMs) throw new Error(`${what}: not reached within ${timeoutMs / 1000} s`);
    await sleep(100);
  }
}

let systemd: ChildProcess | undefined;
let installedFiles: string[] = [];
const edus = byId('1234', '11e8');
const pfs = byId('8086', '10c9');
const timings: Record<string, number> = {};

test.before(() => {
  if (!process.env.VFIO_MIG_IN_RIG) throw new Error('runs inside the rig guest: test/rig/package/run.sh');
  for (const f of [OLD, NEW]) if (!existsSync(f)) throw new Error(`${f} is missing: test/rig/package/run.sh builds it`);
  if (pfs.length === 0) throw new Error('no igb PF (8086:10c9): test/rig/package/run.sh adds them through VFIO_MIG_RIG_QEMU_EXTRA');
  if (edus.length === 0) throw new Error('no edu device');
});

test.after.always(() => {
  if (systemdPid) {
    try {
      writeFileSync(join(results, 'journal.txt'), sh("journalctl --no-pager -o short-monotonic -u 'vfio-mig*' -u libvirtd.service -u systemd-udevd.service 2>&1 || true"));
    } catch {
      // diagnostics only
    }
  }
  if (systemd?.pid) {
    try {
      // The namespace's init: its death takes every process of the namespace with it.
      process.kill(systemd.pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
  writeFileSync(join(results, 'package-timings.json'), `${JSON.stringify(timings, null, 2)}\n`);
  log(`timings ${JSON.stringify(timings)}`);
});

test.serial('dpkg -i installs the package on the root the guest sees; its Depends are met by the installed nodejs', (t) => {
  // man-db's trigger rebuilds its whole index: minutes under TCG, and not ours to test.
  sh('rm -f /var/lib/man-db/auto-update');
  const node = sh("dpkg-query -W -f='${Version}' nodejs");
  t.log(`nodejs ${node}; /usr/bin/node ${sh('/usr/bin/node --version').trim()}`);
  const out = sh(`dpkg -i ${OLD} 2>&1`);
  t.log(out.trim().split('\n').slice(-3).join(' | '));
  t.is(sh("dpkg-query -W -f='${Status} ${Version}' vfio-mig"), `install ok installed ${version}`);
  installedFiles = sh('dpkg -L vfio-mig').trim().split('\n');
  for (const f of ['/usr/bin/vfio-mig', '/lib/systemd/system/vfio-mig-bind.service', '/lib/systemd/system/vfio-mig-bind@.service', '/lib/udev/rules.d/70-vfio-mig.rules', '/usr/share/vfio-mig/config.schema.json', '/usr/share/man/man1/vfio-mig.1.gz']) t.true(existsSync(f), f);
  for (const l of ['/etc/libvirt/hooks/daemon.d/vfio-mig', '/etc/libvirt/hooks/qemu.d/50-vfio-mig']) t.true(lstatSync(l).isSymbolicLink(), l);
  t.regex(sh("dpkg-query -W -f='${Conffiles}' vfio-mig"), /\/etc\/vfio-mig\/config\.json [0-9a-f]{32}/);
  // postinst enabled the boot unit (deb-systemd-helper: WantedBy= multi-user and libvirtd).
  t.true(lstatSync('/etc/systemd/system/multi-user.target.wants/vfio-mig-bind.service').isSymbolicLink());
  t.true(lstatSync('/etc/systemd/system/libvirtd.service.wants/vfio-mig-bind.service').isSymbolicLink());
  t.regex(sh('vfio-mig --help'), /vfio-mig install/);
  // The units as systemd parses them (the command exists now).
  const verify = sh('systemd-analyze verify /lib/systemd/system/vfio-mig-bind.service /lib/systemd/system/vfio-mig-bind@00.service /lib/systemd/system/vfio-mig-forget@00.service 2>&1 || true');
  t.deepEqual(verify.split('\n').filter((l) => /vfio-mig/.test(l)), [], verify);
});

test.serial('boot: under systemd the enabled unit binds the edu devices before libvirtd starts; the PFs stop autoprobing', async (t) => {
  // The operator's rule: the 82576's VFs go to plain vfio-pci (it has no variant driver).
  writeFileSync(CONFIG, `${JSON.stringify({ $schema: '/usr/share/vfio-mig/config.schema.json', version: 1, aliasPolicy: 'safe', manageSriovAutoprobe: true, rules: [{ vendor: '8086', device: '10ca', driver: 'vfio-pci', comment: '82576 VFs (rig)' }] }, null, 2)}\n`);
  sh('modprobe igb');
  for (const pf of pfs) t.is(driverOf(pf), 'igb', `${pf} is the igb PF`);
  // A minimal target: journald, udevd and its coldplug, and a stand-in for libvirtd that
  // writes down every edu device's driver at the moment it starts.
  writeFileSync('/etc/systemd/system/vfio-mig-rig.target', '[Unit]\nDescription=vfio-mig rig: minimal boot\nWants=systemd-journald.service systemd-udevd.service systemd-udev-trigger.service libvirtd.service\n');
  writeFileSync(
    '/etc/systemd/system/libvirtd.service',
    `[Unit]\nDescription=stand-in for libvirtd (rig)\n[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/sh -c 'for d in ${edus.join(' ')}; do echo "$d $(basename $(readlink /sys/bus/pci/devices/$d/driver) 2>/dev/null)"; done > ${STANDIN}'\n`,
  );
  const out = openSync(join(results, 'systemd.log'), 'w');
  const t0 = Date.now();
  systemd = spawn('unshare', ['--pid', '--fork', '--mount-proc', '/lib/systemd/systemd', '--unit=vfio-mig-rig.target', '--log-target=console', '--show-status=0'], { stdio: ['ignore', out, out] });
  const child = await until('systemd started', 60_000, () => {
    try {
      return Number(readFileSync(`/proc/${systemd!.pid}/task/${systemd!.pid}/children`, 'utf8').trim().split(/\s+/)[0]) || false;
    } catch {
      return false;
    }
  });
  systemdPid = child.value;
  const up = await until('stand-in libvirtd.service active', 600_000, () => existsSync(STANDIN) && sh('systemctl is-active libvirtd.service 2>&1 || true').trim() === 'active');
  timings.bootToLibvirtdMs = up.ms;
  t.log(`systemd started; stand-in libvirtd active after ${(up.ms / 1000).toFixed(1)} s`);
  const seen = readFileSync(STANDIN, 'utf8').trim().split('\n');
  t.deepEqual(seen, edus.map((d) => `${d} edu-vfio-pci`), 'every edu device was on edu-vfio-pci when libvirtd started');
  t.is(sh('systemctl show -p Result --value vfio-mig-bind.service').trim(), 'success');
  const bindDone = Number(sh('systemctl show -p ExecMainExitTimestampMonotonic --value vfio-mig-bind.service'));
  const libvirtStart = Number(sh('systemctl show -p ExecMainStartTimestampMonotonic --value libvirtd.service'));
  t.true(bindDone > 0 && bindDone <= libvirtStart, `bind ended at ${bindDone}, libvirtd started at ${libvirtStart}`);
  timings.bootUnitMs = Math.round((bindDone - Number(sh('systemctl show -p ExecMainStartTimestampMonotonic --value vfio-mig-bind.service'))) / 1000);
  await until('udev queue empty', 120_000, () => sh('udevadm settle --timeout=5 >/dev/null 2>&1 && echo ok || true').trim() === 'ok');
  for (const pf of pfs) {
    t.is(attr(pf, 'sriov_drivers_autoprobe'), '0', `${pf}: autoprobe off (its VFs go to vfio-pci)`);
    t.is(driverOf(pf), 'igb');
  }
  t.log(`${Date.now() - t0} ms from systemd start to a settled udev`);
});

test.serial('echo 2 > sriov_numvfs: both VFs end on vfio-pci through udev and the template unit; echo 0 cleans the journal', async (t) => {
  const pf = pfs[0]!;
  const t0 = Date.now();
  writeFileSync(join(PCI, pf, 'sriov_numvfs'), '2');
  const vfs = vfsOf(pf);
  t.is(vfs.length, 2);
  const bound = await until('2 VFs on vfio-pci', 120_000, () => vfs.every((v) => driverOf(v) === 'vfio-pci') && vfs.every((v) => journal().devices[v]));
  timings.twoVfsMs = Date.now() - t0;
  t.log(`2 VFs on vfio-pci ${timings.twoVfsMs} ms after echo 2 (${bound.ms} ms of polling)`);
  const groups = vfs.map((v) => basename(readlinkSync(join(PCI, v, 'iommu_group'))));
  t.is(new Set(groups).size, 2, `each VF in its own IOMMU group (${groups.join(', ')})`);
  for (const v of vfs) {
    t.is(basename(readlinkSync(join(PCI, v, 'physfn'))), pf);
    t.is(attr(v, 'device'), '0x10ca');
    t.is(journal().devices[v]?.previousDriver, null, 'a new VF had no driver before (autoprobe was off)');
  }
  t.is(driverOf(pf), 'igb', 'the PF keeps igb');
  t.false(pf in journal().devices, 'the PF itself was never rebound');
  for (const v of vfs) t.is(sh(`systemctl show -p Result --value 'vfio-mig-bind@${v}.service'`).trim(), 'success', `vfio-mig-bind@${v}.service`);
  // udev at debug level from here: the journal shows each remove event's RUN.
  sh('udevadm control --log-level=debug || true');
  const t1 = Date.now();
  writeFileSync(join(PCI, pf, 'sriov_numvfs'), '0');
  await until('VF records dropped from the journal', 120_000, () => vfs.every((v) => !(v in journal().devices)));
  timings.forgetTwoVfsMs = Date.now() - t1;
  t.log(`records dropped ${timings.forgetTwoVfsMs} ms after echo 0`);
  t.deepEqual(vfsOf(pf), []);
  t.is(driverOf(pf), 'igb');
});

test.serial('a burst of 7 VFs on every PF at once: all of them bound', async (t) => {
  for (const pf of pfs) if (attr(pf, 'sriov_numvfs') !== '0') writeFileSync(join(PCI, pf, 'sriov_numvfs'), '0');
  const t0 = Date.now();
  // All PFs at once (each write returns once its VFs exist).
  await Promise.all(pfs.map((pf) => new Promise<void>((resolve, reject) => {
    const c = spawn('sh', ['-c', `echo 7 > ${join(PCI, pf, 'sriov_numvfs')}`], { stdio: 'inherit' });
    c.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`echo 7 > ${pf}/sriov_numvfs: exit ${code}`))));
  })));
  const created = Date.now() - t0;
  const vfs = pfs.flatMap(vfsOf);
  t.is(vfs.length, 7 * pfs.length);
  const firstAt: Record<string, number> = {};
  await until(`${vfs.length} VFs on vfio-pci`, 600_000, () => {
    for (const v of vfs) if (!(v in firstAt) && driverOf(v) === 'vfio-pci') firstAt[v] = Date.now() - t0;
    return vfs.every((v) => v in firstAt) && vfs.every((v) => journal().devices[v]);
  });
  const times = Object.values(firstAt).sort((a, b) => a - b);
  Object.assign(timings, { burstVfs: vfs.length, burstCreateMs: created, burstFirstBoundMs: times[0], burstLastBoundMs: times.at(-1), burstAllRecordedMs: Date.now() - t0 });
  t.log(`${vfs.length} VFs created in ${created} ms; first on vfio-pci at ${times[0]} ms, last at ${times.at(-1)} ms, all recorded at ${timings.burstAllRecordedMs} ms`);
  const failed = sh("systemctl list-units --failed --no-legend --plain 'vfio-mig-*' 2>&1 || true").trim();
  t.is(failed, '', 'no vfio-mig unit failed');
  for (const pf of pfs) t.is(driverOf(pf), 'igb');
  const t1 = Date.now();
  for (const pf of pfs) writeFileSync(join(PCI, pf, 'sriov_numvfs'), '0');
  await until('every VF record dropped', 300_000, () => vfs.every((v) => !(v in journal().devices)));
  timings.burstForgetMs = Date.now() - t1;
  t.log(`all ${vfs.length} records dropped ${timings.burstForgetMs} ms after echo 0`);
});

test.serial('an upgrade keeps the operator\'s config, the binding journal and the enabled unit', (t) => {
  const config = readFileSync(CONFIG, 'utf8');
  const before = journal();
  t.true(edus.every((d) => d in before.devices), 'the edu devices are in the journal');
  const out = sh(`dpkg -i ${NEW} 2>&1 </dev/null`);
  t.log(out.trim().split('\n').slice(-2).join(' | '));
  t.is(sh("dpkg-query -W -f='${Version}' vfio-mig"), `${version}+up1`);
  t.is(readFileSync(CONFIG, 'utf8'), config, 'config.json byte for byte');
  t.deepEqual(journal(), before, 'bindings.json unchanged');
  for (const d of edus) t.is(driverOf(d), 'edu-vfio-pci', `${d} stays bound across the upgrade`);
  t.true(lstatSync('/etc/systemd/system/multi-user.target.wants/vfio-mig-bind.service').isSymbolicLink());
});

test.serial('purge: every device back on the driver it had before bind, and no file of ours left', (t) => {
  const before = journal();
  const prev = Object.fromEntries(Object.entries(before.devices).map(([d, r]) => [d, r.previousDriver ?? undefined]));
  const out = sh('dpkg --purge vfio-mig 2>&1');
  t.log(out.trim().split('\n').slice(-3).join(' | '));
  const status = sh("dpkg-query -W -f='${Status}' vfio-mig 2>/dev/null || true").trim();
  t.true(status === '' || /not-installed/.test(status), `dpkg: ${status || 'unknown package'}`);
  for (const [d, p] of Object.entries(prev)) if (existsSync(join(PCI, d))) t.is(driverOf(d), p, `${d} back on ${p ?? 'no driver'}`);
  for (const pf of Object.keys(before.pfs)) t.is(attr(pf, 'sriov_drivers_autoprobe'), before.pfs[pf]!.previousAutoprobe ? '1' : '0', `${pf} autoprobe restored`);
  // statSync: /lib is a symlink to usr/lib on merged-/usr Debian, a directory all the same.
  const left = installedFiles.filter((f) => f !== '/.' && existsSync(f) && !statSync(f).isDirectory());
  t.deepEqual(left, [], 'no file of the package left');
  const ours = installedFiles.filter((f) => /vfio-mig/.test(f) && existsSync(f));
  t.deepEqual(ours, [], 'no directory of ours left');
  for (const p of ['/var/lib/vfio-mig', '/etc/vfio-mig', '/etc/systemd/system/multi-user.target.wants/vfio-mig-bind.service', '/etc/systemd/system/libvirtd.service.wants/vfio-mig-bind.service']) t.false(existsSync(p) || isLink(p), `${p} removed`);
});

function isLink(p: string): boolean {
  try {
    return lstatSync(p).isSymbolicLink();
  } catch {
    return false;
  }
}
