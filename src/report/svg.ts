// An SVG picture of one migration: the phases along the top, then for each side a vCPU
// lane (running, or stopped between QMP STOP and RESUME) and one lane per device, coloured
// by the VFIO state the device was in, with the downtime window marked across both sides.
// Plain SVG 1.1, no script, no external references; every text from the timeline (device
// ids, host names, QEMU's error) is escaped, so a hostile name cannot break out of the
// document or inject markup.

import type { Analysis } from './analysis.ts';
import { SIDES, sideMarks, type Mark, type Side, type Timeline } from './timeline.ts';

const WIDTH = 1100;
const LEFT = 230;
const RIGHT = 30;
const LANE_H = 22;
const LANE_GAP = 6;
const TOP = 70;

/** Colour of each device state (QEMU's spelling). */
export const STATE_COLOURS: Record<string, string> = {
  running: '#4caf50',
  'pre-copy': '#26a69a',
  'running-p2p': '#fdd835',
  'pre-copy-p2p': '#c0ca33',
  'pre-copy-p2p-prepare': '#dce775',
  'stop-copy': '#fb8c00',
  stop: '#9e9e9e',
  resuming: '#42a5f5',
};
const OTHER_STATE = '#ab47bc';
const PHASE_COLOURS: Record<string, string> = { setup: '#e3f2fd', iteration: '#e8f5e9', switchover: '#ffe0b2', resume: '#ede7f6' };

/** XML text/attribute escaping; characters XML 1.0 forbids become U+FFFD. */
export function escapeXml(text: string): string {
  return (
    text
      // eslint-disable-next-line no-control-regex
      .replace(/[\u0000-\u0008\u000b\u000c\u000e-\u001f\ufffe\uffff]/g, '\ufffd')
      .replace(/[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g, '\ufffd')
      .replace(/&/g, '&amp;')
      .replace(/</g, '&lt;')
      .replace(/>/g, '&gt;')
      .replace(/"/g, '&quot;')
      .replace(/'/g, '&apos;')
  );
}

function fmt(n: number): string {
  return String(Math.round(n * 100) / 100);
}

function fmtMs(n: number | undefined): string {
  return n === undefined ? '-' : `${Math.round(n * 10) / 10} ms`;
}

interface Lane {
  side: Side;
  kind: 'vcpus' | 'device';
  device?: string;
  label: string;
}

export function renderSvg(tl: Timeline, a: Analysis): string {
  const marks = tl.marks;
  const times = marks.flatMap((m) => [m.t, m.tStart ?? m.t]);
  for (const p of a.phases) times.push(p.start, p.end);
  const t0 = times.length ? Math.min(...times) : 0;
  let t1 = times.length ? Math.max(...times) : 1;
  if (t1 - t0 < 1) t1 = t0 + 1;
  const span = t1 - t0;
  const plotW = WIDTH - LEFT - RIGHT;
  const x = (t: number): number => LEFT + ((t - t0) / span) * plotW;

  const lanes: Lane[] = [];
  const hostOf = new Map(tl.devices.map((d) => [d.id, d.hosts]));
  for (const side of SIDES) {
    const mine = sideMarks(tl, side);
    if (!mine.length) continue;
    if (tl.vcpusRecorded) lanes.push({ side, kind: 'vcpus', label: `${side}: vCPUs` });
    const ids: string[] = [];
    for (const m of mine) if (m.device && !ids.includes(m.device)) ids.push(m.device);
    for (const id of ids) {
      const host = hostOf.get(id)?.[side];
      lanes.push({ side, kind: 'device', device: id, label: `${side}: ${id}${host ? ` (${host.split('/').at(-1)})` : ''}` });
    }
  }
  const laneY = (i: number): number => TOP + i * (LANE_H + LANE_GAP);
  const height = laneY(lanes.length) + 90;
  const parts: string[] = [];
  const verdictColour = a.verdict === 'ok' ? '#2e7d32' : a.verdict === 'violated' ? '#c62828' : '#e65100';
  parts.push(`<?xml version="1.0" encoding="UTF-8"?>`);
  parts.push(`<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="${WIDTH}" height="${fmt(height)}" viewBox="0 0 ${WIDTH} ${fmt(height)}" font-family="sans-serif" font-size="11">`);
  parts.push(`<title>${escapeXml(`vfio-mig: ${a.verdict} - ${a.reason}`)}</title>`);
  parts.push(`<rect x="0" y="0" width="${WIDTH}" height="${fmt(height)}" fill="#ffffff"/>`);
  parts.push(`<text x="10" y="18" font-size="14" font-weight="bold" fill="${verdictColour}">${escapeXml(`${a.verdict.toUpperCase()} (${a.status})`)}</text>`);
  parts.push(`<text x="10" y="34" fill="#333333">${escapeXml(truncate(a.reason, 170))}</text>`);

  // Phases band.
  const phaseY = 44;
  parts.push('<g class="phases">');
  for (const p of a.phases) {
    const w = Math.max(1, x(p.end) - x(p.start));
    parts.push(`<g class="phase" data-phase="${escapeXml(p.name)}" data-side="${p.side}"><rect x="${fmt(x(p.start))}" y="${phaseY}" width="${fmt(w)}" height="16" fill="${PHASE_COLOURS[p.name] ?? '#eeeeee'}" stroke="#90a4ae" stroke-width="0.5"/>` +
      `<text x="${fmt(x(p.start) + 2)}" y="${phaseY + 12}" fill="#37474f">${escapeXml(w > 60 ? `${p.name} ${fmtMs(p.end - p.start)}` : p.name)}</text></g>`);
  }
  parts.push('</g>');

  // Downtime window: from the stop of the first device (vCPUs already paused) to the last
  // device running on the destination.
  const dt = downtimeWindow(tl);
  if (dt) {
    const w = Math.max(2, x(dt.end) - x(dt.start));
    parts.push(`<g class="downtime"><rect x="${fmt(x(dt.start))}" y="${TOP - 4}" width="${fmt(w)}" height="${fmt(laneY(lanes.length) - TOP + 4)}" fill="#e53935" fill-opacity="0.12" stroke="#e53935" stroke-dasharray="3,2"/>` +
      `<text x="${fmt(x(dt.start))}" y="${fmt(laneY(lanes.length) + 12)}" fill="#c62828">${escapeXml(`downtime >= ${fmtMs(a.events.downtimeBoundMs)} by events; QEMU: ${fmtMs(a.qemu.downtimeMs)}`)}</text></g>`);
  }

  lanes.forEach((lane, i) => {
    const y = laneY(i);
    parts.push(`<g class="lane" data-side="${lane.side}" data-kind="${lane.kind}"${lane.device !== undefined ? ` data-device="${escapeXml(lane.device)}"` : ''}>`);
    parts.push(`<text x="${LEFT - 6}" y="${y + 15}" text-anchor="end" fill="#212121">${escapeXml(truncate(lane.label, 36))}</text>`);
    parts.push(`<rect x="${LEFT}" y="${y}" width="${plotW}" height="${LANE_H}" fill="#fafafa" stroke="#e0e0e0" stroke-width="0.5"/>`);
    if (lane.kind === 'vcpus') parts.push(...vcpuSegments(tl, lane.side, x, y, t0, t1));
    else parts.push(...stateSegments(sideMarks(tl, lane.side).filter((m) => m.device === lane.device), x, y, t1, tl.origin));
    parts.push('</g>');
  });

  // Axis.
  const axisY = laneY(lanes.length) + 30;
  parts.push(`<g class="axis"><line x1="${LEFT}" y1="${axisY}" x2="${LEFT + plotW}" y2="${axisY}" stroke="#616161"/>`);
  for (let k = 0; k <= 5; k++) {
    const t = t0 + (span * k) / 5;
    parts.push(`<line x1="${fmt(x(t))}" y1="${axisY}" x2="${fmt(x(t))}" y2="${axisY + 4}" stroke="#616161"/><text x="${fmt(x(t))}" y="${axisY + 15}" text-anchor="middle" fill="#616161">${escapeXml(fmtMs(t - t0))}</text>`);
  }
  parts.push('</g>');

  // Legend.
  let lx = 10;
  const ly = height - 18;
  parts.push('<g class="legend">');
  for (const [state, colour] of Object.entries(STATE_COLOURS)) {
    parts.push(`<rect x="${lx}" y="${ly - 9}" width="10" height="10" fill="${colour}"/><text x="${lx + 13}" y="${ly}" fill="#424242">${state}</text>`);
    lx += 26 + state.length * 6;
  }
  parts.push(`<rect x="${lx}" y="${ly - 9}" width="10" height="10" fill="#e53935"/><text x="${lx + 13}" y="${ly}" fill="#424242">vCPUs stopped</text>`);
  parts.push('</g>');
  parts.push('</svg>');
  return `${parts.join('\n')}\n`;
}

function truncate(s: string, n: number): string {
  return s.length > n ? `${s.slice(0, n - 1)}…` : s;
}

function colourOf(state: string): string {
  return STATE_COLOURS[state] ?? OTHER_STATE;
}

function stateSegments(marks: Mark[], x: (t: number) => number, y: number, t1: number, origin: Timeline['origin']): string[] {
  const out: string[] = [];
  const states = marks.filter((m) => (m.kind === 'device' || m.kind === 'reset') && m.state);
  states.forEach((m, i) => {
    const next = states[i + 1];
    const from = m.t;
    const to = next ? next.t : t1;
    const w = Math.max(1, x(to) - x(from));
    out.push(`<rect class="state" data-state="${escapeXml(m.state!)}" x="${fmt(x(from))}" y="${y + 3}" width="${fmt(w)}" height="${LANE_H - 6}" fill="${colourOf(m.state!)}"><title>${escapeXml(`${m.device}: ${m.state} at ${fmtMs(m.t)}`)}</title></rect>`);
    if (origin === 'engine' && m.tStart !== undefined && m.tStart < m.t) {
      // The arc itself: from issue to return.
      out.push(`<rect class="arc" x="${fmt(x(m.tStart))}" y="${y + LANE_H - 4}" width="${fmt(Math.max(1, x(m.t) - x(m.tStart)))}" height="3" fill="#37474f"/>`);
    }
  });
  for (const m of marks.filter((mm) => mm.kind === 'arc-failed')) {
    out.push(`<g class="failed-arc"><line x1="${fmt(x(m.t))}" y1="${y}" x2="${fmt(x(m.t))}" y2="${y + LANE_H}" stroke="#b71c1c" stroke-width="2"/><title>${escapeXml(`${m.device}: ${m.from ?? '?'} -> ${m.state ?? '?'} failed: ${m.result ?? ''}`)}</title></g>`);
  }
  return out;
}

function vcpuSegments(tl: Timeline, side: Side, x: (t: number) => number, y: number, t0: number, t1: number): string[] {
  const out: string[] = [];
  const marks = sideMarks(tl, side).filter((m) => m.kind === 'stop' || m.kind === 'resume');
  const initial = tl.initialStatus[side];
  let stoppedSince: number | undefined = initial !== undefined && initial !== 'running' ? t0 : undefined;
  const bar = (from: number, to: number, label: string): void => {
    out.push(`<rect class="vcpus-stopped" x="${fmt(x(from))}" y="${y + 6}" width="${fmt(Math.max(1, x(to) - x(from)))}" height="${LANE_H - 12}" fill="#e53935"><title>${escapeXml(label)}</title></rect>`);
  };
  for (const m of marks) {
    if (m.kind === 'stop') {
      out.push(`<line class="stop" x1="${fmt(x(m.t))}" y1="${y}" x2="${fmt(x(m.t))}" y2="${y + LANE_H}" stroke="#b71c1c" stroke-width="1.5"><title>${escapeXml(`STOP at ${fmtMs(m.t)}`)}</title></line>`);
      stoppedSince ??= m.t;
    } else {
      out.push(`<line class="resume" x1="${fmt(x(m.t))}" y1="${y}" x2="${fmt(x(m.t))}" y2="${y + LANE_H}" stroke="#1b5e20" stroke-width="1.5"><title>${escapeXml(`RESUME at ${fmtMs(m.t)}`)}</title></line>`);
      if (stoppedSince !== undefined) bar(stoppedSince, m.t, `vCPUs stopped ${fmtMs(m.t - stoppedSince)}`);
      stoppedSince = undefined;
    }
  }
  if (stoppedSince !== undefined) bar(stoppedSince, t1, 'vCPUs stopped (until the end of the recording)');
  return out;
}

/** First device stop on the source .. last device running on the destination after it. */
function downtimeWindow(tl: Timeline): { start: number; end: number } | undefined {
  const src = sideMarks(tl, 'source');
  const dst = sideMarks(tl, 'destination');
  let start: number | undefined;
  const stop = src.findIndex((m) => m.kind === 'stop');
  if (stop >= 0) {
    // The device events right before QMP STOP ran with the vCPUs already paused.
    let j = stop;
    while (j > 0 && src[j - 1]!.kind === 'device') j--;
    start = src[j]!.t;
  } else {
    const first = src.find((m) => m.kind === 'device' && (m.state === 'stop' || m.state === 'stop-copy'));
    start = first ? (first.tStart ?? first.t) : undefined;
  }
  if (start === undefined) return undefined;
  const runs = dst.filter((m) => m.kind === 'device' && m.state === 'running' && m.t >= start);
  const end = runs.length ? Math.max(...runs.map((m) => m.t)) : dst.find((m) => m.kind === 'resume' && m.t >= start)?.t;
  return end === undefined ? undefined : { start, end };
}
