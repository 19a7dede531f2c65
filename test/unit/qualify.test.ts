// `vfio-mig qualify` on the fake kernel: a conforming device passes, a faulty one fails
// naming the arc, and a driver that accepts a forbidden state is caught.
import test from 'ava';
import { installFake } from '../fake/install.ts';
import { runCli } from '../cli-harness.ts';
import { Errno } from '../../src/host/errno.ts';
import { MigState } from '../../src/vfio/uapi.ts';

const fake = installFake(test);
const [A, B, C, D] = ['0000:70:00.0', '0000:70:00.1', '0000:70:00.2', '0000:70:00.3'];
fake.addDevice({ id: A, flags: 7, seed: 1, stateSize: 5000 });
fake.addDevice({ id: B, flags: 7, seed: 2, stateSize: 5000 });
fake.addDevice({ id: C, flags: 3, seed: 3 });
fake.addDevice({ id: D, flags: 1, seed: 4 });

const run = runCli;

test.serial('a conforming pair passes, with every allowed arc, refusals, data size and the state move', async (t) => {
  const { code, out } = await run(['qualify', A, B, '--json']);
  t.is(code, 0, out);
  const [ra, rb] = JSON.parse(out) as { verdict: string; checks: { check: string; ok: boolean; result: string }[] }[];
  t.is(ra!.verdict, 'pass');
  const names = ra!.checks.map((c) => c.check);
  t.true(names.includes('RUNNING->STOP_COPY'));
  t.true(names.includes('PRE_COPY->STOP'));
  t.false(names.includes('STOP_COPY->PRE_COPY'), 'the hanging request is never sent');
  t.is(names.filter((n) => n.includes('->') && !n.startsWith('state')).length, 7 * 6 - 2);
  t.true(names.includes('refuse ERROR') && names.includes('refuse INVALID(8)'));
  t.true(names.includes(`state ${A} -> ${B}`));
  t.is(rb!.verdict, 'pass');
  t.is(fake.device(B).digest(), fake.device(A).digest());
  t.is(fake.openFdCount(), 0);
  for (const id of [A, B]) t.is(fake.device(id).state, MigState.Running);
});

test.serial('devices with fewer flags are checked to refuse the states they lack', async (t) => {
  const c = await run(['qualify', C]);
  t.is(c.code, 0, c.out);
  t.regex(c.out, /refuse PRE_COPY\s+\S+ ms\s+ok/);
  const d = await run(['qualify', D]);
  t.is(d.code, 0, d.out);
  t.regex(d.out, /refuse RUNNING_P2P\s+\S+ ms\s+ok/);
  const pair = await run(['qualify', C, D]);
  t.is(pair.code, 1, 'two devices with different flags are not the same type');
  t.regex(pair.out, /FAIL flags differ/);
});

test.serial('an injected fault fails the verdict, naming the arc', async (t) => {
  fake.inject(A, { arc: 'RUNNING_P2P>STOP', errno: Errno.EIO, mode: 'always', outcome: 'stay' });
  const { code, out } = await run(['qualify', A]);
  fake.device(A).failures.length = 0;
  t.is(code, 1);
  t.regex(out, /FAIL EIO at RUNNING_P2P->STOP/);
  t.regex(out, /verdict: FAIL/);
  t.is(fake.device(A).state, MigState.Running, 'the device is left RUNNING');
});

test.serial('a driver that accepts a state outside its flags is caught', async (t) => {
  const dev = fake.device(D);
  dev.spec.fsmFlags = 7; // reports STOP_COPY only, but its state machine runs every state
  try {
    const { code, out } = await run(['qualify', D]);
    t.is(code, 1);
    t.regex(out, /refuse RUNNING_P2P\s+\S+ ms\s+FAIL accepted/);
  } finally {
    dev.spec.fsmFlags = undefined;
  }
  t.is(dev.state, MigState.Running);
});

test.serial('usage errors', async (t) => {
  t.is((await run(['qualify'])).code, 2);
  t.is((await run(['qualify', A, A])).code, 2);
  const bad = await run(['qualify', '../etc']);
  t.is(bad.code, 1);
  t.regex(bad.err, /invalid device id/);
});

test.serial('MIG_DATA_SIZE is an estimate: smaller than the stop-copy data passes, far larger warns, neither fails', async (t) => {
  const E = '0000:70:01.0';
  const F = '0000:70:01.1';
  fake.addDevice({ id: E, flags: 3, seed: 5, stateSize: 5000, dataSizeEstimate: 1_000_000 }); // generous: reads less
  fake.addDevice({ id: F, flags: 3, seed: 6, stateSize: 5000, dataSizeEstimate: 100 }); // reads 50x more
  const over = await run(['qualify', E, '--json']);
  t.is(over.code, 0, over.out);
  const e = (JSON.parse(over.out) as { checks: { check: string; ok: boolean; warning?: boolean; result: string }[] }[])[0]!;
  const eCheck = e.checks.find((c) => c.check === 'MIG_DATA_SIZE')!;
  t.true(eCheck.ok);
  t.falsy(eCheck.warning, 'reading less than the estimate is normal');
  const under = await run(['qualify', F]);
  t.is(under.code, 0, `a low estimate is a warning, not a failure:\n${under.out}`);
  t.regex(under.out, /MIG_DATA_SIZE\s+WARN estimate 100 bytes, read \d+ \(more than 2x the estimate\)/);
  t.regex(under.out, /verdict: PASS/);
});
