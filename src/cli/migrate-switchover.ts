// vfio-mig migrate --switchover-ack: QEMU's switchover-ack as a requirement the command
// enforces before the start and verifies during the migration, not a setting it makes.
//
// Why no setting: libvirt 11.3 itself turns on return-path + switchover-ack on both QEMUs
// for every migration that is not --tunnelled (negotiated through the migration cookie;
// the capability reads off before and after the migration), and for --tunnelled it forces
// both off, overriding anything set beside it. Older libvirt was not measured
// (docs/performance.md). So the flag asks: will libvirt do it (both ends >= 11.3, both
// QEMUs >= 8.1, the source QEMU lists the capability)? If not, the migration does not
// start. Then, once QEMU's migration has begun (status setup or active), it reads the source QEMU's capabilities
// through libvirt's QMP pass-through and records whether both are on.
//
// An observation of "off" does not change the migration's verdict (the migration did run,
// and may well have completed): it adds a warning line and the JSON field says so; the
// exit code stays the migration's. An operator who requires it reads switchoverAck.observed.

import { atLeast, parseVersion } from '../compat/preflight/versions.ts';
import { LIBVIRT_NEGOTIATES_SWITCHOVER_ACK } from '../compat/preflight/downtime.ts';
import type { Answer } from '../compat/preflight/qmp-facts.ts';
import type { QmpExecutor } from '../qmp/commands.ts';

/** libvirt from which on it negotiates switchover-ack itself (measured with 11.3): the preflight lever's figure. */
export const SWITCHOVER_ACK_LIBVIRT = LIBVIRT_NEGOTIATES_SWITCHOVER_ACK;
/** QEMU that has the switchover-ack capability. */
export const SWITCHOVER_ACK_QEMU = [8, 1] as const;
const DOC = 'docs/performance.md (switchover-ack)';

/** What the gate needs: both ends' libvirt and QEMU versions, the source QEMU's capability list. */
export interface SwitchoverAckInputs {
  sourceLibvirt: Answer<string>;
  destinationLibvirt: Answer<string>;
  /** The running source QEMU's version (query-version), undefined when not asked. */
  sourceQemu: Answer<string> | undefined;
  destinationQemu: Answer<string>;
  /** The capabilities the source QEMU knows (query-migrate-capabilities), on or off. */
  sourceCapabilities: Answer<string[]> | undefined;
}

/** Why --switchover-ack cannot be met, one reason per side and part; empty: it can. */
export function switchoverAckRefusals(i: SwitchoverAckInputs): string[] {
  const out: string[] = [];
  const lv = SWITCHOVER_ACK_LIBVIRT.join('.');
  const qv = SWITCHOVER_ACK_QEMU.join('.');
  const version = (side: string, what: string, a: Answer<string> | undefined, min: readonly [number, number], consequence: string): void => {
    if (!a) return void out.push(`the ${side}'s ${what} version is unknown (not asked): ${consequence}`);
    if (!a.ok) return void out.push(`the ${side}'s ${what} version is unknown (${a.error}): ${consequence}`);
    const v = parseVersion(a.value);
    if (!v) return void out.push(`the ${side}'s ${what} version ${JSON.stringify(a.value)} cannot be read: ${consequence}`);
    if (!atLeast(v, ...min)) out.push(`the ${side} runs ${what} ${a.value}, older than ${min.join('.')}: ${consequence}`);
  };
  const libvirtWhy = `libvirt ${lv} or later negotiates switchover-ack itself; older libvirt was not measured to`;
  const qemuWhy = `QEMU ${qv} or later has the switchover-ack capability`;
  version('source', 'libvirt', i.sourceLibvirt, SWITCHOVER_ACK_LIBVIRT, libvirtWhy);
  version('destination', 'libvirt', i.destinationLibvirt, SWITCHOVER_ACK_LIBVIRT, libvirtWhy);
  version('source', 'QEMU', i.sourceQemu, SWITCHOVER_ACK_QEMU, qemuWhy);
  version('destination', 'QEMU', i.destinationQemu, SWITCHOVER_ACK_QEMU, qemuWhy);
  const caps = i.sourceCapabilities;
  if (!caps) out.push("the source QEMU's migration capabilities were not asked: whether it knows switchover-ack is unknown");
  else if (!caps.ok) out.push(`the source QEMU's migration capabilities are unknown (${caps.error})`);
  else for (const c of ['return-path', 'switchover-ack']) if (!caps.value.includes(c)) out.push(`the source QEMU does not know the ${c} capability (query-migrate-capabilities)`);
  return out;
}

/** The line that stops the migration. */
export function switchoverAckRefusalLine(reasons: string[]): string {
  return `--switchover-ack cannot be met: ${reasons.join('; ')}. See ${DOC}.`;
}

/** What --json carries (switchoverAck) and the text line says. */
export interface SwitchoverAckReport {
  required: true;
  /** Both capabilities on while the migration was active; null: not observed. */
  observed: boolean | null;
  detail: string;
  /** QEMU's migration status when the capabilities were read. */
  status?: string;
  /** The capabilities read then. */
  returnPath?: boolean;
  switchoverAck?: boolean;
}

/**
 * QEMU's migration statuses in which libvirt has set its capabilities: it sends
 * migrate-set-capabilities before `migrate`, and QEMU leaves 'none' only with `migrate`.
 * 'setup' counts: a small domain on a fast link can pass from setup to completed between
 * two polls.
 */
const ACTIVE = new Set(['setup', 'active', 'pre-switchover', 'device', 'postcopy-active', 'postcopy-paused', 'postcopy-recover', 'wait-unplug']);
const ENDED = new Set(['completed', 'failed', 'cancelled', 'cancelling']);

export interface ObserveOptions {
  /** Stopped (the migration call returned): give up if not seen active yet. */
  signal: AbortSignal;
  /** Between two query-migrate (default 20 ms; each one waits for libvirt's monitor anyway). */
  pollMs?: number;
}

const errText = (e: unknown): string => (e instanceof Error ? e.message : String(e));

/**
 * Polls the source QEMU (query-migrate) until its migration has begun (setup, active or a
 * later running state), then reads
 * query-migrate-capabilities once. Never throws: an error or a migration that ended
 * before it was seen active is observed = null with the reason.
 */
export async function observeSwitchoverAck(q: QmpExecutor, o: ObserveOptions): Promise<SwitchoverAckReport> {
  const pollMs = o.pollMs ?? 20;
  let last = 'none';
  while (!o.signal.aborted) {
    let status: string;
    try {
      const r = (await q.execute('query-migrate')) as { status?: unknown } | null;
      status = typeof r?.status === 'string' ? r.status : 'none';
    } catch (e) {
      return { required: true, observed: null, detail: `not observed: query-migrate on the source failed: ${errText(e)}` };
    }
    last = status;
    if (ACTIVE.has(status)) {
      let caps: Array<{ capability?: unknown; state?: unknown }>;
      try {
        const r = await q.execute('query-migrate-capabilities');
        if (!Array.isArray(r)) throw new Error('the reply is not a list');
        caps = r as typeof caps;
      } catch (e) {
        return { required: true, observed: null, status, detail: `not observed: query-migrate-capabilities on the source failed: ${errText(e)}` };
      }
      const on = (name: string): boolean => caps.some((c) => c.capability === name && c.state === true);
      const returnPath = on('return-path');
      const switchoverAck = on('switchover-ack');
      const observed = returnPath && switchoverAck;
      const detail = `source QEMU, migration ${status}: switchover-ack ${switchoverAck ? 'on' : 'off'}, return-path ${returnPath ? 'on' : 'off'}`;
      return { required: true, observed, status, returnPath, switchoverAck, detail };
    }
    if (ENDED.has(status)) break;
    await new Promise<void>((resolve) => {
      // One listener at a time: removed when the timer fires, so polls do not pile them up.
      const onAbort = (): void => {
        clearTimeout(t);
        resolve();
      };
      const t = setTimeout(() => {
        o.signal.removeEventListener('abort', onAbort);
        resolve();
      }, pollMs);
      o.signal.addEventListener('abort', onAbort, { once: true });
    });
  }
  return { required: true, observed: null, status: last, detail: `not observed: the source QEMU's migration was never seen in setup or active (last status: ${last})` };
}

/** The text lines for the result: one line, a warning when observed off or not observed. */
export function switchoverAckLines(r: SwitchoverAckReport): string[] {
  if (r.observed === true) return [`switchover-ack: on (${r.detail})`];
  if (r.observed === false) return [`WARNING: switchover-ack was required but is OFF: ${r.detail}. QEMU may have switched over before the devices' initial data arrived; the verdict above is the migration's own. See ${DOC}.`];
  return [`WARNING: switchover-ack was required but could not be verified: ${r.detail}. See ${DOC}.`];
}
