// QEMU's `switchover-ack` capability under two real libvirt 11.3 daemons (hosts A and B,
// see hosts.ts). libvirt does not know the capability; the question is whether it can be
// turned on beside libvirt and survive libvirt's own migrate-set-capabilities on both
// ends, and when the destination can be reached. Each domain has an extra QMP socket
// (<qemu:commandline> -qmp unix:...,server=on,wait=off; the XML travels, so B's QEMU gets
// one too). The domains have no VFIO device, which is enough for the capability interplay
// (no device asks for an ack, so the destination acks at once).
//
// Observed here: libvirtd's own monitor traffic (debug log), hook timestamps on B, and the
// capabilities/status of both QEMUs sampled through the extra sockets during the migration.
import test, { type ExecutionContext } from 'ava';
import { execFile, execFileSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cannotRun, startHosts, tinyDomainXml, type Host, type Hosts } from './hosts.ts';
import { QmpClient } from '../../src/qmp/client.ts';
import { queryMigrate, queryMigrateCapabilities } from '../../src/qmp/commands.ts';
import { armDestination, enableOnSource } from '../../src/migration/switchover-ack.ts';

const why = cannotRun();
let hosts: Hosts;

if (why) {
  test('libvirt switchover-ack suite prerequisites', (t) => t.fail(`LIBVIRT SUITE CANNOT RUN: ${why}`));
} else {
  test.before(async () => {
    hosts = await startHosts({ beforeStart: (dir, name) => prepareHost(dir, name) });
  });
  test.after.always(async () => {
    if (process.env.SWACK_KEEP_LOGS) for (const h of [hosts?.a, hosts?.b]) if (h) execFileSync('cp', [join(h.dir, 'log', 'libvirtd.log'), join(process.env.SWACK_KEEP_LOGS, `libvirtd-${h.name}.log`)]);
    await hosts?.stop();
  });
}
const stest = why ? test.skip : test.serial;

/** Monitor traffic in libvirtd's log, and a qemu hook on B that only records when it ran. */
function prepareHost(dir: string, name: 'A' | 'B'): void {
  const conf = join(dir, 'etc', 'libvirtd.conf');
  writeFileSync(conf, readFileSync(conf, 'utf8').replace(/^log_filters = .*$/m, 'log_filters = "1:qemu.qemu_migration 1:qemu.qemu_monitor 3:*"'));
  if (name !== 'B') return;
  mkdirSync(join(dir, 'etc', 'hooks'), { recursive: true });
  const hook = join(dir, 'etc', 'hooks', 'qemu');
  // $1 domain, $2 operation, $3 sub-operation; the XML on stdin is read and dropped (empty
  // stdout leaves `migrate`'s XML unchanged). It notes whether the extra socket exists yet.
  writeFileSync(
    hook,
    ['#!/bin/sh', 'cat >/dev/null', `s=/var/lib/libvirt/qemu/$1.extra.qmp`, `[ -S "$s" ] && e=1 || e=0`, `echo "$(date +%s%3N) $2 $3 socket=$e" >> '${join(dir, 'hook-times.log')}'`, 'exit 0', ''].join('\n'),
  );
  chmodSync(hook, 0o755);
}

/** The extra QMP socket as QEMU (in the host's mount namespace) sees it, and from here. */
const insidePath = (dom: string): string => `/var/lib/libvirt/qemu/${dom}.extra.qmp`;
const outsidePath = (h: Host, dom: string): string => join(h.dir, 'lib', 'qemu', `${dom}.extra.qmp`);

function domainXml(name: string, extraArgs: string[] = []): string {
  const args = ['-qmp', `unix:${insidePath(name)},server=on,wait=off`, ...extraArgs].map((a) => `    <qemu:arg value='${a}'/>`).join('\n');
  return tinyDomainXml(name)
    .replace("<domain type='qemu'>", "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>")
    .replace('</domain>', `  <qemu:commandline>\n${args}\n  </qemu:commandline>\n</domain>`);
}

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

function virsh(h: Host, args: string[], timeoutMs = 180_000): Promise<Run> {
  return new Promise((resolve) =>
    execFile('virsh', ['-q', '-c', h.uri, ...args], { encoding: 'utf8', timeout: timeoutMs }, (err, stdout, stderr) =>
      resolve({ code: err ? Number((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    ),
  );
}

async function defineAndStart(h: Host, name: string, xml: string): Promise<void> {
  const file = join(hosts.base, `${name}.xml`);
  writeFileSync(file, xml);
  for (const args of [['define', file], ['start', name]]) {
    const r = await virsh(h, args);
    if (r.code !== 0) throw new Error(`virsh ${args[0]} ${name}: ${r.stderr}`);
  }
}

/** libvirtd's migrate-set-capabilities / migrate-incoming / migrate commands for `dom`, with their log times (ms). */
function monitorLog(h: Host): Array<{ at: number; line: string }> {
  const f = join(h.dir, 'log', 'libvirtd.log');
  if (!existsSync(f)) return [];
  const out: Array<{ at: number; line: string }> = [];
  for (const line of readFileSync(f, 'utf8').split('\n')) {
    const m = /^(\S+ \S+): .*(?:Send command '|QEMU_MONITOR_SEND_MSG: mon=\S+ msg=)(\{"execute":"(?:migrate-set-capabilities|migrate-incoming|migrate|migrate-continue)".*?"id":"libvirt-\d+"\})/.exec(line);
    if (!m) continue;
    out.push({ at: Date.parse(m[1]!.replace(' ', 'T').replace(/([+-]\d\d)(\d\d)$/, '$1:$2')), line: m[2]! });
  }
  return out;
}

const enabled = async (q: QmpClient): Promise<string[]> => (await queryMigrateCapabilities(q)).filter((c) => c.state).map((c) => c.capability).sort();

interface Sample {
  at: number;
  status: string;
  swack: boolean;
  rp: boolean;
}

/** Samples one QEMU's migration status and the two capabilities every 20 ms until stopped. */
function sampler(q: QmpClient): { stop(): Promise<Sample[]> } {
  const out: Sample[] = [];
  let on = true;
  const loop = (async () => {
    while (on) {
      try {
        const caps = await enabled(q);
        out.push({ at: Date.now(), status: (await queryMigrate(q)).status ?? 'none', swack: caps.includes('switchover-ack'), rp: caps.includes('return-path') });
      } catch {
        return; // the QEMU is gone (the source after a completed migration)
      }
      await new Promise((r) => setTimeout(r, 20));
    }
  })();
  return {
    async stop() {
      on = false;
      await loop;
      return out;
    },
  };
}

/** Changes only: "+t ms status swack=.. rp=..". */
function transitions(samples: Sample[], t0: number): string {
  const keep = samples.filter((s, i) => i === 0 || s.status !== samples[i - 1]!.status || s.swack !== samples[i - 1]!.swack || s.rp !== samples[i - 1]!.rp);
  return keep.map((s) => `+${s.at - t0} ${s.status} swack=${s.swack ? 1 : 0} rp=${s.rp ? 1 : 0}`).join(' | ');
}

interface Observed {
  code: number;
  stderr: string;
  a: Sample[];
  b: Sample[];
  t0: number;
}

/**
 * Migrates `dom` A -> B with `virsh migrate --live`, sampling both QEMUs through their extra
 * sockets. `source`/`destination`: whether switchover-ack is set there through this module
 * (else the socket is only watched).
 */
async function observe(t: ExecutionContext, dom: string, o: { source: boolean; destination: boolean; virshArgs?: string[] }): Promise<Observed> {
  await defineAndStart(hosts.a, dom, domainXml(dom));
  const t0 = Date.now();
  const qa = o.source ? (await enableOnSource({ path: outsidePath(hosts.a, dom) })).qmp : await QmpClient.connect({ path: outsidePath(hosts.a, dom) }, { connectTimeoutMs: 30_000 });
  const sa = sampler(qa);
  let armedErr: unknown;
  const bConn = (async (): Promise<QmpClient> => {
    if (o.destination) {
      const armed = await armDestination({ path: outsidePath(hosts.b, dom) }, { timeoutMs: 120_000 }).ready;
      t.log(`B armed: socket accepted at +${armed.socketSeenAt - t0} ms, caps confirmed at +${armed.setAt - t0} ms, incoming status before: ${armed.incomingStatus}`);
      return armed.qmp;
    }
    const p = outsidePath(hosts.b, dom);
    while (!existsSync(p)) await new Promise((r) => setTimeout(r, 10));
    return QmpClient.connect({ path: p }, { connectTimeoutMs: 30_000 });
  })().catch((err: unknown) => {
    armedErr = err;
    return undefined;
  });
  const mig = virsh(hosts.a, o.virshArgs ? [...o.virshArgs, dom, hosts.b.uri] : ['migrate', '--live', '--unsafe', dom, hosts.b.uri, '--migrateuri', `tcp://${hosts.b.addr}`]);
  const qb = await bConn;
  const sb = qb ? sampler(qb) : undefined;
  const m = await mig;
  const a = await sa.stop();
  const b = sb ? await sb.stop() : [];
  if (armedErr) t.log(`B not armed: ${armedErr instanceof Error ? armedErr.message : String(armedErr)}`);
  t.log(`virsh: exit ${m.code} ${m.stderr.trim()}`);
  t.log(`A: ${transitions(a, t0)}`);
  t.log(`B: ${transitions(b, t0)}`);
  for (const [h, label] of [[hosts.a, 'A'], [hosts.b, 'B']] as const) {
    for (const e of monitorLog(h).filter((x) => x.at >= t0 - 500)) t.log(`${label} libvirt +${e.at - t0}: ${e.line}`);
  }
  const hookFile = join(hosts.b.dir, 'hook-times.log');
  for (const l of existsSync(hookFile) ? readFileSync(hookFile, 'utf8').trim().split('\n') : []) {
    const [at, ...rest] = l.split(' ');
    if (Number(at) >= t0) t.log(`B hook +${Number(at) - t0}: ${rest.join(' ')}`);
  }
  await qa.close();
  await qb?.close();
  return { code: m.code, stderr: m.stderr, a, b, t0 };
}

/** The samples taken while the migration ran (status active / pre-switchover / device). */
// While a migration runs on that QEMU: from its `setup` (libvirt has set the capabilities by
// then, on both ends) to its end. A tiny domain migrates within ~100 ms, so a 20 ms sampler
// may see only `setup` on the destination or only `pre-switchover` on the source.
const during = (s: Sample[]): Sample[] => s.filter((x) => ['setup', 'active', 'pre-switchover', 'device'].includes(x.status));

/** libvirt's own migrate-set-capabilities on one host since t0, parsed. */
function libvirtCaps(h: Host, t0: number): Array<Record<string, boolean>> {
  return monitorLog(h)
    .filter((e) => e.at >= t0 - 500 && e.line.startsWith('{"execute":"migrate-set-capabilities"'))
    .map((e) => {
      const caps = (JSON.parse(e.line) as { arguments: { capabilities: Array<{ capability: string; state: boolean }> } }).arguments.capabilities;
      return Object.fromEntries(caps.map((c) => [c.capability, c.state]));
    });
}

stest('libvirt 11.3 alone turns switchover-ack + return-path on at both ends of a plain live migration (and off again on the destination afterwards)', async (t) => {
  const dom = 'vm-swack-control';
  const r = await observe(t, dom, { source: false, destination: false });
  t.is(r.code, 0, r.stderr);
  t.true(during(r.a).length > 0 && during(r.b).length > 0, 'both ends were sampled during the migration');
  t.true(during(r.a).every((s) => s.swack && s.rp), 'A: on while migrating');
  t.true(during(r.b).every((s) => s.swack && s.rp), 'B: on while migrating');
  // What libvirt itself sent: on the source once (Perform), on the destination three times
  // (events at QEMU start, the migration set before migrate-incoming, the reset after it).
  const a = libvirtCaps(hosts.a, r.t0);
  const b = libvirtCaps(hosts.b, r.t0);
  t.true(a.some((c) => c['switchover-ack'] === true && c['return-path'] === true && c['pause-before-switchover'] === true), JSON.stringify(a));
  t.true(b.some((c) => c['switchover-ack'] === true && c['return-path'] === true && c['late-block-activate'] === true), JSON.stringify(b));
  t.is(b.at(-1)?.['switchover-ack'], false, 'the reset after the migration turns it off on the destination');
  await virsh(hosts.b, ['destroy', dom]);
});

stest('enableOnSource + armDestination through the extra sockets: accepted before libvirt acts, still on while migrating, the migration completes', async (t) => {
  const dom = 'vm-swack-both';
  const r = await observe(t, dom, { source: true, destination: true });
  t.is(r.code, 0, r.stderr);
  t.true(during(r.a).length > 0 && during(r.b).length > 0);
  t.true(during(r.a).every((s) => s.swack && s.rp));
  t.true(during(r.b).every((s) => s.swack && s.rp));
  // Armed before libvirt's migrate-incoming: the first B sample (taken right after arming) is "none" with the caps on.
  t.is(r.b[0]?.status, 'none');
  t.true(r.b[0]?.swack);
  t.is((await virsh(hosts.b, ['domstate', dom])).stdout.trim(), 'running');
  await virsh(hosts.b, ['destroy', dom]);
});

stest('tunnelled (--p2p --tunnelled): libvirt sends return-path and switchover-ack off, overriding what was set through the extra socket; the migration completes without it', async (t) => {
  const dom = 'vm-swack-tunnel';
  const r = await observe(t, dom, { source: true, destination: false, virshArgs: ['migrate', '--live', '--unsafe', '--p2p', '--tunnelled'] });
  t.is(r.code, 0, r.stderr);
  const a = libvirtCaps(hosts.a, r.t0);
  t.true(a.length > 0 && a.every((c) => c['switchover-ack'] === false && c['return-path'] === false), JSON.stringify(a));
  t.true(during(r.a).length > 0 && during(r.a).every((s) => !s.swack), 'A: off while migrating');
  await virsh(hosts.b, ['destroy', dom]);
});
