// The SVG report (src/report/svg.ts): well-formed (parsed back with fast-xml-parser), one
// lane per device and side plus the vCPU lanes, the downtime window and phases drawn, and
// hostile device names escaped so they cannot break out of the document.

import test from 'ava';
import { readFileSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { XMLParser, XMLValidator } from 'fast-xml-parser';
import { parseTimeline, type WatchRecord, type EngineRecord } from '../../src/report/timeline.ts';
import { analyze } from '../../src/report/analysis.ts';
import { renderSvg, escapeXml } from '../../src/report/svg.ts';
import { formatSummary } from '../../src/report/summary.ts';

const FIXTURES = join(dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'timelines');
const load = (name: string): WatchRecord => JSON.parse(readFileSync(join(FIXTURES, name), 'utf8')) as WatchRecord;

function render(json: unknown): string {
  const tl = parseTimeline(json);
  return renderSvg(tl, analyze(tl));
}

type Node = Record<string, unknown>;

/** Every element named `name` in a preserveOrder parse, with its attributes. */
function elements(tree: Node[], name: string, out: Array<{ attrs: Record<string, string>; children: Node[] }> = []): Array<{ attrs: Record<string, string>; children: Node[] }> {
  for (const node of tree) {
    for (const [k, v] of Object.entries(node)) {
      if (k === ':@' || k === '#text') continue;
      const children = v as Node[];
      if (k === name) out.push({ attrs: (node[':@'] ?? {}) as Record<string, string>, children });
      elements(children, name, out);
    }
  }
  return out;
}

function parse(svg: string): Node[] {
  const valid = XMLValidator.validate(svg);
  if (valid !== true) throw new Error(`not well-formed: ${JSON.stringify(valid.err)}`);
  return new XMLParser({ preserveOrder: true, ignoreAttributes: false, attributeNamePrefix: '', parseAttributeValue: false, processEntities: true }).parse(svg) as Node[];
}

test('watch recording with two devices: well-formed SVG, a vCPU lane and one lane per device on each side', (t) => {
  const tree = parse(render(load('mtty-x2.json')));
  const svg = elements(tree, 'svg');
  t.is(svg.length, 1);
  t.is(svg[0]!.attrs.xmlns, 'http://www.w3.org/2000/svg');
  const lanes = elements(tree, 'g').filter((g) => g.attrs.class === 'lane');
  t.deepEqual(
    lanes.map((l) => `${l.attrs['data-side']}/${l.attrs['data-kind']}/${l.attrs['data-device'] ?? ''}`),
    ['source/vcpus/', 'source/device/dev0', 'source/device/dev1', 'destination/vcpus/', 'destination/device/dev0', 'destination/device/dev1'],
  );
  // Each source device lane shows its four states, each destination lane its three.
  for (const lane of lanes.filter((l) => l.attrs['data-kind'] === 'device')) {
    const states = elements(lane.children, 'rect').filter((r) => r.attrs.class === 'state').map((r) => r.attrs['data-state']);
    t.deepEqual(states, lane.attrs['data-side'] === 'source' ? ['pre-copy', 'pre-copy-p2p', 'stop-copy', 'stop'] : ['resuming', 'running-p2p', 'running']);
  }
  const vcpuLanes = lanes.filter((l) => l.attrs['data-kind'] === 'vcpus');
  const stopped = vcpuLanes.map((l) => elements(l.children, 'rect').filter((r) => r.attrs.class === 'vcpus-stopped').length);
  t.deepEqual(stopped, [1, 1], 'source: from STOP on; destination: from the start (inmigrate) to RESUME');
  t.is(elements(tree, 'line').filter((l) => l.attrs.class === 'stop').length, 1);
  t.is(elements(tree, 'line').filter((l) => l.attrs.class === 'resume').length, 1);
  t.is(elements(tree, 'g').filter((g) => g.attrs.class === 'downtime').length, 1);
  t.deepEqual(elements(tree, 'g').filter((g) => g.attrs.class === 'phase').map((g) => g.attrs['data-phase']), ['setup', 'iteration', 'switchover', 'resume']);
});

test("the engine's timeline renders too: device lanes, arcs, no vCPU lane", (t) => {
  const rec: EngineRecord = {
    devices: ['0000:01:00.0', '0000:02:00.0'],
    timeline: [
      { device: '0000:01:00.0', op: 'set', from: 'RUNNING', to: 'RUNNING_P2P', phase: 'quiesce', start: 0, end: 1.5, result: 'ok' },
      { device: '0000:01:00.0', op: 'set', from: 'RUNNING_P2P', to: 'STOP_COPY', phase: 'stop-copy', start: 2, end: 2.5, result: 'ok' },
      { device: '0000:01:00.0', op: 'set', from: 'STOP_COPY', to: 'STOP', phase: 'finish', start: 9, end: 9.5, result: 'ok' },
      { device: '0000:02:00.0', op: 'set', from: 'RUNNING', to: 'RESUMING', phase: 'resuming', start: 3, end: 3.2, result: 'ok' },
      { device: '0000:02:00.0', op: 'set', from: 'RESUMING', to: 'STOP', phase: 'commit', start: 6, end: 7, result: 'ok' },
      { device: '0000:02:00.0', op: 'set', from: 'STOP', to: 'RUNNING_P2P', phase: 'resume-p2p', start: 7, end: 7.5, result: 'ok' },
      { device: '0000:02:00.0', op: 'set', from: 'RUNNING_P2P', to: 'RUNNING', phase: 'resume', start: 8, end: 8.5, result: 'ok' },
    ],
  };
  const tree = parse(render(rec));
  const lanes = elements(tree, 'g').filter((g) => g.attrs.class === 'lane');
  t.deepEqual(lanes.map((l) => `${l.attrs['data-side']}/${l.attrs['data-device']}`), ['source/0000:01:00.0', 'destination/0000:02:00.0']);
  t.true(elements(tree, 'rect').some((r) => r.attrs.class === 'arc'));
  t.false(lanes.some((l) => l.attrs['data-kind'] === 'vcpus'));
  const a = analyze(parseTimeline(rec));
  t.is(a.verdict, 'ok');
  t.is(a.events.downtimeBoundMs, 6.5, 'from the stop-copy arc issued (2) to RUNNING returned (8.5)');
});

test("the engine's downtime bound starts at the source's stop, not at the destination's STOP on its way to RESUMING", (t) => {
  const rec: EngineRecord = {
    devices: ['0000:01:00.0', '0000:02:00.0'],
    timeline: [
      // The destination device walks RUNNING -> STOP -> RESUMING while the VM still runs on the source.
      { device: '0000:02:00.0', op: 'set', from: 'RUNNING', to: 'STOP', phase: 'resuming', start: 0.2, end: 0.4, result: 'ok' },
      { device: '0000:02:00.0', op: 'set', from: 'STOP', to: 'RESUMING', phase: 'resuming', start: 0.4, end: 0.6, result: 'ok' },
      { device: '0000:01:00.0', op: 'set', from: 'RUNNING', to: 'RUNNING_P2P', phase: 'quiesce', start: 1, end: 1.5, result: 'ok' },
      { device: '0000:01:00.0', op: 'set', from: 'RUNNING_P2P', to: 'STOP_COPY', phase: 'stop-copy', start: 2, end: 2.5, result: 'ok' },
      { device: '0000:02:00.0', op: 'set', from: 'RESUMING', to: 'STOP', phase: 'commit', start: 6, end: 7, result: 'ok' },
      { device: '0000:02:00.0', op: 'set', from: 'STOP', to: 'RUNNING_P2P', phase: 'resume-p2p', start: 7, end: 7.5, result: 'ok' },
      { device: '0000:02:00.0', op: 'set', from: 'RUNNING_P2P', to: 'RUNNING', phase: 'resume', start: 8, end: 8.5, result: 'ok' },
      { device: '0000:01:00.0', op: 'set', from: 'STOP_COPY', to: 'STOP', phase: 'finish', start: 9, end: 9.5, result: 'ok' },
    ],
  };
  const a = analyze(parseTimeline(rec));
  t.is(a.verdict, 'ok');
  t.is(a.events.downtimeBoundMs, 6.5, "from the source's stop-copy arc issued (2) to RUNNING returned (8.5)");
});

test('hostile device names are escaped: the document stays well-formed and the names come back as text', (t) => {
  const rec = load('mtty-x2.json');
  const hostile = `dev"><script>alert(1)</script><x a='&amp;'\u0001\u0007 ]]> <!--`;
  for (const side of ['source', 'destination'] as const) {
    for (const e of rec[side].events) if (e.data['device-id'] === 'dev1') e.data['device-id'] = hostile;
    for (const d of rec[side].devices ?? []) if (d.id === 'dev1') d.host = `/sys/bus/mdev/devices/</text><evil/>`;
  }
  const svg = render(rec);
  const tree = parse(svg);
  t.is(elements(tree, 'script').length, 0);
  t.is(elements(tree, 'evil').length, 0);
  t.is(elements(tree, 'x').length, 0);
  const lanes = elements(tree, 'g').filter((g) => g.attrs.class === 'lane' && g.attrs['data-kind'] === 'device');
  const names = lanes.map((l) => l.attrs['data-device']);
  // Control characters XML cannot carry become U+FFFD; everything else round-trips.
  const expected = hostile.replace('\u0001', '\ufffd').replace('\u0007', '\ufffd');
  t.deepEqual(names, ['dev0', expected, 'dev0', expected]);
  t.false(svg.includes('<script'));
  // The text summary does not pass control characters to a terminal either.
  const text = formatSummary(analyze(parseTimeline(rec)));
  t.false(text.includes('\u0001') || text.includes('\u0007'));
});

test('escapeXml: markup, quotes, lone surrogates and forbidden control characters', (t) => {
  t.is(escapeXml(`<a b="c" d='e'>&</a>`), '&lt;a b=&quot;c&quot; d=&apos;e&apos;&gt;&amp;&lt;/a&gt;');
  t.is(escapeXml('a\u0000b\u001fc\td\ne'), 'a\ufffdb\ufffdc\td\ne');
  t.is(escapeXml('x\ud800y'), 'x\ufffdy');
  t.is(escapeXml('ok \ud83d\ude00'), 'ok \ud83d\ude00');
});

test('a failed run renders with the verdict in the title and the vCPUs stopped then resumed on the source', (t) => {
  const tree = parse(render(load('edu-fail-stop-copy.json')));
  const title = elements(tree, 'title')[0]!;
  const text = JSON.stringify(title.children);
  t.regex(text, /vfio-mig: failed/);
  t.regex(text, /edu0/);
  t.true(elements(tree, 'line').filter((l) => l.attrs.class === 'resume').length >= 1);
});
