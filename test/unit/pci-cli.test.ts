// `vfio-mig drivers | bind | unbind` and the libvirt daemon hook on a fake host.
import test from 'ava';
import { PassThrough } from 'node:stream';
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { installFakeSysfs } from '../fake/sysfs.ts';
import { bigAliasFile } from '../fake/sysfs-aliases.ts';
import { runCli as run } from '../cli-harness.ts';
import { daemonHook, type RunResult } from '../../src/hooks/daemon.ts';

const fake = installFakeSysfs(test);
fake.addBuiltinDriver({ name: 'pcieport', ids: [{ classPrefix: '0604' }] });
fake.addModule('vfio_pci', [{ name: 'vfio-pci' }]);
fake.addModule('edu_vfio_pci', [{ name: 'edu-vfio-pci' }]);
fake.addModule('ixgbe', [{ name: 'ixgbe', ids: [{ vendor: '8086', device: '10fb' }] }], { loaded: true });
fake.addDevice({ bdf: '0000:00:10.0', vendor: '1b36', device: '000c', class: '060400', group: 3, driver: 'pcieport' });
fake.addDevice({ bdf: '0000:01:00.0', vendor: '1234', device: '11e8', subsystemVendor: '1af4', subsystemDevice: '1100', class: '00ff00', group: 8 });
fake.addDevice({ bdf: '0000:02:00.0', vendor: '1234', device: '11e8', subsystemVendor: '1af4', subsystemDevice: '1100', class: '00ff00', group: 9 });
fake.addDevice({ bdf: '0000:05:00.0', vendor: '8086', device: '10fb', class: '020000', group: 40, driver: 'ixgbe' });
fake.writeAliases(bigAliasFile());

test.serial('drivers --json: every device with current, chosen and why', async (t) => {
  const { code, out } = await run(['drivers', '--json']);
  t.is(code, 0);
  const rows = JSON.parse(out) as Array<Record<string, unknown>>;
  t.deepEqual(rows.map((r) => r.address), ['0000:00:10.0', '0000:01:00.0', '0000:02:00.0', '0000:05:00.0']);
  t.like(rows[1], { address: '0000:01:00.0', vendor: '1234', device: '11e8', current: null, chosen: 'edu-vfio-pci', module: 'edu_vfio_pci', reason: 'alias', iommuGroup: 8, managed: false });
  t.like(rows[3], { vendor: '8086', device: '10fb', current: 'ixgbe', chosen: null, reason: 'none' });
  const table = await run(['drivers']);
  t.regex(table.out, /^ADDRESS\s+IDS\s+CLASS\s+GROUP\s+CURRENT\s+CHOSEN\s+REASON/);
  t.regex(table.out, /0000:01:00\.0\s+1234:11e8\s+00ff00\s+8\s+-\s+edu-vfio-pci\s+alias: modules\.alias: vfio_pci:v00001234d000011E8sv\*sd\*bc\*sc\*i\* edu_vfio_pci/);
});

test.serial('bind --dry-run, bind, drivers (managed), unbind; exit codes', async (t) => {
  const dry = await run(['bind', '--all', '--dry-run']);
  t.is(dry.code, 0);
  t.regex(dry.out, /0000:01:00\.0\s+would-bind\s+- -> edu-vfio-pci\s+modules\.alias: .*; modprobe edu_vfio_pci, driver_override=edu-vfio-pci, drivers_probe/);
  t.regex(dry.out, /2 would-bind, 2 skipped/);
  t.is(fake.driverOf('0000:01:00.0'), undefined);

  const b = await run(['bind', '--all', '--json']);
  t.is(b.code, 0, b.err);
  const report = JSON.parse(b.out) as { ok: boolean; results: Array<Record<string, unknown>> };
  t.true(report.ok);
  t.like(report.results.find((r) => r.address === '0000:02:00.0'), { action: 'bound', current: 'edu-vfio-pci' });
  t.is(fake.driverOf('0000:02:00.0'), 'edu-vfio-pci');

  const listed = await run(['drivers']);
  t.regex(listed.out, /0000:01:00\.0\s+1234:11e8\s+00ff00\s+8\s+edu-vfio-pci\*/);

  const one = await run(['unbind', '--device', '0000:01:00.0']);
  t.is(one.code, 0);
  t.regex(one.out, /0000:01:00\.0\s+restored\s+edu-vfio-pci -> -/);
  t.is(fake.driverOf('0000:01:00.0'), undefined);
  t.is(fake.driverOf('0000:02:00.0'), 'edu-vfio-pci');

  const rest = await run(['unbind', '--json']);
  t.like(JSON.parse(rest.out), { ok: true, results: [{ address: '0000:02:00.0', action: 'restored' }] });
  t.regex((await run(['unbind'])).out, /nothing to restore/);
});

test.serial('usage and config errors: exit 2 / exit 1 with one clear message', async (t) => {
  let r = await run(['bind']);
  t.is(r.code, 2);
  t.regex(r.err, /give --all or --device BDF\nusage: vfio-mig bind/);
  r = await run(['bind', '--all', '--device', '0000:01:00.0']);
  t.is(r.code, 2);
  r = await run(['bind', '--device', '0000:01:00.0;reboot']);
  t.is(r.code, 1);
  t.regex(r.err, /invalid PCI address "0000:01:00\.0;reboot"/);
  r = await run(['drivers', 'extra']);
  t.is(r.code, 2);
  fake.writeConfig('{"version": 1, "rules": [{"vendor": "1234", "device": "11e8"}]}');
  r = await run(['bind', '--all']);
  t.is(r.code, 1);
  t.regex(r.err, /^vfio-mig bind: config .*config\.json:1:26: rules\[0\]: needs exactly one of "driver", "exclude"/);
  r = await run(['drivers']);
  t.is(r.code, 1, 'drivers reports a broken table too');
  fake.removeConfig();
  r = await run(['bind', '--device', '0000:05:00.0']);
  t.is(r.code, 0);
  t.regex(r.out, /0000:05:00\.0\s+skipped\s+ixgbe\s+none: no rule/);
});

// --- the daemon hook ---------------------------------------------------------------------

function inProcess(calls: string[][]) {
  return async (args: string[]): Promise<RunResult> => {
    calls.push(args);
    const r = await run(args);
    return { code: r.code, stdout: r.out, stderr: r.err, timedOut: false };
  };
}

function sink() {
  const s = new PassThrough();
  let text = '';
  s.on('data', (c) => (text += c));
  return { s, text: () => text };
}

test.serial('daemon hook: start binds everything; other operations do nothing', async (t) => {
  const calls: string[][] = [];
  const err = sink();
  t.is(await daemonHook(['-', 'shutdown', '-', 'shutdown'], err.s, { run: inProcess(calls) }), 0);
  t.is(await daemonHook(['-', 'reload', 'begin', 'SIGHUP'], err.s, { run: inProcess(calls) }), 0);
  t.deepEqual(calls, []);
  const code = await daemonHook(['-', 'start', '-', 'start'], err.s, { run: inProcess(calls) });
  t.is(code, 0, err.text());
  t.deepEqual(calls, [['bind', '--all', '--json']]);
  t.is(err.text(), '', 'silent on success');
  t.is(fake.driverOf('0000:01:00.0'), 'edu-vfio-pci');
  t.is((await run(['unbind'])).code, 0);
});

test.serial('daemon hook: failures and overruns are one line on stderr and a non-zero exit', async (t) => {
  const err = sink();
  fake.writeConfig({ version: 1, rules: [{ vendor: '1234', device: '11e8', driver: 'nosuch_vfio_pci' }] });
  t.is(await daemonHook(['-', 'start', '-', 'start'], err.s, { run: inProcess([]) }), 1);
  t.regex(err.text(), /^vfio-mig daemon hook: bind --all: 2 failed, 0 refused; first: modprobe nosuch_vfio_pci for 0000:01:00\.0 failed: .*\n$/);
  fake.removeConfig();

  const slow = sink();
  const never = () => new Promise<RunResult>(() => undefined);
  t.is(await daemonHook(['-', 'start', '-', 'start'], slow.s, { run: never, timeoutMs: 50 }), 1);
  t.regex(slow.text(), /did not finish within 0 s and was stopped/);

  const bad = sink();
  t.is(await daemonHook(['$(reboot)', 'start'], bad.s, { run: inProcess([]) }), 2);
  t.regex(bad.text(), /unexpected arguments/);
  t.is(bad.text().split('\n').length, 2, 'exactly one line');
});

const shim = fileURLToPath(new URL('../../hooks/daemon', import.meta.url));

function runShim(args: string[], env: Record<string, string>): Promise<{ code: number; stderr: string; ms: number }> {
  const t0 = Date.now();
  return new Promise((resolve) => {
    execFile(shim, args, { env: { ...process.env, ...env }, encoding: 'utf8', timeout: 60_000 }, (err, _out, stderr) => {
      resolve({ code: err ? Number((err as { code?: number }).code ?? 1) : 0, stderr, ms: Date.now() - t0 });
    });
  });
}

test.serial('the installed shim: lean for shutdown, runs the real child for start', async (t) => {
  const empty = mkdtempSync(join(tmpdir(), 'vfio-mig-hookhost-'));
  t.teardown(() => rmSync(empty, { recursive: true, force: true }));
  const env = { VFIO_MIG_SYSFS: join(empty, 'sys'), VFIO_MIG_STATE_DIR: join(empty, 'state'), VFIO_MIG_CONFIG: join(empty, 'config.json'), VFIO_MIG_MODULES_DIR: empty };
  const down = await runShim(['-', 'shutdown', '-', 'shutdown'], env);
  t.is(down.code, 0);
  t.is(down.stderr, '');
  const up = await runShim(['-', 'start', '-', 'start'], env);
  t.is(up.code, 0, up.stderr);
  t.log(`shim: shutdown ${down.ms} ms, start (empty host) ${up.ms} ms`);
  writeFileSync(join(empty, 'config.json'), '{"version": 1, "rules": [}');
  const broken = await runShim(['-', 'start', '-', 'start'], env);
  t.is(broken.code, 1);
  t.regex(broken.stderr, /^vfio-mig daemon hook: bind --all failed: vfio-mig bind: config .*config\.json:1:26: invalid JSON/);
  t.is(broken.stderr.trim().split('\n').length, 1);
});
