// The conformance suite against the fake kernel (the rig runs it against the real one):
// once as our edu driver (all four flag sets, arc log, failure injection; state returns
// to RUNNING on reopen like edu's open_device) and once as mtty (an mdev with fixed
// flags 7, no arc log, no injection, a stream it does not validate, 0 for "nothing now"
// in PRE_COPY, the state kept across close), so each backend's path through the suite
// is exercised here before the rig runs it on the real drivers.
import test from 'ava';
import { registerConformance } from '../conformance/suite.ts';
import { installFake } from '../fake/install.ts';
import { FakeKernel, FakeKernelLockup } from '../fake/fake-kernel.ts';
import { MigState, encodeFeature, encodeMigState, Feature, FeatureFlag, Ioctl } from '../../src/vfio/uapi.ts';

const fake = installFake(test);
const EDU = ['0000:00:03.0', '0000:00:04.0'] as const;
const MTTY = ['83b8f4f2-509f-382f-3c1e-e6bfe0fa0001', '83b8f4f2-509f-382f-3c1e-e6bfe0fa0002'] as const;
fake.addDevice({ id: EDU[0], flags: 7, stateSize: 65536, seed: 11, stateOnReopen: 'running' });
fake.addDevice({ id: EDU[1], flags: 7, stateSize: 65536, seed: 12, stateOnReopen: 'running' });
for (const [i, id] of MTTY.entries()) {
  fake.addDevice({ id, driver: 'vfio_mdev', flags: 7, stateSize: 72, seed: 21 + i, validatesData: false, badDataOutcome: 'stay', precopyEmpty: 'zero', stateOnReopen: 'kept' });
}

registerConformance(test, {
  name: 'fake edu',
  pair: () => [EDU[0], EDU[1]],
  async setFlags(id, flags) {
    fake.device(id).spec.flags = BigInt(flags);
  },
  async arcLog(id) {
    return fake.device(id).arcLog.slice();
  },
  async clearArcLog(id) {
    fake.device(id).arcLog.length = 0;
  },
  async inject(id, arc, errno, outcome) {
    fake.inject(id, { arc, errno, outcome, mode: 'once' });
  },
  async clearInjection(id) {
    fake.device(id).failures.length = 0;
  },
  stateAfterReopen: 'running',
  validatesStream: true,
  badDataState: MigState.Error,
  precopyEmpty: 'ENOMSG',
  openFds: () => fake.openFdCount(),
});

registerConformance(test, {
  name: 'fake mtty',
  pair: () => [MTTY[0], MTTY[1]],
  fixedFlags: 7,
  stateAfterReopen: 'kept',
  validatesStream: false,
  badDataState: MigState.Resuming,
  precopyEmpty: 'zero',
  openFds: () => fake.openFdCount(),
});

// What the suite cannot ask of the real kernel, checked on the fake alone.

test.serial('fake: fds are the lowest free numbers from 3, reused after close, EBADF once closed (poll: POLLNVAL)', async (t) => {
  const a = fake.open(`${fake.devRoot}/vfio/vfio`, 2);
  const b = fake.open(`${fake.devRoot}/vfio/vfio`, 2);
  t.deepEqual([a, b], [3, 4], 'nothing else is open in this fake: 3 and 4');
  fake.close(a);
  t.false(fake.isOpenFd(a));
  t.throws(() => fake.ioctl(a, Ioctl.GET_API_VERSION), { code: 'EBADF' });
  t.throws(() => fake.close(a), { code: 'EBADF' });
  await t.throwsAsync(fake.read(a, Buffer.alloc(8), 8), { code: 'EBADF' });
  t.is(await fake.poll(a, 1, 0), 0x20, 'poll(2) reports POLLNVAL for a closed fd');
  t.is(fake.open(`${fake.devRoot}/vfio/vfio`, 2), a, 'close + open reuses the number');
  fake.close(a);
  fake.close(b);
  t.is(fake.openFdCount(), 0);
});

test.serial('fake: STOP_COPY -> PRE_COPY sent raw fails the test loudly (an unfixed kernel spins), EINVAL with the 2026 fix', (t) => {
  for (const fixed of [false, true]) {
    const k = new FakeKernel({ fixedNextState: fixed });
    try {
      const d = k.addDevice({ id: '0000:00:1f.0', flags: 7 });
      d.state = MigState.StopCopy;
      const c = k.open(`${k.devRoot}/vfio/vfio`, 2);
      const g = k.open(`${k.devRoot}/vfio/${d.spec.group}`, 2);
      const cfd = Buffer.alloc(4);
      cfd.writeInt32LE(c);
      k.ioctl(g, Ioctl.GROUP_SET_CONTAINER, cfd);
      k.ioctl(c, Ioctl.SET_IOMMU, 3);
      const dev = k.ioctl(g, Ioctl.GROUP_GET_DEVICE_FD, Buffer.from('0000:00:1f.0\0'));
      const set = encodeFeature(Feature.MIG_DEVICE_STATE, FeatureFlag.SET, encodeMigState(MigState.PreCopy));
      if (fixed) t.throws(() => k.ioctl(dev, Ioctl.DEVICE_FEATURE, set), { code: 'EINVAL' });
      else t.throws(() => k.ioctl(dev, Ioctl.DEVICE_FEATURE, set), { instanceOf: FakeKernelLockup });
      t.is(d.state, MigState.StopCopy);
    } finally {
      k.dispose();
    }
  }
});
