// The QMP client against a scripted fake QMP server (unix and tcp sockets): handshake, id
// correlation, events, time limits, and every way a peer can misbehave. The real QEMU side
// is test/qemu/.
import test, { type ExecutionContext } from 'ava';
import net from 'node:net';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { QmpClient, type QmpClientOptions } from '../../src/qmp/client.ts';
import { QmpClosedError, QmpError, QmpProtocolError, QmpTimeoutError } from '../../src/qmp/errors.ts';
import { queryStatus } from '../../src/qmp/commands.ts';

const GREETING = { QMP: { version: { qemu: { micro: 2, minor: 0, major: 10 }, package: 'Debian 1:10.0.2' }, capabilities: ['oob'] } };

interface Cmd {
  execute: string;
  arguments?: Record<string, unknown>;
  id?: unknown;
}

interface Conn {
  socket: net.Socket;
  /** Sends an object as one CRLF-terminated line, or raw text as is. */
  send(msg: object | string): void;
  reply(cmd: Cmd, ret?: unknown): void;
  event(name: string, data?: Record<string, unknown>): void;
}

interface FakeOptions {
  greeting?: object | string | null;
  onCommand?: (cmd: Cmd, conn: Conn) => void;
  tcp?: boolean;
}

/** Starts a fake QMP server; returns a connect function bound to it. Cleaned up after the test. */
async function fake(t: ExecutionContext, o: FakeOptions = {}): Promise<{ connect: (opts?: QmpClientOptions) => Promise<QmpClient>; conns: Conn[] }> {
  const conns: Conn[] = [];
  const server = net.createServer((socket) => {
    const conn: Conn = {
      socket,
      send: (msg) => socket.write(typeof msg === 'string' ? msg : JSON.stringify(msg) + '\r\n'),
      reply: (cmd, ret = {}) => conn.send({ return: ret, id: cmd.id }),
      event: (name, data) => conn.send({ event: name, ...(data ? { data } : {}), timestamp: { seconds: 1700000000, microseconds: 123456 } }),
    };
    conns.push(conn);
    socket.on('error', () => {});
    if (o.greeting !== null) conn.send(o.greeting ?? GREETING);
    let buf = '';
    socket.on('data', (d) => {
      buf += d.toString();
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        const cmd = JSON.parse(line) as Cmd;
        if (cmd.execute === 'qmp_capabilities') conn.reply(cmd);
        else o.onCommand?.(cmd, conn);
      }
    });
  });
  let endpoint: { path: string } | { host: string; port: number };
  if (o.tcp) {
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    endpoint = { host: '127.0.0.1', port: (server.address() as net.AddressInfo).port };
  } else {
    const dir = mkdtempSync(join(tmpdir(), 'qmp-fake-'));
    endpoint = { path: join(dir, 'qmp.sock') };
    await new Promise<void>((r) => server.listen((endpoint as { path: string }).path, r));
    t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  }
  t.teardown(() => {
    for (const c of conns) c.socket.destroy();
    server.close();
  });
  return { connect: (opts) => QmpClient.connect(endpoint, opts), conns };
}

test('handshake: greeting parsed, capabilities negotiated before the first command', async (t) => {
  const seen: string[] = [];
  const { connect } = await fake(t, { onCommand: (c, conn) => (seen.push(c.execute), conn.reply(c, { status: 'running', running: true })) });
  const q = await connect();
  t.deepEqual(q.greeting.version.qemu, { major: 10, minor: 0, micro: 2 });
  t.deepEqual(q.greeting.capabilities, ['oob']);
  t.deepEqual(await q.execute('query-status'), { status: 'running', running: true });
  t.deepEqual(seen, ['query-status']);
  await q.close();
  t.true(q.closed);
});

test('replies are matched by id, out of order and with events in between', async (t) => {
  const held: Cmd[] = [];
  const { connect } = await fake(t, {
    onCommand: (c, conn) => {
      held.push(c);
      if (held.length === 3) {
        conn.event('STOP');
        conn.reply(held[2]!, 'third');
        conn.event('RESUME');
        conn.reply(held[0]!, 'first');
        conn.reply(held[1]!, 'second');
      }
    },
  });
  const q = await connect();
  const events: string[] = [];
  q.onEvent((e) => events.push(e.event));
  const r = await Promise.all([q.execute('a'), q.execute('b', { x: 1 }), q.execute('c')]);
  t.deepEqual(r, ['first', 'second', 'third']);
  t.deepEqual(events, ['STOP', 'RESUME']);
  t.deepEqual(held[1]!.arguments, { x: 1 });
  t.true(held.every((c) => typeof c.id === 'string'));
  t.is(new Set(held.map((c) => c.id)).size, 3);
  await q.close();
});

test('an error reply becomes QmpError{class, desc}; the connection stays usable', async (t) => {
  const { connect } = await fake(t, {
    onCommand: (c, conn) =>
      c.execute === 'migrate-continue'
        ? conn.send({ error: { class: 'GenericError', desc: "Migration not in expected state: active", extra: 1 }, id: c.id })
        : conn.reply(c, { running: true, status: 'running' }),
  });
  const q = await connect();
  const err = await t.throwsAsync(q.execute('migrate-continue', { state: 'pre-switchover' }), { instanceOf: QmpError });
  t.is(err?.class, 'GenericError');
  t.is(err?.desc, 'Migration not in expected state: active');
  t.is(err?.command, 'migrate-continue');
  t.is((await queryStatus(q)).status, 'running');
  await q.close();
});

test('per-command timeout; the late reply is dropped and later commands still work', async (t) => {
  let slow: Cmd | undefined;
  const { connect, conns } = await fake(t, { onCommand: (c, conn) => (c.execute === 'slow' ? (slow = c) : conn.reply(c, 'ok')) });
  const q = await connect({ commandTimeoutMs: 5_000 });
  const err = await t.throwsAsync(q.execute('slow', undefined, { timeoutMs: 50 }), { instanceOf: QmpTimeoutError });
  t.is(err?.timeoutMs, 50);
  // Under load the server may see the command only after the client gave up on it.
  while (!slow) await new Promise((r) => setTimeout(r, 5));
  conns[0]!.reply(slow, 'too late');
  t.is(await q.execute('fast'), 'ok');
  t.false(q.closed);
  await q.close();
});

test('events carry data, QEMU timestamp and a receive seq; waitFor filters with a predicate', async (t) => {
  const { connect } = await fake(t, {
    onCommand: (c, conn) => {
      conn.reply(c);
      conn.event('MIGRATION', { status: 'setup' });
      conn.event('MIGRATION_PASS', { pass: 1 });
      conn.event('MIGRATION', { status: 'active' });
      conn.event('MIGRATION', { status: 'pre-switchover' });
    },
  });
  const q = await connect();
  const all: number[] = [];
  q.onEvent((e) => all.push(e.seq));
  const w = q.waitFor('MIGRATION', (e) => e.typed.status === 'pre-switchover', 2_000);
  await q.execute('migrate', { uri: 'unix:/x' });
  const ev = await w;
  t.is(ev.typed.status, 'pre-switchover');
  t.deepEqual(ev.timestamp, { seconds: 1700000000, microseconds: 123456 });
  t.is(ev.seq, 4);
  t.deepEqual(all, [1, 2, 3, 4]);
  // Already received: found through `since`, not by waiting.
  const pass = await q.waitFor('MIGRATION_PASS', undefined, 10, { since: 0 });
  t.is(pass.typed.pass, 1);
  await t.throwsAsync(q.waitFor('MIGRATION_PASS', undefined, 30, { since: 2 }), { instanceOf: QmpTimeoutError });
  await q.close();
});

test('unknown enum values, unknown events and extra members are tolerated', async (t) => {
  const { connect } = await fake(t, {
    onCommand: (c, conn) => {
      conn.send({ return: { status: 'some-future-state', running: false, 'new-member': [1] }, id: c.id, extra: true });
      conn.event('VFIO_MIGRATION', { 'device-id': 'hostdev0', 'qom-path': '/machine/peripheral/hostdev0', 'device-state': 'pre-copy-p2p-prepare-v2', more: 1 });
      conn.event('SOMETHING_NEW', { x: 1 });
    },
  });
  const q = await connect();
  const vfio = q.waitFor('VFIO_MIGRATION', undefined, 2_000);
  const other = q.waitFor('SOMETHING_NEW', (e) => e.data.x === 1, 2_000);
  const st = await queryStatus(q);
  t.is(st.status, 'some-future-state');
  t.deepEqual(st['new-member'], [1]);
  const ev = await vfio;
  t.is(ev.typed['device-state'], 'pre-copy-p2p-prepare-v2');
  t.is(ev.typed['device-id'], 'hostdev0');
  t.is((await other).event, 'SOMETHING_NEW');
  await q.close();
});

test('a known event with an ill-typed payload does not match its typed wait', async (t) => {
  const { connect, conns } = await fake(t);
  const q = await connect();
  const w = q.waitFor('MIGRATION', undefined, 2_000);
  conns[0]!.event('MIGRATION', { status: 42 });
  conns[0]!.event('MIGRATION', { status: 'completed' });
  t.is((await w).typed.status, 'completed');
  await q.close();
});

test('socket closed by the peer: every pending command and wait is rejected, done settles', async (t) => {
  const { connect, conns } = await fake(t, { onCommand: () => {} });
  const q = await connect();
  const a = q.execute('a');
  const b = q.execute('b');
  const w = q.waitFor('STOP', undefined, 60_000);
  setTimeout(() => conns[0]!.socket.destroy(), 20);
  await t.throwsAsync(a, { instanceOf: QmpClosedError });
  await t.throwsAsync(b, { instanceOf: QmpClosedError });
  await t.throwsAsync(w, { instanceOf: QmpClosedError });
  t.true((await q.done) instanceof QmpClosedError);
  await t.throwsAsync(q.execute('c'), { instanceOf: QmpClosedError });
  await t.throwsAsync(q.waitFor('STOP'), { instanceOf: QmpClosedError });
});

for (const [what, garbage] of [
  ['malformed JSON', '{"return": {}, "id": \r\n'],
  ['a JSON array', '[1,2,3]\r\n'],
  ['a message that is neither reply nor event', '{"hello": 1}\r\n'],
  ['a reply without id', '{"return": {}}\r\n'],
  ['a reply to an id never sent', '{"return": {}, "id": "nope"}\r\n'],
  ['an event without timestamp', '{"event": "STOP"}\r\n'],
  ['an event whose data is not an object', '{"event": "STOP", "data": [], "timestamp": {"seconds": 1, "microseconds": 2}}\r\n'],
  ['an error reply without class/desc', '{"error": "bad", "id": "vfio-mig-2"}\r\n'],
  ['a second greeting', JSON.stringify(GREETING) + '\r\n'],
] as const) {
  test(`strict: ${what} closes the connection with QmpProtocolError, nothing hangs`, async (t) => {
    const { connect } = await fake(t, { onCommand: (_c, conn) => conn.send(garbage) });
    const q = await connect();
    const w = q.waitFor('STOP', undefined, 60_000);
    const err = await t.throwsAsync(q.execute('query-status'), { instanceOf: QmpProtocolError });
    t.regex(err!.message, /connection closed/);
    await t.throwsAsync(w, { instanceOf: QmpProtocolError });
    t.true(q.closed);
    t.true((await q.done) instanceof QmpProtocolError);
    await t.throwsAsync(q.execute('query-status'), { instanceOf: QmpClosedError });
  });
}

test('bounded line size: an endless line is cut off at the limit', async (t) => {
  const { connect } = await fake(t, { onCommand: (_c, conn) => conn.send('{"return": "' + 'x'.repeat(10_000)) });
  const q = await connect({ maxLineBytes: 4096 });
  const err = await t.throwsAsync(q.execute('x'), { instanceOf: QmpProtocolError });
  t.regex(err!.message, /4096/);
});

test('bounded line size: one complete line over the limit is refused too', async (t) => {
  const { connect } = await fake(t, { onCommand: (c, conn) => conn.send({ return: 'y'.repeat(5_000), id: c.id }) });
  const q = await connect({ maxLineBytes: 4096 });
  await t.throwsAsync(q.execute('x'), { instanceOf: QmpProtocolError });
});

test('messages split at every byte and several per chunk are reassembled', async (t) => {
  const { connect } = await fake(t, {
    onCommand: (c, conn) => {
      const text = JSON.stringify({ event: 'STOP', timestamp: { seconds: 1, microseconds: 2 } }) + '\r\n' + JSON.stringify({ return: { ok: 'é' }, id: c.id }) + '\r\n';
      const bytes = Buffer.from(text);
      let i = 0;
      const step = (): void => {
        if (i < bytes.length) conn.socket.write(bytes.subarray(i, ++i), step);
      };
      step();
    },
  });
  const q = await connect();
  const stop = q.waitFor('STOP', undefined, 5_000);
  t.deepEqual(await q.execute('x'), { ok: 'é' });
  t.is((await stop).seq, 1);
  await q.close();
});

test('bad greeting: connect rejects with QmpProtocolError', async (t) => {
  const { connect } = await fake(t, { greeting: { QMP: { version: { qemu: { major: '10' } }, capabilities: [] } } });
  await t.throwsAsync(connect(), { instanceOf: QmpProtocolError });
  const { connect: c2 } = await fake(t, { greeting: 'not json at all\r\n' });
  await t.throwsAsync(c2(), { instanceOf: QmpProtocolError });
});

test('no greeting (e.g. QEMU busy with another client): connect times out with a hint', async (t) => {
  const { connect } = await fake(t, { greeting: null });
  const err = await t.throwsAsync(connect({ connectTimeoutMs: 100 }), { instanceOf: QmpTimeoutError });
  t.regex(err!.message, /one client per QMP socket/);
});

test('connect to a missing socket fails with QmpClosedError', async (t) => {
  await t.throwsAsync(QmpClient.connect({ path: '/nonexistent/qmp.sock' }), { instanceOf: QmpClosedError });
  await t.throwsAsync(QmpClient.connect({ path: 'x'.repeat(200) }), { instanceOf: RangeError });
  await t.throwsAsync(QmpClient.connect({ host: '127.0.0.1', port: 0 }), { instanceOf: RangeError });
});

test('tcp endpoint; fd passing is refused on tcp', async (t) => {
  const { connect } = await fake(t, { tcp: true, onCommand: (c, conn) => conn.reply(c, 42) });
  const q = await connect();
  t.is(await q.execute('x'), 42);
  await t.throwsAsync(q.executeWithFd('getfd', { fdname: 'a' }, 0), { instanceOf: TypeError });
  await q.close();
});

test('invalid command names and arguments never reach the socket', async (t) => {
  const seen: string[] = [];
  const { connect } = await fake(t, { onCommand: (c, conn) => (seen.push(c.execute), conn.reply(c)) });
  const q = await connect();
  await t.throwsAsync(q.execute('bad"name'), { instanceOf: TypeError });
  await t.throwsAsync(q.execute('x', [] as unknown as Record<string, unknown>), { instanceOf: TypeError });
  await t.throwsAsync(q.execute('x', undefined, { timeoutMs: 0 }), { instanceOf: RangeError });
  await q.execute('ok');
  t.deepEqual(seen, ['ok']);
  await q.close();
});

test('a throwing predicate rejects only its own wait; a throwing listener does not break delivery', async (t) => {
  const { connect, conns } = await fake(t);
  const listenerErrors: unknown[] = [];
  const q = await connect({ onListenerError: (e) => listenerErrors.push(e) });
  const bad = q.waitFor('STOP', () => {
    throw new Error('predicate bug');
  }, 2_000);
  const good = q.waitFor('STOP', undefined, 2_000);
  const got: number[] = [];
  q.onEvent(() => {
    throw new Error('listener bug');
  });
  q.onEvent((e) => got.push(e.seq));
  conns[0]!.event('STOP');
  await t.throwsAsync(bad, { message: 'predicate bug' });
  t.is((await good).seq, 1);
  t.is((listenerErrors[0] as Error).message, 'listener bug');
  t.deepEqual(got, [1]);
  await q.close();
});

test('close() rejects pending commands with QmpClosedError and done settles with undefined', async (t) => {
  const { connect } = await fake(t, { onCommand: () => {} });
  const q = await connect();
  const p = q.execute('never');
  await q.close();
  await t.throwsAsync(p, { instanceOf: QmpClosedError });
  t.is(await q.done, undefined);
});
