// The driver table: schema validation with file:line:column and field, JSON syntax
// errors, duplicate keys, the wildcard-driver guard, rule order, and the choice
// precedence (rule > modules.alias > nothing) including the "safe" alias policy.
import test from 'ava';
import { readFileSync } from 'node:fs';
import { parseDriverTable, loadDriverTable, configSchema, findRule, DEFAULT_TABLE } from '../../src/pci/table.ts';
import { ConfigError } from '../../src/pci/errors.ts';
import { validate, checkSchema } from '../../src/pci/schema.ts';
import { parseLocatedJson } from '../../src/pci/jsonloc.ts';
import { chooseDriver, chooseForFutureVfs } from '../../src/pci/choose.ts';
import { isVfioDriver } from '../../src/pci/drivernames.ts';
import { AliasIndex } from '../../src/pci/modalias.ts';
import { readPciDevice } from '../../src/pci/pcidev.ts';
import { installFakeSysfs } from '../fake/sysfs.ts';
import { bigAliasFile } from '../fake/sysfs-aliases.ts';

const fake = installFakeSysfs(test);

function reject(text: string): ConfigError {
  const err = (() => {
    try {
      parseDriverTable(text, '/etc/vfio-mig/config.json');
    } catch (e) {
      return e;
    }
    return undefined;
  })();
  if (!(err instanceof ConfigError)) throw new Error(`expected a ConfigError, got ${String(err)}`);
  return err;
}

test('the shipped schema and default config are valid and use only the supported keywords', (t) => {
  const schema = configSchema();
  t.notThrows(() => checkSchema(schema));
  const shipped = JSON.parse(readFileSync(new URL('../../plugin/config.json', import.meta.url), 'utf8'));
  t.deepEqual(validate(schema, shipped), []);
  t.throws(() => checkSchema({ type: 'object', patternProperties: {} }), { message: /keyword patternProperties/ });
  t.throws(() => checkSchema({ $ref: 'http://example.com/x' }), { message: /local/ });
});

test('a good table parses: rules in order, ids lower-cased, defaults filled', (t) => {
  const table = parseDriverTable(
    JSON.stringify({
      version: 1,
      rules: [
        { vendor: '15B3', device: '101e', driver: 'mlx5_vfio_pci', comment: 'CX-6 VFs' },
        { vendor: '8086', device: '*', class: '0200*', exclude: true },
        { vendor: '1234', device: '11e8', subsystem_vendor: '1af4', subsystem_device: '1100', class: '00ff00', driver: 'vfio-pci' },
      ],
    }, null, 2),
    'cfg.json',
  );
  t.is(table.aliasPolicy, 'safe');
  t.true(table.manageSriovAutoprobe);
  t.is(table.rules.length, 3);
  t.like(table.rules[0], { index: 0, vendor: '15b3', device: '101e', driver: 'mlx5_vfio_pci', exclude: false, subsystemVendor: '*', class: '*', line: 4 });
  t.like(table.rules[1], { exclude: true, driver: undefined, class: '0200*' });
  const nic = { vendor: '8086', device: '1572', subsystemVendor: '8086', subsystemDevice: '0000', class: '020000' };
  t.is(findRule(table, nic)?.index, 1);
  t.is(findRule(table, { ...nic, class: '030000' }), undefined);
  t.is(findRule(table, { vendor: '1234', device: '11e8', subsystemVendor: '1af4', subsystemDevice: '1100', class: '00ff00' })?.index, 2);
  t.is(findRule(table, { vendor: '1234', device: '11e8', subsystemVendor: '1af4', subsystemDevice: '1101', class: '00ff00' }), undefined);
});

test('schema errors name line, column and field, and the file is rejected whole', (t) => {
  const text = ['{', '  "version": 1,', '  "rules": [', '    { "vendor": "15b3", "device": "101e", "driver": "mlx5_vfio_pci" },', '    { "vendor": "15B", "device": "101e", "driver": "x" }', '  ]', '}'].join('\n');
  const err = reject(text);
  t.is(err.line, 5);
  t.is(err.column, 17);
  t.is(err.field, 'rules[1].vendor');
  t.regex(err.message, /config \/etc\/vfio-mig\/config\.json:5:17: rules\[1\]\.vendor: "15B" is not valid \(a 4-digit hex PCI id like "15b3", or "\*"\)/);
  t.regex(err.message, /nothing was changed/);
});

test('every kind of mistake is caught with a useful message', (t) => {
  const cases: Array<[unknown, RegExp, string]> = [
    [{ rules: [] }, /missing required field "version"/, '(document)'],
    [{ version: 2 }, /must be 1, found 2/, 'version'],
    [{ version: 1, rule: [] }, /unknown field "rule" \(known: \$schema, version, aliasPolicy, manageSriovAutoprobe, rules, hooks\)/, 'rule'],
    [{ version: 1, aliasPolicy: 'always' }, /must be one of "safe", "all", "off"/, 'aliasPolicy'],
    [{ version: 1, rules: {} }, /expected an array/, 'rules'],
    [{ version: 1, rules: [{ vendor: '15b3', device: '101e' }] }, /needs exactly one of "driver", "exclude"/, 'rules[0]'],
    [{ version: 1, rules: [{ vendor: '15b3', device: '101e', driver: 'a', exclude: true }] }, /needs exactly one of "driver", "exclude", not several/, 'rules[0]'],
    [{ version: 1, rules: [{ vendor: '15b3', device: '101e', exclude: false }] }, /must be true/, 'rules[0].exclude'],
    [{ version: 1, rules: [{ vendor: '15b3', device: '101e', driver: '../../bin/sh' }] }, /is not valid \(a PCI driver name/, 'rules[0].driver'],
    [{ version: 1, rules: [{ vendor: '15b3', device: '101e', driver: '-rf' }] }, /is not valid/, 'rules[0].driver'],
    [{ version: 1, rules: [{ vendor: '15b3', device: '101e', class: '02', driver: 'x' }] }, /"02" is not valid \(6 hex digits/, 'rules[0].class'],
    [{ version: 1, rules: [{ vendor: '15b3', device: '101e', driver: 'x', vendorr: '1' }] }, /unknown field "vendorr"/, 'rules[0].vendorr'],
    [{ version: 1, rules: [{ vendor: '*', device: '*', driver: 'vfio-pci' }] }, /must name a vendor: "\*" would give every matching device on the host to vfio-pci/, 'rules[0].vendor'],
    [[], /expected an object/, '(document)'],
  ];
  for (const [doc, re, field] of cases) {
    const err = reject(JSON.stringify(doc, null, 1));
    t.regex(err.message, re, JSON.stringify(doc));
    t.is(err.field, field, JSON.stringify(doc));
    t.true(err.line !== undefined && err.line >= 1);
  }
  // A wide exclude is fine: it only ever keeps devices away.
  t.notThrows(() => parseDriverTable(JSON.stringify({ version: 1, rules: [{ vendor: '*', device: '*', exclude: true }] }), 'x'));
});

test('JSON syntax errors and duplicate keys give line and column', (t) => {
  let err = reject('{\n  "version": 1,\n  "rules": [\n    { "vendor": "15b3", }\n  ]\n}');
  t.is(err.line, 4);
  t.regex(err.message, /invalid JSON: expected a "quoted" key, found "}"/);
  err = reject('{\n  "version": 1,\n  "version": 1\n}');
  t.like(err, { line: 3, column: 3 });
  t.regex(err.message, /duplicate key "version"/);
  err = reject('{"version": 1} trailing');
  t.regex(err.message, /after the end of the document/);
  err = reject('');
  t.regex(err.message, /unexpected end of input/);
  err = reject('{"version": 1, "rules": [{"vendor": "15b3", "device": "101e", "driver": "x", "comment": "a\u0001b"}]}');
  t.regex(err.message, /control character/);
  const deep = '['.repeat(100) + ']'.repeat(100);
  t.regex(reject(deep).message, /nested deeper than 64/);
  t.deepEqual(parseLocatedJson('\ufeff{"a": [1, 2.5e3, "\\u0041"]}').value, { a: [1, 2500, 'A'] });
});

test('loading: a missing file is an empty table; an unreadable or huge one is rejected', (t) => {
  fake.removeConfig();
  t.deepEqual(loadDriverTable(), { ...DEFAULT_TABLE, rules: [] });
  fake.writeConfig('x'.repeat((1 << 20) + 1));
  t.throws(() => loadDriverTable(), { instanceOf: ConfigError, message: /larger than/ });
  fake.writeConfig({ version: 1, rules: [{ vendor: '1234', device: '11e8', driver: 'vfio-pci' }] });
  t.is(loadDriverTable().rules.length, 1);
  t.throws(() => loadDriverTable(fake.root), { instanceOf: ConfigError, message: /cannot read/ });
});

test('isVfioDriver recognises vfio-pci and its variants, nothing else', (t) => {
  for (const d of ['vfio-pci', 'mlx5_vfio_pci', 'xe-vfio-pci', 'edu-vfio-pci', 'vfio_mdev', 'VFIO']) t.true(isVfioDriver(d), d);
  for (const d of ['ixgbevf', 'pcieport', 'pci-stub', 'nvme', 'mlx5_core']) t.false(isVfioDriver(d), d);
});

// --- choice precedence ---------------------------------------------------------------

fake.addModule('edu_vfio_pci', [{ name: 'edu-vfio-pci' }]);
fake.addModule('mlx5_core', [{ name: 'mlx5_core', ids: [{ vendor: '15b3' }] }], { loaded: true });
fake.addModule('virtio_pci', [{ name: 'virtio-pci', ids: [{ vendor: '1af4' }] }], { loaded: true });
fake.addDevice({ bdf: '0000:01:00.0', vendor: '1234', device: '11e8', subsystemVendor: '1af4', subsystemDevice: '1100', class: '00ff00' });
fake.addDevice({ bdf: '0000:00:03.0', vendor: '1af4', device: '1041', class: '020000', driver: 'virtio-pci' });
fake.addDevice({ bdf: '0000:00:04.0', vendor: '1af4', device: '1041', class: '020000' }); // host driver not loaded yet
fake.addDevice({ bdf: '0000:3b:00.0', vendor: '15b3', device: '101d', class: '020000', driver: 'mlx5_core', sriov: { totalVfs: 8, vfDevice: '101e' } });
fake.writeAliases(bigAliasFile(['alias vfio_pci:v00001AF4d00001041sv*sd*bc*sc*i* other_virtio_vfio']));

const aliases = () => AliasIndex.parse(readFileSync(`${fake.modulesDir}/modules.alias`, 'utf8'));
const tableOf = (doc: object) => parseDriverTable(JSON.stringify({ version: 1, ...doc }), 'cfg.json');

test('rule beats alias; exclude beats alias; no rule and no alias means none', (t) => {
  const edu = readPciDevice('0000:01:00.0');
  t.like(chooseDriver(edu, tableOf({}), aliases()), { driver: 'edu-vfio-pci', module: 'edu_vfio_pci', reason: 'alias', alias: 'vfio_pci:v00001234d000011E8sv*sd*bc*sc*i*' });
  t.like(chooseDriver(edu, tableOf({ rules: [{ vendor: '1234', device: '11e8', driver: 'vfio-pci' }] }), aliases()), { driver: 'vfio-pci', module: 'vfio_pci', reason: 'rule', rule: 1 });
  t.like(chooseDriver(edu, tableOf({ rules: [{ vendor: '1234', device: '*', exclude: true, comment: 'lab' }] }), aliases()), { driver: null, reason: 'excluded', detail: 'excluded by rule 1 (line 1): lab' });
  t.like(chooseDriver(edu, tableOf({ aliasPolicy: 'off' }), aliases()), { driver: null, reason: 'none' });
  const pf = readPciDevice('0000:3b:00.0');
  t.like(chooseDriver(pf, tableOf({}), aliases()), { driver: null, reason: 'none', detail: 'no rule and no modules.alias variant driver matches' });
});

test('a rule may name the module instead of the driver: xe_vfio_pci means xe-vfio-pci', (t) => {
  const edu = readPciDevice('0000:01:00.0');
  t.like(chooseDriver(edu, tableOf({ rules: [{ vendor: '1234', device: '11e8', driver: 'edu_vfio_pci' }] }), aliases()), { driver: 'edu-vfio-pci', module: 'edu_vfio_pci' });
  t.like(chooseDriver(edu, tableOf({ rules: [{ vendor: '1234', device: '11e8', driver: 'xe_vfio_pci' }] }), aliases()), { driver: 'xe-vfio-pci', module: 'xe_vfio_pci' });
});

test('alias policy "safe" leaves PFs a host driver uses or would claim; "all" takes them; ties are reported', (t) => {
  const used = readPciDevice('0000:00:03.0');
  const notYet = readPciDevice('0000:00:04.0');
  const idx = AliasIndex.parse(readFileSync(`${fake.modulesDir}/modules.alias`, 'utf8').replace(/.*other_virtio_vfio\n/, ''));
  t.like(chooseDriver(used, tableOf({}), idx), { driver: null, reason: 'none', detail: 'modules.alias suggests virtio_vfio_pci, but this PF is in use by host driver virtio-pci: add a rule to take it' });
  t.like(chooseDriver(notYet, tableOf({}), idx), { driver: null, reason: 'none', detail: 'modules.alias suggests virtio_vfio_pci, but host driver module virtio_pci also claims this PF: add a rule to take it' });
  t.like(chooseDriver(used, tableOf({ aliasPolicy: 'all' }), idx), { driver: 'virtio_vfio_pci', reason: 'alias' });
  const tie = chooseDriver(used, tableOf({ aliasPolicy: 'all' }), aliases());
  t.like(tie, { driver: null, reason: 'none', candidates: ['other_virtio_vfio', 'virtio_vfio_pci'] });
  t.regex(tie.detail, /equally specific variants other_virtio_vfio, virtio_vfio_pci .*add a rule/);
});

test('the VFs a PF will create are judged from its sriov_vf_device', (t) => {
  const pf = readPciDevice('0000:3b:00.0');
  t.like(chooseForFutureVfs(pf, tableOf({}), aliases()), { driver: 'mlx5_vfio_pci', reason: 'alias' });
  t.like(chooseForFutureVfs(pf, tableOf({ rules: [{ vendor: '15b3', device: '101e', exclude: true }] }), aliases()), { driver: null, reason: 'excluded' });
  t.is(chooseForFutureVfs(readPciDevice('0000:01:00.0'), tableOf({}), aliases()), undefined);
});
