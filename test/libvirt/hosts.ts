// Two fake libvirt hosts on one machine (spec/libvirt-rig.md, adapted to libvirt 11.3):
// each is a libvirtd in its own network + mount namespace, with its own /etc/libvirt,
// /run/libvirt, /var/{lib,cache,log}/libvirt bind-mounted from a temp dir, a distinct
// host_uuid (libvirt refuses a "migration to the same host" otherwise), and a veth pair
// between the namespaces carrying QEMU's migration stream. Clients stay in the root
// namespace and reach each daemon through its unix socket.
//
// Everything lives under one temp dir; stop() kills QEMUs and daemons by pid (checked
// against /proc/<pid>/cmdline), deletes the namespaces and the dir. Nothing is left running.
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, readdirSync, rmSync, writeFileSync, closeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));

export interface Host {
  name: 'A' | 'B';
  netns: string;
  dir: string;
  /** Address of this host on the veth link (QEMU's incoming migration listens here). */
  addr: string;
  /** libvirt URI for clients in the root namespace. */
  uri: string;
  proc: ChildProcess;
  exited: Promise<void>;
}

export interface Hosts {
  a: Host;
  b: Host;
  base: string;
  stop(): Promise<void>;
}

function run(cmd: string, args: string[]): string {
  return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

/** Why the suite cannot run here, or undefined when it can. */
export function cannotRun(): string | undefined {
  if (process.getuid?.() !== 0) return 'needs root (network and mount namespaces, bind mounts, a privileged libvirtd)';
  for (const bin of ['/usr/sbin/libvirtd', '/usr/bin/tini', '/usr/bin/qemu-system-x86_64']) {
    if (!existsSync(bin)) return `${bin} is missing: run test/libvirt/setup.sh`;
  }
  try {
    run('ip', ['-V']);
  } catch {
    return 'the ip command (iproute2) is missing';
  }
  return undefined;
}

/**
 * Each fake host's libvirtd.conf and qemu.conf (also used by the rig's in-guest pair,
 * test/rig/libvirt-guest.ts). `logFilters` adds libvirt log filters (e.g. util.hook).
 */
export function configs(name: 'A' | 'B', addr: string, logFilters = '1:qemu.qemu_migration 3:*'): { libvirtd: string; qemu: string } {
  const uuidTail = name === 'A' ? '00000000000a' : '00000000000b';
  return {
    libvirtd: [
      `host_uuid = "5a5a5a5a-0000-4000-8000-${uuidTail}"`,
      'unix_sock_group = "root"',
      'unix_sock_ro_perms = "0770"',
      'unix_sock_rw_perms = "0770"',
      'unix_sock_admin_perms = "0700"',
      'auth_unix_ro = "none"',
      'auth_unix_rw = "none"',
      `log_filters = "${logFilters}"`,
      'log_outputs = "1:file:/var/log/libvirt/libvirtd.log"',
      '',
    ].join('\n'),
    qemu: [
      // Root and no security driver: /dev/kvm and friends are not set up for a libvirt-qemu user here.
      'user = "root"',
      'group = "root"',
      'dynamic_ownership = 0',
      'remember_owner = 0',
      'security_driver = "none"',
      // ip netns exec remounts /sys, hiding the cgroup mounts; no cgroups, no namespaces.
      'cgroup_controllers = [ ]',
      'namespaces = [ ]',
      // No virtlogd daemon: QEMU's output goes straight to a file.
      'stdio_handler = "file"',
      `migration_address = "${addr}"`,
      `migration_host = "${addr}"`,
      'migration_port_min = 49152',
      'migration_port_max = 49215',
      '',
    ].join('\n'),
  };
}

async function waitFor(what: string, cond: () => boolean, timeoutMs: number, proc?: { dead: () => string | undefined }): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    const dead = proc?.dead();
    if (dead) throw new Error(`${what}: ${dead}`);
    if (Date.now() > deadline) throw new Error(`${what}: not within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

function isQemu(pid: number): boolean {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0')[0]!.includes('qemu-system');
  } catch {
    return false;
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

export interface StartOptions {
  /**
   * Runs for each host after its directories and configs exist, before its libvirtd
   * starts: e.g. to install hooks under <dir>/etc/hooks (libvirtd scans them at start;
   * a SIGHUP while its drivers are still initializing is ignored).
   */
  beforeStart?: (dir: string, name: 'A' | 'B') => void;
}

async function startHost(base: string, name: 'A' | 'B', netns: string, addr: string, seedCacheFrom?: string, opts: StartOptions = {}): Promise<Host> {
  const dir = join(base, name);
  for (const sub of ['etc', 'run', 'lib', 'cache', 'log']) mkdirSync(join(dir, sub), { recursive: true });
  const c = configs(name, addr);
  writeFileSync(join(dir, 'etc', 'libvirtd.conf'), c.libvirtd);
  writeFileSync(join(dir, 'etc', 'qemu.conf'), c.qemu);
  opts.beforeStart?.(dir, name);
  if (seedCacheFrom) {
    // QEMU capabilities probing (TCG) takes seconds; B reuses A's cache (libvirt re-probes
    // if QEMU, libvirt or the kernel differ, which they do not).
    const from = join(seedCacheFrom, 'qemu', 'capabilities');
    if (existsSync(from)) {
      mkdirSync(join(dir, 'cache', 'qemu', 'capabilities'), { recursive: true });
      for (const f of readdirSync(from)) copyFileSync(join(from, f), join(dir, 'cache', 'qemu', 'capabilities', f));
    }
  }
  const logFd = openSync(join(dir, 'daemon.out'), 'a');
  const proc = spawn('ip', ['netns', 'exec', netns, join(here, 'host-init.sh'), dir], { stdio: ['ignore', logFd, logFd], detached: false });
  closeSync(logFd);
  let exitInfo: string | undefined;
  const exited = new Promise<void>((resolve) =>
    proc.on('exit', (code, sig) => {
      exitInfo = `libvirtd ${name} exited (${code ?? sig}): ${readTail(join(dir, 'daemon.out'))}`;
      resolve();
    }),
  );
  const sock = join(dir, 'run', 'libvirt-sock');
  await waitFor(`libvirtd ${name} socket`, () => existsSync(sock), 30_000, { dead: () => exitInfo });
  return { name, netns, dir, addr, uri: `qemu+unix:///system?socket=${sock}`, proc, exited };
}

function readTail(file: string): string {
  try {
    return readFileSync(file, 'utf8').slice(-2000).trim();
  } catch {
    return '';
  }
}

const BASE_PREFIX = 'vfio-mig-lv-';

interface Owner {
  pid: number;
  netns: string[];
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

function cmdlineHas(pid: number, what: string): boolean {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(what);
  } catch {
    return false;
  }
}

/**
 * Tears down one rig by what is recorded under `base`: QEMUs (run/qemu/*.pid), then the
 * daemons (libvirtd.pid, SIGTERM, SIGKILL after 10 s), the namespaces, the directory.
 * Every pid is checked against its /proc cmdline first: a recycled pid is never signalled.
 */
export async function teardown(base: string, netns: string[]): Promise<void> {
  const daemons: number[] = [];
  for (const name of ['A', 'B']) {
    const qdir = join(base, name, 'run', 'qemu');
    for (const f of existsSync(qdir) ? readdirSync(qdir) : []) {
      if (!f.endsWith('.pid') || f === 'driver.pid') continue;
      const pid = pidFrom(join(qdir, f));
      if (pid && isQemu(pid)) process.kill(pid, 'SIGKILL');
    }
    const pid = pidFrom(join(base, name, 'libvirtd.pid'));
    if (pid && cmdlineHas(pid, join(base, name))) {
      process.kill(pid, 'SIGTERM');
      daemons.push(pid);
    }
  }
  const deadline = Date.now() + 10_000;
  while (daemons.some(alive) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  for (const pid of daemons) if (alive(pid) && cmdlineHas(pid, base)) process.kill(pid, 'SIGKILL');
  for (const ns of netns) {
    try {
      run('ip', ['netns', 'del', ns]);
    } catch {
      // not created, or already gone
    }
  }
  rmSync(base, { recursive: true, force: true });
}

/** Tears down rigs left behind by test processes that died (e.g. a crash skipped teardown). */
export async function reapStale(): Promise<string[]> {
  const reaped: string[] = [];
  for (const d of readdirSync(tmpdir())) {
    if (!d.startsWith(BASE_PREFIX)) continue;
    const base = join(tmpdir(), d);
    let owner: Owner;
    try {
      owner = JSON.parse(readFileSync(join(base, 'owner.json'), 'utf8')) as Owner;
    } catch {
      continue; // being created right now, or not ours
    }
    if (alive(owner.pid)) continue;
    await teardown(base, owner.netns.filter((n) => /^vml[0-9a-z]+[AB]$/.test(n)));
    reaped.push(base);
  }
  return reaped;
}

/** Starts both hosts; on failure everything started so far is torn down. */
export async function startHosts(opts: StartOptions = {}): Promise<Hosts> {
  await reapStale();
  const base = mkdtempSync(join(tmpdir(), BASE_PREFIX));
  // Unique per run: other sessions may run the same suite (interface names <= 15 chars).
  const tag = `vml${process.pid.toString(36)}`;
  const nsA = `${tag}A`;
  const nsB = `${tag}B`;
  writeFileSync(join(base, 'owner.json'), JSON.stringify({ pid: process.pid, netns: [nsA, nsB] } satisfies Owner));
  const started: Host[] = [];
  const stop = async (): Promise<void> => {
    await teardown(base, [nsA, nsB]);
    await Promise.all(started.map((h) => h.exited));
  };
  try {
    run('ip', ['netns', 'add', nsA]);
    run('ip', ['netns', 'add', nsB]);
    run('ip', ['link', 'add', `${tag}a0`, 'netns', nsA, 'type', 'veth', 'peer', 'name', `${tag}b0`, 'netns', nsB]);
    const link = [
      [nsA, `${tag}a0`, '10.77.77.1/30'],
      [nsB, `${tag}b0`, '10.77.77.2/30'],
    ] as const;
    for (const [ns, dev, cidr] of link) {
      run('ip', ['-n', ns, 'addr', 'add', cidr, 'dev', dev]);
      run('ip', ['-n', ns, 'link', 'set', dev, 'up']);
      run('ip', ['-n', ns, 'link', 'set', 'lo', 'up']);
    }
    const a = await startHost(base, 'A', nsA, '10.77.77.1', undefined, opts);
    started.push(a);
    // First contact probes QEMU's capabilities into A's cache, which B then starts from.
    run('virsh', ['-q', '-c', a.uri, 'version']);
    const b = await startHost(base, 'B', nsB, '10.77.77.2', join(base, 'A', 'cache'), opts);
    started.push(b);
    return { a, b, base, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

/** The smallest domain libvirt will run here: TCG, q35, 64 MiB, no disk, no NIC. */
export function tinyDomainXml(name: string): string {
  return `<domain type='qemu'>
  <name>${name}</name>
  <memory unit='MiB'>64</memory>
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
  </devices>
</domain>
`;
}
