// Transports for the state stream, on the fake kernel: mutual TLS with a throwaway CA made
// here with the openssl command (never committed), a one-time token, stdio through a
// child process's pipes (as `ssh host vfio-mig receive` carries it), and backpressure
// end to end (1 GiB through a socket with a bounded RSS). A wrong certificate or token is
// dropped before any byte reaches a device: the destination never leaves RUNNING and no
// write reaches its fd; the right peer then migrates the set end to end.
import test from 'ava';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { installFake } from '../fake/install.ts';
import { VfioDevice } from '../../src/vfio/device.ts';
import { Coordinator } from '../../src/migration/coordinator.ts';
import { sendDevices, receiveDevices, writeDevices, acceptSameIdentity, TransferError, type DeviceSource } from '../../src/migration/transfer.ts';
import { readStream } from '../../src/migration/stream.ts';
import { listen, connect, newToken, spawnTransport, streamTransport, TransportError, type PkiFiles, type Listener, type Transport } from '../../src/migration/transport.ts';
import { MigState } from '../../src/vfio/uapi.ts';
import { SysError } from '../../src/host/sys.ts';
import { Errno } from '../../src/host/errno.ts';

const fake = installFake(test);
const SRC = ['0000:a0:00.0', '0000:a0:00.1'];
const DST = ['0000:a1:00.0', '0000:a1:00.1'];
for (const [i, id] of [...SRC, ...DST].entries()) fake.addDevice({ id, flags: 7, seed: 40 + i, stateSize: 5000 + 1000 * (i % 2), validatesData: false });
const route = (src: string) => DST[SRC.indexOf(src)]!;
const identity = { vendor: '1234', device: '11e8', driver: 'edu-vfio-pci', migration_version: 'edu-1' };
const describe = () => identity;

let writes = 0;
const realWrite = fake.write.bind(fake);
fake.write = async (fd, buf, len) => {
  writes++;
  return realWrite(fd, buf, len);
};
const dstEvents = () => fake.events.filter((e) => DST.includes(e.device));

// ---- a throwaway PKI, made with openssl at test time ----
const dir = mkdtempSync(join(tmpdir(), 'vfio-mig-transport-'));
test.after.always(() => rmSync(dir, { recursive: true, force: true }));

function openssl(...args: string[]): void {
  execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
}
function makeCa(name: string): void {
  openssl('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', `${name}.key`, '-out', `${name}.pem`, '-days', '1', '-subj', `/CN=${name}`);
}
function makeCert(ca: string, name: string): void {
  openssl('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${name}`);
  writeFileSync(join(dir, `${name}.ext`), 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n');
  openssl('x509', '-req', '-in', `${name}.csr`, '-CA', `${ca}.pem`, '-CAkey', `${ca}.key`, '-CAcreateserial', '-out', `${name}.pem`, '-days', '1', '-extfile', `${name}.ext`);
}
makeCa('ca');
makeCa('otherca');
makeCert('ca', 'server');
makeCert('ca', 'client');
makeCert('otherca', 'rogue');
const p = (f: string) => join(dir, f);
const serverPki: Partial<PkiFiles> = { caCert: p('ca.pem'), serverCert: p('server.pem'), serverKey: p('server.key') };
const clientPki: Partial<PkiFiles> = { caCert: p('ca.pem'), clientCert: p('client.pem'), clientKey: p('client.key') };
const roguePki: Partial<PkiFiles> = { caCert: p('ca.pem'), clientCert: p('rogue.pem'), clientKey: p('rogue.key') };

async function waitFor(cond: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error('timed out waiting');
    await new Promise((r) => setTimeout(r, 10));
  }
}

/**
 * A destination waiting on `listener`, wrong peers tried first (each must be dropped
 * with nothing reaching the destination), then the right sender migrates the set.
 */
async function scenario(t: import('ava').ExecutionContext, listener: Listener, wrong: (() => Promise<Transport>)[], right: () => Promise<Transport>) {
  fake.resetAll();
  writes = 0;
  const srcDevs = SRC.map((id) => VfioDevice.open(id));
  const dstDevs = DST.map((id) => VfioDevice.open(id));
  try {
    const src = await Coordinator.create(srcDevs);
    const dst = await Coordinator.create(dstDevs);
    const receiving = listener.accept().then((tr) => receiveDevices(dst, tr, route, acceptSameIdentity(describe)));
    receiving.catch(() => undefined);
    for (const [i, attempt] of wrong.entries()) {
      const err = await t.throwsAsync(attempt(), { instanceOf: TransportError });
      t.is(err?.code, 'AUTH', err?.message);
      await waitFor(() => listener.refused.length === i + 1);
    }
    t.deepEqual(dstEvents(), [], 'no destination device left RUNNING');
    t.is(writes, 0, 'no write reached a destination fd');
    for (const id of DST) t.is(fake.device(id).state, MigState.Running);
    await src.quiesce();
    await src.stopCopy();
    const sent = await sendDevices(src, describe, await right());
    const got = await receiving;
    t.true(sent.receiver.ok);
    t.is(got.devices, 2);
    t.is(got.bytes, sent.bytes);
    for (const [i, id] of DST.entries()) {
      t.is(fake.device(id).digest(), fake.device(SRC[i]!).digest(), 'bytes verified: the destination holds the source state');
      t.is(fake.device(id).state, MigState.Running);
    }
    t.deepEqual(src.states(), { [SRC[0]!]: 'STOP', [SRC[1]!]: 'STOP' });
  } finally {
    for (const d of [...srcDevs, ...dstDevs]) await d.close();
  }
}

test.serial('mutual TLS: a client certificate from another CA, and a peer without TLS, are refused; the right one migrates the set', async (t) => {
  const listener = await listen({ host: '127.0.0.1', port: 0 }, { tls: serverPki });
  const ep = listener.endpoint;
  await scenario(t, listener, [() => connect(ep, { tls: roguePki, timeoutMs: 3000 }), () => connect(ep, { token: newToken(), timeoutMs: 3000 })], () => connect(ep, { tls: clientPki }));
  t.regex(listener.refused[0]!.reason, /TLS/);
  await listener.close();
});

test.serial('mutual TLS: the sender refuses a receiver whose certificate another CA signed', async (t) => {
  const listener = await listen({ host: '127.0.0.1', port: 0 }, { tls: { caCert: p('ca.pem'), serverCert: p('rogue.pem'), serverKey: p('rogue.key') }, acceptTimeoutMs: 5000 });
  const err = await t.throwsAsync(connect(listener.endpoint, { tls: clientPki, timeoutMs: 3000 }), { instanceOf: TransportError });
  t.is(err?.code, 'AUTH');
  t.regex(err?.message ?? '', /certificate/);
  await listener.close();
});

test.serial('one-time token over a unix socket: a wrong token is dropped; the right one migrates; it works once', async (t) => {
  const token = newToken();
  t.regex(token, /^[0-9a-f]{64}$/);
  const path = join(dir, 'recv.sock');
  const listener = await listen({ path }, { token });
  await scenario(t, listener, [() => connect({ path }, { token: newToken(), timeoutMs: 3000 })], () => connect({ path }, { token }));
  t.is(listener.refused[0]!.reason, 'wrong token');
  // Single use: the listener is gone once one sender got in.
  await t.throwsAsync(connect({ path }, { token, timeoutMs: 2000 }));
});

test.serial('a receiver that refuses the descriptors answers why; the sender rolls back to RUNNING', async (t) => {
  fake.resetAll();
  writes = 0;
  const token = newToken();
  const listener = await listen({ host: '127.0.0.1', port: 0 }, { token });
  const srcDevs = SRC.map((id) => VfioDevice.open(id));
  const dstDevs = DST.map((id) => VfioDevice.open(id));
  try {
    const src = await Coordinator.create(srcDevs);
    const dst = await Coordinator.create(dstDevs);
    const receiving = listener.accept().then((tr) => receiveDevices(dst, tr, route, acceptSameIdentity(() => ({ ...identity, migration_version: 'edu-2' })), { drainMs: 2000 }));
    receiving.catch(() => undefined);
    await src.quiesce();
    await src.stopCopy();
    const err = await t.throwsAsync(sendDevices(src, describe, await connect(listener.endpoint, { token })), { instanceOf: TransferError });
    t.is(err?.code, 'REMOTE_REFUSED');
    t.is(err?.device, SRC[0]);
    t.regex(err?.message ?? '', /migration_version "edu-1" does not match "edu-2"/);
    await t.throwsAsync(receiving, { message: /does not match/ });
    for (const id of [...SRC, ...DST]) t.is(fake.device(id).state, MigState.Running, id);
    t.deepEqual(dstEvents(), []);
    t.is(writes, 0);
  } finally {
    for (const d of [...srcDevs, ...dstDevs]) await d.close();
  }
});

test.serial('a source that fails mid-stream cuts the connection; the receiver resets its devices, never commits', async (t) => {
  fake.resetAll();
  const token = newToken();
  const listener = await listen({ host: '127.0.0.1', port: 0 }, { token });
  const srcDevs = SRC.map((id) => VfioDevice.open(id));
  const dstDevs = DST.map((id) => VfioDevice.open(id));
  for (const id of DST) fake.device(id).payload = Buffer.alloc(fake.device(id).spec.stateSize, 5);
  const old = DST.map((id) => fake.device(id).digest());
  let reads = 0;
  const realRead = fake.read.bind(fake);
  fake.read = async (fd, buf, len) => {
    if (++reads === 4) throw new SysError('read', Errno.EIO);
    return realRead(fd, buf, len);
  };
  try {
    const src = await Coordinator.create(srcDevs);
    const dst = await Coordinator.create(dstDevs);
    const receiving = listener.accept().then((tr) => receiveDevices(dst, tr, route, acceptSameIdentity(describe)));
    receiving.catch(() => undefined);
    await src.quiesce();
    await src.stopCopy();
    await t.throwsAsync(sendDevices(src, describe, await connect(listener.endpoint, { token }), { chunkSize: 1000 }), { message: /EIO/ });
    const err = await t.throwsAsync(receiving);
    t.regex(err?.message ?? '', /closed|truncated/);
    for (const id of [...SRC, ...DST]) t.is(fake.device(id).state, MigState.Running, id);
    t.deepEqual(DST.map((id) => fake.device(id).digest()), old, 'the partial state was never committed');
    t.true(dstEvents().some((e) => e.kind === 'reset'), 'RESUMING ended by a reset');
  } finally {
    fake.read = realRead;
    for (const d of [...srcDevs, ...dstDevs]) await d.close();
  }
});

test.serial('a sender that stalls is given up after the idle time; the receiver resets its devices', async (t) => {
  fake.resetAll();
  const token = newToken();
  const listener = await listen({ host: '127.0.0.1', port: 0 }, { token });
  const dstDevs = DST.map((id) => VfioDevice.open(id));
  const tr = await connect(listener.endpoint, { token }).then((x) => x, (e: unknown) => Promise.reject(e));
  try {
    const dst = await Coordinator.create(dstDevs);
    const receiving = listener.accept().then((r) => receiveDevices(dst, r, route, () => ({ ok: true }), { idleTimeoutMs: 300, drainMs: 100 }));
    // Descriptors and a little of one device, then silence (the sender hangs).
    void writeDevices((b) => tr.write(b), [
      {
        device: SRC[0]!,
        descriptor: identity,
        read: async (sink) => {
          await sink(Buffer.alloc(100));
          await new Promise((r) => setTimeout(r, 5000).unref());
          return 100;
        },
      },
      { device: SRC[1]!, descriptor: identity, read: async () => 0 },
    ]).catch(() => undefined);
    await t.throwsAsync(receiving, { message: /no data for 300 ms: the sender stalled/ });
    for (const id of DST) t.is(fake.device(id).state, MigState.Running, id);
    t.true(dstEvents().some((e) => e.kind === 'reset'), 'RESUMING ended by a reset');
  } finally {
    tr.close();
    for (const d of dstDevs) await d.close();
  }
});

test.serial('over a pair of pipes (what ssh gives): sendDevices -> receiveDevices with the verdict coming back', async (t) => {
  const { PassThrough } = await import('node:stream');
  const toReceiver = new PassThrough();
  const toSender = new PassThrough();
  await scenario(t, { refused: [], endpoint: { path: '-' }, accept: async () => streamTransport(toReceiver, toSender, 'stdio'), close: async () => undefined }, [], async () =>
    streamTransport(toSender, toReceiver, 'ssh'),
  );
});

test.serial('no verdict (the receiver went away after the stream): the source is rolled back to RUNNING', async (t) => {
  fake.resetAll();
  const { PassThrough } = await import('node:stream');
  const toReceiver = new PassThrough();
  const toSender = new PassThrough();
  const srcDevs = SRC.map((id) => VfioDevice.open(id));
  try {
    const src = await Coordinator.create(srcDevs);
    await src.quiesce();
    await src.stopCopy();
    // A receiver that reads everything and then closes without answering.
    const receiver = streamTransport(toReceiver, toSender, 'stdio');
    const reading = (async () => {
      for await (const _ of readStream(receiver.readable)) void _;
      await receiver.end();
    })();
    const err = await t.throwsAsync(sendDevices(src, describe, streamTransport(toSender, toReceiver, 'ssh')), { instanceOf: TransferError });
    await reading;
    t.is(err?.code, 'NO_VERDICT');
    for (const id of SRC) t.is(fake.device(id).state, MigState.Running, id);
  } finally {
    for (const d of srcDevs) await d.close();
  }
});

test('listeners bind only the address given, and only with authentication', async (t) => {
  for (const host of ['0.0.0.0', '::', '']) {
    await t.throwsAsync(listen({ host, port: 0 }, { token: newToken() }), { instanceOf: TransportError, message: /wildcard/ });
  }
  const explicit = await listen({ host: '0.0.0.0', port: 0 }, { token: newToken(), allowWildcard: true });
  await explicit.close();
  await t.throwsAsync(listen({ host: '127.0.0.1', port: 0 }, {}), { message: /needs TLS or a token/ });
  await t.throwsAsync(listen({ host: '127.0.0.1', port: 0 }, { token: 'abc' }), { message: /32 bytes/ });
  await t.throwsAsync(listen({ host: '127.0.0.1', port: 0 }, { tls: { serverCert: p('missing.pem') } }), { message: /cannot read the server/ });
  // A peer that says nothing is dropped after the handshake time.
  const l = await listen({ host: '127.0.0.1', port: 0 }, { token: newToken(), authTimeoutMs: 200 });
  const net = await import('node:net');
  const ep = l.endpoint as { host: string; port: number };
  const s = net.connect(ep.port, ep.host);
  s.on('error', () => undefined);
  await waitFor(() => l.refused.length === 1);
  t.regex(l.refused[0]!.reason, /no the handshake within 200 ms|handshake/);
  s.destroy();
  await l.close();
});

test.serial('stdio: a child process reads the stream on stdin and answers on stdout (as over ssh)', async (t) => {
  const script = join(dir, 'child.mts');
  const src = resolve('src/migration');
  writeFileSync(
    script,
    `import { stdioTransport } from ${JSON.stringify(join(src, 'transport.ts'))};
import { readStream } from ${JSON.stringify(join(src, 'stream.ts'))};
const t = stdioTransport();
const bytes = {};
for await (const e of readStream(t.readable)) if (e.type === 'device-verified') bytes[e.device] = e.bytes;
await t.write(Buffer.from(JSON.stringify(bytes) + '\\n'));
await t.end();
`,
  );
  const tr = spawnTransport(process.execPath, ['--import', 'tsx', script]);
  const gen = (n: number, fill: number): DeviceSource['read'] => async (sink) => {
    for (let i = 0; i < n; i++) await sink(Buffer.alloc(64 * 1024, fill));
    return n * 64 * 1024;
  };
  await writeDevices((b) => tr.write(b), [
    { device: 'a', descriptor: {}, read: gen(40, 1) },
    { device: 'b', descriptor: {}, read: gen(20, 2) },
  ]);
  await tr.end();
  let answer = '';
  for await (const piece of tr.readable) answer += piece.toString();
  t.deepEqual(JSON.parse(answer), { a: 40 * 65536, b: 20 * 65536 });
  // A command that does not exist is a transport error, not a crash.
  const none = spawnTransport(join(dir, 'no-such-ssh'), ['host']);
  await t.throwsAsync(async () => {
    for await (const _ of none.readable) void _;
  }, { instanceOf: TransportError });
});

test.serial('backpressure: 1 GiB from two generators through a socket into a sink, RSS stays bounded', async (t) => {
  const token = newToken();
  const listener = await listen({ host: '127.0.0.1', port: 0 }, { token });
  const MiB = 1 << 20;
  const perDevice = 512; // MiB, two devices read at once
  const baseline = process.memoryUsage().rss;
  let peak = baseline;
  const sampler = setInterval(() => (peak = Math.max(peak, process.memoryUsage().rss)), 20);
  const started = performance.now();
  try {
    const receiving = (async () => {
      const tr = await listener.accept();
      const got = [0, 0];
      for await (const e of readStream(tr.readable)) {
        if (e.type === 'data') got[e.index]! += e.chunk.length; // the sink: counted, dropped
        if (e.type === 'end') break;
      }
      tr.close();
      return got;
    })();
    const tr = await connect(listener.endpoint, { token });
    const gen =
      (fill: number): DeviceSource['read'] =>
      async (sink) => {
        for (let i = 0; i < perDevice; i++) await sink(Buffer.alloc(MiB, fill + i)); // a fresh chunk each time, like a data fd read
        return perDevice * MiB;
      };
    const r = await writeDevices((b) => tr.write(b), [
      { device: 'big0', descriptor: {}, read: gen(1) },
      { device: 'big1', descriptor: {}, read: gen(2) },
    ]);
    await tr.end();
    const got = await receiving;
    t.is(r.bytes, 2 * perDevice * MiB);
    t.deepEqual(got, [perDevice * MiB, perDevice * MiB], 'every byte arrived, digests verified');
  } finally {
    clearInterval(sampler);
  }
  const growth = (peak - baseline) / MiB;
  t.log(`1 GiB in ${((performance.now() - started) / 1000).toFixed(1)} s; RSS baseline ${(baseline / MiB).toFixed(0)} MiB, peak ${(peak / MiB).toFixed(0)} MiB (+${growth.toFixed(0)} MiB)`);
  t.true(growth < 200, `RSS grew by ${growth.toFixed(0)} MiB`);
});
