// Trial migration on the fake kernel: success is verified byte for byte, and every
// failure leaves both devices RUNNING with no fd left open.
import test from 'ava';
import { installFake } from '../fake/install.ts';
import { trialMigrate } from '../../src/migration/trial.ts';
import { MigState } from '../../src/vfio/uapi.ts';
import { Errno } from '../../src/host/errno.ts';

const fake = installFake(test);
const [S, D, P2P, BIG] = ['0000:01:00.0', '0000:01:00.1', '0000:01:00.2', '0000:01:00.3'];
fake.addDevice({ id: S, flags: 7, seed: 5, stateSize: 10_000 });
fake.addDevice({ id: D, flags: 7, seed: 6, stateSize: 10_000 });
fake.addDevice({ id: P2P, flags: 3, seed: 7 });
fake.addDevice({ id: BIG, flags: 1, seed: 8, stateSize: 300_000 });
const BIG2 = '0000:01:00.4';
fake.addDevice({ id: BIG2, flags: 1, seed: 9, stateSize: 300_000 });

test.serial('a trial migration moves the state and verifies it', async (t) => {
  t.not(fake.device(S).digest(), fake.device(D).digest());
  const r = await trialMigrate(S, D);
  t.is(r.via, 'pre-copy', 'PRE_COPY is used when the device offers it');
  t.true(r.verified);
  t.is(r.bytes, 24 + 10_000 + 32);
  t.is(fake.device(D).digest(), fake.device(S).digest());
  t.is(fake.openFdCount(), 0);
});

test.serial('devices with different flags are refused before any state moves', async (t) => {
  const before = fake.device(S).arcLog.length;
  await t.throwsAsync(trialMigrate(S, P2P), { message: /migration flags differ/ });
  t.is(fake.device(S).arcLog.length, before);
});

for (const [arc, outcome] of [['RESUMING>STOP', 'error'], ['STOP>RESUMING', 'stay'], ['PRE_COPY_P2P>STOP_COPY', 'error']] as const) {
  test.serial(`a failure on ${arc} (${outcome}) leaves both devices RUNNING`, async (t) => {
    const dev = arc === 'PRE_COPY_P2P>STOP_COPY' ? S : D;
    fake.inject(dev, { arc, errno: Errno.EIO, outcome });
    await t.throwsAsync(trialMigrate(S, D));
    t.is(fake.device(S).state, MigState.Running);
    t.is(fake.device(D).state, MigState.Running);
    t.is(fake.openFdCount(), 0);
  });
}

test.serial('STOP_COPY-only devices migrate through STOP_COPY', async (t) => {
  const r = await trialMigrate(BIG, BIG2);
  t.is(r.via, 'stop-copy');
  t.true(r.verified);
  t.is(fake.device(BIG2).digest(), fake.device(BIG).digest());
});

test.serial('a device cannot be its own destination', async (t) => {
  const err = await t.throwsAsync(trialMigrate(BIG, BIG));
  t.regex(err?.message ?? '', /EBUSY/);
  t.is(fake.openFdCount(), 0);
});
