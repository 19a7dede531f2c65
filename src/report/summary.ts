// The text summary of an analysed migration, for a terminal: verdict first, then the
// devices' state sequences, the phases, the downtime (QEMU's figure and the event bound),
// QEMU's other figures, and any rule that was broken.

import type { Analysis } from './analysis.ts';

function ms(v: number | undefined): string {
  if (v === undefined) return '-';
  return `${Math.round(v * 10) / 10} ms`;
}

function bytes(v: number | undefined): string {
  if (v === undefined) return '-';
  if (v < 10_000) return `${v} B`;
  if (v < 10_000_000) return `${Math.round(v / 1024)} KiB`;
  return `${Math.round(v / 1048576)} MiB`;
}

/** Strips control characters so a hostile device name cannot drive the terminal. */
export function printable(text: string): string {
  // eslint-disable-next-line no-control-regex
  return text.replace(/[\u0000-\u001f\u007f-\u009f]/g, '?');
}

export function formatSummary(a: Analysis): string {
  const lines: string[] = [];
  lines.push(`verdict: ${a.verdict} - ${printable(a.reason)}`);
  lines.push(`status: ${a.status}${a.qemu.destinationStatus ? ` (destination: ${a.qemu.destinationStatus})` : ''}    origin: ${a.origin === 'watch' ? 'QEMU events (vfio-mig watch)' : "vfio-mig's engine"}`);
  lines.push('');
  lines.push('devices:');
  if (!a.devices.length) lines.push('  (none seen)');
  for (const d of a.devices) {
    lines.push(`  ${printable(d.id)}${d.host ? ` (${printable(d.host)})` : ''}`);
    lines.push(`    source:      ${d.source.map(printable).join(' -> ') || '(no events)'}`);
    lines.push(`    destination: ${d.destination.map(printable).join(' -> ') || '(no events)'}${d.destinationHost ? `    [${printable(d.destinationHost)}]` : ''}`);
  }
  lines.push('');
  lines.push('phases:');
  for (const p of a.phases) lines.push(`  ${p.name.padEnd(12)} ${p.side.padEnd(12)} ${ms(p.end - p.start)}`);
  if (!a.phases.length) lines.push('  (none recorded)');
  if (a.origin === 'watch') lines.push(`  RAM passes: ${a.events.passes}`);
  lines.push('');
  lines.push('downtime:');
  lines.push(`  QEMU's figure:            ${ms(a.qemu.downtimeMs)}`);
  if (a.origin === 'watch') lines.push(`  QMP STOP -> RESUME:       ${ms(a.events.stopToResumeMs)}`);
  lines.push(`  events bound (at least):  ${ms(a.events.downtimeBoundMs)}${a.origin === 'watch' ? '  (first device stop event .. last device running event)' : '  (first stop arc issued .. last running arc returned)'}`);
  if (a.origin === 'watch') {
    lines.push('');
    lines.push(`QEMU: total ${ms(a.qemu.totalTimeMs)}, setup ${ms(a.qemu.setupTimeMs)}, VFIO state ${bytes(a.qemu.vfioTransferred)}, RAM ${bytes(a.qemu.ramTransferred)}, dirty syncs ${a.qemu.dirtySyncCount ?? '-'}`);
    if (a.qemu.errorDesc) lines.push(`QEMU error: ${printable(a.qemu.errorDesc)}`);
  }
  if (a.violations.length) {
    lines.push('');
    lines.push('broken rules:');
    for (const v of a.violations) lines.push(`  [${v.rule}] ${printable(v.message)} (at ${ms(v.at)})`);
  }
  if (a.notes.length) {
    lines.push('');
    for (const n of a.notes) lines.push(`note: ${printable(n)}`);
  }
  return `${lines.join('\n')}\n`;
}
