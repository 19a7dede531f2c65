// src/migration/switchover-ack.ts against a scripted QMP server on a unix socket: the
// commands it sends, the states it accepts and refuses, and the destination's wait for a
// socket that appears late (or is stale).
import test, { type ExecutionContext } from 'ava';
import net from 'node:net';
import { mkdtempSync, rmSync, writeFileSync, unlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { armDestination, enableOnSource, SwitchoverAckError } from '../../src/migration/switchover-ack.ts';

interface Cmd {
  execute: string;
  arguments?: { capabilities?: Array<{ capability: string; state: boolean }> };
  id?: unknown;
}

interface Qemu {
  /** query-migrate's status; `afterSet` replaces it once a set-capabilities arrived. */
  status: string;
  afterSet?: string;
  /** Capabilities QEMU knows, with their state. */
  caps: Record<string, boolean>;
  /** Reply to migrate-set-capabilities with this error desc. */
  refuse?: string;
  /** Accept migrate-set-capabilities without changing anything. */
  ignore?: boolean;
}

const GREETING = { QMP: { version: { qemu: { major: 10, minor: 0, micro: 2 }, package: '' }, capabilities: [] } };
const qemu10Caps = (): Record<string, boolean> => ({ events: false, 'return-path': false, 'pause-before-switchover': false, 'switchover-ack': false });

function tmp(t: ExecutionContext): string {
  const dir = mkdtempSync(join(tmpdir(), 'swack-unit-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

async function fakeQemu(t: ExecutionContext, path: string, q: Qemu): Promise<Cmd[]> {
  const seen: Cmd[] = [];
  const conns: net.Socket[] = [];
  const server = net.createServer((socket) => {
    conns.push(socket);
    socket.on('error', () => {});
    const send = (m: unknown): boolean => socket.write(JSON.stringify(m) + '\r\n');
    send(GREETING);
    let buf = '';
    socket.on('data', (d) => {
      buf += d.toString();
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        const cmd = JSON.parse(buf.slice(0, nl)) as Cmd;
        buf = buf.slice(nl + 1);
        if (cmd.execute !== 'qmp_capabilities') seen.push(cmd);
        switch (cmd.execute) {
          case 'qmp_capabilities':
            send({ return: {}, id: cmd.id });
            break;
          case 'query-migrate':
            send({ return: q.status === 'none' ? {} : { status: q.status }, id: cmd.id });
            break;
          case 'query-migrate-capabilities':
            send({ return: Object.entries(q.caps).map(([capability, state]) => ({ capability, state })), id: cmd.id });
            break;
          case 'migrate-set-capabilities':
            if (q.refuse) {
              send({ error: { class: 'GenericError', desc: q.refuse }, id: cmd.id });
              break;
            }
            if (!q.ignore) for (const c of cmd.arguments?.capabilities ?? []) q.caps[c.capability] = c.state;
            if (q.afterSet) q.status = q.afterSet;
            send({ return: {}, id: cmd.id });
            break;
          default:
            send({ error: { class: 'CommandNotFound', desc: `The command ${cmd.execute} has not been found` }, id: cmd.id });
        }
      }
    });
  });
  await new Promise<void>((r) => server.listen(path, r));
  t.teardown(() => {
    for (const s of conns) s.destroy();
    server.close();
  });
  return seen;
}

test('enableOnSource: sets return-path + switchover-ack in one command, reads them back, keeps the connection', async (t) => {
  const path = join(tmp(t), 'src.qmp');
  const q: Qemu = { status: 'none', caps: qemu10Caps() };
  const seen = await fakeQemu(t, path, q);
  const r = await enableOnSource({ path });
  t.deepEqual(r.enabled, ['return-path', 'switchover-ack']);
  t.is(r.status, 'none');
  t.deepEqual(
    seen.find((c) => c.execute === 'migrate-set-capabilities')?.arguments,
    { capabilities: [{ capability: 'return-path', state: true }, { capability: 'switchover-ack', state: true }] },
  );
  t.false(r.qmp.closed);
  await r.close();
  t.true(r.qmp.closed);
});

test('enableOnSource: a finished earlier migration is fine; a running one is too late and nothing is set', async (t) => {
  const dir = tmp(t);
  await fakeQemu(t, join(dir, 'done.qmp'), { status: 'completed', caps: qemu10Caps() });
  await (await enableOnSource({ path: join(dir, 'done.qmp') })).close();

  const q: Qemu = { status: 'active', caps: qemu10Caps() };
  const seen = await fakeQemu(t, join(dir, 'busy.qmp'), q);
  const err = await t.throwsAsync(enableOnSource({ path: join(dir, 'busy.qmp') }), { instanceOf: SwitchoverAckError });
  t.is(err?.side, 'source');
  t.regex(err!.message, /^switchover-ack on the source \(QMP .*busy\.qmp\): too late: the migration is already "active"/);
  t.false(seen.some((c) => c.execute === 'migrate-set-capabilities'));
});

test('enableOnSource: a QEMU without switchover-ack (before 8.1) is named as such', async (t) => {
  const path = join(tmp(t), 'old.qmp');
  await fakeQemu(t, path, { status: 'none', caps: { events: false, 'return-path': false } });
  await t.throwsAsync(enableOnSource({ path }), { instanceOf: SwitchoverAckError, message: /has no switchover-ack capability \(switchover-ack needs QEMU 8\.1 or later\)/ });
});

test("enableOnSource: QEMU's refusal is the cause; a change QEMU accepts but does not show is an error too", async (t) => {
  const dir = tmp(t);
  await fakeQemu(t, join(dir, 'refuse.qmp'), { status: 'none', caps: qemu10Caps(), refuse: "Capability 'switchover-ack' requires capability 'return-path'" });
  const err = await t.throwsAsync(enableOnSource({ path: join(dir, 'refuse.qmp') }), { instanceOf: SwitchoverAckError });
  t.regex(err!.message, /requires capability 'return-path'/);
  t.is((err!.cause as Error).name, 'QmpError');

  await fakeQemu(t, join(dir, 'ignore.qmp'), { status: 'none', caps: qemu10Caps(), ignore: true });
  await t.throwsAsync(enableOnSource({ path: join(dir, 'ignore.qmp') }), { instanceOf: SwitchoverAckError, message: /accepted the change but reports return-path, switchover-ack off/ });
});

test('enableOnSource: no socket says so and hints at the extra -qmp socket', async (t) => {
  const path = join(tmp(t), 'missing.qmp');
  await t.throwsAsync(enableOnSource({ path }, { connectTimeoutMs: 2000 }), { instanceOf: SwitchoverAckError, message: /cannot connect: .*does the domain have the extra -qmp socket\?/ });
});

test('armDestination: waits for a socket that appears late (after a stale file), then arms it before migrate-incoming', async (t) => {
  const path = join(tmp(t), 'dst.qmp');
  writeFileSync(path, ''); // a stale leftover: exists, refuses connections
  const h = armDestination({ path }, { timeoutMs: 20_000 });
  await new Promise((r) => setTimeout(r, 300));
  unlinkSync(path);
  const q: Qemu = { status: 'none', caps: qemu10Caps() };
  const listenedAt = Date.now();
  await fakeQemu(t, path, q);
  const armed = await h.ready;
  t.true(armed.socketSeenAt >= listenedAt);
  t.true(armed.setAt >= armed.socketSeenAt);
  t.is(armed.incomingStatus, 'none');
  t.deepEqual(armed.enabled, ['return-path', 'switchover-ack']);
  t.true(q.caps['switchover-ack']);
  await armed.close();
});

test('armDestination: "setup" (listening, no stream) is still in time; "active" is too late; becoming active while setting is a race', async (t) => {
  const dir = tmp(t);
  await fakeQemu(t, join(dir, 'setup.qmp'), { status: 'setup', caps: qemu10Caps() });
  const ok = await armDestination({ path: join(dir, 'setup.qmp') }, { timeoutMs: 10_000 }).ready;
  t.is(ok.incomingStatus, 'setup');
  await ok.close();

  await fakeQemu(t, join(dir, 'active.qmp'), { status: 'active', caps: qemu10Caps() });
  await t.throwsAsync(armDestination({ path: join(dir, 'active.qmp') }, { timeoutMs: 10_000 }).ready, {
    instanceOf: SwitchoverAckError,
    message: /^switchover-ack on the destination .*too late: the migration is already "active"; the capability must be set before the source connects/,
  });

  await fakeQemu(t, join(dir, 'race.qmp'), { status: 'setup', afterSet: 'active', caps: qemu10Caps() });
  await t.throwsAsync(armDestination({ path: join(dir, 'race.qmp') }, { timeoutMs: 10_000 }).ready, { instanceOf: SwitchoverAckError, message: /raced: the migration became "active"/ });
});

test('armDestination: gives up after its time limit, and cancel() ends the wait', async (t) => {
  const dir = tmp(t);
  const t0 = Date.now();
  await t.throwsAsync(armDestination({ path: join(dir, 'never.qmp') }, { timeoutMs: 300 }).ready, { instanceOf: SwitchoverAckError, message: /no destination QEMU within 300 ms \(the socket does not exist\)/ });
  t.true(Date.now() - t0 < 10_000);

  const h = armDestination({ path: join(dir, 'never2.qmp') }, { timeoutMs: 60_000 });
  setTimeout(() => h.cancel(), 100);
  await t.throwsAsync(h.ready, { instanceOf: SwitchoverAckError, message: /cancelled before the destination QEMU was armed/ });

  const ac = new AbortController();
  const h2 = armDestination({ path: join(dir, 'never3.qmp') }, { timeoutMs: 60_000, signal: ac.signal });
  setTimeout(() => ac.abort(), 100);
  await t.throwsAsync(h2.ready, { message: /cancelled/ });
});
