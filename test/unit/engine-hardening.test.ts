// The engine's ownership and recovery rules on the fake kernel (which, like Linux, hands
// out the lowest free fd number and keeps a device's state across close, as mtty does):
// no call reaches a reused fd number; rollback survives the cancellation that caused it;
// RESUMING is only ever reset; a slow arc is walked back when it returns; saveSet rolls
// back; a reset's outcome is re-read before the next plan. Device states are checked
// BEFORE the devices are closed.
import test from 'ava';
import { installFake } from '../fake/install.ts';
import { sys } from '../../src/host/sys.ts';
import { VfioDevice } from '../../src/vfio/device.ts';
import { readToEnd, writeAll } from '../../src/vfio/data.ts';
import { MigState } from '../../src/vfio/uapi.ts';
import { Coordinator, CoordinatorError } from '../../src/migration/coordinator.ts';
import { saveSet } from '../../src/migration/transfer.ts';
import { recoverToRunning, RECOVERY_STEP } from '../../src/migration/recover.ts';
import { trialMigrate } from '../../src/migration/trial.ts';
import { Errno } from '../../src/host/errno.ts';

const fake = installFake(test);
const D = ['0000:60:00.0', '0000:60:00.1', '0000:60:00.2', '0000:60:00.3'];
for (const [i, id] of D.entries()) fake.addDevice({ id, flags: 7, seed: i + 1, stateSize: 4000 });
const NORESET = '0000:61:00.0';
fake.addDevice({ id: NORESET, flags: 7, seed: 7, stateSize: 4000, canReset: false });

test.afterEach.always(() => fake.resetAll());

async function opened<T>(ids: string[], fn: (devs: VfioDevice[]) => Promise<T>): Promise<T> {
  const devs = ids.map((id) => VfioDevice.open(id));
  try {
    return await fn(devs);
  } finally {
    for (const d of devs) await d.close();
    await Promise.all(devs.map((d) => d.released));
  }
}

const arcsOf = (id: string) => fake.events.filter((e) => e.device === id && e.kind === 'arc').map((e) => `${MigState[e.from]}->${MigState[e.to]}`);

test.serial('the hazard is real: a raw fd closed under a queued read lets the read reach the next file opened', async (t) => {
  // The control experiment for the next test: without ownership, the number is reused.
  const a = VfioDevice.open(D[0]!);
  try {
    const r = await a.setState(MigState.StopCopy);
    const raw = r.dataFd!.fd;
    const read = sys().read(raw, Buffer.alloc(64), 64);
    sys().close(raw); // what a close without ownership does
    const b = VfioDevice.open(D[1]!); // takes the lowest free number: the one just closed
    try {
      const err = await t.throwsAsync(read);
      t.regex(String(err?.message), /EINVAL|EBADF/, 'the read reached a container/group/device fd, not the data session');
    } finally {
      await b.close();
    }
    r.dataFd!.close();
  } finally {
    await a.close();
  }
});

test.serial('a data fd closed while a read is queued is released only after the read returned; the read gets its own data', async (t) => {
  await opened([D[0]!], async ([a]) => {
    const r = await a!.setState(MigState.StopCopy);
    const f = r.dataFd!;
    const number = f.fd;
    const chunks: Buffer[] = [];
    const reading = readToEnd(f, (c) => void chunks.push(Buffer.from(c)), { chunkSize: 512 });
    await new Promise((resolve) => setImmediate(resolve)); // the first read is in flight
    f.close();
    t.true(f.closePending, 'the number is held while the read runs');
    // Opening another device now must not receive the held number.
    const b = VfioDevice.open(D[1]!);
    try {
      t.true(fake.isOpenFd(number), 'the data fd number is still the data session');
      const err = await t.throwsAsync(reading);
      t.is((err as { code?: string }).code, 'EBADF', 'the loop stops at its next iteration with EBADF');
      t.true(chunks.length >= 1 && chunks[0]!.length > 0, 'the read in flight returned data from its own session');
      await f.released;
      t.false(f.closePending);
      // And nothing after the close reached the kernel on that number.
      const reads = fake.ioctlLog.filter((l) => l.fd === number);
      t.deepEqual(reads, [], 'no ioctl ever went to the data fd number');
    } finally {
      await b.close();
    }
    await r.dataFd!.released;
  });
});

test.serial('a device closed during an arc keeps its fd until the arc returned; queued calls fail with EBADF without reaching the kernel', async (t) => {
  const id = D[2]!;
  fake.device(id).spec.arcLatencyMs = 50;
  const dev = VfioDevice.open(id);
  const arc = dev.setState(MigState.RunningP2P);
  const queued = dev.state();
  await new Promise((resolve) => setTimeout(resolve, 10));
  await dev.close();
  t.true(dev.closePending, 'the device fd is held while the SET runs');
  const other = VfioDevice.open(D[3]!);
  const before = fake.ioctlLog.length;
  try {
    const arcResult = await arc.then(
      () => 'resolved',
      (e: Error) => e.message,
    );
    t.regex(arcResult, /closed during the transition|resolved/);
    t.is(fake.device(id).state, MigState.RunningP2P, 'the SET reached its own device');
    t.is(fake.device(D[3]!).state, MigState.Running, 'and not the device opened meanwhile');
    const err = await t.throwsAsync(queued);
    t.is((err as { code?: string }).code, 'EBADF');
    t.is(fake.ioctlLog.length, before, 'the queued GET never reached the kernel');
    await dev.released;
    t.false(dev.closePending);
  } finally {
    await other.close();
  }
});

test.serial('rollback after a cancellation is not cancelled by the same signal', async (t) => {
  for (const id of D) fake.device(id).spec.arcLatencyMs = 20;
  await opened(D, async (devs) => {
    const ac = new AbortController();
    const c = await Coordinator.create(devs, { signal: ac.signal });
    await c.quiesce();
    const stopping = c.stopCopy();
    setTimeout(() => ac.abort(), 5);
    const err = await t.throwsAsync(stopping, { instanceOf: CoordinatorError });
    t.regex(err!.message, /every device was rolled back to RUNNING/);
    for (const id of D) t.is(fake.device(id).state, MigState.Running, `${id} RUNNING before close`);
    for (const d of devs) t.is(await d.state(), MigState.Running);
    t.true(c.timeline.some((e) => e.phase === 'rollback' && e.result === 'ok'), 'rollback arcs ran after the abort');
  });
});

test.serial('aborting RESUMING is a reset; if the reset fails the device stays in RESUMING, reported, never committed', async (t) => {
  await opened([D[0]!, NORESET], async (devs) => {
    const c = await Coordinator.create(devs);
    const fds = await c.beginResume();
    await writeAll(fds.get(D[0]!)!, fake.validStream(D[0]!).subarray(0, 100));
    const err = await t.throwsAsync(c.rollback(), { instanceOf: CoordinatorError });
    t.regex(err!.message, new RegExp(`${NORESET}: reset failed, left in RESUMING \\(uncommitted\\)`));
    t.is(fake.device(D[0]!).state, MigState.Running, 'the resettable device was reset');
    t.is(fake.device(NORESET).state, MigState.Resuming, 'the other stays in RESUMING');
    for (const id of [D[0]!, NORESET]) t.false(arcsOf(id).includes('Resuming->Stop'), `${id}: RESUMING->STOP never sent`);
    t.true(fake.events.some((e) => e.device === D[0] && e.kind === 'reset'));
  });
});

test.serial('the recovery policy: RESUMING and ERROR reset, others walk; a partial restore is reset, not committed', async (t) => {
  t.is(RECOVERY_STEP[MigState.Resuming], 'reset');
  t.is(RECOVERY_STEP[MigState.Error], 'reset');
  t.is(RECOVERY_STEP[MigState.StopCopy], 'walk');
  t.is(RECOVERY_STEP[MigState.Running], 'none');
  await opened([D[1]!], async ([dev]) => {
    // A restore that stopped half-way (the stream broke): the device is in RESUMING with
    // partial data. Recovery must reset it; STOP would commit the partial state.
    const r = await dev!.setState(MigState.Resuming);
    await writeAll(r.dataFd!, fake.validStream(D[1]!).subarray(0, 50));
    r.dataFd!.close();
    t.is(fake.device(D[1]!).state, MigState.Resuming);
    const outcome = await recoverToRunning(dev!);
    t.like(outcome, { action: 'reset', state: 'RUNNING', ok: true });
    t.false(arcsOf(D[1]!).includes('Resuming->Stop'), 'the partial data was never committed');
  });
  await opened([NORESET], async ([dev]) => {
    await dev!.setState(MigState.Resuming);
    const outcome = await recoverToRunning(dev!);
    t.like(outcome, { from: 'RESUMING', action: 'reset', state: 'RESUMING', ok: false });
    t.regex(outcome.error ?? '', /left in RESUMING, uncommitted/);
    t.false(arcsOf(NORESET).includes('Resuming->Stop'));
  });
});

test.serial('a trial whose restore fails leaves both devices RUNNING and the destination uncommitted', async (t) => {
  fake.inject(D[3]!, { arc: 'RESUMING>STOP', errno: Errno.EINVAL, outcome: 'stay' });
  const err = await t.throwsAsync(trialMigrate(D[2]!, D[3]!, { via: 'stop-copy' }));
  t.regex(err!.message, /RESUMING->STOP|EINVAL/);
  // The devices are closed by trialMigrate; the fake keeps their state across close.
  t.is(fake.device(D[2]!).state, MigState.Running);
  t.is(fake.device(D[3]!).state, MigState.Running);
  t.true(fake.events.some((e) => e.device === D[3] && e.kind === 'reset'), 'the destination was reset, not walked');
});

test.serial('a slow arc (past its timeout) is walked back to RUNNING when it returns', async (t) => {
  await opened([D[0]!, D[1]!], async (devs) => {
    const c = await Coordinator.create(devs, { arcTimeoutMs: 60 });
    fake.device(D[1]!).spec.arcLatencyMs = 250;
    const err = await t.throwsAsync(c.quiesce(), { instanceOf: CoordinatorError });
    t.deepEqual(err!.hung, [D[1]]);
    t.is(fake.device(D[0]!).state, MigState.Running, 'the prompt device was rolled back at once');
    fake.device(D[1]!).spec.arcLatencyMs = 0;
    const stillHung = await c.settled(5000);
    t.deepEqual(stillHung, []);
    t.is(fake.device(D[1]!).state, MigState.Running, 'the slow device came back and was walked to RUNNING');
    t.true(c.timeline.some((e) => e.device === D[1] && /late return/.test(e.phase)));
  });
});

test.serial('saveSet rolls the source back when the stream sink fails', async (t) => {
  await opened([D[0]!, D[1]!], async (devs) => {
    const c = await Coordinator.create(devs);
    await c.quiesce();
    await c.stopCopy();
    let calls = 0;
    const err = await t.throwsAsync(
      saveSet(c, (device) => ({ device }), () => {
        if (++calls > 2) throw new Error('peer went away');
      }),
    );
    t.regex(err!.message, /peer went away/);
    for (const id of [D[0]!, D[1]!]) t.is(fake.device(id).state, MigState.Running, `${id} RUNNING before close`);
    t.deepEqual(c.dataFds().size, 0, 'no saving fd left open');
  });
});

test.serial('after a reset the next plan starts from the state the kernel reports', async (t) => {
  await opened([D[2]!], async ([dev]) => {
    await dev!.setState(MigState.Stop);
    await dev!.reset();
    // The device reports something other than RUNNING after the reset (a driver whose
    // reset does not touch the migration state machine): the layer must not assume.
    fake.device(D[2]!).state = MigState.RunningP2P;
    fake.events.length = 0;
    await dev!.setState(MigState.Running);
    t.deepEqual(arcsOf(D[2]!), ['RunningP2P->Running']);
  });
});

test.serial('unknown migration flag bits are tolerated and shown', async (t) => {
  fake.device(D[3]!).spec.flags = 0x8n | 7n;
  try {
    await opened([D[3]!], async ([dev]) => {
      t.is(await dev!.migrationFlags(), 7);
      t.is(dev!.unknownMigrationFlags, 8n);
      await dev!.setState(MigState.RunningP2P);
      t.is(fake.device(D[3]!).state, MigState.RunningP2P);
    });
  } finally {
    fake.device(D[3]!).spec.flags = undefined;
  }
});
