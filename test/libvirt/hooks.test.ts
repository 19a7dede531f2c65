// The built qemu hook under two real libvirt 11.3 daemons (hosts A and B in their own
// network + mount namespaces, see hosts.ts), during real `virsh migrate --live` runs.
// Installed as each host sees it, /etc/libvirt/hooks/qemu.d/50-vfio-mig (a small wrapper
// that points the hook's state, log and host name at the host's own directory, then
// execs the built hooks/qemu of a throw-away install tree), in place before each
// libvirtd starts (libvirtd scans its hooks at start and on SIGHUP).
//
// What is real and what is not: the daemons, QEMU, the migration, the hook calls and
// the XML libvirt passes and takes back are real. The machine has no VFIO device (no
// IOMMU groups, no mdev), so the domains carry no hostdev: they carry vfio-mig metadata,
// which makes the hook act exactly as it does for hostdevs' metadata - it rewrites the
// metadata on the destination (the observable edit below), and refuses a domain whose
// metadata names a hostdev the domain does not have. Device remapping itself is tested
// on a fake sysfs (test/unit/hook-qemu.test.ts).
import test from 'ava';
import { execFile } from 'node:child_process';
import { chmodSync, mkdirSync, readFileSync, writeFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { DomainXml } from '../../src/libvirt/domain-xml.ts';
import { readMetadata, writeMetadata } from '../../src/compat/domain-metadata.ts';
import { makePrefix, type Prefix } from '../unit/hook-harness.ts';
import { cannotRun, startHosts, tinyDomainXml, type Host, type Hosts } from './hosts.ts';

const why = cannotRun();
let hosts: Hosts;
let prefix: Prefix;

if (why) {
  test('libvirt hook suite prerequisites', (t) => t.fail(`LIBVIRT SUITE CANNOT RUN: ${why}`));
} else {
  test.before(async () => {
    prefix = await makePrefix();
    // Installed before each libvirtd starts: it scans its hooks at start (and on SIGHUP,
    // which it ignores while its drivers are still initializing).
    hosts = await startHosts({ beforeStart: (dir, name) => installHook(dir, name) });
  });
  test.after.always(async () => {
    await hosts?.stop();
    prefix?.dispose();
  });
}
const stest = why ? test.skip : test.serial;

function installHook(hostDir: string, name: 'A' | 'B'): void {
  const dir = join(hostDir, 'etc', 'hooks', 'qemu.d');
  mkdirSync(dir, { recursive: true });
  const own = join(hostDir, 'vfio-mig');
  mkdirSync(own, { recursive: true });
  const wrapper = [
    '#!/bin/sh',
    `# vfio-mig qemu hook for test host ${name}: its own state, log and host name.`,
    `export VFIO_MIG_STATE_DIR='${own}/state' VFIO_MIG_LOG_DIR='${own}/log' VFIO_MIG_CONFIG='${own}/config.json' VFIO_MIG_HOST_NAME='host-${name}'`,
    `exec '${process.execPath}' '${prefix.hook}' "$@"`,
    '',
  ].join('\n');
  writeFileSync(join(dir, '50-vfio-mig'), wrapper);
  chmodSync(join(dir, '50-vfio-mig'), 0o755);
}

interface Run {
  code: number;
  stdout: string;
  stderr: string;
  ms: number;
}

function virsh(h: Host, args: string[], timeoutMs = 120_000): Promise<Run> {
  const t0 = Date.now();
  return new Promise((resolve) =>
    execFile('virsh', ['-q', '-c', h.uri, ...args], { encoding: 'utf8', timeout: timeoutMs }, (err, stdout, stderr) =>
      resolve({ code: err ? Number((err as { code?: number }).code ?? 1) : 0, stdout, stderr, ms: Date.now() - t0 }),
    ),
  );
}

function migrate(name: string, extra: string[] = []): Promise<Run> {
  return virsh(hosts.a, ['migrate', '--live', '--unsafe', ...extra, name, hosts.b.uri, '--migrateuri', `tcp://${hosts.b.addr}`]);
}

async function defineAndStart(h: Host, xml: string, name: string): Promise<void> {
  const file = join(hosts.base, `${name}.xml`);
  writeFileSync(file, xml);
  const def = await virsh(h, ['define', file]);
  if (def.code !== 0) throw new Error(`define ${name}: ${def.stderr}`);
  const start = await virsh(h, ['start', name]);
  if (start.code !== 0) throw new Error(`start ${name}: ${start.stderr}`);
}

function withMetadata(name: string, hostdevs: Parameters<typeof writeMetadata>[1]['hostdevs']): string {
  const doc = DomainXml.parse(tinyDomainXml(name));
  writeMetadata(doc, { host: 'host-A', hostdevs });
  return doc.serialize();
}

function hookLog(h: Host): Array<Record<string, unknown>> {
  const f = join(h.dir, 'vfio-mig', 'log', 'hooks.log');
  return existsSync(f) ? readFileSync(f, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>) : [];
}

stest("the destination's migrate hook rewrites the live XML of a migrating domain (vfio-mig metadata now names host B); the persistent definition keeps A's", async (t) => {
  await defineAndStart(hosts.a, withMetadata('vm-hook-md', []), 'vm-hook-md');
  const before = readMetadata(DomainXml.parse((await virsh(hosts.a, ['dumpxml', 'vm-hook-md'])).stdout))!;
  t.is(before.host, 'host-A');
  const m = await migrate('vm-hook-md', ['--persistent']);
  t.is(m.code, 0, m.stderr);
  t.log(`virsh migrate --live --persistent with the hook on both hosts: ${m.ms} ms`);
  t.is((await virsh(hosts.b, ['domstate', 'vm-hook-md'])).stdout.trim(), 'running');
  const live = (await virsh(hosts.b, ['dumpxml', 'vm-hook-md'])).stdout;
  t.is(readMetadata(DomainXml.parse(live))!.host, 'host-B', 'the hook output replaced the live XML');
  t.regex(live, /https:\/\/vfio-mig\.org\/xmlns\/domain\/1/);
  // libvirt passes only the live definition through the hook (spec/libvirt-rig.md): the
  // persistent one that travelled with --persistent still says host-A. The hook warns of
  // exactly this for remapped hostdevs.
  const inactive = (await virsh(hosts.b, ['dumpxml', '--inactive', 'vm-hook-md'])).stdout;
  t.is(readMetadata(DomainXml.parse(inactive))!.host, 'host-A');
  const log = hookLog(hosts.b).filter((e) => e.domain === 'vm-hook-md');
  t.true(log.some((e) => e.operation === 'migrate' && e.event === 'rewritten' && e.fromHost === 'host-A'), JSON.stringify(log));
  const qemuLog = join(hosts.b.dir, 'log', 'qemu', 'vm-hook-md.log');
  if (existsSync(qemuLog)) t.regex(readFileSync(qemuLog, 'utf8'), /hook-script/, 'libvirt marks a domain whose migrate hook changed its XML');
  // Source side: release end migrated ran there (nothing reserved, nothing to do) without a complaint.
  t.is((await virsh(hosts.a, ['domstate', 'vm-hook-md'])).stdout.trim(), 'shut off');
  await virsh(hosts.b, ['destroy', 'vm-hook-md']);
});

stest('a domain the hook has nothing to do with migrates untouched (no hook output, no hook-script taint on B)', async (t) => {
  await defineAndStart(hosts.a, tinyDomainXml('vm-hook-plain'), 'vm-hook-plain');
  const m = await migrate('vm-hook-plain');
  t.is(m.code, 0, m.stderr);
  t.is((await virsh(hosts.b, ['domstate', 'vm-hook-plain'])).stdout.trim(), 'running');
  const live = (await virsh(hosts.b, ['dumpxml', 'vm-hook-plain'])).stdout;
  t.false(live.includes('vfio-mig'));
  const qemuLog = join(hosts.b.dir, 'log', 'qemu', 'vm-hook-plain.log');
  if (existsSync(qemuLog)) t.notRegex(readFileSync(qemuLog, 'utf8'), /hook-script/, 'libvirt taints a domain whose migrate hook printed XML');
  t.false(hookLog(hosts.b).some((e) => e.domain === 'vm-hook-plain'));
  await virsh(hosts.b, ['destroy', 'vm-hook-plain']);
});

stest('a refusing migrate hook aborts virsh migrate with our one line; the source keeps running', async (t) => {
  const xml = withMetadata('vm-hook-refuse', [
    { alias: 'hostdev0', type: 'pci', address: '0000:3b:00.2', descriptor: { schema: 1, id: '0000:3b:00.2', kind: 'pci', vendor: '15b3', device: '101e' } },
  ]);
  await defineAndStart(hosts.a, xml, 'vm-hook-refuse');
  const m = await migrate('vm-hook-refuse');
  t.not(m.code, 0);
  t.log(m.stderr.trim());
  t.regex(m.stderr, /Hook script execution failed/);
  t.regex(m.stderr, /vfio-mig qemu hook: "vm-hook-refuse" migrate: the vfio-mig metadata lists hostdev hostdev0 \(pci 0000:3b:00\.2\) but the domain has no such hostdev: the XML is stale; migrate with the XML written by "vfio-mig preflight <domain> --to <destination> --print-xml FILE"/);
  t.is((await virsh(hosts.a, ['domstate', 'vm-hook-refuse'])).stdout.trim(), 'running', 'the source keeps running');
  const onB = await virsh(hosts.b, ['domstate', 'vm-hook-refuse']);
  t.not(onB.code, 0, 'nothing was left on the destination');
  // And the domain still migrates once its metadata is right (here: none).
  await virsh(hosts.a, ['destroy', 'vm-hook-refuse']);
});
