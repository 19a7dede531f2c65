// Coordinator behaviour on the fake kernel: input validation before any arc, the
// single-device-without-P2P case, hung devices, cancellation, the timeline.
import test from 'ava';
import { installFake } from '../fake/install.ts';
import { VfioDevice } from '../../src/vfio/device.ts';
import { Coordinator, CoordinatorError } from '../../src/migration/coordinator.ts';
import { readToEnd, writeAll } from '../../src/vfio/data.ts';
import { MigState } from '../../src/vfio/uapi.ts';
import { Errno } from '../../src/host/errno.ts';

const fake = installFake(test);
const P = ['0000:50:00.0', '0000:50:00.1', '0000:50:00.2', '0000:50:00.3'];
for (const [i, id] of P.entries()) fake.addDevice({ id, flags: 7, seed: i + 1, stateSize: 1000 });
const NOP2P = '0000:51:00.0';
fake.addDevice({ id: NOP2P, flags: 5, seed: 9, stateSize: 1000 });

test.afterEach.always(() => fake.resetAll());

async function opened<T>(ids: string[], fn: (devs: VfioDevice[]) => Promise<T>): Promise<T> {
  const devs = ids.map((id) => VfioDevice.open(id));
  try {
    return await fn(devs);
  } finally {
    for (const d of devs) await d.close();
  }
}

test.serial('bad sets are refused before any arc: empty, duplicate, closed, ERROR, mixed P2P', async (t) => {
  await t.throwsAsync(Coordinator.create([]), { instanceOf: CoordinatorError, message: /empty/ });
  await opened([P[0]!], async ([a]) => {
    await t.throwsAsync(Coordinator.create([a!, a!]), { message: /appears twice/ });
  });
  const closed = VfioDevice.open(P[1]!);
  await closed.close();
  await t.throwsAsync(Coordinator.create([closed]), { message: /0000:50:00\.1: the device is closed/ });
  fake.device(P[2]!).state = MigState.Error;
  await opened([P[2]!], async ([c]) => {
    await t.throwsAsync(Coordinator.create([c!]), { message: /in ERROR/ });
  });
  await opened([P[0]!, NOP2P], async (devs) => {
    await t.throwsAsync(Coordinator.create(devs), { message: /0000:51:00\.0: lacks P2P .* a set of 2 devices needs every device to support RUNNING_P2P/ });
  });
  t.deepEqual(fake.events, [], 'no arc ran');
});

test.serial('a single device without P2P goes straight to STOP and saves', async (t) => {
  await opened([NOP2P], async (devs) => {
    const c = await Coordinator.create(devs);
    await c.quiesce();
    t.is(fake.device(NOP2P).state, MigState.Stop);
    const fds = await c.stopCopy();
    const bytes = await readToEnd(fds.get(NOP2P)!, () => undefined);
    t.true(bytes > 1000);
    await c.finishSource();
    await c.rollback();
    t.is(fake.device(NOP2P).state, MigState.Running);
  });
});

test.serial('stopCopy before quiesce is refused', async (t) => {
  await opened(P.slice(0, 2), async (devs) => {
    const c = await Coordinator.create(devs);
    await t.throwsAsync(c.stopCopy(), { message: /still RUNNING: quiesce first/ });
    t.deepEqual(fake.events, []);
  });
});

test.serial('source and destination: full round trip with a timeline of every arc', async (t) => {
  const saved = new Map<string, Buffer>();
  await opened(P.slice(0, 2), async (devs) => {
    const c = await Coordinator.create(devs);
    await c.preCopy();
    await c.quiesce();
    const fds = await c.stopCopy();
    for (const [name, f] of fds) {
      const chunks: Buffer[] = [];
      await readToEnd(f, (x) => void chunks.push(Buffer.from(x)));
      saved.set(name, Buffer.concat(chunks));
    }
    await c.finishSource();
    const arcs = c.timeline.map((e) => `${e.device} ${e.phase} ${e.from}>${e.to} ${e.result}`);
    t.true(arcs.includes('0000:50:00.0 quiesce PRE_COPY>PRE_COPY_P2P ok'));
    t.true(arcs.includes('0000:50:00.1 stop-copy PRE_COPY_P2P>STOP_COPY ok'));
    t.true(c.timeline.every((e) => e.end >= e.start));
    const json = JSON.parse(JSON.stringify(c)) as { devices: string[]; timeline: unknown[] };
    t.deepEqual(json.devices, P.slice(0, 2));
    t.is(json.timeline.length, c.timeline.length);
  });
  // The same states go into devices 2 and 3 on the "destination".
  await opened(P.slice(2), async (devs) => {
    const c = await Coordinator.create(devs);
    const sources = new Map([[P[2]!, saved.get(P[0]!)!], [P[3]!, saved.get(P[1]!)!]]);
    await c.resume(async (name, f) => void (await writeAll(f, sources.get(name)!)));
    t.is(fake.device(P[2]!).digest(), fake.device(P[0]!).digest());
    t.is(fake.device(P[3]!).digest(), fake.device(P[1]!).digest());
    t.is(fake.device(P[2]!).state, MigState.Running);
  });
  t.is(fake.openFdCount(), 0);
});

test.serial('a failure on device 3 during STOP_COPY rolls all four back to RUNNING', async (t) => {
  fake.inject(P[2]!, { arc: 'STOP>STOP_COPY', errno: Errno.EIO, outcome: 'error' });
  await opened(P, async (devs) => {
    const c = await Coordinator.create(devs);
    await c.quiesce();
    const err = await t.throwsAsync(c.stopCopy(), { instanceOf: CoordinatorError });
    t.is(err?.phase, 'stop-copy');
    t.deepEqual(err?.failures.map((f) => f.device), [P[2]]);
    t.regex(err?.message ?? '', /every device was rolled back to RUNNING/);
    for (const id of P) t.is(fake.device(id).state, MigState.Running);
    t.true(c.timeline.some((e) => e.op === 'reset' && e.device === P[2]), 'the device in ERROR was reset');
  });
  t.is(fake.openFdCount(), 0);
});

test.serial('a hung arc is reported after the timeout, the others are rolled back', async (t) => {
  fake.inject(P[1]!, { arc: 'RUNNING>RUNNING_P2P', hang: true });
  await opened(P.slice(0, 3), async (devs) => {
    const c = await Coordinator.create(devs, { arcTimeoutMs: 100 });
    const err = await t.throwsAsync(c.quiesce(), { instanceOf: CoordinatorError });
    t.deepEqual(err?.hung, [P[1]]);
    t.regex(err?.message ?? '', /hung/);
    t.is(fake.device(P[0]!).state, MigState.Running);
    t.is(fake.device(P[2]!).state, MigState.Running);
    t.true(c.timeline.some((e) => e.device === P[1] && e.result === 'timeout'));
    t.regex(c.states()[P[1]!]!, /hung/);
  });
});

test.serial('cancellation stops the next arcs and rolls back', async (t) => {
  const ac = new AbortController();
  for (const id of P) fake.device(id).spec.arcLatencyMs = 5;
  await opened(P, async (devs) => {
    const c = await Coordinator.create(devs, { signal: ac.signal });
    await c.quiesce();
    setTimeout(() => ac.abort(), 2);
    const err = await t.throwsAsync(c.stopCopy(), { instanceOf: CoordinatorError });
    t.true(err?.failures.some((f) => f.errno === 'ECANCELED'));
  });
  for (const id of P) t.is(fake.device(id).state, MigState.Running);
});
