// Opening through the cdev/iommufd path (Linux >= 6.6 with CONFIG_VFIO_DEVICE_CDEV; not
// in Debian's kernels, so only the fake exercises it): /dev/iommu, IOAS_ALLOC, the vfioX
// node, BIND_IOMMUFD, ATTACH_IOMMUFD_PT - and the same migration calls afterwards.
import test from 'ava';
import { installFake } from '../fake/install.ts';
import { VfioDevice } from '../../src/vfio/device.ts';
import { VfioError } from '../../src/vfio/errors.ts';
import { MigState, Ioctl } from '../../src/vfio/uapi.ts';
import { saveState, restoreState } from '../../src/migration/trial.ts';

const fake = installFake(test, { cdev: true });
fake.addDevice({ id: '0000:80:00.0', flags: 7, cdev: true, seed: 1 });
fake.addDevice({ id: '0000:80:00.1', flags: 7, cdev: true, seed: 2 });
fake.addDevice({ id: '0000:80:00.2', flags: 7, cdev: false, seed: 3 });

test.serial('auto picks cdev when the device has a vfio-dev node, and migration works through it', async (t) => {
  const a = VfioDevice.open('0000:80:00.0');
  const b = VfioDevice.open('0000:80:00.1');
  t.is(a.openedVia, 'cdev');
  const calls = fake.ioctlLog.map((l) => l.request);
  t.true(calls.includes(Ioctl.IOMMU_IOAS_ALLOC) && calls.includes(Ioctl.DEVICE_BIND_IOMMUFD) && calls.includes(Ioctl.DEVICE_ATTACH_IOMMUFD_PT));
  t.is(fake.openFdCount('container'), 0, 'no legacy container on this path');
  await restoreState(b, await saveState(a));
  t.is(fake.device('0000:80:00.1').digest(), fake.device('0000:80:00.0').digest());
  t.is(await b.state(), MigState.Running);
  await a.close();
  await b.close();
  t.is(fake.openFdCount(), 0);
});

test.serial('a device without a cdev node falls back to the group path; forcing cdev explains', async (t) => {
  const c = VfioDevice.open('0000:80:00.2');
  t.is(c.openedVia, 'group');
  await c.close();
  const err = t.throws(() => VfioDevice.open('0000:80:00.2', { path: 'cdev' }), { instanceOf: VfioError });
  t.regex(err?.message ?? '', /has no vfio-dev cdev/);
});

test.serial('a second open of a cdev device is refused, and nothing leaks', async (t) => {
  const a = VfioDevice.open('0000:80:00.0');
  const err = t.throws(() => VfioDevice.open('0000:80:00.0'), { instanceOf: VfioError });
  t.is(err?.code, 'EINVAL');
  t.regex(err?.message ?? '', /VFIO_DEVICE_BIND_IOMMUFD .*already opened elsewhere/);
  await a.close();
  t.is(fake.openFdCount(), 0);
});
