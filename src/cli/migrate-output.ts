// vfio-mig migrate, step 5: the verdict and what is left behind.
//
// The verdict and exit code come from libvirt's result and the watch's analysis (devices,
// phases, ordering rules). The text after the watch's summary says, on failure, which
// device failed in which phase, what QEMU reported and the state the source domain and its
// devices were left in; always the downtime predicted, set and measured, and the files:
// the watch's timeline (JSON) and its SVG. --json prints one MigrateJson object instead.

import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { formatBytes, type PreflightReport } from '../compat/preflight/types.ts';
import type { Analysis } from '../report/analysis.ts';
import type { WatchRecord } from '../report/timeline.ts';
import type { WatchResult } from './watch-common.ts';
import { rateText } from './migrate-downtime.ts';
import type { SwitchoverAckReport } from './migrate-switchover.ts';

export const MIGRATE_SCHEMA = 'vfio-mig/migrate/1';

/** Exit codes (also in --help). */
export const EXIT = { OK: 0, FAILED: 1, USAGE: 2, NOT_STARTED: 3, TIMEOUT: 4, VIOLATED: 5 } as const;

export type MigrateVerdict = 'ok' | 'failed' | 'violated' | 'timeout' | 'not-started';

export interface Outcome {
  /** libvirt reported the migration done. */
  migrated: boolean;
  /** libvirt's error when it did not. */
  libvirtError?: string;
  /** The migration was aborted by us. */
  aborted?: 'timeout' | 'interrupted';
  watch?: WatchResult;
  /** Why there is no watch result. */
  watchError?: string;
  /** The domain's state on each host afterwards (undefined: not there). */
  sourceState?: string;
  destinationState?: string;
}

export function verdictOf(o: Outcome): { verdict: MigrateVerdict; exitCode: number } {
  if (!o.migrated) {
    if (o.aborted === 'timeout') return { verdict: 'timeout', exitCode: EXIT.TIMEOUT };
    return { verdict: 'failed', exitCode: EXIT.FAILED };
  }
  if (o.watch?.analysis.verdict === 'violated') return { verdict: 'violated', exitCode: EXIT.VIOLATED };
  return { verdict: 'ok', exitCode: EXIT.OK };
}

const ms = (v: number | undefined): string => (v === undefined ? '-' : `${Math.round(v * 10) / 10} ms`);

/** The lines after the watch's summary: what failed and where things were left, the downtime, the files. */
export function outcomeLines(o: Outcome, ctx: { domain: string; hostdevs?: number; predicted?: PreflightReport['downtime']; limitMs?: number; timeline?: string; report?: string }): string[] {
  const { verdict } = verdictOf(o);
  const a: Analysis | undefined = o.watch?.analysis;
  const lines: string[] = [];
  if (verdict === 'ok' || verdict === 'violated') {
    lines.push(`verdict: ${verdict} - ${ctx.domain} runs on the destination${o.destinationState ? ` (${o.destinationState})` : ''}${verdict === 'violated' && a ? `; ${a.reason}` : ''}`);
    if (a && a.verdict === 'failed') lines.push(`note: libvirt reports the migration done but the watch saw a failure (${a.reason}); check the timeline`);
  } else {
    const why = o.aborted === 'timeout' ? 'the time limit was reached and the migration aborted' : o.aborted === 'interrupted' ? 'interrupted; the migration aborted' : 'the migration failed';
    lines.push(`verdict: ${verdict} - ${why}; ${ctx.domain} ${o.sourceState ? `is ${o.sourceState} on the source` : 'is not on the source any more'}${o.destinationState ? `, and ${o.destinationState} on the destination` : ''}`);
    if (o.libvirtError) lines.push(`libvirt: ${o.libvirtError}`);
    // No phase, no RAM sent, no device moved: QEMU had not begun (libvirt or the destination refused first, or the abort came first).
    const neverBegan = a !== undefined && a.phases.length === 0 && !((a.qemu.ramTransferred ?? 0) > 0) && !a.devices.some((d) => d.source.length > 1);
    if (neverBegan) lines.push('QEMU had not started migrating: nothing on the source was touched');
    else if (a?.failure) lines.push(`failed in phase ${a.failure.phase}${a.failure.devices.length ? `, device ${a.failure.devices.join(', ')}` : ''}: ${a.failure.detail}`);
    if (a?.qemu.errorDesc) lines.push(`QEMU reported: ${a.qemu.errorDesc}`);
    if (ctx.hostdevs === 0) lines.push('source devices: none (the domain has no VFIO hostdevs)');
    else if (a && a.devices.length) lines.push(`source devices left in: ${a.devices.map((d) => `${d.id} ${d.final.source}`).join(', ')}`);
    else if (a) lines.push('source devices left in: unknown (no VFIO_MIGRATION events; migration-events is off on the source)');
    else lines.push('source devices left in: unknown (not watched)');
  }
  const d = ctx.predicted;
  lines.push('downtime:');
  if (d) lines.push(`  predicted:        ~${d.totalMs} ms (devices ${d.deviceMs} ms + RAM ${d.ramMs} ms; ${formatBytes(d.deviceBytes)} of device state at ${rateText(d.linkBytesPerSec)})`);
  if (ctx.limitMs !== undefined) lines.push(`  limit:            ${ctx.limitMs} ms`);
  lines.push(`  QEMU's figure:    ${ms(a?.qemu.downtimeMs)}`);
  lines.push(`  STOP -> RESUME:   ${ms(a?.events.stopToResumeMs)}`);
  lines.push(`  events bound:     ${ms(a?.events.downtimeBoundMs)}`);
  if (o.watchError) lines.push(`watch: ${o.watchError}`);
  if (ctx.timeline) lines.push(`timeline: ${ctx.timeline}`);
  if (ctx.report) lines.push(`report: ${ctx.report}`);
  return lines;
}

/** What --json prints (schema MIGRATE_SCHEMA); filled in as the command goes. */
export interface MigrateJson {
  schema: typeof MIGRATE_SCHEMA;
  domain: string;
  from: string;
  to: string;
  verdict: MigrateVerdict;
  exitCode: number;
  started: boolean;
  preflight?: PreflightReport;
  blocking?: Array<{ id: string; subject: string; detail: string; advice: string }>;
  remedies: string[];
  actions: string[];
  /** derivation: before the start; measured: the decision once QEMU measured the throughput. */
  downtime?: { limitMs?: number; derivation?: string; measured?: { bytesPerSec: number; derivation: string }; predicted?: PreflightReport['downtime'] };
  /** --switchover-ack: what the source QEMU had on while its migration was active (observed null: not verified). */
  switchoverAck?: SwitchoverAckReport;
  libvirtError?: string;
  sourceState?: string;
  destinationState?: string;
  analysis?: Analysis;
  timeline?: string;
  report?: string;
  notes: string[];
}


export function defaultTimelinePath(domain: string): string {
  const dir = process.env.VFIO_MIG_STATE_DIR || '/var/lib/vfio-mig';
  const stamp = new Date().toISOString().replace(/[:.]/g, '-');
  return join(dir, 'migrations', `${domain.replace(/[^A-Za-z0-9_.-]/g, '_')}-${stamp}.json`);
}

/** Writes the watch's timeline (JSON) and its SVG: the paths written, or why not (the timeline may be there without the SVG). */
export async function writeTimelineFiles(watch: WatchResult, timelinePath: string, reportPath: string): Promise<{ timeline?: string; svg?: string; error?: string }> {
  let timeline: string | undefined;
  try {
    mkdirSync(dirname(timelinePath), { recursive: true });
    writeFileSync(timelinePath, `${JSON.stringify(watch.record, null, 1)}\n`);
    timeline = timelinePath;
    const svg = await writeSvg(watch.record, watch.analysis, reportPath);
    return { timeline, svg };
  } catch (e) {
    return { timeline, error: (e as Error).message };
  }
}

async function writeSvg(record: WatchRecord, analysis: Analysis, path: string): Promise<string> {
  const { parseTimeline } = await import('../report/timeline.ts');
  const { renderSvg } = await import('../report/svg.ts');
  mkdirSync(dirname(path), { recursive: true });
  writeFileSync(path, renderSvg(parseTimeline(JSON.parse(JSON.stringify(record))), analysis));
  return path;
}
