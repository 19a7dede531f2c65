// `vfio-mig devices` on a fake host: migratable, in-use, plain vfio-pci and mdev devices.
import test from 'ava';
import { installFake } from '../fake/install.ts';
import { runCli } from '../cli-harness.ts';
import { VfioDevice } from '../../src/vfio/device.ts';

const fake = installFake(test);
fake.addDevice({ id: '0000:3b:00.2', flags: 7, vendor: '15b3', deviceId: '101e', driver: 'mlx5_vfio_pci' });
fake.addDevice({ id: '0000:3b:00.3', flags: 3, vendor: '15b3', deviceId: '101e', driver: 'mlx5_vfio_pci' });
fake.addDevice({ id: '0000:3b:00.4', driver: 'vfio-pci' });
fake.addDevice({ id: '83b8f4f2-509f-382f-3c1e-e6bfe0fa0001', flags: 7, driver: 'vfio_mdev' });
fake.addGroupSibling('0000:00:1f.0', 99, 'lpc_ich'); // a host device: not listed

const run = runCli;

test.serial('devices --json lists VFIO devices with flags, state, or why not', async (t) => {
  const busy = VfioDevice.open('0000:3b:00.3'); // a "VM" holds this one
  const { code, out } = await run(['devices', '--json']);
  await busy.close();
  t.is(code, 0);
  const list = JSON.parse(out) as Record<string, unknown>[];
  t.deepEqual(list.map((d) => d.address), ['0000:3b:00.2', '0000:3b:00.3', '0000:3b:00.4', '83b8f4f2-509f-382f-3c1e-e6bfe0fa0001']);
  t.like(list[0], { vendor: '15b3', device: '101e', driver: 'mlx5_vfio_pci', iommuGroup: 10, migration: { flags: ['STOP_COPY', 'P2P', 'PRE_COPY'], state: 'RUNNING' } });
  t.like(list[1], { migration: { errno: 'EBUSY' } });
  t.regex(String((list[1]!.migration as { error: string }).error), /is a VM using 0000:3b:00\.3/);
  t.like(list[2], { driver: 'vfio-pci', migration: { errno: 'ENOTTY' } });
  t.like(list[3], { kind: 'mdev', migration: { state: 'RUNNING' } });
  t.is(fake.openFdCount(), 0, 'probing closes everything it opened');
});

test.serial('devices prints a table; bad options are usage errors', async (t) => {
  const { code, out } = await run(['devices']);
  t.is(code, 0);
  t.regex(out, /^ADDRESS\s+IDS\s+DRIVER\s+GROUP\s+MIGRATION/);
  t.regex(out, /0000:3b:00\.2\s+15b3:101e\s+mlx5_vfio_pci\s+10\s+STOP_COPY\|P2P\|PRE_COPY \(RUNNING\)/);
  const bad = await run(['devices', '--jsn']);
  t.is(bad.code, 2);
  t.regex(bad.err, /unknown option --jsn/);
  const unknown = await run(['frobnicate']);
  t.is(unknown.code, 2);
});
