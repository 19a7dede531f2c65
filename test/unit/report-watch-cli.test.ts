// `vfio-mig watch` and `vfio-mig report` end to end without QEMU: two fake QMP servers replay
// a real recording (test/fixtures/timelines/) - the events with QEMU's timestamps, and
// query-migrate's answers - to a real `watch`, which must record the same thing and reach
// the same verdict and exit code; plus the usage errors, and `report` on files.

import test, { type ExecutionContext } from 'ava';
import net from 'node:net';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { XMLValidator } from 'fast-xml-parser';
import { main } from '../../src/cli/main.ts';
import type { Analysis } from '../../src/report/analysis.ts';
import type { SideRecord, WatchRecord } from '../../src/report/timeline.ts';

const FIXTURES = join(dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'timelines');
const load = (name: string): WatchRecord => JSON.parse(readFileSync(join(FIXTURES, name), 'utf8')) as WatchRecord;

function tmp(t: ExecutionContext): string {
  const dir = mkdtempSync(join(tmpdir(), 'vfio-mig-watch-unit-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function sink(): { stream: NodeJS.WritableStream; text: () => string } {
  const chunks: string[] = [];
  return { stream: { write: (c: string) => (chunks.push(String(c)), true) } as unknown as NodeJS.WritableStream, text: () => chunks.join('') };
}

/**
 * A QMP server that plays one side of a recording: before `go()` query-migrate says
 * nothing happened; after it, the recorded events are sent in order and query-migrate
 * returns the recorded final answer. `closeAfter` ends the connection after the events
 * (the destination QEMU exits after a failed load).
 */
async function replayServer(t: ExecutionContext, path: string, side: SideRecord, opts: { closeAfter?: boolean } = {}): Promise<{ go: () => void; commands: string[] }> {
  const commands: string[] = [];
  let started = false;
  let conn: net.Socket | undefined;
  const send = (o: unknown): void => void conn?.write(`${JSON.stringify(o)}\n`);
  const server = net.createServer((c) => {
    conn = c;
    send({ QMP: { version: { qemu: { major: 10, minor: 0, micro: 2 }, package: '' }, capabilities: [] } });
    let buf = '';
    c.on('data', (d) => {
      buf += d.toString();
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (!line.trim()) continue;
        const cmd = JSON.parse(line) as { execute: string; id?: unknown; arguments?: Record<string, unknown> };
        commands.push(cmd.execute);
        const ret = (value: unknown): void => send({ return: value, id: cmd.id });
        switch (cmd.execute) {
          case 'query-status':
            ret({ status: side.initialStatus ?? 'running', running: side.initialStatus === 'running' });
            break;
          case 'qom-list':
            ret((side.devices ?? []).map((d) => ({ name: d.id, type: 'child<vfio-pci>' })));
            break;
          case 'qom-get': {
            const id = String(cmd.arguments?.path).split('/').at(-1);
            const dev = side.devices?.find((d) => d.id === id);
            const prop = cmd.arguments?.property;
            if (prop === 'sysfsdev') ret(dev?.host?.startsWith('/sys/bus/mdev') ? dev.host : '');
            else if (prop === 'host') ret(dev?.host?.startsWith('/sys/bus/pci') ? dev.host.split('/').at(-1) : '');
            else if (prop === 'migration-events') ret(true);
            else send({ error: { class: 'GenericError', desc: 'no such property' }, id: cmd.id });
            break;
          }
          case 'query-migrate-capabilities':
            ret([{ capability: 'events', state: true }]);
            break;
          case 'query-migrate':
            ret(started ? side.migrate : {});
            break;
          default:
            ret({});
        }
      }
    });
    c.on('error', () => undefined);
  });
  await new Promise<void>((r) => server.listen(path, r));
  t.teardown(() => new Promise<void>((r) => server.close(() => r())));
  return {
    commands,
    go: () => {
      for (const e of side.events) send({ event: e.event, data: e.data, timestamp: e.timestamp });
      started = true;
      if (opts.closeAfter) setTimeout(() => conn?.destroy(), 20);
    },
  };
}

async function replay(t: ExecutionContext, rec: WatchRecord, opts: { closeDest?: boolean } = {}): Promise<{ code: number; analysis: Analysis; stderr: string; record: WatchRecord }> {
  const dir = tmp(t);
  const sp = join(dir, 's.qmp');
  const dp = join(dir, 'd.qmp');
  const s = await replayServer(t, sp, rec.source);
  const d = await replayServer(t, dp, rec.destination, { closeAfter: opts.closeDest ?? false });
  const out = sink();
  const err = sink();
  const file = join(dir, 'tl.json');
  const running = main(['watch', '--source-qmp', sp, '--dest-qmp', dp, '--json', '--timeout', '20', '--settle', '1', '--timeline', file], out.stream, err.stream);
  // Start the "migration" once the watch says it is watching.
  for (let i = 0; i < 400 && !/watching/.test(err.text()); i++) await new Promise((r) => setTimeout(r, 10));
  t.regex(err.text(), /^vfio-mig watch: watching /);
  d.go();
  s.go();
  const code = await running;
  return { code, analysis: JSON.parse(out.text()) as Analysis, stderr: err.text(), record: JSON.parse(readFileSync(file, 'utf8')) as WatchRecord };
}

test('watch replaying a real two-mtty migration: ok, downtime, devices and sequences, the same timeline recorded', async (t) => {
  const rec = load('mtty-x2.json');
  const r = await replay(t, rec);
  t.is(r.code, 0, r.stderr);
  t.is(r.analysis.verdict, 'ok');
  t.is(r.analysis.status, 'completed');
  t.is(r.analysis.downtimeMs, 155);
  t.deepEqual(
    r.analysis.devices.map((d) => [d.id, d.host, d.source, d.destination]),
    ['dev0', 'dev1'].map((id, i) => [id, `/sys/bus/mdev/devices/83b8f4f2-509f-382f-3c1e-e6bfe0fa000${i + 1}`, ['pre-copy', 'pre-copy-p2p', 'stop-copy', 'stop'], ['resuming', 'running-p2p', 'running']]),
  );
  for (const side of ['source', 'destination'] as const) {
    t.deepEqual(
      r.record[side].events.map((e) => [e.event, e.data, e.timestamp]),
      rec[side].events.map((e) => [e.event, e.data, e.timestamp]),
    );
  }
});

test('watch replaying a doctored recording (order broken): violated, exit 5', async (t) => {
  const rec = load('mtty-x2.json');
  const ev = rec.source.events;
  const i = ev.findIndex((e) => e.event === 'VFIO_MIGRATION' && e.data['device-id'] === 'dev1' && e.data['device-state'] === 'stop-copy');
  const [moved] = ev.splice(i, 1);
  ev.splice(ev.findIndex((e) => e.data['device-state'] === 'pre-copy-p2p'), 0, moved!);
  const r = await replay(t, rec);
  t.is(r.code, 5);
  t.is(r.analysis.verdict, 'violated');
  t.regex(r.analysis.reason, /p2p-before-stop/);
});

test('watch replaying the failed edu migration (the destination QEMU exits): failed, exit 1, device and phase named', async (t) => {
  const r = await replay(t, load('edu-fail-stop-copy.json'), { closeDest: true });
  t.is(r.code, 1, r.stderr);
  t.is(r.analysis.verdict, 'failed');
  t.is(r.analysis.failure?.phase, 'switchover');
  t.deepEqual(r.analysis.failure?.devices, ['edu0']);
});

test('watch: a migration that never finishes ends at --timeout with exit 4 and a failed verdict saying so', async (t) => {
  const rec = load('mtty-x1.json');
  // Everything up to the first RAM pass after `active`, then silence: QEMU keeps iterating.
  const active = rec.source.events.findIndex((e) => e.event === 'MIGRATION' && e.data.status === 'active');
  rec.source.events = rec.source.events.slice(0, active + 1);
  rec.source.migrate = { status: 'active', ram: { transferred: 1 } };
  rec.destination.events = rec.destination.events.slice(0, 2);
  rec.destination.migrate = { status: 'active' };
  const dir = tmp(t);
  const s = await replayServer(t, join(dir, 's.qmp'), rec.source);
  const d = await replayServer(t, join(dir, 'd.qmp'), rec.destination);
  const out = sink();
  const err = sink();
  const running = main(['watch', '--source-qmp', join(dir, 's.qmp'), '--dest-qmp', join(dir, 'd.qmp'), '--json', '--timeout', '2'], out.stream, err.stream);
  for (let i = 0; i < 400 && !/watching/.test(err.text()); i++) await new Promise((r) => setTimeout(r, 10));
  d.go();
  s.go();
  const started = Date.now();
  t.is(await running, 4);
  t.true(Date.now() - started < 4000);
  const a = JSON.parse(out.text()) as Analysis;
  t.is(a.verdict, 'failed');
  t.is(a.status, 'active');
  t.regex(a.reason, /did not finish while watched \(last status: active\)/);
  t.true(a.notes.some((n) => /time limit/.test(n)));
});

test('watch usage: both sockets required, the two forms not mixed, bad numbers refused', async (t) => {
  const run = async (args: string[]): Promise<{ code: number; err: string }> => {
    const err = sink();
    const code = await main(['watch', ...args], sink().stream, err.stream);
    return { code, err: err.text() };
  };
  t.like(await run(['--source-qmp', '/tmp/a']), { code: 2 });
  t.regex((await run(['--source-qmp', '/tmp/a'])).err, /--dest-qmp PATH is required/);
  const mixed = await run(['--source-domain', 'vm1', '--source-uri', 'qemu:///system', '--dest-uri', 'qemu+ssh://b/system', '--source-qmp', '/tmp/a']);
  t.is(mixed.code, 2);
  t.regex(mixed.err, /either the QMP sockets .* or the libvirt domain/);
  t.regex((await run(['--source-qmp', '/tmp/a', '--dest-qmp', '/tmp/a'])).err, /same socket/);
  t.regex((await run(['--source-qmp', '/tmp/a', '--dest-qmp', '/tmp/b', '--settle', 'x'])).err, /--settle must be/);
  const none = await run(['--source-qmp', '/nonexistent/a', '--dest-qmp', '/nonexistent/b', '--timeout', '2']);
  t.is(none.code, 3);
  t.regex(none.err, /^vfio-mig watch: source: /);
});

test('report: summary, SVG with -o, JSON, exit code per verdict, unreadable input', async (t) => {
  const dir = tmp(t);
  const run = async (args: string[]): Promise<{ code: number; out: string; err: string }> => {
    const out = sink();
    const err = sink();
    const code = await main(['report', ...args], out.stream, err.stream);
    return { code, out: out.text(), err: err.text() };
  };
  const svg = join(dir, 'r.svg');
  const ok = await run([join(FIXTURES, 'mtty-x1.json'), '-o', svg]);
  t.is(ok.code, 0);
  t.regex(ok.out, /^verdict: ok/);
  t.regex(ok.out, /dev0 \(\/sys\/bus\/mdev\/devices\/83b8f4f2-509f-382f-3c1e-e6bfe0fa0001\)/);
  t.regex(ok.out, /pre-copy -> pre-copy-p2p -> stop-copy -> stop/);
  t.regex(ok.out, /QEMU's figure: +216 ms/);
  t.is(XMLValidator.validate(readFileSync(svg, 'utf8')), true);
  const failed = await run([join(FIXTURES, 'edu-fail-stop-copy.json'), '--json']);
  t.is(failed.code, 1);
  t.is((JSON.parse(failed.out) as Analysis).verdict, 'failed');
  writeFileSync(join(dir, 'bad.json'), '{"x": 1}');
  const bad = await run([join(dir, 'bad.json')]);
  t.is(bad.code, 1);
  t.regex(bad.err, /not a timeline/);
  t.is((await run([join(dir, 'missing.json')])).code, 1);
  t.is((await run([])).code, 2);
});
