// `vfio-mig qmp` and `vfio-mig events` against a real qemu-system-x86_64 (test/qemu/vm.ts:
// q35, TCG, 64 MiB, no disk). The VM gets two extra QMP monitors for the CLI: QEMU serves
// one client per monitor socket, and the harness's own client holds the first one.
// Serial, like test/qemu/qmp.test.ts: the machine has 2 cores shared with other work.
import test, { type ExecutionContext } from 'ava';
import { PassThrough } from 'node:stream';
import { join } from 'node:path';
import { main } from '../../src/cli/main.ts';
import { runCli } from '../cli-harness.ts';
import { startVm, tempDir, type Vm } from './vm.ts';

interface CliVm extends Vm {
  /** Two QMP sockets nobody else uses. */
  cliA: string;
  cliB: string;
}

async function vmWithCliSockets(t: ExecutionContext, name: string): Promise<CliVm> {
  const dir = tempDir(t, 'cli-qmp-q-');
  const cliA = join(dir, 'cli-a.qmp');
  const cliB = join(dir, 'cli-b.qmp');
  const vm = await startVm(t, dir, name, { extra: ['-qmp', `unix:${cliA},server=on,wait=off`, '-qmp', `unix:${cliB},server=on,wait=off`] });
  return { ...vm, cliA, cliB };
}

/** Runs the CLI in-process and exposes its output while it runs. */
function startCli(argv: string[]): { output: () => string; done: Promise<{ code: number; out: string; err: string }> } {
  const out = new PassThrough();
  const err = new PassThrough();
  let o = '';
  let e = '';
  out.on('data', (c) => (o += c));
  err.on('data', (c) => (e += c));
  const done = main(argv, out, err).then((code) => ({ code, out: o, err: e }));
  return { output: () => o, done };
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

test.serial('qmp: query-status and query-version print the return value; a refusal exits 1 with "<class>: <desc>"', async (t) => {
  const vm = await vmWithCliSockets(t, 'cliq');
  const st = await runCli(['qmp', '--socket', vm.cliA, 'query-status']);
  t.is(st.code, 0, st.err);
  t.like(JSON.parse(st.out), { status: 'running', running: true });
  const ver = await runCli(['qmp', '--socket', vm.cliA, 'query-version']);
  t.is(ver.code, 0, ver.err);
  const v = JSON.parse(ver.out) as { qemu: { major: number; minor: number; micro: number } };
  t.deepEqual(v.qemu, vm.qmp.greeting.version.qemu);
  const nf = await runCli(['qmp', '--socket', vm.cliA, 'no-such-command']);
  t.is(nf.code, 1);
  t.is(nf.out, '');
  t.is(nf.err, 'CommandNotFound: The command no-such-command has not been found\n');
  // Arguments pass through: a bad one is QEMU's refusal, not ours.
  const bad = await runCli(['qmp', '--socket', vm.cliA, 'migrate-set-capabilities', '{"capabilities":[{"capability":"no-such-cap","state":true}]}']);
  t.is(bad.code, 1);
  t.regex(bad.err, /^GenericError: .*no-such-cap.*\n$/);
  t.log(`QEMU ${v.qemu.major}.${v.qemu.minor}.${v.qemu.micro}; refusal: ${bad.err.trim()}`);
  // The harness's client holds the first monitor: QEMU never greets a second client.
  const held = await runCli(['qmp', '--socket', vm.qmpPath, '--timeout', '1', 'query-status']);
  t.is(held.code, 4);
  t.regex(held.err, /^vfio-mig qmp: .*greeting \(is another client connected\?.*no answer within 1000 ms\n$/);
});

test.serial('events --until STOP ends at the STOP caused by `qmp stop`; query-status then says paused', async (t) => {
  const vm = await vmWithCliSockets(t, 'clie');
  const events = startCli(['events', '--socket', vm.cliA, '--until', 'STOP', '--timeout', '60']);
  // `events` cannot tell us when its monitor has negotiated; a STOP sent before that is not
  // delivered to it. Stop and continue until it has seen one (usually the first).
  let finished = false;
  void events.done.then(() => (finished = true));
  let cycles = 0;
  while (!finished && cycles < 40) {
    cycles++;
    const stop = await runCli(['qmp', '--socket', vm.cliB, 'stop']);
    t.is(stop.code, 0, stop.err);
    t.is(stop.out.trim(), '{}');
    await sleep(200);
    if (finished) break;
    t.is((await runCli(['qmp', '--socket', vm.cliB, 'cont'])).code, 0);
    await sleep(100);
  }
  const r = await events.done;
  t.is(r.code, 0, r.err);
  t.is(r.err, '');
  const lines = r.out.trim().split('\n');
  t.regex(lines.at(-1)!, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z STOP \{\}$/);
  const when = Date.parse(lines.at(-1)!.split(' ')[0]!);
  t.true(Math.abs(when - Date.now()) < 120_000, 'QEMU wall-clock timestamp');
  const st = await runCli(['qmp', '--socket', vm.cliB, 'query-status']);
  t.like(JSON.parse(st.out), { running: false, status: 'paused' });
  t.log(`STOP seen after ${cycles} stop/cont cycle(s): ${lines.join(' | ')}`);
});

test.serial('events --json, then `qmp quit`: SHUTDOWN printed, the closed socket ends with exit 3; --timeout alone exits 0', async (t) => {
  const vm = await vmWithCliSockets(t, 'cliquit');
  const quiet = await runCli(['events', '--socket', vm.cliA, '--timeout', '1']);
  t.is(quiet.code, 0, quiet.err);
  t.is(quiet.err, '');

  const events = startCli(['events', '--socket', vm.cliA, '--json', '--until', 'NEVER_SENT']);
  // Wait until the monitor delivers events (see above), then quit QEMU.
  for (let i = 0; i < 40 && !events.output().includes('"STOP"'); i++) {
    t.is((await runCli(['qmp', '--socket', vm.cliB, 'stop'])).code, 0);
    await sleep(200);
    t.is((await runCli(['qmp', '--socket', vm.cliB, 'cont'])).code, 0);
    await sleep(100);
  }
  t.true(events.output().includes('"STOP"'), 'events saw a STOP');
  const quit = await runCli(['qmp', '--socket', vm.cliB, 'quit']);
  t.is(quit.code, 0, quit.err);
  const r = await events.done;
  t.is(r.code, 3);
  t.regex(r.err, /^vfio-mig events: .*closed.*\(before NEVER_SENT\)\n$/);
  const objs = r.out.trim().split('\n').map((l) => JSON.parse(l) as { event: string; data: Record<string, unknown>; timestamp: { seconds: number } });
  const shutdown = objs.find((o) => o.event === 'SHUTDOWN');
  t.like(shutdown, { data: { guest: false, reason: 'host-qmp-quit' } });
  t.true(objs.every((o) => Number.isSafeInteger(o.timestamp.seconds)));
  await vm.exited;
  // Nothing listens any more: the socket file may linger (QEMU removes it on a clean exit).
  const gone = await runCli(['qmp', '--socket', vm.cliB, '--timeout', '2', 'query-status']);
  t.is(gone.code, 3);
  t.regex(gone.err, /ENOENT|ECONNREFUSED/);
});
