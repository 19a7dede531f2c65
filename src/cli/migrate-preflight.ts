// vfio-mig migrate, step 1: preflight and what it lets through.
//
// Every check of vfio-mig preflight runs against the running domain and the destination;
// a failed check stops the migration unless --force. Two failures are known traps and get
// an exact remedy:
//   - dirty-tracking: device dirty tracking fails on a kernel without CONFIG_IOMMUFD_DRIVER
//     (Debian's 6.12) at RAM setup. The remedy is a device property of the *running* QEMU,
//     so it cannot be set now: `vfio-mig enable-events <domain> --fix` and a restart. It
//     blocks.
//   - pinned-convergence: a pinned device without dirty tracking makes all guest RAM dirty
//     at every pass, pre-copy never ends. With --fix the migration parameter
//     avail-switchover-bandwidth (the link rate) is set through the monitor, with a
//     downtime limit that holds all guest RAM, so QEMU switches over.
// A downtime-limit failure (device state larger than the limit allows) is resolved by --fix
// or --downtime.

import { DIRTY_TRACKING_FIX, PINNED_FIX } from './enable-events.ts';
import { answer } from './preflight.ts';
import type { Check, PreflightReport } from '../compat/preflight/types.ts';
import type { PreflightDeps, PreflightResult } from '../compat/preflight/run.ts';
import type { HostFacts } from '../compat/preflight/facts.ts';
import type { Answer } from '../compat/preflight/qmp-facts.ts';
import type { Connection, Domain } from '../libvirt/binding.ts';
import type { MigrateOptions } from './migrate.ts';
import type { SwitchoverAckInputs } from './migrate-switchover.ts';
import type { QmpExecutor } from '../qmp/commands.ts';

export interface MigratePreflight {
  pf: PreflightResult;
  /** The source's facts as preflight collected them (the trap fixes need its kernel config and devices). */
  sourceFacts: HostFacts | undefined;
  /** The destination's QEMU version, when its libvirt answered. */
  destQemu: string | undefined;
  /** What --switchover-ack's gate needs, from what preflight asked (no query of its own). */
  versions: SwitchoverAckInputs;
}

/** Runs preflight for the running domain against the destination (destConn: its libvirt, or why not), keeping the source's facts. */
export async function preflightRunning(dom: Domain, src: Connection, destConn: Answer<Connection>, o: Pick<MigrateOptions, 'domain' | 'to' | 'linkBytesPerSec' | 'linkAssumed'>, deps: PreflightDeps): Promise<MigratePreflight> {
  let sourceFacts: HostFacts | undefined;
  const pfDeps: PreflightDeps = {
    ...deps,
    localFacts: async (q, uri, role) => {
      const f = await deps.localFacts(q, uri, role);
      if (role === 'source') sourceFacts = f;
      return f;
    },
  };
  const destination = {
    uri: o.to,
    libvirt: destConn.ok ? answer(() => destConn.value.libVersion()) : destConn,
    qemu: destConn.ok ? answer(() => destConn.value.hypervisorVersion()) : destConn,
  };
  // The source QEMU's answers to preflight's queries, kept for --switchover-ack's gate.
  let sourceQemu: Answer<string> | undefined;
  let sourceCapabilities: Answer<string[]> | undefined;
  const qmp: QmpExecutor = {
    execute: async (command, args, options) => {
      try {
        const r = await dom.execute(command, args, options);
        if (command === 'query-version') {
          const q = (r as { qemu?: { major?: unknown; minor?: unknown; micro?: unknown } } | null)?.qemu;
          sourceQemu = q ? { ok: true, value: `${String(q.major)}.${String(q.minor)}.${String(q.micro)}` } : { ok: false, error: 'query-version: no qemu version in the reply' };
        }
        if (command === 'query-migrate-capabilities') {
          sourceCapabilities = Array.isArray(r) ? { ok: true, value: r.map((c) => String((c as { capability?: unknown }).capability)) } : { ok: false, error: 'query-migrate-capabilities: the reply is not a list' };
        }
        return r;
      } catch (e) {
        const error = `${command}: ${(e as Error).message}`;
        if (command === 'query-version') sourceQemu = { ok: false, error };
        if (command === 'query-migrate-capabilities') sourceCapabilities = { ok: false, error };
        throw e;
      }
    },
  };
  const sourceLibvirt = answer(() => src.libVersion());
  const pfRun = await import('../compat/preflight/run.ts');
  const pf = await pfRun.preflightDomain(
    {
      name: o.domain,
      xml: dom.xml(),
      running: true,
      qmp,
      sourceLibvirt,
      destination,
      options: { postcopy: false, parallel: false, linkBytesPerSec: o.linkBytesPerSec, linkAssumed: o.linkAssumed },
    },
    pfDeps,
  );
  return {
    pf,
    sourceFacts,
    destQemu: destination.qemu.ok ? destination.qemu.value : undefined,
    versions: { sourceLibvirt, destinationLibvirt: destination.libvirt, sourceQemu, destinationQemu: destination.qemu, sourceCapabilities },
  };
}

/** The preflight verdict with its counts, then every check that did not pass with its advice. */
export function preflightLines(report: PreflightReport): string[] {
  const counts = (['fail', 'warn', 'pass'] as const).map((v) => `${report.checks.filter((c) => c.verdict === v).length} ${v}`).join(', ');
  return [`preflight: ${report.verdict.toUpperCase()} (${counts})`, ...report.checks.filter((x) => x.verdict !== 'pass').map((c) => `  ${c.verdict.toUpperCase()} ${c.id} ${c.subject}: ${c.detail}\n       -> ${c.advice}`)];
}

export interface TrapPlan {
  /** Failed checks nothing here can fix: the migration stops on them unless --force. */
  blocking: Check[];
  /** Set avail-switchover-bandwidth (bytes/s) on the running source QEMU. */
  availSwitchoverBandwidth: number | undefined;
  /** All guest RAM counts against the limit (pinned device under avail-switchover-bandwidth). */
  ramInLimit: boolean;
  /** The limit must be derived (as --downtime auto) because a check asks for it. */
  needsLimit: boolean;
  /** What to set, for the operator (without --fix: what --fix would do). */
  remedies: string[];
}

/** Decides, from the preflight report, what stops the migration and what --fix/--downtime resolve. */
export function planTraps(report: PreflightReport, o: Pick<MigrateOptions, 'fix' | 'downtime' | 'linkBytesPerSec' | 'domain'>, downtimeNeededMs?: number): TrapPlan {
  const failed = report.checks.filter((c) => c.verdict === 'fail');
  const plan: TrapPlan = { blocking: [], availSwitchoverBandwidth: undefined, ramInLimit: false, needsLimit: false, remedies: [] };
  const pinned = failed.some((c) => c.id === 'pinned-convergence');
  const bw = Math.round(o.linkBytesPerSec);
  // An avail-switchover-bandwidth already in force: QEMU fits all of RAM into the limit too.
  if (report.checks.some((c) => c.id === 'pinned-convergence' && c.verdict === 'pass' && /avail-switchover-bandwidth/.test(c.detail))) plan.ramInLimit = true;
  for (const c of failed) {
    switch (c.id) {
      case 'dirty-tracking':
        plan.blocking.push(c);
        plan.remedies.push(`${c.subject}: needs ${DIRTY_TRACKING_FIX.map((p) => `${p.name}=${p.value}`).join(' and ')}, a device property of the running QEMU: run "vfio-mig enable-events ${o.domain} --fix", shut ${o.domain} down and start it, then migrate`);
        break;
      case 'pinned-convergence':
        if (o.fix) {
          plan.availSwitchoverBandwidth = bw;
          plan.ramInLimit = true;
          plan.needsLimit = true;
          plan.remedies.push(`pinned devices: avail-switchover-bandwidth=${bw} B/s set on the running QEMU and a downtime limit that holds all guest RAM (--fix); for the next start: vfio-mig enable-events ${o.domain} --fix (${PINNED_FIX.name}=off)`);
        } else {
          plan.blocking.push(c);
          plan.remedies.push(`pinned devices without dirty tracking: set avail-switchover-bandwidth (${bw} B/s) and a downtime limit holding all guest RAM (--fix does both), or "vfio-mig enable-events ${o.domain} --fix" (${PINNED_FIX.name}=off) and a restart`);
        }
        break;
      case 'downtime-prediction':
        // "No switchover" follows from the pinned trap and goes with its fix; otherwise it blocks.
        if (!(pinned && o.fix)) plan.blocking.push(c);
        break;
      case 'downtime-limit': {
        const covered = o.downtime === 'auto' || o.fix || (typeof o.downtime === 'number' && downtimeNeededMs !== undefined && o.downtime >= downtimeNeededMs);
        if (covered) {
          plan.needsLimit = true;
        } else {
          plan.blocking.push(c);
          plan.remedies.push(`the devices' state does not fit the downtime limit: --downtime auto (or --fix) raises it${downtimeNeededMs !== undefined ? ` to at least ${downtimeNeededMs} ms` : ''}`);
        }
        break;
      }
      default:
        plan.blocking.push(c);
    }
  }
  return plan;
}

/** Why the migration does not start: the blocking checks and what resolves them. */
export function notStartedLine(plan: TrapPlan, fix: boolean): string {
  const n = plan.blocking.length;
  return `not started: ${n} failed check${n > 1 ? 's' : ''} (${plan.blocking.map((c) => `${c.id} ${c.subject}`).join('; ')}); fix ${n > 1 ? 'them' : 'it'}${plan.remedies.length && !fix ? ' (or --fix where it says so)' : ''}, or --force`;
}
