// modules.alias matching: libvirt's fewest-wildcards choice, ties reported, the generic
// vfio_pci entry never a variant, host aliases, module -> driver names, and speed on a
// file of realistic size.
import test from 'ava';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { AliasIndex, globToRegExp, vfioModalias, loadAliasIndex } from '../../src/pci/modalias.ts';
import { pciDriverForModule, moduleForPciDriver } from '../../src/pci/drivernames.ts';
import { installFakeSysfs } from '../fake/sysfs.ts';
import { bigAliasFile } from '../fake/sysfs-aliases.ts';

const fake = installFakeSysfs(test);

const MLX_VF = 'pci:v000015B3d0000101Esv000015B3sd00000001bc02sc00i00';
const EDU = 'pci:v00001234d000011E8sv00001AF4sd00001100bc00scFFi00';
const VIRTIO_NET = 'pci:v00001AF4d00001041sv00001AF4sd00001100bc02sc00i00';

test('glob matching follows fnmatch: *, ?, [...] and [!...]', (t) => {
  t.true(globToRegExp('vfio_pci:v*d*sv*sd*bc*sc*i*').test('vfio_pci:v000015B3d0000101Esv000015B3sd00000001bc02sc00i00'));
  t.true(globToRegExp('a?c').test('abc'));
  t.false(globToRegExp('a?c').test('ac'));
  t.true(globToRegExp('x[0-9]y').test('x5y'));
  t.false(globToRegExp('x[!0-9]y').test('x5y'));
  t.true(globToRegExp('a.b+c').test('a.b+c'));
  t.false(globToRegExp('a.b').test('axb'), 'regex metacharacters are literal');
});

test('the vfio_ prefix is added to a validated modalias only', (t) => {
  t.is(vfioModalias(EDU), `vfio_${EDU}`);
  for (const bad of ['usb:v05ACp1234', 'pci:v1234', `${EDU}/../x`, '']) t.throws(() => vfioModalias(bad), { message: /not a PCI modalias/ });
});

test('the most specific variant wins; the generic vfio_pci entry is never a variant', (t) => {
  const idx = AliasIndex.parse(bigAliasFile(['alias vfio_pci:v000015B3d*sv*sd*bc*sc*i* mlx5_generic_vfio']).join('\n'));
  t.is(idx.size, 6);
  t.deepEqual(idx.best(MLX_VF), { kind: 'variant', module: 'mlx5_vfio_pci', pattern: 'vfio_pci:v000015B3d0000101Esv*sd*bc*sc*i*', wildcards: 5 });
  t.like(idx.best(EDU), { kind: 'variant', module: 'edu_vfio_pci' });
  // Only vfio_pci's catch-all matches: that is not a variant.
  t.deepEqual(idx.best('pci:v00001000d00002000sv00001000sd00000000bc02sc00i00'), { kind: 'none' });
  // xe's entry pins the class: another class is not matched.
  t.like(idx.best('pci:v00008086d0000E20Bsv00008086sd00000000bc03sc00i00'), { module: 'xe_vfio_pci' });
  t.deepEqual(idx.best('pci:v00008086d0000E20Bsv00008086sd00000000bc02sc00i00'), { kind: 'none' });
});

test('a tie between different modules is reported, not guessed; the same module twice is no tie', (t) => {
  const idx = AliasIndex.parse(
    bigAliasFile([
      'alias vfio_pci:v00001234d000011E8sv*sd*bc*sc*i* other_vfio_pci',
      'alias vfio_pci:v000015B3d0000101Esv*sd*bc02sc*i* mlx5_vfio_pci',
      'alias vfio_pci:v000015B3d0000101Esv*sd*bc*sc00i* mlx5_vfio_pci',
    ]).join('\n'),
  );
  t.deepEqual(idx.best(EDU), { kind: 'ambiguous', modules: ['edu_vfio_pci', 'other_vfio_pci'], wildcards: 5 });
  t.like(idx.best(MLX_VF), { kind: 'variant', module: 'mlx5_vfio_pci', wildcards: 4 });
});

test('host driver aliases are indexed too (class drivers included), VFIO modules left out', (t) => {
  const idx = AliasIndex.parse(bigAliasFile().join('\n'));
  t.deepEqual(idx.hostModules(VIRTIO_NET), ['virtio_pci']);
  t.deepEqual(idx.hostModules(MLX_VF), ['mlx5_core']);
  t.deepEqual(idx.hostModules(EDU), []);
  t.deepEqual(idx.hostModules('pci:v00001B36d0000000Dsv00001AF4sd00001100bc0Csc03i30'), ['xhci_pci']);
});

test('malformed alias lines are skipped with their line numbers, not fatal', (t) => {
  const idx = AliasIndex.parse(['# comment', 'alias vfio_pci:v00001234d000011E8sv*sd*bc*sc*i* edu_vfio_pci', 'alias vfio_pci:v$(reboot) evil', 'alias vfio_pci:v*d*sv*sd*bc*sc*i* -rf', ' alias vfio_pci:vX edu'].join('\n'));
  t.is(idx.size, 1);
  t.deepEqual(idx.skipped, [3, 4]);
  t.like(idx.best(EDU), { module: 'edu_vfio_pci' });
});

test('a 30000-line modules.alias loads and answers fast (indexed by vendor)', (t) => {
  const lines = bigAliasFile();
  writeFileSync(join(fake.modulesDir, 'modules.alias'), lines.join('\n'));
  const t0 = performance.now();
  const idx = loadAliasIndex();
  const loadMs = performance.now() - t0;
  const t1 = performance.now();
  for (let i = 0; i < 1000; i++) idx.best(i % 2 ? MLX_VF : EDU);
  const lookupMs = (performance.now() - t1) / 1000;
  t.log(`load ${lines.length} lines: ${loadMs.toFixed(1)} ms; lookup ${(lookupMs * 1000).toFixed(1)} us`);
  t.true(loadMs < 500, `load took ${loadMs} ms`);
  t.true(lookupMs < 1, `lookup took ${lookupMs} ms`);
  t.is(loadAliasIndex(), idx, 'cached while the file is unchanged');
  t.like(idx.best(MLX_VF), { module: 'mlx5_vfio_pci' });
  const t2 = performance.now();
  t.deepEqual(idx.hostModules(MLX_VF), ['mlx5_core']);
  const hostMs = performance.now() - t2;
  t.log(`first host-driver lookup (scans the text for one vendor): ${hostMs.toFixed(1)} ms`);
  t.true(hostMs < 100, `host lookup took ${hostMs} ms`);
});

test('a missing modules.alias is an empty index, not an error', (t) => {
  const saved = process.env.VFIO_MIG_MODULES_DIR;
  process.env.VFIO_MIG_MODULES_DIR = join(fake.root, 'nowhere');
  try {
    const idx = loadAliasIndex();
    t.is(idx.size, 0);
    t.regex(idx.source, /missing/);
  } finally {
    process.env.VFIO_MIG_MODULES_DIR = saved;
  }
});

test('module names map to PCI driver names: sysfs first, then the known table, then the name', (t) => {
  t.is(pciDriverForModule('xe_vfio_pci'), 'xe-vfio-pci');
  t.is(pciDriverForModule('vfio_pci'), 'vfio-pci');
  t.is(pciDriverForModule('vfio-pci'), 'vfio-pci', 'modprobe spelling with dashes');
  t.is(pciDriverForModule('edu_vfio_pci'), 'edu-vfio-pci');
  t.is(pciDriverForModule('mlx5_vfio_pci'), 'mlx5_vfio_pci');
  // A loaded module says what it registered, whatever the table believes.
  fake.addModule('odd_vfio_pci', [{ name: 'odd-variant' }], { loaded: true });
  t.is(pciDriverForModule('odd_vfio_pci'), 'odd-variant');
  t.is(moduleForPciDriver('odd-variant'), 'odd_vfio_pci', 'from the driver\'s module link');
  t.is(moduleForPciDriver('xe-vfio-pci'), 'xe_vfio_pci');
  t.is(moduleForPciDriver('mlx5_vfio_pci'), 'mlx5_vfio_pci');
  t.is(moduleForPciDriver('some-driver'), 'some_driver');
  t.throws(() => pciDriverForModule('-r'), { message: /invalid module name/ });
  t.throws(() => moduleForPciDriver('../x'), { message: /invalid driver name/ });
});
