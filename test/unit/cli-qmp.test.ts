// `vfio-mig qmp` and `vfio-mig events` against a fake QMP server on a unix socket in a temp
// dir: replies, error replies, usage errors, and every transport failure (no socket,
// garbage, close, silence) ending with one line and its exit code within the time limit.
// Most tests run the CLI in-process (test/cli-harness.ts); two run bin/vfio-mig.js as a
// child process to prove the process itself exits with the code (no handle left open).
// The real QEMU side is test/qemu/cli-qmp.test.ts.
import test, { type ExecutionContext } from 'ava';
import net from 'node:net';
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { PassThrough } from 'node:stream';
import { runCli } from '../cli-harness.ts';
import { main } from '../../src/cli/main.ts';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const GREETING = { QMP: { version: { qemu: { micro: 2, minor: 0, major: 10 }, package: 'Debian 1:10.0.2' }, capabilities: ['oob'] } };

interface Cmd {
  execute: string;
  arguments?: Record<string, unknown>;
  id?: unknown;
}

interface Conn {
  socket: net.Socket;
  send(msg: object | string): void;
  reply(cmd: Cmd, ret?: unknown): void;
  event(name: string, data?: Record<string, unknown>, seconds?: number): void;
}

interface FakeOptions {
  /** What to send on connect: the QMP greeting by default, raw text, or nothing (null). */
  greeting?: object | string | null;
  /** Called after qmp_capabilities was answered (same write turn: events land with the reply). */
  onReady?: (conn: Conn) => void;
  onCommand?: (cmd: Cmd, conn: Conn) => void;
}

/** A scripted QMP server on a unix socket in a temp dir; removed after the test. */
async function fakeQmp(t: ExecutionContext, o: FakeOptions = {}): Promise<{ path: string; commands: Cmd[] }> {
  const commands: Cmd[] = [];
  const conns: net.Socket[] = [];
  const server = net.createServer((socket) => {
    conns.push(socket);
    socket.on('error', () => {});
    const conn: Conn = {
      socket,
      send: (msg) => socket.write(typeof msg === 'string' ? msg : JSON.stringify(msg) + '\r\n'),
      reply: (cmd, ret = {}) => conn.send({ return: ret, id: cmd.id }),
      event: (name, data, seconds = 1764958271) => conn.send({ event: name, ...(data ? { data } : {}), timestamp: { seconds, microseconds: 4321 } }),
    };
    if (o.greeting !== null) conn.send(o.greeting ?? GREETING);
    let buf = '';
    socket.on('data', (d) => {
      buf += d.toString();
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const cmd = JSON.parse(buf.slice(0, nl)) as Cmd;
        buf = buf.slice(nl + 1);
        if (cmd.execute === 'qmp_capabilities') {
          conn.reply(cmd);
          o.onReady?.(conn);
        } else {
          commands.push(cmd);
          o.onCommand?.(cmd, conn);
        }
      }
    });
  });
  const dir = mkdtempSync(join(tmpdir(), 'cli-qmp-'));
  const path = join(dir, 'qmp.sock');
  await new Promise<void>((r) => server.listen(path, r));
  t.teardown(() => {
    for (const s of conns) s.destroy();
    server.close();
    rmSync(dir, { recursive: true, force: true });
  });
  return { path, commands };
}

/** QEMU-like replies: query-status, stop (with its STOP event), errors for the rest. */
function qemuLike(cmd: Cmd, conn: Conn): void {
  if (cmd.execute === 'query-status') return conn.reply(cmd, { status: 'running', running: true });
  if (cmd.execute === 'echo') return conn.reply(cmd, { got: cmd.arguments ?? null });
  if (cmd.execute === 'stop') {
    conn.reply(cmd);
    return conn.event('STOP');
  }
  conn.send({ error: { class: 'CommandNotFound', desc: `The command ${cmd.execute} has not been found` }, id: cmd.id });
}

function oneLine(t: ExecutionContext, text: string, re: RegExp): void {
  t.is(text.split('\n').filter(Boolean).length, 1, `exactly one line on stderr: ${JSON.stringify(text)}`);
  t.true(text.endsWith('\n'));
  t.regex(text, re);
}

// --- qmp -----------------------------------------------------------------------------------

test('qmp prints the return value as JSON and exits 0; ARGS-JSON becomes the arguments', async (t) => {
  const { path, commands } = await fakeQmp(t, { onCommand: qemuLike });
  const r = await runCli(['qmp', '--socket', path, 'query-status']);
  t.is(r.code, 0, r.err);
  t.is(r.err, '');
  t.deepEqual(JSON.parse(r.out), { status: 'running', running: true });
  const e = await runCli(['qmp', '--socket', path, '--timeout', '5', 'echo', '{"device":"hostdev0","n":[1,2]}']);
  t.is(e.code, 0, e.err);
  t.deepEqual(JSON.parse(e.out), { got: { device: 'hostdev0', n: [1, 2] } });
  t.deepEqual(commands.map((c) => c.execute), ['query-status', 'echo']);
  t.deepEqual(commands[1]!.arguments, { device: 'hostdev0', n: [1, 2] });
  // An empty return ({}), as for stop, is printed too.
  const s = await runCli(['qmp', '--socket', path, 'stop']);
  t.is(s.code, 0);
  t.deepEqual(JSON.parse(s.out), {});
});

test('qmp: an error reply exits 1 with "<class>: <desc>" on stderr', async (t) => {
  const { path } = await fakeQmp(t, { onCommand: qemuLike });
  const r = await runCli(['qmp', '--socket', path, 'no-such-command']);
  t.is(r.code, 1);
  t.is(r.out, '');
  t.is(r.err, 'CommandNotFound: The command no-such-command has not been found\n');
});

test('qmp: usage errors exit 2 (ARGS-JSON not an object, no socket, bad timeout, no command)', async (t) => {
  const { path, commands } = await fakeQmp(t, { onCommand: qemuLike });
  const cases: Array<[string[], RegExp]> = [
    [['qmp', '--socket', path, 'echo', '[1,2]'], /ARGS-JSON must be a JSON object.*an array/],
    [['qmp', '--socket', path, 'echo', '"x"'], /ARGS-JSON must be a JSON object.*string/],
    [['qmp', '--socket', path, 'echo', 'null'], /ARGS-JSON must be a JSON object.*null/],
    [['qmp', '--socket', path, 'echo', '42'], /ARGS-JSON must be a JSON object.*number/],
    [['qmp', '--socket', path, 'echo', '{device:1}'], /ARGS-JSON is not valid JSON/],
    [['qmp', '--socket', path, 'echo', '{}', '{}'], /unexpected argument/],
    [['qmp', 'query-status'], /--socket PATH is required/],
    [['qmp', '--socket', path], /name a QMP command/],
    [['qmp', '--socket', path, 'bad name;'], /not a QMP command name/],
    [['qmp', '--socket', path, '--timeout', '0', 'query-status'], /--timeout must be/],
    [['qmp', '--socket', path, '--timeout', 'soon', 'query-status'], /--timeout must be/],
    [['qmp', '--socket', 'x'.repeat(200), 'query-status'], /longer than 107 bytes/],
    [['qmp', '--sock', path, 'query-status'], /unknown option --sock/],
  ];
  for (const [argv, re] of cases) {
    const r = await runCli(argv);
    t.is(r.code, 2, argv.join(' '));
    t.regex(r.err, re, argv.join(' '));
    t.regex(r.err, /usage: vfio-mig qmp --socket PATH/);
    t.is(r.out, '');
  }
  t.deepEqual(commands, [], 'nothing was sent');
});

test('qmp: a socket that does not exist exits 3 with one line', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'cli-qmp-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const r = await runCli(['qmp', '--socket', join(dir, 'absent.sock'), 'query-status']);
  t.is(r.code, 3);
  t.is(r.out, '');
  oneLine(t, r.err, /^vfio-mig qmp: .*absent\.sock.*ENOENT/);
});

test('qmp: garbage instead of the greeting, or instead of a reply, exits 3 with one line', async (t) => {
  const a = await fakeQmp(t, { greeting: 'this is not QMP\r\n' });
  const r = await runCli(['qmp', '--socket', a.path, 'query-status']);
  t.is(r.code, 3);
  oneLine(t, r.err, /^vfio-mig qmp: QMP protocol error: malformed JSON .*this is not QMP/);

  const b = await fakeQmp(t, { greeting: { hello: 'world' } });
  const rb = await runCli(['qmp', '--socket', b.path, 'query-status']);
  t.is(rb.code, 3);
  oneLine(t, rb.err, /expected the QMP greeting/);

  const c = await fakeQmp(t, { onCommand: (_cmd, conn) => conn.send('{"return": \x00garbage\n\nmore garbage\r\n') });
  const rc = await runCli(['qmp', '--socket', c.path, 'query-status']);
  t.is(rc.code, 3);
  t.is(rc.out, '');
  oneLine(t, rc.err, /^vfio-mig qmp: QMP protocol error: malformed JSON/);
});

test('qmp: the peer closing the socket exits 3 with one line', async (t) => {
  const a = await fakeQmp(t, { onCommand: (_cmd, conn) => conn.socket.end() });
  const r = await runCli(['qmp', '--socket', a.path, 'query-status']);
  t.is(r.code, 3);
  oneLine(t, r.err, /^vfio-mig qmp: .*closed/);

  // A server that accepts and hangs up at once, before the greeting.
  const server = net.createServer((s) => s.destroy());
  const dir = mkdtempSync(join(tmpdir(), 'cli-qmp-'));
  const path = join(dir, 'hangup.sock');
  await new Promise<void>((res) => server.listen(path, res));
  t.teardown(() => {
    server.close();
    rmSync(dir, { recursive: true, force: true });
  });
  const rh = await runCli(['qmp', '--socket', path, 'query-status']);
  t.is(rh.code, 3);
  oneLine(t, rh.err, /closed/);
});

test('qmp: silence (no greeting, or no reply) exits 4 within the timeout', async (t) => {
  const a = await fakeQmp(t, { greeting: null });
  let t0 = Date.now();
  const r = await runCli(['qmp', '--socket', a.path, '--timeout', '0.4', 'query-status']);
  t.true(Date.now() - t0 < 30_000, `took ${Date.now() - t0} ms`);
  t.is(r.code, 4);
  oneLine(t, r.err, /^vfio-mig qmp: .*greeting.*no answer within 400 ms/);

  const b = await fakeQmp(t, { onCommand: () => {} });
  t0 = Date.now();
  // Long enough for the greeting and capabilities on a loaded machine: what is tested is
  // that the silent command ends at the time limit, not how fast negotiation is.
  const rb = await runCli(['qmp', '--socket', b.path, '--timeout', '3', 'query-status']);
  const took = Date.now() - t0;
  t.true(took >= 2900 && took < 30_000, `took ${took} ms`);
  t.is(rb.code, 4);
  oneLine(t, rb.err, /^vfio-mig qmp: QMP query-status: no answer within \d+ ms/);
});

// --- events --------------------------------------------------------------------------------

test('events --until STOP prints each event (time, name, data) and exits 0 at STOP', async (t) => {
  const { path } = await fakeQmp(t, {
    onReady: (conn) => {
      // With the capabilities reply (same write turn), then later ones.
      conn.event('RESUME');
      conn.event('MIGRATION', { status: 'setup' });
      setTimeout(() => {
        conn.event('VFIO_MIGRATION', { 'device-id': 'hostdev0', 'qom-path': '/machine/peripheral/hostdev0', 'device-state': 'stop-copy' });
        conn.event('STOP');
        conn.event('RESUME'); // after --until: not printed
      }, 50);
    },
  });
  const r = await runCli(['events', '--socket', path, '--until', 'STOP', '--timeout', '10']);
  t.is(r.code, 0, r.err);
  t.is(r.err, '');
  const lines = r.out.trim().split('\n');
  t.deepEqual(lines, [
    '2025-12-05T18:11:11.004321Z RESUME {}',
    '2025-12-05T18:11:11.004321Z MIGRATION {"status":"setup"}',
    '2025-12-05T18:11:11.004321Z VFIO_MIGRATION {"device-id":"hostdev0","qom-path":"/machine/peripheral/hostdev0","device-state":"stop-copy"}',
    '2025-12-05T18:11:11.004321Z STOP {}',
  ]);
});

test('events --json prints one QEMU-shaped JSON object per line', async (t) => {
  const { path } = await fakeQmp(t, { onReady: (conn) => setTimeout(() => (conn.event('MIGRATION', { status: 'active' }), conn.event('STOP')), 20) });
  const r = await runCli(['events', '--socket', path, '--json', '--until', 'STOP']);
  t.is(r.code, 0, r.err);
  const objs = r.out.trim().split('\n').map((l) => JSON.parse(l) as unknown);
  t.deepEqual(objs, [
    { event: 'MIGRATION', data: { status: 'active' }, timestamp: { seconds: 1764958271, microseconds: 4321 } },
    { event: 'STOP', data: {}, timestamp: { seconds: 1764958271, microseconds: 4321 } },
  ]);
});

test('events --timeout: exit 0 without --until; exit 4 when the --until event did not come', async (t) => {
  const { path } = await fakeQmp(t, { onReady: (conn) => conn.event('RESUME') });
  let t0 = Date.now();
  const plain = await runCli(['events', '--socket', path, '--timeout', '3']);
  t.is(plain.code, 0, plain.err);
  t.is(plain.err, '');
  t.regex(plain.out, /^\S+Z RESUME \{\}\n$/);
  t.true(Date.now() - t0 < 30_000);
  t0 = Date.now();
  const missed = await runCli(['events', '--socket', path, '--until', 'SHUTDOWN', '--timeout', '3']);
  const took = Date.now() - t0;
  t.true(took >= 2900 && took < 30_000, `took ${took} ms`);
  t.is(missed.code, 4);
  t.regex(missed.out, /RESUME/);
  oneLine(t, missed.err, /^vfio-mig events: no SHUTDOWN event within 3 s$/m);
});

test('events: the socket closing exits 3 with one line, after printing what came', async (t) => {
  const { path } = await fakeQmp(t, { onReady: (conn) => (conn.event('STOP'), setTimeout(() => conn.socket.end(), 30)) });
  const r = await runCli(['events', '--socket', path, '--until', 'RESUME']);
  t.is(r.code, 3);
  t.regex(r.out, /STOP/);
  oneLine(t, r.err, /^vfio-mig events: .*closed.*\(before RESUME\)$/m);
  const w = await runCli(['events', '--socket', path]);
  t.is(w.code, 3, 'also without --until');
  oneLine(t, w.err, /closed/);
});

test('events: garbage, silence, no socket and usage errors', async (t) => {
  const g = await fakeQmp(t, { onReady: (conn) => setTimeout(() => conn.send('{"event": "STOP", "timestamp": garbage}\r\n'), 20) });
  const rg = await runCli(['events', '--socket', g.path, '--timeout', '5']);
  t.is(rg.code, 3);
  oneLine(t, rg.err, /^vfio-mig events: QMP protocol error: malformed JSON/);

  const s = await fakeQmp(t, { greeting: null });
  const t0 = Date.now();
  const rs = await runCli(['events', '--socket', s.path, '--timeout', '0.3']);
  t.true(Date.now() - t0 < 30_000);
  t.is(rs.code, 4, 'no greeting is a time-out even without --until');
  oneLine(t, rs.err, /greeting/);

  const rn = await runCli(['events', '--socket', join(tmpdir(), 'vfio-mig-no-such-dir', 'qmp.sock')]);
  t.is(rn.code, 3);
  oneLine(t, rn.err, /ENOENT/);

  for (const argv of [['events'], ['events', '--socket', s.path, 'STOP'], ['events', '--socket', s.path, '--until', 'a b'], ['events', '--socket', s.path, '--timeout', '-1']]) {
    const r = await runCli(argv);
    t.is(r.code, 2, argv.join(' '));
    t.regex(r.err, /usage: vfio-mig events --socket PATH/);
  }
});

test('events: the reader going away (EPIPE on stdout) ends it quietly with exit 0', async (t) => {
  const { path } = await fakeQmp(t, { onReady: (conn) => setTimeout(() => conn.event('STOP'), 20) });
  const out = new PassThrough();
  const err = new PassThrough();
  let e = '';
  err.on('data', (c) => (e += c));
  out.once('data', () => out.emit('error', Object.assign(new Error('write EPIPE'), { code: 'EPIPE' })));
  const code = await main(['events', '--socket', path], out, err);
  t.is(code, 0);
  t.is(e, '');
});

test('--help of qmp and events lists the exit codes; vfio-mig --help lists both commands', async (t) => {
  for (const name of ['qmp', 'events']) {
    const r = await runCli([name, '--help']);
    t.is(r.code, 0);
    t.regex(r.out, new RegExp(`^usage: vfio-mig ${name} --socket PATH`));
    t.regex(r.out, /exit codes: 0 .*\n.*2 usage; 3 transport.*\n.*4 time limit/);
  }
  const h = await runCli(['--help']);
  t.regex(h.out, /vfio-mig qmp --socket PATH/);
  t.regex(h.out, /vfio-mig events --socket PATH/);
  t.regex(h.out, /exit codes:/);
});

// --- the installed command, as a process ------------------------------------------------------

function runBin(args: string[]): Promise<{ code: number | null; out: string; err: string; ms: number }> {
  const t0 = Date.now();
  return new Promise((resolve) => {
    execFile(process.execPath, [join(root, 'bin', 'vfio-mig.js'), ...args], { timeout: 60_000 }, (error, stdout, stderr) => {
      const code = error ? (typeof error.code === 'number' ? error.code : null) : 0;
      resolve({ code, out: stdout, err: stderr, ms: Date.now() - t0 });
    });
  });
}

test('bin/vfio-mig.js qmp: the process exits with the code (reply 0, silence 4) and leaves nothing open', async (t) => {
  const ok = await fakeQmp(t, { onCommand: qemuLike });
  const r = await runBin(['qmp', '--socket', ok.path, 'query-status']);
  t.is(r.code, 0, r.err);
  t.deepEqual(JSON.parse(r.out), { status: 'running', running: true });
  const silent = await fakeQmp(t, { onCommand: () => {} });
  const s = await runBin(['qmp', '--socket', silent.path, '--timeout', '1', 'query-status']);
  t.is(s.code, 4);
  oneLine(t, s.err, /no answer within/);
  const ev = await fakeQmp(t, { onReady: (conn) => conn.event('STOP') });
  const e = await runBin(['events', '--socket', ev.path, '--until', 'STOP']);
  t.is(e.code, 0, e.err);
  t.regex(e.out, /STOP \{\}/);
});
