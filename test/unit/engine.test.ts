// The source and destination engines on the fake kernel, with fake QEMU monitors: a
// QMP-coordinated migration (pause-before-switchover, pre-copy before QEMU starts, the
// devices moved at pre-switchover, migrate-continue, the destination kept paused with
// `stop` and continued with `cont` after the devices run), standalone, and the failure
// paths: a device arc, a refused descriptor, a corrupted and a cut stream, QEMU's
// migration failing, the source monitor closing (recovery reconnects). Every failure
// ends with the source devices RUNNING, the source VM running, the destination devices
// RUNNING and not holding the state, no data fd left open, and an outcome naming the cause.
import test from 'ava';
import net from 'node:net';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { installFake } from '../fake/install.ts';
import { VfioDevice } from '../../src/vfio/device.ts';
import { MigState, stateName } from '../../src/vfio/uapi.ts';
import { QmpClient } from '../../src/qmp/client.ts';
import { streamTransport, type Transport } from '../../src/migration/transport.ts';
import { acceptSameIdentity } from '../../src/migration/transfer.ts';
import { migrateSource, type SourceOptions, type SourcePhase } from '../../src/migration/engine-source.ts';
import { receiveDestination, type DestinationOptions } from '../../src/migration/engine-destination.ts';
import { mergeTimelines, downtimeBreakdown } from '../../src/migration/engine.ts';
import { parseTimeline } from '../../src/report/timeline.ts';
import { analyze } from '../../src/report/analysis.ts';

const fake = installFake(test);
const SRC = ['0000:70:00.0', '0000:70:00.1'];
const DST = ['0000:71:00.0', '0000:71:00.1'];
for (const [i, id] of [...SRC, ...DST].entries()) fake.addDevice({ id, flags: 7, seed: 100 + i, stateSize: 40_000 + 1000 * (i % 2), stateOnReopen: 'running' });
const identity = { vendor: '1234', device: '11e8', driver: 'edu-vfio-pci', migration_version: 'edu-1' };
const dir = mkdtempSync(join(tmpdir(), 'vfio-mig-engine-'));
test.after.always(() => rmSync(dir, { recursive: true, force: true }));

// --- a fake QEMU monitor: just enough of QEMU's migration for the engine ----------------

interface Link {
  /** Set by the destination's migrate-incoming; the source's migrate-continue completes it. */
  incoming?: FakeQemu;
}

class FakeQemu {
  readonly commands: string[] = [];
  readonly path: string;
  status: string; // run state
  running: boolean;
  migration = 'none';
  autostart = true;
  failMigrate = false;
  #conns = new Set<net.Socket>();
  #server: net.Server;
  #link: Link;
  #side: 'src' | 'dst';

  constructor(name: string, side: 'src' | 'dst', link: Link) {
    this.path = join(dir, `${name}-${Math.random().toString(16).slice(2)}.qmp`);
    this.#side = side;
    this.#link = link;
    this.status = side === 'src' ? 'running' : 'inmigrate';
    this.running = side === 'src';
    this.#server = net.createServer((c) => this.#serve(c));
  }

  listen(): Promise<void> {
    return new Promise((resolve) => this.#server.listen(this.path, resolve));
  }

  async client(): Promise<QmpClient> {
    return QmpClient.connect({ path: this.path }, { connectTimeoutMs: 5000, commandTimeoutMs: 5000 });
  }

  /** Drops every monitor connection (the QMP socket closing under the engine). */
  dropClients(): void {
    for (const c of this.#conns) c.destroy();
  }

  close(): void {
    this.dropClients();
    this.#server.close();
  }

  event(event: string, data?: Record<string, unknown>): void {
    const now = Date.now();
    const line = `${JSON.stringify({ event, ...(data ? { data } : {}), timestamp: { seconds: Math.floor(now / 1000), microseconds: (now % 1000) * 1000 } })}\n`;
    for (const c of this.#conns) c.write(line);
  }

  #setMigration(s: string): void {
    this.migration = s;
    this.event('MIGRATION', { status: s });
  }

  #serve(c: net.Socket): void {
    this.#conns.add(c);
    c.on('close', () => this.#conns.delete(c));
    c.on('error', () => undefined);
    c.write(`${JSON.stringify({ QMP: { version: { qemu: { major: 10, minor: 0, micro: 2 }, package: '' }, capabilities: [] } })}\n`);
    let buf = '';
    c.on('data', (d) => {
      buf += d.toString();
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (line.trim()) this.#command(c, JSON.parse(line) as { execute: string; id?: unknown; arguments?: Record<string, unknown> });
      }
    });
  }

  #command(c: net.Socket, cmd: { execute: string; id?: unknown; arguments?: Record<string, unknown> }): void {
    this.commands.push(cmd.execute);
    const ret = (value: unknown = {}): void => void c.write(`${JSON.stringify({ return: value, id: cmd.id })}\n`);
    const error = (desc: string): void => void c.write(`${JSON.stringify({ error: { class: 'GenericError', desc }, id: cmd.id })}\n`);
    switch (cmd.execute) {
      case 'qmp_capabilities':
      case 'migrate-set-capabilities':
        return ret();
      case 'query-status':
        return ret({ status: this.status, running: this.running });
      case 'query-migrate':
        return ret(this.migration === 'none' ? {} : { status: this.migration, ...(this.migration === 'completed' ? { downtime: 12, 'total-time': 100 } : {}) });
      case 'query-migrate-capabilities':
        return ret([{ capability: 'pause-before-switchover', state: true }, { capability: 'events', state: true }]);
      case 'stop':
        if (this.status === 'inmigrate') this.autostart = false;
        else this.#pause('paused');
        return ret();
      case 'cont':
        if (this.status === 'inmigrate') return error('Migration is not finalized yet');
        this.status = 'running';
        this.running = true;
        this.event('RESUME');
        return ret();
      case 'migrate-incoming':
        this.#link.incoming = this;
        this.#setMigration('setup');
        return ret();
      case 'migrate':
        ret();
        this.#setMigration('setup');
        setTimeout(() => {
          if (this.migration !== 'setup') return;
          this.#setMigration('active');
          setTimeout(() => {
            if (this.migration !== 'active') return;
            if (this.failMigrate) {
              this.#setMigration('failed');
              this.#link.incoming?.incomingFailed();
              return;
            }
            this.#pause('finish-migrate');
            this.#setMigration('pre-switchover');
          }, 30);
        }, 5);
        return;
      case 'migrate-continue':
        if (this.migration !== 'pre-switchover') return error(`Migration not in expected state: ${this.migration}`);
        ret();
        setTimeout(() => {
          this.#setMigration('device');
          this.#setMigration('completed');
          this.status = 'postmigrate';
          this.#link.incoming?.incomingCompleted();
        }, 10);
        return;
      case 'migrate_cancel':
        ret();
        if (this.migration !== 'none' && this.migration !== 'completed' && this.migration !== 'failed') {
          this.#setMigration('cancelled');
          this.#link.incoming?.incomingFailed();
          // QEMU restarts a VM its migration had stopped.
          if (this.#side === 'src' && !this.running) {
            this.status = 'running';
            this.running = true;
            this.event('RESUME');
          }
        }
        return;
      default:
        return error(`The command ${cmd.execute} has not been found`);
    }
  }

  #pause(status: string): void {
    this.status = status;
    if (this.running) {
      this.running = false;
      this.event('STOP');
    }
  }

  incomingCompleted(): void {
    this.#setMigration('completed');
    if (this.autostart) {
      this.status = 'running';
      this.running = true;
      this.event('RESUME');
    } else this.status = 'paused';
  }

  incomingFailed(): void {
    this.#setMigration('failed');
  }
}

// --- harness -----------------------------------------------------------------------------

function pipePair(): [Transport, Transport] {
  const a = new PassThrough();
  const b = new PassThrough();
  return [streamTransport(b, a, 'to-destination'), streamTransport(a, b, 'from-source')];
}

interface Scenario {
  qemu?: boolean;
  source?: Partial<SourceOptions>;
  destination?: Partial<DestinationOptions>;
  /** Changes the bytes from source to destination. */
  tamper?: (t: Transport) => Transport;
  setup?: (vms: { src: FakeQemu; dst: FakeQemu }) => void;
}

async function scenario(s: Scenario) {
  const link: Link = {};
  const src = new FakeQemu('src', 'src', link);
  const dst = new FakeQemu('dst', 'dst', link);
  await src.listen();
  await dst.listen();
  s.setup?.({ src, dst });
  const srcQmp = s.qemu ? await src.client() : undefined;
  const dstQmp = s.qemu ? await dst.client() : undefined;
  const sdev = SRC.map((id) => VfioDevice.open(id));
  const ddev = DST.map((id) => VfioDevice.open(id));
  const [toDst, fromSrc] = pipePair();
  let n = 0;
  let accepted = false;
  try {
    const [so, de] = await Promise.all([
      migrateSource({
        devices: sdev,
        describe: () => identity,
        connect: async () => (s.tamper ? s.tamper(toDst) : toDst),
        ...(srcQmp ? { vm: { qmp: srcQmp, uri: 'unix:/nowhere', reconnect: () => src.client() } } : {}),
        ...s.source,
      }),
      receiveDestination({
        devices: ddev,
        accept: async () => {
          accepted = true;
          return fromSrc;
        },
        route: () => DST[n++]!,
        check: acceptSameIdentity(() => identity),
        ...(dstQmp ? { vm: { qmp: dstQmp, uri: 'unix:/nowhere' } } : {}),
        idleTimeoutMs: 3000,
        ...s.destination,
      }).finally(() => {
        // A destination that gave up before accepting: its listener closes (as the CLI's does).
        if (!accepted) fromSrc.close();
      }),
    ]);
    const states = {
      source: await Promise.all(sdev.map(async (d) => stateName(await d.state()))),
      destination: await Promise.all(ddev.map(async (d) => stateName(await d.state()))),
    };
    const fds = [...sdev, ...ddev].reduce((a, d) => a + d.openDataFds, 0);
    return { so: so.outcome, de: de.outcome, merged: mergeTimelines(so.timeline, de.timeline), states, fds, src, dst };
  } finally {
    await srcQmp?.close().catch(() => undefined);
    await dstQmp?.close().catch(() => undefined);
    for (const d of [...sdev, ...ddev]) await d.close();
    src.close();
    dst.close();
  }
}

test.afterEach.always(() => fake.resetAll());

const digests = () => ({ src: SRC.map((id) => fake.device(id).digest()), dst: DST.map((id) => fake.device(id).digest()) });

// --- the good paths ---------------------------------------------------------------------

test.serial('QMP-coordinated: pre-copy before migrate, devices at pre-switchover, continue; the destination stays paused until cont', async (t) => {
  const before = digests();
  const phases: SourcePhase[] = [];
  const r = await scenario({ qemu: true, source: { onPhase: (p) => void phases.push(p) } });
  t.true(r.so.ok, r.so.cause);
  t.true(r.de.ok, r.de.cause);
  t.deepEqual(digests().dst, before.src, 'the destination devices hold the source state');
  t.deepEqual(r.states.destination, ['RUNNING', 'RUNNING']);
  t.deepEqual(r.states.source, ['STOP', 'STOP'], 'the source copy stays stopped until released');
  t.is(r.fds, 0);
  // Source: capabilities, then migrate only after pre-copy, continue only after the devices moved.
  const sc = r.src.commands;
  t.true(sc.indexOf('migrate-set-capabilities') < sc.indexOf('migrate'));
  t.true(sc.includes('migrate-continue'));
  t.false(sc.includes('migrate_cancel'));
  t.deepEqual(phases, ['validated', 'connected', 'pre-copy', 'qemu-started', 'vcpus-stopped', 'quiesced', 'stop-copy', 'destination-committed', 'source-stopped', 'completed']);
  // Destination: stop (autostart off) before migrate-incoming; cont at the end.
  const dc = r.dst.commands;
  t.true(dc.indexOf('stop') < dc.indexOf('migrate-incoming'));
  t.is(dc.at(-2) === 'cont' || dc.includes('cont'), true);
  t.is(r.dst.status, 'running');
  t.is(r.src.status, 'postmigrate');
  // The vCPUs stopped before any source device left RUNNING_P2P / PRE_COPY_P2P for a stopped state.
  const d = downtimeBreakdown(r.merged);
  t.truthy(d);
  t.true(d!.totalMs >= 0);
  t.true(Math.abs(d!.phases.reduce((a, p) => a + p.ms, 0) - d!.totalMs) < 0.01, 'the phases add up to the downtime');
  const a = analyze(parseTimeline(JSON.parse(JSON.stringify(r.merged))));
  t.is(a.verdict, 'ok', a.reason);
});

test.serial('standalone: no VM, devices quiesced, saved, streamed, restored, resumed', async (t) => {
  const before = digests();
  const r = await scenario({});
  t.true(r.so.ok && r.de.ok, `${r.so.cause} ${r.de.cause}`);
  t.deepEqual(digests().dst, before.src);
  t.is(r.fds, 0);
  t.is(r.so.vm, undefined);
});

// --- failures ----------------------------------------------------------------------------

function assertRecovered(t: import('ava').ExecutionContext, r: Awaited<ReturnType<typeof scenario>>, before: ReturnType<typeof digests>, cause: RegExp, qemu = true): void {
  t.false(r.so.ok);
  t.regex(r.so.cause ?? '', cause);
  t.deepEqual(r.states.source, ['RUNNING', 'RUNNING'], 'every source device RUNNING');
  t.deepEqual(r.states.destination, ['RUNNING', 'RUNNING'], 'every destination device RUNNING');
  t.deepEqual(digests().src, before.src, 'the source devices keep their state');
  t.is(r.fds, 0, 'no data fd left open');
  if (qemu) {
    t.is(r.src.status, 'running', 'the source VM runs');
    t.true(r.src.running);
    t.not(r.dst.status, 'running', 'the destination VM was not started');
  }
}

for (const [arc, phase] of [
  ['RUNNING>PRE_COPY', 'pre-copy'],
  ['PRE_COPY>PRE_COPY_P2P', 'quiesce'],
  ['PRE_COPY_P2P>STOP_COPY', 'stop-copy'],
  ['STOP_COPY>STOP', 'finish'],
] as const) {
  test.serial(`a source arc fails (${arc}): rollback, migrate_cancel, VM running`, async (t) => {
    const before = digests();
    fake.inject(SRC[1]!, { arc, errno: 5 });
    const r = await scenario({ qemu: true });
    assertRecovered(t, r, before, new RegExp(`${phase}|EIO`));
    t.true(r.so.recovery.some((x) => /rolled back/.test(x)));
    if (phase !== 'pre-copy') t.true(r.src.commands.includes('migrate_cancel'));
  });
}

for (const arc of ['RUNNING>RUNNING_P2P', 'STOP>RESUMING', 'RESUMING>STOP', 'RUNNING_P2P>RUNNING']) {
  test.serial(`a destination arc fails (${arc}): the source rolls back and the VM runs on the source`, async (t) => {
    const before = digests();
    fake.inject(DST[0]!, { arc, errno: 5 });
    const r = await scenario({ qemu: true });
    assertRecovered(t, r, before, /refused|EIO|closed|verdict/);
    t.false(r.de.ok);
  });
}

test.serial('a destination device with another migration_version refuses before RESUMING', async (t) => {
  const before = digests();
  const r = await scenario({ qemu: true, destination: { check: acceptSameIdentity(() => ({ ...identity, migration_version: 'edu-2' })) } });
  assertRecovered(t, r, before, /migration_version/);
  t.false(
    DST.some((id) => fake.device(id).arcLog.some((a) => a.to === MigState.Resuming)),
    'no destination device entered RESUMING',
  );
});

test.serial('a corrupted stream is refused before any commit', async (t) => {
  const before = digests();
  let seen = 0;
  const r = await scenario({
    qemu: true,
    tamper: (inner) => ({
      ...inner,
      peer: inner.peer,
      readable: inner.readable,
      write: (b: Buffer) => {
        seen += b.length;
        // flip one byte well inside the data
        if (seen > 30_000 && seen - b.length <= 30_000) {
          const c = Buffer.from(b);
          c[c.length - 1]! ^= 0xff;
          return inner.write(c);
        }
        return inner.write(b);
      },
      end: () => inner.end(),
      close: () => inner.close(),
    }),
  });
  assertRecovered(t, r, before, /refused|digest|corrupt|checksum/i);
});

test.serial('a truncated stream: the destination resets, the source rolls back', async (t) => {
  const before = digests();
  let sent = 0;
  const r = await scenario({
    qemu: true,
    tamper: (inner) => ({
      ...inner,
      peer: inner.peer,
      readable: inner.readable,
      write: (b: Buffer) => {
        sent += b.length;
        if (sent > 50_000) {
          inner.close();
          return Promise.reject(new Error('cut'));
        }
        return inner.write(b);
      },
      end: () => inner.end(),
      close: () => inner.close(),
    }),
  });
  assertRecovered(t, r, before, /cut|closed|verdict|truncat/i);
});

test.serial("QEMU's migration fails: the engine stops, rolls back, the VM runs", async (t) => {
  const before = digests();
  const r = await scenario({ qemu: true, setup: ({ src }) => (src.failMigrate = true) });
  assertRecovered(t, r, before, /failed/);
  t.false(r.de.ok);
});

test.serial('the source QMP socket closes mid-migration: recovery reconnects, cancels, continues the VM', async (t) => {
  const before = digests();
  let vms: { src: FakeQemu } | undefined;
  const r = await scenario({
    qemu: true,
    setup: (v) => (vms = v),
    source: {
      onPhase: (p) => {
        if (p === 'quiesced') vms!.src.dropClients();
      },
    },
  });
  assertRecovered(t, r, before, /QMP|closed/);
  t.true(r.so.recovery.some((x) => /reconnected/.test(x)));
});

test.serial('a destination QEMU that is not waiting for a migration is refused before anything moves', async (t) => {
  const before = digests();
  const r = await scenario({ qemu: true, setup: ({ dst }) => (dst.status = 'running') });
  t.false(r.de.ok);
  t.regex(r.de.cause ?? '', /-incoming/);
  assertRecovered(t, r, before, /closed|verdict|refused/, false);
  t.is(r.src.status, 'running');
  t.false(r.dst.commands.includes('stop'), 'the running destination VM was left alone');
});

// --- the commands ------------------------------------------------------------------------

test.serial('vfio-mig receive and migrate-devices (standalone, unix socket, token): state moved, timelines written, exit 0', async (t) => {
  const { main } = await import('../../src/cli/main.ts');
  const { existsSync, readFileSync } = await import('node:fs');
  const before = digests();
  const sock = join(dir, `cli-${Date.now()}.sock`);
  const token = 'ab'.repeat(32);
  const sink = () => {
    let text = '';
    return { stream: { write: (s: string) => ((text += s), true) } as unknown as NodeJS.WritableStream, text: () => text };
  };
  const rOut = sink();
  const sOut = sink();
  const err = sink();
  const recvTimeline = join(dir, 'recv.json');
  const sendTimeline = join(dir, 'send.json');
  const receiving = main(['receive', '--device', DST[0]!, '--device', DST[1]!, '--from', `unix:${sock}`, '--token', token, '--timeline', recvTimeline], rOut.stream, err.stream);
  for (let i = 0; i < 100 && !existsSync(sock); i++) await new Promise((r) => setTimeout(r, 20));
  const sending = main(['migrate-devices', '--device', SRC[0]!, '--device', SRC[1]!, '--to', `unix:${sock}`, '--token', token, '--timeline', sendTimeline], sOut.stream, err.stream);
  const [rc, sc] = await Promise.all([receiving, sending]);
  t.is(rc, 0, `${rOut.text()}${err.text()}`);
  t.is(sc, 0, `${sOut.text()}${err.text()}`);
  t.regex(sOut.text(), /source: migration completed/);
  t.regex(rOut.text(), /destination: migration completed/);
  t.deepEqual(digests().dst, before.src);
  const tl = JSON.parse(readFileSync(sendTimeline, 'utf8')) as { engine: { sides: { source: { ok: boolean } } } };
  t.true(tl.engine.sides.source.ok);
  t.true(existsSync(recvTimeline));
});

test.serial('vfio-mig migrate-devices refuses a socket without a token or TLS (usage, exit 2)', async (t) => {
  const { main } = await import('../../src/cli/main.ts');
  let text = '';
  const s = { write: (x: string) => ((text += x), true) } as unknown as NodeJS.WritableStream;
  t.is(await main(['migrate-devices', '--device', SRC[0]!, '--to', 'unix:/tmp/x.sock'], s, s), 2);
  t.regex(text, /--token/);
});

test.serial('vfio-mig trial --peer-device: the state loads on the spare; evidence stored under the state dir; the trial device runs', async (t) => {
  const { main } = await import('../../src/cli/main.ts');
  const { readFileSync } = await import('node:fs');
  const stateDir = mkdtempSync(join(dir, 'state-'));
  const saved = process.env.VFIO_MIG_STATE_DIR;
  process.env.VFIO_MIG_STATE_DIR = stateDir;
  let text = '';
  const s = { write: (x: string) => ((text += x), true) } as unknown as NodeJS.WritableStream;
  try {
    const before = fake.device(SRC[0]!).digest();
    t.is(await main(['trial', '--device', SRC[0]!, '--peer-device', DST[0]!, '--timeline', join(stateDir, 'trial.json')], s, s), 0, text);
    t.is(fake.device(DST[0]!).digest(), before);
    const ev = JSON.parse(readFileSync(join(stateDir, 'trials', `${SRC[0]!}.json`), 'utf8')) as { ok: boolean; peer: { device: string } };
    t.true(ev.ok);
    t.is(ev.peer.device, DST[0]!);
    const dev = VfioDevice.open(SRC[0]!);
    t.is(await dev.state(), MigState.Running);
    await dev.close();
  } finally {
    if (saved === undefined) delete process.env.VFIO_MIG_STATE_DIR;
    else process.env.VFIO_MIG_STATE_DIR = saved;
  }
});
