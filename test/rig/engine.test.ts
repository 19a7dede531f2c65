// The engine against the real 6.12 kernel, with two nested QEMU 10 VMs (no OS, no VFIO
// device: vfio-mig holds the devices next to them and QEMU migrates RAM and vCPUs).
// The QMP-coordinated path with edu (several MiB of state per device) and with mtty; then
// a fault at every step: each source and destination arc (edu's fail_arc knob), a
// corrupted and a truncated stream, the receiving process killed mid-stream, the source
// QMP socket closing, QEMU's migration failing, a destination edu whose migration_version
// does not match. Every failure must end with the source VM running, every source device
// RUNNING with its state, the destination devices not holding it, no fd or process left,
// and an outcome naming the cause.
import test, { type ExecutionContext } from 'ava';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, existsSync, readdirSync, readlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { VfioDevice } from '../../src/vfio/device.ts';
import { saveState } from '../../src/migration/trial.ts';
import { newToken, connect, type Transport } from '../../src/migration/transport.ts';
import { migrateSource, qmpReconnector } from '../../src/migration/engine-source.ts';
import { describeForStream } from '../../src/cli/migrate-devices.ts';
import { parseTimeline } from '../../src/report/timeline.ts';
import { analyze } from '../../src/report/analysis.ts';
import { requireRig, prepareEdu, prepareMtty, eduKnob, eduInject } from './guest.ts';
import { startVmPair, runEngines, type EngineRun, type EngineVm } from './engine-vms.ts';

requireRig(test);

let edu: string[] = [];
let mtty: string[] = [];
test.before(() => {
  edu = prepareEdu();
  mtty = prepareMtty(2);
});

const MIB = 1 << 20;

interface Ctx {
  dir: string;
  vms: { src: EngineVm; dst: EngineVm; ramUri: string };
  src: VfioDevice[];
  dst: VfioDevice[];
  fdsBefore: number;
}

async function setup(t: ExecutionContext, srcIds: string[], dstIds: string[]): Promise<Ctx> {
  const fdsBefore = ownedFds().length;
  const dir = mkdtempSync(join(tmpdir(), 'vfio-mig-engine-'));
  const vms = await startVmPair(dir);
  const src = srcIds.map((id) => VfioDevice.open(id));
  const dst = dstIds.map((id) => VfioDevice.open(id));
  t.teardown(async () => {
    for (const d of [...src, ...dst]) await d.close();
    await vms.src.stop();
    await vms.dst.stop();
    rmSync(dir, { recursive: true, force: true });
  });
  return { dir, vms, src, dst, fdsBefore };
}

/** Closes what the test opened and checks nothing is left (fds, QEMU processes). */
async function closeAndCheck(t: ExecutionContext, c: Ctx): Promise<void> {
  for (const d of [...c.src, ...c.dst]) await d.close();
  await c.vms.src.stop();
  await c.vms.dst.stop();
  // Sockets close asynchronously: give them a moment before counting. Only what the
  // engine can own is counted (VFIO groups/containers/devices, data fds, sockets): the
  // runtime's own fds (worker threads' event loops) come and go.
  for (let i = 0; i < 20 && ownedFds().length > c.fdsBefore; i++) await new Promise((r) => setTimeout(r, 100));
  t.deepEqual(ownedFds().length, c.fdsBefore, `no fd leaked (now: ${ownedFds().join(' ')})`);
  t.not(c.vms.src.proc.exitCode ?? c.vms.src.proc.signalCode, null, 'source QEMU reaped');
}

/** Our process's fds that the engine could leak: VFIO, data fds (anon inodes named after vfio), sockets. */
function ownedFds(): string[] {
  return readdirSync('/proc/self/fd')
    .map((fd) => {
      try {
        return `${fd}:${readlinkSync(`/proc/self/fd/${fd}`)}`;
      } catch {
        return `${fd}:?`;
      }
    })
    .filter((l) => /vfio|socket:|edu|mtty/.test(l));
}

async function vmStatus(vm: EngineVm): Promise<{ status: string; running: boolean }> {
  return (await vm.qmp.execute('query-status')) as { status: string; running: boolean };
}

async function assertFailedAndRecovered(t: ExecutionContext, c: Ctx, run: { so: EngineRun['source']['outcome'] }, cause: RegExp, srcDigests?: string[]): Promise<void> {
  const so = run.so;
  t.false(so.ok, 'the migration failed');
  t.regex(so.cause ?? '', cause, `cause named: ${so.cause}`);
  t.log(`phase ${so.phase}: ${so.cause}; recovery: ${so.recovery.join('; ')}`);
  // The monitor may have been replaced by recovery: ask QEMU through a fresh connection if needed.
  const q = c.vms.src.qmp.closed ? await qmpReconnector(c.vms.src.qmpPath)() : c.vms.src.qmp;
  const st = (await q.execute('query-status')) as { status: string; running: boolean };
  if (q !== c.vms.src.qmp) await q.close();
  t.true(st.running, `the source VM runs (${st.status})`);
  const states = await Promise.all(c.src.map(async (d) => (await d.state()) as number));
  t.deepEqual(states, c.src.map(() => 2), 'every source device RUNNING (2)');
  if (srcDigests) t.deepEqual(c.src.map((d) => eduKnob(d.name, 'state_digest')), srcDigests, 'the source devices keep their state');
  for (const d of c.src) t.is(d.openDataFds, 0);
  for (const d of c.dst) t.is(d.openDataFds, 0);
}

const RUNNING = 2;

async function eduCase(t: ExecutionContext, opts: { mib?: number; arm?: (c: Ctx) => void; run?: (c: Ctx) => Promise<EngineRun> } = {}): Promise<{ c: Ctx; r: EngineRun; before: string[] }> {
  const [s0, s1, d0, d1] = edu as [string, string, string, string];
  for (const b of [s0, s1]) eduKnob(b, 'blob_size', (opts.mib ?? 2) * MIB);
  for (const b of [d0, d1]) eduKnob(b, 'compat', '1');
  const before = [eduKnob(s0, 'state_digest'), eduKnob(s1, 'state_digest')];
  const c = await setup(t, [s0, s1], [d0, d1]);
  opts.arm?.(c);
  const r = opts.run ? await opts.run(c) : await runEngines({ dir: c.dir, source: c.src, destination: c.dst, vms: c.vms });
  return { c, r, before };
}

function disarm(): void {
  for (const b of edu) {
    eduKnob(b, 'fail_arc', 'none');
    eduKnob(b, 'compat', '1');
    eduKnob(b, 'arc_log', 'clear');
  }
}
test.beforeEach(disarm);
test.afterEach.always(disarm);

test.serial('edu: QMP-coordinated migration of a VM with two devices (4 MiB each); the destination holds the state; downtime by phase', async (t) => {
  const { c, r, before } = await eduCase(t, { mib: 4 });
  const so = r.source.outcome;
  const de = r.destination.outcome;
  t.true(so.ok, so.cause);
  t.true(de.ok, de.cause);
  t.deepEqual([eduKnob(edu[2]!, 'state_digest'), eduKnob(edu[3]!, 'state_digest')], before);
  t.true((await vmStatus(c.vms.dst)).running, 'the destination VM runs');
  t.is((await vmStatus(c.vms.src)).status, 'postmigrate');
  for (const d of c.dst) t.is(await d.state(), RUNNING);
  const d = r.merged.engine.downtime!;
  t.truthy(d, 'downtime measured');
  t.log(`downtime ${d.totalMs} ms: ${d.phases.map((p) => `${p.name} ${p.ms}`).join(', ')}`);
  t.true(d.totalMs > 0);
  const a = analyze(parseTimeline(JSON.parse(JSON.stringify(r.merged))));
  t.is(a.verdict, 'ok', a.reason);
  // The vCPUs stopped (QMP STOP) before the first source device left its P2P state.
  const stop = so.qemuEvents.find((e) => e.event === 'STOP')!.at;
  const quiesced = so.marks.find((m) => m.name === 'quiesced')!.at;
  t.true(stop <= quiesced);
  await closeAndCheck(t, c);
});

test.serial('mtty: QMP-coordinated migration of one device; the destination re-saves the same state', async (t) => {
  const c = await setup(t, [mtty[0]!], [mtty[1]!]);
  const r = await runEngines({ dir: c.dir, source: c.src, destination: c.dst, vms: c.vms });
  t.true(r.source.outcome.ok, r.source.outcome.cause);
  t.true(r.destination.outcome.ok, r.destination.outcome.cause);
  t.true((await vmStatus(c.vms.dst)).running);
  // The source copy is in STOP: saving it again (STOP -> STOP_COPY) reads the state it sent.
  const a = await saveState(c.src[0]!);
  const b = await saveState(c.dst[0]!);
  t.true(a.equals(b), 'mtty state equal on both ends');
  await closeAndCheck(t, c);
});

for (const [side, arc] of [
  ['source', 'RUNNING>PRE_COPY'],
  ['source', 'PRE_COPY>PRE_COPY_P2P'],
  ['source', 'PRE_COPY_P2P>STOP_COPY'],
  ['source', 'STOP_COPY>STOP'],
  ['destination', 'RUNNING_P2P>STOP'],
  ['destination', 'STOP>RESUMING'],
  ['destination', 'RESUMING>STOP'],
  ['destination', 'STOP>RUNNING_P2P'],
  ['destination', 'RUNNING_P2P>RUNNING'],
] as const) {
  test.serial(`edu: ${side} arc ${arc} fails: source VM running, devices RUNNING, cause named`, async (t) => {
    const { c, r, before } = await eduCase(t, { arm: () => eduInject(side === 'source' ? edu[1]! : edu[3]!, arc, { errno: 5 }) });
    await assertFailedAndRecovered(t, c, { so: r.source.outcome }, side === 'source' ? /EIO|Input\/output/ : /refused|EIO|verdict|closed/, before);
    t.false(r.destination.outcome.ok);
    for (const d of c.dst) t.is(await d.state(), RUNNING, `${d.name} RUNNING`);
    await closeAndCheck(t, c);
  });
}

/** A transport that changes the bytes going to the destination. */
function tampered(inner: Transport, change: (b: Buffer, offset: number) => Buffer | 'cut'): Transport {
  let offset = 0;
  return {
    peer: inner.peer,
    readable: inner.readable,
    write: (b: Buffer) => {
      const r = change(b, offset);
      offset += b.length;
      if (r === 'cut') {
        inner.close();
        return Promise.reject(new Error('the test cut the stream'));
      }
      return inner.write(r);
    },
    end: () => inner.end(),
    close: () => inner.close(),
  };
}

test.serial('edu: a corrupted stream (one byte flipped in the data) is refused before any commit', async (t) => {
  const { c, r, before } = await eduCase(t, {
    run: (c) =>
      runEngines({
        dir: c.dir,
        source: c.src,
        destination: c.dst,
        vms: c.vms,
        wrap: (tr) =>
          tampered(tr, (b, off) => {
            const at = MIB - off;
            if (at < 0 || at >= b.length) return b;
            const x = Buffer.from(b);
            x[at]! ^= 0x5a;
            return x;
          }),
      }),
  });
  await assertFailedAndRecovered(t, c, { so: r.source.outcome }, /refused|digest|corrupt|checksum|mismatch/i, before);
  t.regex(r.destination.outcome.cause ?? '', /digest|corrupt|checksum|mismatch/i);
  await closeAndCheck(t, c);
});

test.serial('edu: a truncated stream: the destination resets, the source rolls back', async (t) => {
  const { c, r, before } = await eduCase(t, {
    run: (c) => runEngines({ dir: c.dir, source: c.src, destination: c.dst, vms: c.vms, wrap: (tr) => tampered(tr, (b, off) => (off > MIB ? 'cut' : b)) }),
  });
  await assertFailedAndRecovered(t, c, { so: r.source.outcome }, /cut|closed|verdict|truncat/i, before);
  t.false(r.destination.outcome.ok);
  for (const d of c.dst) t.is(await d.state(), RUNNING);
  await closeAndCheck(t, c);
});

test.serial('edu: the source QMP socket closes mid-migration: recovery reconnects, cancels, continues the VM', async (t) => {
  let ctx: Ctx | undefined;
  const { c, r, before } = await eduCase(t, {
    run: (c) => {
      ctx = c;
      return runEngines({ dir: c.dir, source: c.src, destination: c.dst, vms: c.vms, sourceExtra: { onPhase: async (p) => void (p === 'quiesced' && (await ctx!.vms.src.qmp.close())) } });
    },
  });
  await assertFailedAndRecovered(t, c, { so: r.source.outcome }, /QMP|closed/i, before);
  t.true(r.source.outcome.recovery.some((x) => /reconnected/.test(x)), r.source.outcome.recovery.join('; '));
  await closeAndCheck(t, c);
});

test.serial("edu: QEMU's migration fails (the destination QEMU dies): rollback, the source VM runs", async (t) => {
  let ctx: Ctx | undefined;
  const { c, r, before } = await eduCase(t, {
    run: (c) => {
      ctx = c;
      // Killed once QEMU's own migration is under way: QEMU reports it failed.
      return runEngines({ dir: c.dir, source: c.src, destination: c.dst, vms: c.vms, sourceExtra: { onPhase: (p) => void (p === 'qemu-started' && ctx!.vms.dst.proc.kill('SIGKILL')) } });
    },
  });
  await assertFailedAndRecovered(t, c, { so: r.source.outcome }, /fail|closed|refused|verdict/i, before);
  // Which the destination engine notices first is a race: its own QEMU's monitor closing,
  // or the source closing the stream when QEMU's migration failed. Either names the cause.
  t.regex(r.destination.outcome.cause ?? '', /QMP|closed|QEMU|truncated/i);
  await closeAndCheck(t, c);
});

test.serial('edu: a destination device with another migration_version is refused before RESUMING', async (t) => {
  const { c, r, before } = await eduCase(t, { arm: () => eduKnob(edu[3]!, 'compat', 'other') });
  await assertFailedAndRecovered(t, c, { so: r.source.outcome }, /migration_version|refused/i, before);
  t.regex(r.destination.outcome.cause ?? '', /migration_version|EINVAL|compat/i);
  t.false(eduKnob(edu[3]!, 'arc_log').includes('>RESUMING'), 'the refused device never entered RESUMING');
  await closeAndCheck(t, c);
});

test.serial('edu: the receiving process is killed mid-stream: the source rolls back and the VM runs', async (t) => {
  const [s0, s1, d0, d1] = edu as [string, string, string, string];
  for (const b of [s0, s1]) eduKnob(b, 'blob_size', 16 * MIB);
  const before = [eduKnob(s0, 'state_digest'), eduKnob(s1, 'state_digest')];
  const c = await setup(t, [s0, s1], []);
  // test/demo/build.mjs bundles the command next to this test; in the whole rig suite's
  // build it is not there, and the command runs from source through tsx (slower to start).
  const bundled = fileURLToPath(new URL('vfio-mig.mjs', import.meta.url));
  const cli = existsSync(bundled) ? [bundled] : ['--import', 'tsx', fileURLToPath(new URL('../../src/cli/main.ts', import.meta.url))];
  const token = newToken();
  const sock = join(c.dir, 'recv.sock');
  for (const b of [d0, d1]) eduKnob(b, 'arc_log', 'clear');
  const child = spawn(process.execPath, [...cli, 'receive', '--device', d0, '--device', d1, '--from', `unix:${sock}`, '--token', token, '--qmp', c.vms.dst.qmpPath, '--uri', c.vms.ramUri, '--timeline', join(c.dir, 'recv.json')], { stdio: ['ignore', 'ignore', 'pipe'] });
  const exited = new Promise<void>((resolve) => child.on('exit', () => resolve()));
  t.teardown(() => void (child.exitCode === null && child.kill('SIGKILL')));
  // The receiver must hold the destination QEMU's monitor: release ours first.
  await c.vms.dst.qmp.close();
  const deadline = Date.now() + 180_000;
  while (!existsSync(sock) && Date.now() < deadline) await new Promise((res) => setTimeout(res, 50));
  const r = await migrateSource({
    devices: c.src,
    describe: (n) => describeForStream(n),
    connect: () => connect({ path: sock }, { token }),
    vm: { qmp: c.vms.src.qmp, reconnect: qmpReconnector(c.vms.src.qmpPath), uri: c.vms.ramUri },
    // Kill it while the pre-copy data streams into its devices.
    onProgress: (p) => void (p.bytes > 4 * MIB && child.exitCode === null && child.kill('SIGKILL')),
  });
  await exited;
  await assertFailedAndRecovered(t, c, { so: r.outcome }, /closed|verdict|reset|EPIPE|broken/i, before);
  // The kernel closed the killed process's devices: they are RUNNING again, uncommitted.
  for (const b of [d0, d1]) t.is(eduKnob(b, 'mig_state'), 'RUNNING');
  t.false(eduKnob(d0, 'arc_log').includes('RESUMING>STOP'), 'never committed');
  await closeAndCheck(t, c);
});
