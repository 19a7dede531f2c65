// Two libvirt 11.3 "hosts" (A and B) inside the rig guest, for live migrations of domains
// with mtty mdev hostdevs between two real daemons on one real 6.12 VFIO kernel.
//
// The same design as test/libvirt/hosts.ts on the outer machine (two libvirtd, each in its
// own network + mount namespace over its own /etc/libvirt, /run/libvirt, /var/{lib,cache,
// log}/libvirt, distinct host_uuid, a veth pair for QEMU's migration stream, clients in the
// root namespace over the unix sockets), with what the guest needs on top:
//
// - veth is loaded by hand: the guest's PID 1 runs from the initramfs, whose root has no
//   /sbin/modprobe, so the kernel's own module autoload (request_module) cannot work there
//   and `ip link add ... type veth` would fail with "Unknown device type".
// - Each daemon also gets its own UTS namespace (host name host-A / host-B): both run on
//   one kernel, and vfio-mig's hook writes the host name into the domain's metadata.
// - With `vfio: true` each host has vfio-mig installed by its own installer
//   (`vfio-mig install --root <host>/root`), and the daemon's mount namespace sees that
//   tree at the usual places: /usr/lib/vfio-mig, /etc/vfio-mig, /var/lib/vfio-mig (the
//   hook's reservations), /var/log/vfio-mig, and /etc/libvirt itself (the installer puts
//   the hook symlinks into <root>/etc/libvirt/hooks, next to the daemon's configs). So
//   each host keeps its own reservations and logs, as two machines would.
// - QEMU here is TCG inside TCG: timeouts are generous; libvirtd probes QEMU's
//   capabilities once (A) and B starts from A's cache.
//
// Nothing of the guest's own / is changed except empty mount points, removed again. stop()
// tears down by pid (QEMUs, then daemons), deletes the namespaces and the directory.
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { closeSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, readdirSync, rmdirSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { configs, teardown, reapStale } from '../libvirt/hosts.ts';
import { isLink, run as install } from '../../src/cli/install.ts';

export type HostName = 'A' | 'B';

export interface GuestHost {
  name: HostName;
  netns: string;
  dir: string;
  /** The host's vfio-mig install root (its /etc/libvirt is <root>/etc/libvirt). */
  root: string;
  /** This host's address on the veth link (incoming migrations listen here). */
  addr: string;
  /** libvirt URI for clients in the guest's root namespace. */
  uri: string;
  proc: ChildProcess;
  exited: Promise<void>;
  /** libvirtd's pid (inside the host's namespaces), from its pid file. */
  pid(): number;
}

export interface GuestHosts {
  a: GuestHost;
  b: GuestHost;
  base: string;
  /** Timings of the start-up, ms. */
  timings: Record<string, number>;
  stop(): Promise<void>;
}

export interface GuestHostOptions {
  /** Install vfio-mig (CLI, hooks, config) into each host with `vfio-mig install --root`. */
  vfio?: boolean;
  /** Merged into each host's /etc/vfio-mig/config.json after the install. */
  config?: Record<string, unknown>;
}

// Same prefix and netns naming as test/libvirt/hosts.ts: its reapStale() also clears what a
// crashed run of this file left behind.
const BASE_PREFIX = 'vfio-mig-lv-';
const SOCKET_MS = 120_000;

function sh(cmd: string, args: string[]): string {
  return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}


// Runs as `ip netns exec NS unshare --uts -- bash -c INIT host-init DIR NAME VFIO`: the host
// name, private bind mounts over libvirt's (and vfio-mig's) fixed paths, then libvirtd under
// tini as a child subreaper (libvirt double-forks QEMU; without a reaper every QEMU exit
// waits for the guest's PID 1). tini -p SIGTERM: libvirtd stops if the test process dies.
const INIT = String.raw`set -euo pipefail
dir=$1 name=$2 vfio=$3
hostname "host-$name"
mount --make-rprivate /
bind() { mkdir -p "$2"; mount --bind "$1" "$2"; }
bind "$dir/root/etc/libvirt" /etc/libvirt
bind "$dir/run" /run/libvirt
bind "$dir/lib" /var/lib/libvirt
bind "$dir/cache" /var/cache/libvirt
bind "$dir/log" /var/log/libvirt
if [ "$vfio" = 1 ]; then
  bind "$dir/root/usr/lib/vfio-mig" /usr/lib/vfio-mig
  bind "$dir/root/etc/vfio-mig" /etc/vfio-mig
  bind "$dir/root/var/lib/vfio-mig" /var/lib/vfio-mig
  bind "$dir/vfio-mig-log" /var/log/vfio-mig
fi
exec tini -s -p SIGTERM -- /usr/sbin/libvirtd -f /etc/libvirt/libvirtd.conf -p "$dir/libvirtd.pid"
`;

function sink(): { stream: NodeJS.WritableStream; text: () => string } {
  const chunks: string[] = [];
  return { stream: { write: (c: string | Buffer) => (chunks.push(String(c)), true) } as unknown as NodeJS.WritableStream, text: () => chunks.join('') };
}

/** `vfio-mig install --root <root>` (this tree's installer, in-process), then the config. */
async function installVfioMig(root: string, config: Record<string, unknown> | undefined): Promise<void> {
  const out = sink();
  const err = sink();
  const code = await install(['--root', root, '--no-reload'], out.stream, err.stream);
  if (code !== 0) throw new Error(`vfio-mig install --root ${root} failed (${code}): ${err.text()}${out.text()}`);
  // Symlinks to /usr/lib/vfio-mig/hooks/*: they resolve only inside the host's namespace.
  for (const link of ['qemu.d/50-vfio-mig', 'daemon.d/vfio-mig']) {
    if (!isLink(join(root, 'etc/libvirt/hooks', link))) throw new Error(`vfio-mig install put no hook at ${root}/etc/libvirt/hooks/${link}`);
  }
  if (config) {
    const file = join(root, 'etc/vfio-mig/config.json');
    const current = JSON.parse(readFileSync(file, 'utf8')) as Record<string, unknown>;
    writeFileSync(file, `${JSON.stringify({ ...current, ...config }, null, 2)}\n`);
  }
}

function pidFrom(file: string): number | undefined {
  try {
    const pid = Number(readFileSync(file, 'utf8').trim());
    return Number.isSafeInteger(pid) && pid > 1 ? pid : undefined;
  } catch {
    return undefined;
  }
}

function readTail(file: string): string {
  try {
    return readFileSync(file, 'utf8').slice(-2000).trim();
  } catch {
    return '';
  }
}

async function startHost(base: string, name: HostName, netns: string, addr: string, opts: GuestHostOptions): Promise<GuestHost> {
  const dir = join(base, name);
  const root = join(dir, 'root');
  for (const sub of ['run', 'lib', 'cache', 'log', 'vfio-mig-log', 'root/etc/libvirt']) mkdirSync(join(dir, sub), { recursive: true });
  // The outer pair's configs (root, no security driver, no cgroups, stdio to a file), with the
  // hook calls logged too.
  const c = configs(name, addr, '1:util.hook 1:qemu.qemu_migration 3:*');
  writeFileSync(join(root, 'etc/libvirt/libvirtd.conf'), c.libvirtd);
  writeFileSync(join(root, 'etc/libvirt/qemu.conf'), c.qemu);
  // Installed before libvirtd starts: it learns its hooks at start (a SIGHUP while its
  // drivers are still initializing is ignored).
  if (opts.vfio) await installVfioMig(root, opts.config);
  const logFd = openSync(join(dir, 'daemon.out'), 'a');
  const proc = spawn('ip', ['netns', 'exec', netns, 'unshare', '--uts', '--', 'bash', '-c', INIT, 'host-init', dir, name, opts.vfio ? '1' : '0'], { stdio: ['ignore', logFd, logFd] });
  closeSync(logFd);
  let exitInfo: string | undefined;
  const exited = new Promise<void>((resolve) =>
    proc.on('exit', (code, sig) => {
      exitInfo = `libvirtd ${name} exited (${code ?? sig}): ${readTail(join(dir, 'daemon.out'))}`;
      resolve();
    }),
  );
  const sock = join(dir, 'run', 'libvirt-sock');
  const deadline = Date.now() + SOCKET_MS;
  while (!existsSync(sock) || pidFrom(join(dir, 'libvirtd.pid')) === undefined) {
    if (exitInfo) throw new Error(`starting libvirtd ${name}: ${exitInfo}`);
    if (Date.now() > deadline) throw new Error(`starting libvirtd ${name}: no socket ${sock} within ${SOCKET_MS} ms: ${readTail(join(dir, 'daemon.out'))}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  const pid = (): number => {
    const p = pidFrom(join(dir, 'libvirtd.pid'));
    if (!p) throw new Error(`libvirtd ${name}: no pid in ${dir}/libvirtd.pid`);
    return p;
  };
  return { name, netns, dir, root, addr, uri: `qemu+unix:///system?socket=${sock}`, proc, exited, pid };
}

/** Starts hosts A and B in the guest; on failure everything started so far is torn down. */
export async function startGuestHosts(opts: GuestHostOptions = {}): Promise<GuestHosts> {
  if (!process.env.VFIO_MIG_IN_RIG) throw new Error('startGuestHosts runs inside the rig guest only (it loads modules and creates namespaces)');
  await reapStale();
  const timings: Record<string, number> = {};
  const t0 = Date.now();
  // See the header: no module autoload in the guest.
  execFileSync('modprobe', ['veth'], { stdio: ['ignore', 'inherit', 'inherit'] });
  const base = mkdtempSync(join(tmpdir(), BASE_PREFIX));
  const tag = `vml${process.pid.toString(36)}`;
  const nsA = `${tag}A`;
  const nsB = `${tag}B`;
  writeFileSync(join(base, 'owner.json'), JSON.stringify({ pid: process.pid, netns: [nsA, nsB] }));
  const started: GuestHost[] = [];
  // The mount points the hosts' namespaces need and the guest's / lacks (created by the
  // init script): removed again at stop, so the next rig file sees the guest as it was.
  const mountPoints = ['/usr/lib/vfio-mig', '/etc/vfio-mig', '/var/lib/vfio-mig', '/var/log/vfio-mig'].filter((d) => !existsSync(d));
  const stop = async (): Promise<void> => {
    await teardown(base, [nsA, nsB]);
    await Promise.all(started.map((h) => h.exited));
    for (const d of mountPoints) {
      try {
        rmdirSync(d); // only if still empty: never anything else's
      } catch {
        // not created (a host failed before), or not empty
      }
    }
  };
  try {
    sh('ip', ['netns', 'add', nsA]);
    sh('ip', ['netns', 'add', nsB]);
    sh('ip', ['link', 'add', `${tag}a0`, 'netns', nsA, 'type', 'veth', 'peer', 'name', `${tag}b0`, 'netns', nsB]);
    for (const [ns, dev, cidr] of [
      [nsA, `${tag}a0`, '10.77.77.1/30'],
      [nsB, `${tag}b0`, '10.77.77.2/30'],
    ] as const) {
      sh('ip', ['-n', ns, 'addr', 'add', cidr, 'dev', dev]);
      sh('ip', ['-n', ns, 'link', 'set', dev, 'up']);
      sh('ip', ['-n', ns, 'link', 'set', 'lo', 'up']);
    }
    const a = await startHost(base, 'A', nsA, '10.77.77.1', opts);
    started.push(a);
    timings.startA = Date.now() - t0;
    // The first API call probes QEMU's capabilities (seconds under nested TCG) into A's
    // cache; B starts from a copy (same QEMU, libvirt and kernel: libvirt keeps it).
    const t1 = Date.now();
    sh('virsh', ['-q', '-c', a.uri, 'version']);
    timings.probeA = Date.now() - t1;
    const from = join(base, 'A', 'cache', 'qemu', 'capabilities');
    if (existsSync(from)) {
      mkdirSync(join(base, 'B', 'cache', 'qemu', 'capabilities'), { recursive: true });
      for (const f of readdirSync(from)) copyFileSync(join(from, f), join(base, 'B', 'cache', 'qemu', 'capabilities', f));
    }
    const t2 = Date.now();
    const b = await startHost(base, 'B', nsB, '10.77.77.2', opts);
    started.push(b);
    sh('virsh', ['-q', '-c', b.uri, 'version']);
    timings.startB = Date.now() - t2;
    return { a, b, base, timings, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

/**
 * The argv prefix that runs a command as host `h` does: in its network, mount and UTS
 * namespaces (its /run/libvirt, /etc/vfio-mig, host name...), e.g. vfio-mig as installed there.
 * -r -w: entering a mount namespace resets root and cwd to the namespace's root, which in
 * the guest is the initramfs, not the overlay root the rig chroots into (exit 127, no node).
 */
export function onHost(h: GuestHost, argv: string[]): string[] {
  return ['nsenter', '-t', String(h.pid()), '-n', '-m', '-u', '-r', '-w', '--', ...argv];
}

/** vfio-mig as installed on host `h` (its own copy, run by this node). */
export function vfioMigOn(h: GuestHost): string[] {
  return onHost(h, [process.execPath, '/usr/lib/vfio-mig/bin/vfio-mig.js']);
}

export interface MttyDomainOptions {
  name: string;
  uuid: string;
  memoryMiB?: number;
}

/**
 * TCG, q35, 64 MiB, no disk, no NIC, one mtty mdev as vfio-pci (alias hostdev0) with the
 * properties QEMU 10 needs to migrate it on Debian's 6.12 kernel: enable-migration=on
 * (mtty has no dirty tracking, so "auto" would block the migration),
 * x-device-dirty-page-tracking=off (the kernel has no DMA-logging report for it; the
 * default fails ram_save_setup), migration-events=on (QEMU reports each device's states).
 * migration-events is a bool property: QEMU rejects the string "on" for it.
 */
export function mttyDomainXml(o: MttyDomainOptions): string {
  return `<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>${o.name}</name>
  <memory unit='MiB'>${o.memoryMiB ?? 64}</memory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
    <hostdev mode='subsystem' type='mdev' model='vfio-pci'>
      <source>
        <address uuid='${o.uuid}'/>
      </source>
    </hostdev>
  </devices>
  <qemu:override>
    <qemu:device alias='hostdev0'>
      <qemu:frontend>
        <qemu:property name='enable-migration' type='string' value='on'/>
        <qemu:property name='x-device-dirty-page-tracking' type='string' value='off'/>
        <qemu:property name='migration-events' type='bool' value='true'/>
      </qemu:frontend>
    </qemu:device>
  </qemu:override>
</domain>
`;
}
