// Domain XML model on every fixture of test/fixtures/libvirt-xml (libvirt's own
// qemuxmlconfdata files): untouched round trips, hostdev reading, address edits that touch
// one attribute only, qemu:override insertion, and malformed input.
//
// "Canonically identical" is judged by a canonicalizer written here, independent of
// fast-xml-parser (attributes sorted, one quote style, empty elements expanded, entities
// normalized, CDATA as text), and additionally by xmllint --c14n when it is installed.
import test from 'ava';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { DomainXml, DomainXmlError, QEMU_NS, formatBdf, unescapeXml } from '../../src/libvirt/domain-xml.ts';

const here = dirname(fileURLToPath(import.meta.url));
const FIXTURES = process.env.VFIO_MIG_XML_FIXTURES ?? join(here, '..', 'fixtures', 'libvirt-xml');

interface IndexRow {
  file: string;
  hostdevs: number;
  notes: string;
}

function index(): IndexRow[] {
  const lines = readFileSync(join(FIXTURES, 'INDEX.tsv'), 'utf8').trim().split('\n');
  const head = lines[0]!.split('\t');
  const col = (name: string): number => head.indexOf(name);
  return lines.slice(1).map((l) => {
    const c = l.split('\t');
    return { file: c[col('file_name')]!, hostdevs: Number(c[col('hostdev_elements')]), notes: c[col('notes')] ?? '' };
  });
}

const escText = (s: string): string => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/\r/g, '&#xD;');
const escAttr = (s: string): string => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/"/g, '&quot;').replace(/\t/g, '&#x9;').replace(/\n/g, '&#xA;').replace(/\r/g, '&#xD;');

/** A small C14N-like canonical form (comments kept), with no XML library involved. */
function canonical(xml: string): string {
  const TOKEN = /<!--([\s\S]*?)-->|<!\[CDATA\[([\s\S]*?)\]\]>|<\?[\s\S]*?\?>|<\/([^\s>]+)\s*>|<([^\s/>]+)((?:\s+[^\s=]+\s*=\s*(?:"[^"]*"|'[^']*'))*)\s*(\/?)>|([^<]+)/gy;
  const ATTR = /([^\s=]+)\s*=\s*(?:"([^"]*)"|'([^']*)')/g;
  const out: string[] = [];
  let depth = 0;
  let m: RegExpExecArray | null;
  let pos = 0;
  while ((m = TOKEN.exec(xml))) {
    pos = TOKEN.lastIndex;
    if (m[1] !== undefined) out.push(`<!--${m[1]}-->`);
    else if (m[2] !== undefined) out.push(escText(m[2]));
    else if (m[3] !== undefined) {
      out.push(`</${m[3]}>`);
      depth--;
    } else if (m[4] !== undefined) {
      const attrs = [...m[5]!.matchAll(ATTR)].map((a) => [a[1]!, unescapeXml(a[2] ?? a[3] ?? '')] as const);
      attrs.sort(([a], [b]) => (a.startsWith('xmlns') === b.startsWith('xmlns') ? (a < b ? -1 : 1) : a.startsWith('xmlns') ? -1 : 1));
      out.push(`<${m[4]}${attrs.map(([k, v]) => ` ${k}="${escAttr(v)}"`).join('')}>`);
      if (m[6] === '/') out.push(`</${m[4]}>`);
      else depth++;
    } else if (m[7] !== undefined) {
      if (depth > 0) out.push(escText(unescapeXml(m[7])));
      else if (m[7].trim() !== '') throw new Error(`text outside the root: ${m[7]}`);
    }
    // <?...?> (declaration) is dropped, as in C14N.
  }
  if (pos !== xml.length) throw new Error(`canonicalizer stuck at ${pos}: ${xml.slice(pos, pos + 40)}`);
  return out.join('');
}

const xmllint = ['/usr/bin/xmllint', '/bin/xmllint'].find((p) => existsSync(p));
function c14n(xml: string): string {
  const dir = mkdtempSync(join(tmpdir(), 'c14n-'));
  try {
    writeFileSync(join(dir, 'x.xml'), xml);
    return execFileSync(xmllint!, ['--c14n', join(dir, 'x.xml')], { encoding: 'utf8' });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const rows = index();
const files = readdirSync(FIXTURES).filter((f) => f.endsWith('.xml')).sort();

test('the fixture index lists every fixture file', (t) => {
  t.deepEqual(rows.map((r) => r.file).sort(), files);
  t.true(files.length >= 50);
});

test('untouched round trip: byte-identical and canonically identical, for every fixture', (t) => {
  let c14nChecked = 0;
  for (const f of files) {
    const src = readFileSync(join(FIXTURES, f), 'utf8');
    const out = DomainXml.parse(src).serialize();
    t.is(canonical(out), canonical(src), `${f}: canonical form changed`);
    t.is(out, src, `${f}: bytes changed`);
    if (xmllint) {
      t.is(c14n(out), c14n(src), `${f}: xmllint --c14n differs`);
      c14nChecked++;
    }
  }
  t.log(xmllint ? `xmllint --c14n agreed on ${c14nChecked} files` : 'xmllint not installed: only the built-in canonical form was compared');
});

test('round trip keeps other formatting too: double quotes, declaration, comments, CDATA, entities', (t) => {
  const src = `<?xml version="1.0" encoding="UTF-8"?>\n<!-- top -->\n<domain type="kvm" xmlns:qemu="${QEMU_NS}">\n  <name>a &amp; b&#x41;</name>\n  <description><![CDATA[<raw> & stuff]]></description>\n  <x a="it's" b='say "hi"' c='&lt;&apos;'></x>\n  <controller type='usb'>\n    </controller>\n</domain>`;
  const d = DomainXml.parse(src);
  t.is(d.name, 'a & bA');
  const out = d.serialize();
  t.is(canonical(out), canonical(src));
  t.true(out.includes(`b='say "hi"'`));
  t.true(out.includes(`a="it's"`));
  t.true(out.includes('<![CDATA[<raw> & stuff]]>'));
  t.false(out.endsWith('\n'), 'no newline added at the end');
  if (xmllint) t.is(c14n(out), c14n(src));
});

test('hostdevs are read from every fixture: count, PCI address, mdev UUID, managed, driver model', (t) => {
  for (const r of rows) {
    const d = DomainXml.parse(readFileSync(join(FIXTURES, r.file), 'utf8'));
    const hs = d.hostdevs();
    t.is(hs.filter((h) => h.element === 'hostdev').length, r.hostdevs, `${r.file}: <hostdev> count`);
    const ifaces = /interface-type-hostdev=(\d+)/.exec(r.notes);
    t.is(hs.filter((h) => h.element === 'interface').length, ifaces ? Number(ifaces[1]) : 0, `${r.file}: <interface type='hostdev'> count`);
    hs.forEach((h, i) => t.is(h.index, i));
    // Negative-test fixtures carry invalid values on purpose: those must read as absent.
    if (!r.notes.includes('negative-test')) {
      for (const h of hs.filter((x) => x.type === 'mdev')) t.regex(h.mdevUuid ?? 'missing', /^[0-9a-f-]{36}$/, `${r.file}: mdev uuid`);
    }
  }
  const vfio = DomainXml.parse(readFileSync(join(FIXTURES, 'hostdev-vfio.xml'), 'utf8')).hostdevs();
  t.deepEqual(
    vfio.map((h) => [formatBdf(h.pci!), h.managed, h.driverName, h.driverModel]),
    [
      ['0000:06:12.1', true, undefined, undefined],
      ['0000:06:12.2', true, 'vfio', undefined],
      ['0000:06:12.3', true, undefined, 'vfio-pci-igb'],
      ['0000:06:12.4', true, 'vfio', 'vfio-pci-igb'],
    ],
  );
  const mdev = DomainXml.parse(readFileSync(join(FIXTURES, 'hostdev-mdev-display.xml'), 'utf8')).hostdevs();
  t.like(mdev[0], { type: 'mdev', mdevModel: 'vfio-pci', mdevUuid: '53764d0e-85a0-42b4-af5c-2046b460b1dc', pci: undefined, managed: undefined });
  const invalid = DomainXml.parse(readFileSync(join(FIXTURES, 'hostdev-mdev-src-address-invalid.xml'), 'utf8')).hostdevs();
  t.is(invalid[0]!.mdevUuid, undefined, 'an invalid UUID is not passed on');
  const out = DomainXml.parse(readFileSync(join(FIXTURES, 'hostdev-pci-address.x86_64-latest.xml'), 'utf8')).hostdevs();
  t.deepEqual(out[0]!.pci, { domain: 0, bus: 6, slot: 0x12, function: 5 });
  t.not(out[0]!.guestPci, undefined, 'the -latest output has the guest-side address');
});

test('aliases of a live XML are read (they are QEMU device ids: VFIO_MIGRATION device-id)', (t) => {
  const live = `<domain type='qemu' id='3'>\n  <name>g</name>\n  <devices>\n    <hostdev mode='subsystem' type='pci' managed='yes'>\n      <driver name='vfio'/>\n      <source>\n        <address domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>\n      </source>\n      <alias name='hostdev0'/>\n      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>\n    </hostdev>\n  </devices>\n</domain>\n`;
  const d = DomainXml.parse(live);
  t.is(d.hostdevs()[0]!.alias, 'hostdev0');
  t.deepEqual(d.hostdevs()[0]!.guestPci, { domain: 0, bus: 1, slot: 0, function: 0 });
  d.setHostdevSourceAddress({ alias: 'hostdev0' }, { domain: 0, bus: 0, slot: 4, function: 0 });
  t.deepEqual(DomainXml.parse(d.serialize()).hostdevs()[0]!.pci, { domain: 0, bus: 0, slot: 4, function: 0 });
});

test('editing a hostdev address changes only that attribute, in every fixture with a PCI hostdev', (t) => {
  let edited = 0;
  for (const f of files) {
    const src = readFileSync(join(FIXTURES, f), 'utf8');
    const d = DomainXml.parse(src);
    const target = d.hostdevs().find((h) => h.pci);
    if (!target) continue;
    const to = { ...target.pci!, function: (target.pci!.function + 1) % 8 };
    d.setHostdevSourceAddress({ index: target.index }, to);
    const out = d.serialize();
    const a = src.split('\n');
    const b = out.split('\n');
    t.is(b.length, a.length, `${f}: line count`);
    const changed = a.map((l, i) => [l, b[i]!] as const).filter(([x, y]) => x !== y);
    t.is(changed.length, 1, `${f}: exactly one line differs`);
    const [before, after] = changed[0]!;
    const diff = [...before.matchAll(/(\w+)='([^']*)'/g)].filter((m) => !after.includes(m[0]));
    t.deepEqual(diff.map((m) => m[1]), ['function'], `${f}: only function= changed`);
    t.true(after.includes(`function='0x${to.function.toString(16)}'`));
    // Everything else canonically identical, and the model sees the new address.
    t.is(canonical(out.replace(after, before)), canonical(src));
    t.deepEqual(DomainXml.parse(out).hostdevs()[target.index]!.pci, to);
    edited++;
  }
  t.true(edited >= 15, `edited ${edited} fixtures`);
});

test('a full retarget rewrites the four address attributes in place, keeping their order', (t) => {
  const d = DomainXml.parse(readFileSync(join(FIXTURES, 'hostdev-pci-address.xml'), 'utf8'));
  d.setHostdevSourceAddress({ pci: { domain: 0, bus: 6, slot: 0x12, function: 5 } }, { domain: 1, bus: 0xa, slot: 0x1f, function: 7 });
  t.true(d.serialize().includes(`<address domain='0x0001' bus='0x0a' slot='0x1f' function='0x7'/>`));
  t.throws(() => d.setHostdevSourceAddress({ index: 0 }, { domain: 0, bus: 0, slot: 0x20, function: 0 }), { instanceOf: RangeError });
  t.throws(() => d.setHostdevSourceAddress({ index: 5 }, { domain: 0, bus: 0, slot: 0, function: 0 }), { instanceOf: DomainXmlError });
  const mdev = DomainXml.parse(readFileSync(join(FIXTURES, 'hostdev-mdev-display.xml'), 'utf8'));
  t.throws(() => mdev.setHostdevSourceAddress({ index: 0 }, { domain: 0, bus: 0, slot: 0, function: 0 }), { instanceOf: DomainXmlError, message: /not pci/ });
});

test('qemu:override: added with the namespace declared once, replaced in place, indented like the document', (t) => {
  const src = readFileSync(join(FIXTURES, 'hostdev-vfio.xml'), 'utf8');
  const d = DomainXml.parse(src);
  d.setQemuDeviceProperty('hostdev0', 'migration-events', 'bool', true);
  d.setQemuDeviceProperty('hostdev0', 'enable-migration', 'string', 'on');
  d.setQemuDeviceProperty('hostdev1', 'migration-events', 'bool', true);
  d.setQemuDeviceProperty('hostdev0', 'migration-events', 'bool', false); // replace, not add
  const out = d.serialize();
  t.is(out.match(/xmlns:qemu=/g)?.length, 1);
  t.true(out.startsWith(`<domain type='qemu' xmlns:qemu='${QEMU_NS}'>`));
  t.true(
    out.endsWith(
      [
        `  </devices>`,
        `  <qemu:override>`,
        `    <qemu:device alias='hostdev0'>`,
        `      <qemu:frontend>`,
        `        <qemu:property name='migration-events' type='bool' value='false'/>`,
        `        <qemu:property name='enable-migration' type='string' value='on'/>`,
        `      </qemu:frontend>`,
        `    </qemu:device>`,
        `    <qemu:device alias='hostdev1'>`,
        `      <qemu:frontend>`,
        `        <qemu:property name='migration-events' type='bool' value='true'/>`,
        `      </qemu:frontend>`,
        `    </qemu:device>`,
        `  </qemu:override>`,
        `</domain>`,
        ``,
      ].join('\n'),
    ),
    out,
  );
  const again = DomainXml.parse(out);
  t.deepEqual(again.qemuDeviceProperties('hostdev0'), [
    { name: 'migration-events', type: 'bool', value: 'false' },
    { name: 'enable-migration', type: 'string', value: 'on' },
  ]);
  // Everything before the override is untouched.
  t.is(canonical(out.slice(0, out.indexOf('  <qemu:override>')).replace(` xmlns:qemu='${QEMU_NS}'`, '') + '</domain>'), canonical(src));
  if (xmllint) t.notThrows(() => c14n(out));
});

test('qemu:override reuses an existing qemu prefix and works next to a default-namespace block', (t) => {
  const latest = DomainXml.parse(readFileSync(join(FIXTURES, 'qemu-ns-alt.x86_64-latest.xml'), 'utf8'));
  latest.setQemuDeviceProperty('ua-x', 'x-foo', 'unsigned', 4);
  const o1 = latest.serialize();
  t.is(o1.match(/xmlns:qemu=/g)?.length, 1);
  t.true(o1.includes(`</qemu:commandline>\n  <qemu:override>`));

  const alt = DomainXml.parse(readFileSync(join(FIXTURES, 'qemu-ns-alt.xml'), 'utf8'));
  alt.setQemuDeviceProperty('hostdev0', 'migration-events', 'bool', 'true');
  const o2 = alt.serialize();
  t.is(o2.match(/xmlns:qemu=/g)?.length, 1, 'declared once on the root');
  t.is(o2.match(/<commandline xmlns=/g)?.length, 1, 'the default-namespace block is left alone');
  t.deepEqual(DomainXml.parse(o2).qemuDeviceProperties('hostdev0'), [{ name: 'migration-events', type: 'bool', value: 'true' }]);

  // A prefix bound to another namespace is not taken over.
  const clash = DomainXml.parse(`<domain type='kvm' xmlns:qemu='urn:other'><name>x</name></domain>`);
  clash.setQemuDeviceProperty('hostdev0', 'migration-events', 'bool', true);
  const o3 = clash.serialize();
  t.true(o3.includes(`xmlns:qemu1='${QEMU_NS}'`));
  t.true(o3.includes('<qemu1:override>'));
  // An override written in default-namespace style is found and extended in that style.
  const dflt = DomainXml.parse(`<domain type='kvm'>\n  <override xmlns='${QEMU_NS}'>\n    <device alias='hostdev0'>\n      <frontend>\n        <property name='a' type='string' value='b'/>\n      </frontend>\n    </device>\n  </override>\n</domain>\n`);
  dflt.setQemuDeviceProperty('hostdev0', 'migration-events', 'bool', true);
  const o4 = dflt.serialize();
  t.true(o4.includes(`        <property name='a' type='string' value='b'/>\n        <property name='migration-events' type='bool' value='true'/>\n      </frontend>`), o4);
  t.is(dflt.qemuDeviceProperties('hostdev0').length, 2);
});

test('override arguments are validated; values are escaped', (t) => {
  const d = DomainXml.parse(`<domain type='kvm'><name>x</name></domain>`);
  t.throws(() => d.setQemuDeviceProperty('bad alias', 'p', 'string', 'v'), { instanceOf: RangeError });
  t.throws(() => d.setQemuDeviceProperty('a', 'p', 'bool', 'yes'), { instanceOf: RangeError });
  t.throws(() => d.setQemuDeviceProperty('a', 'p', 'signed', '1.5'), { instanceOf: RangeError });
  d.setQemuDeviceProperty('a', 'p', 'string', `<x y='1' & "z">`);
  t.true(d.serialize().includes(`value='&lt;x y=&apos;1&apos; &amp; &quot;z&quot;&gt;'`));
  t.is(DomainXml.parse(d.serialize()).qemuDeviceProperties('a')[0]!.value, `<x y='1' & "z">`);
});

for (const [what, xml, line] of [
  ['an unclosed element', `<domain type='kvm'>\n  <name>x</name>\n  <devices>\n</domain>\n`, 4],
  ['mismatched tags', `<domain>\n<a></b>\n</domain>`, 2],
  ['a repeated attribute', `<domain a='1' a='2'/>`, 1],
  ['an attribute without quotes', `<domain a=1/>`, 1],
  ['two root elements', `<domain/><domain/>`, undefined],
  ['a root that is not <domain>', `<network/>`, undefined],
  ['an unknown entity', `<domain><name>&bogus;</name></domain>`, undefined],
  ['a DOCTYPE', `<!DOCTYPE domain [<!ENTITY a "b">]><domain/>`, undefined],
  ['text outside the root', `<domain/>junk`, undefined],
  ['an empty document', `  \n`, undefined],
  ['a prototype-polluting tag', `<domain><__proto__ x='1'/></domain>`, undefined],
] as const) {
  test(`malformed XML gives a clear DomainXmlError: ${what}`, (t) => {
    const err = t.throws(() => DomainXml.parse(xml), { instanceOf: DomainXmlError });
    t.regex(err!.message, /^domain XML: /);
    if (line !== undefined) t.is(err!.line, line, err!.message);
  });
}

test('setHostdevMdevUuid: only the uuid attribute changes; bad UUIDs and PCI hostdevs are refused', (t) => {
  const text = readFileSync(join(FIXTURES, 'hostdev-mdev-display.xml'), 'utf8');
  const doc = DomainXml.parse(text);
  const to = '83B8F4F2-509F-382F-3C1E-E6BFE0FA0002';
  doc.setHostdevMdevUuid({ index: 0 }, to);
  const out = doc.serialize();
  t.is(DomainXml.parse(out).hostdevs()[0]!.mdevUuid, to.toLowerCase());
  t.is(out, text.replace('53764d0e-85a0-42b4-af5c-2046b460b1dc', to.toLowerCase()), 'nothing else in the document moved');
  t.throws(() => DomainXml.parse(text).setHostdevMdevUuid({ index: 0 }, "x' onload='1"), { instanceOf: DomainXmlError });
  const pci = DomainXml.parse(readFileSync(join(FIXTURES, 'hostdev-pci-address.x86_64-latest.xml'), 'utf8'));
  t.throws(() => pci.setHostdevMdevUuid({ index: 0 }, to), { instanceOf: DomainXmlError, message: /not mdev/ });
});
