// The sysfs model for binding: paths from validated parts only, ids/class/modalias/
// override/group/SR-IOV read and checked against the kernel's formats, and the fake
// PCI core itself behaving like the kernel (it is what the binder tests trust).
import test from 'ava';
import { writeFileSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import * as sysfs from '../../src/host/sysfs.ts';
import { readPciDevice, parseOverride } from '../../src/pci/pcidev.ts';
import { PciError } from '../../src/pci/errors.ts';
import { installFakeSysfs } from '../fake/sysfs.ts';

const fake = installFakeSysfs(test);
fake.addBuiltinDriver({ name: 'pcieport', ids: [{ classPrefix: '0604' }] });
fake.addModule('ixgbe', [{ name: 'ixgbe', ids: [{ vendor: '8086', device: '10fb' }] }], { loaded: true });
fake.addModule('ixgbevf', [{ name: 'ixgbevf', ids: [{ vendor: '8086', device: '10ed' }] }], { loaded: true });
fake.addModule('vfio_pci', [{ name: 'vfio-pci' }]);
const PF = fake.addDevice({ bdf: '0000:3B:00.0', vendor: '8086', device: '10fb', subsystemVendor: '8086', subsystemDevice: '0003', class: '020000', group: 7, driver: 'ixgbe', sriov: { totalVfs: 4, vfDevice: '10ed', autoprobe: true } });
const FN1 = fake.addDevice({ bdf: '0000:3b:00.1', vendor: '8086', device: '10fb', class: '020000', group: 7 });

test.serial('paths are built from validated parts only', (t) => {
  t.is(sysfs.pciAttrPath(PF, 'driver_override'), join(fake.sys, 'bus/pci/devices', PF, 'driver_override'));
  t.is(sysfs.pciDriverUnbindPath('mlx5_vfio_pci'), join(fake.sys, 'bus/pci/drivers/mlx5_vfio_pci/unbind'));
  t.is(sysfs.pciDriverBindPath('xe-vfio-pci'), join(fake.sys, 'bus/pci/drivers/xe-vfio-pci/bind'));
  t.is(sysfs.pciDriversProbePath(), join(fake.sys, 'bus/pci/drivers_probe'));
  for (const bad of ['../x', 'a/b', '', 'x'.repeat(65), 'nul\0']) t.throws(() => sysfs.pciDriverDir(bad), { instanceOf: sysfs.InvalidDeviceIdError }, JSON.stringify(bad));
  for (const bad of ['-r', '--force', 'a b', '../m']) t.throws(() => sysfs.parseModuleName(bad), { message: /invalid module name/ }, bad);
  t.throws(() => sysfs.pciAttrPath(PF, '../driver'), { message: /invalid attribute name/ });
  t.throws(() => sysfs.pciAttrPath('0000:3b:00.0/..', 'driver_override'), { message: /invalid PCI address/ });
  t.throws(() => sysfs.moduleLoaded('../../etc'), { message: /invalid module name/ });
});

test.serial('a device reads back as the kernel prints it: ids, class, modalias, override, group, SR-IOV', (t) => {
  const d = readPciDevice('0000:3B:00.0');
  t.like(d, {
    address: PF,
    vendor: '8086',
    device: '10fb',
    subsystemVendor: '8086',
    subsystemDevice: '0003',
    class: '020000',
    revision: '01',
    modalias: 'pci:v00008086d000010FBsv00008086sd00000003bc02sc00i00',
    driver: 'ixgbe',
    override: undefined,
    iommuGroup: 7,
    physfn: undefined,
    virtfns: [],
    sriov: { totalVfs: 4, numVfs: 0, autoprobe: true, vfDevice: '10ed' },
  });
  t.deepEqual(sysfs.groupMembers(7).map(sysfs.deviceIdString), [PF, FN1]);
  t.is(sysfs.pciDriverModule('ixgbe'), 'ixgbe');
  t.is(sysfs.pciDriverModule('pcieport'), undefined, 'built in: no module link');
  t.deepEqual(sysfs.modulePciDrivers('ixgbe'), ['ixgbe']);
  t.true(sysfs.moduleLoaded('ixgbe'));
  t.false(sysfs.moduleLoaded('vfio_pci'));
  t.is(parseOverride('(null)'), undefined);
  t.is(parseOverride(''), undefined);
  t.is(parseOverride('vfio-pci'), 'vfio-pci');
});

test.serial('garbage in sysfs is an error naming the device and attribute', (t) => {
  const bad = fake.addDevice({ bdf: '0000:09:00.0', vendor: '1234', device: '5678', group: 90 });
  const dir = join(fake.sys, 'bus/pci/devices', bad);
  const cases: Array<[string, string, RegExp]> = [
    ['vendor', '0x12345\n', /read vendor for 0000:09:00\.0 failed: "0x12345" is not a 16-bit id/],
    ['class', 'network\n', /read class .* is not a 24-bit class/],
    ['modalias', 'pci:v00001234$(id)\n', /read modalias .* is not a PCI modalias/],
    ['driver_override', '../../evil\n', /read driver_override .* is not a driver name/],
  ];
  for (const [attr, content, re] of cases) {
    const good = readPciDevice(bad);
    writeFileSync(join(dir, attr), content);
    t.throws(() => readPciDevice(bad), { instanceOf: PciError, message: re }, attr);
    // put it back
    const restore: Record<string, string> = { vendor: `0x${good.vendor}`, class: `0x${good.class}`, modalias: good.modalias, driver_override: '(null)' };
    writeFileSync(join(dir, attr), `${restore[attr]}\n`);
  }
  t.throws(() => readPciDevice('0000:0f:00.0'), { instanceOf: PciError, message: /no such PCI device/ });
  symlinkSync('../../../bus/pci/drivers/x y', join(dir, 'driver'));
  t.throws(() => readPciDevice(bad), { message: /read driver .* is not a driver name/ });
});

test.serial('the fake PCI core: SR-IOV links, autoprobe, override matching, bind/unbind errors', async (t) => {
  const w = (rel: string, v: string) => fake.writeAttr(join(fake.sys, rel), v);
  w(`bus/pci/devices/${PF}/sriov_numvfs`, '2');
  const vfs = sysfs.virtfnsOf(PF);
  t.deepEqual(vfs, ['0000:3c:00.0', '0000:3c:00.1']);
  t.is(sysfs.physfnOf(vfs[0]!), PF);
  t.is(fake.driverOf(vfs[0]!), 'ixgbevf', 'autoprobe on: the host VF driver grabs it');
  t.like(readPciDevice(vfs[1]!), { physfn: PF, vendor: '8086', device: '10ed', sriov: undefined });
  t.like(readPciDevice(PF).sriov, { numVfs: 2 });
  t.throws(() => w(`bus/pci/devices/${PF}/sriov_numvfs`, '3'), { message: /EBUSY/ });
  w(`bus/pci/devices/${PF}/sriov_numvfs`, '0');
  t.deepEqual(sysfs.virtfnsOf(PF), []);
  w(`bus/pci/devices/${PF}/sriov_drivers_autoprobe`, '0');
  w(`bus/pci/devices/${PF}/sriov_numvfs`, '1');
  const vf = sysfs.virtfnsOf(PF)[0]!;
  t.is(fake.driverOf(vf), undefined, 'autoprobe off: nothing binds');
  w('bus/pci/drivers_probe', vf);
  t.is(fake.driverOf(vf), undefined, 'not even on drivers_probe');
  await fake.modprobe('vfio_pci', 1000);
  w(`bus/pci/devices/${vf}/driver_override`, 'vfio-pci\n');
  t.is(sysfs.readDeviceAttr({ kind: 'pci', bdf: vf }, 'driver_override'), 'vfio-pci');
  w('bus/pci/drivers_probe', vf);
  t.is(fake.driverOf(vf), 'vfio-pci', 'an override makes a VF probe-able under autoprobe=0');
  t.throws(() => w('bus/pci/drivers/vfio-pci/bind', vf), { message: /ENODEV/ }, 'bind on a bound device');
  t.throws(() => w('bus/pci/drivers/ixgbevf/unbind', vf), { message: /ENODEV/ }, 'unbind from the wrong driver');
  w(`bus/pci/devices/${vf}/driver/unbind`, vf);
  t.is(fake.driverOf(vf), undefined);
  w(`bus/pci/devices/${vf}/driver_override`, '\n');
  t.is(fake.overrideOf(vf), undefined);
  t.throws(() => w('bus/pci/drivers/vfio-pci/bind', vf), { message: /ENODEV/ }, 'vfio-pci has no ids: no match without override');
  t.throws(() => w('bus/pci/drivers/nosuch/bind', vf), { message: /ENOENT/ });
  t.throws(() => w(`bus/pci/devices/${vf}/vendor`, '1'), { message: /EACCES/ });
  await t.throwsAsync(fake.modprobe('nosuch', 1000), { message: /FATAL: Module nosuch not found/ });
  w(`bus/pci/devices/${PF}/sriov_numvfs`, '0');
  w(`bus/pci/devices/${PF}/sriov_drivers_autoprobe`, '1');
});
