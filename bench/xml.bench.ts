// Cost of the domain XML model (validate, parse with preserveOrder, convert to our node
// model, read the hostdevs, serialize) against fast-xml-parser's own parse + build of the
// same documents with the same options - the library alone, measured in the same run.
// Documents: every file of test/fixtures/libvirt-xml (libvirt's qemuxmlconfdata).

import { readFileSync, readdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { DomainXml } from '../src/libvirt/domain-xml.ts';

const here = dirname(fileURLToPath(import.meta.url));
const FIXTURES = process.env.VFIO_MIG_XML_FIXTURES ?? join(here, '..', 'test', 'fixtures', 'libvirt-xml');
const ROUNDS = Number(process.env.BENCH_XML_ROUNDS ?? 30);

interface Fxp {
  XMLParser: new (o: Record<string, unknown>) => { parse(x: string): unknown };
  XMLBuilder: new (o: Record<string, unknown>) => { build(t: unknown): string };
}

const OPTIONS = {
  preserveOrder: true, ignoreAttributes: false, attributeNamePrefix: '', attributesGroupName: ':@',
  commentPropName: '#comment', cdataPropName: '#cdata', parseTagValue: false, parseAttributeValue: false,
  trimValues: false, processEntities: false, suppressEmptyNode: true,
};

function timeNs(docs: string[], fn: (x: string) => unknown): number {
  const runs: number[] = [];
  for (let r = 0; r < 3; r++) {
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < ROUNDS; i++) for (const d of docs) fn(d);
    runs.push(Number(process.hrtime.bigint() - t0) / (ROUNDS * docs.length));
  }
  return Math.min(...runs);
}

export async function run(): Promise<string> {
  const docs = readdirSync(FIXTURES).filter((f) => f.endsWith('.xml')).map((f) => readFileSync(join(FIXTURES, f), 'utf8'));
  const fxp = createRequire(import.meta.url)('fast-xml-parser') as Fxp;
  const parser = new fxp.XMLParser(OPTIONS);
  const builder = new fxp.XMLBuilder(OPTIONS);
  const library = (x: string): string => builder.build(parser.parse(x));
  const ours = (x: string): string => {
    const d = DomainXml.parse(x);
    d.hostdevs();
    return d.serialize();
  };
  const edit = (x: string): string => {
    const d = DomainXml.parse(x);
    const h = d.hostdevs().find((v) => v.pci);
    if (h) d.setHostdevSourceAddress({ index: h.index }, { ...h.pci!, function: (h.pci!.function + 1) % 8 });
    d.setQemuDeviceProperty('hostdev0', 'migration-events', 'bool', true);
    return d.serialize();
  };
  for (const f of [library, ours, edit]) timeNs(docs, f); // warm-up: JIT
  const lib = timeNs(docs, library);
  const our = timeNs(docs, ours);
  const ed = timeNs(docs, edit);
  console.log(`xml: ${docs.length} libvirt documents: fast-xml-parser parse+build ${(lib / 1000).toFixed(1)} us/doc; DomainXml validate+parse+hostdevs+serialize ${(our / 1000).toFixed(1)} us/doc; with a hostdev remap and a qemu:override ${(ed / 1000).toFixed(1)} us/doc`);
  return `xml: ratio=${(our / lib).toFixed(2)} edit_ratio=${(ed / lib).toFixed(2)} model_us=${(our / 1000).toFixed(1)} library_us=${(lib / 1000).toFixed(1)} docs=${docs.length}`;
}
