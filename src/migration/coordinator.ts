// Moves a set of devices through migration together, following the multi-device rule:
// on the source every device reaches RUNNING_P2P (or PRE_COPY_P2P) before any device
// goes to STOP or STOP_COPY; on the destination every device reaches RUNNING_P2P before
// any goes to RUNNING. Devices move in parallel (one arc at a time within a device), so
// the added downtime is the slowest device's, not the sum - QEMU walks them one by one.
// Every arc is timed into a timeline, every arc has a timeout, and any failure rolls
// every device back to RUNNING (resetting devices left in ERROR).

import { MigState, stateName, MigrationFlag, parseMigState } from '../vfio/uapi.ts';
import { plan, describeFlags, type Arc } from '../vfio/fsm.ts';
import type { DataFd } from '../vfio/data.ts';
import type { SetStateResult } from '../vfio/device.ts';
import { VfioError } from '../vfio/errors.ts';

/** What the coordinator needs of a device; VfioDevice implements it. */
export interface MigrationDevice {
  readonly name: string;
  readonly isOpen: boolean;
  migrationFlags(): Promise<number>;
  state(): Promise<MigState>;
  setState(target: MigState, opts?: { signal?: AbortSignal }): Promise<SetStateResult>;
  reset(): Promise<void>;
}

export type ArcResult = 'ok' | 'timeout' | 'cancelled' | string; // string: errno name or error text

export interface TimelineEntry {
  device: string;
  /** 'set' is one arc; 'reset' is VFIO_DEVICE_RESET; 'get' re-reads the state. */
  op: 'set' | 'reset' | 'get';
  from?: string;
  to?: string;
  phase: string;
  /** ms since the coordinator was created (performance.now based). */
  start: number;
  end: number;
  result: ArcResult;
}

export interface CoordinatorOptions {
  /** Longest one arc may take before its device is reported hung (default 10 s). */
  arcTimeoutMs?: number;
  signal?: AbortSignal;
  /** Roll every device back to RUNNING when a phase fails (default true). */
  autoRollback?: boolean;
}

export class CoordinatorError extends Error {
  readonly phase: string;
  readonly failures: { device: string; error: string; errno?: string }[];
  readonly hung: string[];
  constructor(phase: string, failures: { device: string; error: string; errno?: string }[], hung: string[], rollbackNote = '') {
    const list = failures.map((f) => `${f.device}: ${f.error}`).join('; ');
    super(`${phase} failed: ${list}${rollbackNote}`);
    this.name = 'CoordinatorError';
    this.phase = phase;
    this.failures = failures;
    this.hung = hung;
  }
}

class ArcTimeout extends Error {}
class Cancelled extends Error {}

interface Member {
  dev: MigrationDevice;
  flags: number;
  state: MigState;
  /** The device has an arc in flight that timed out: never touch it again. */
  hung: boolean;
  dataFd?: DataFd;
}

export class Coordinator {
  readonly timeline: TimelineEntry[] = [];
  readonly #members: Member[];
  readonly #t0 = performance.now();
  readonly #arcTimeoutMs: number;
  readonly #signal: AbortSignal | undefined;
  readonly #autoRollback: boolean;

  private constructor(members: Member[], opts: CoordinatorOptions) {
    this.#members = members;
    this.#arcTimeoutMs = opts.arcTimeoutMs ?? 10_000;
    this.#signal = opts.signal;
    this.#autoRollback = opts.autoRollback ?? true;
  }

  /**
   * Validates the set before any arc runs: not empty, no device twice, all open, none in
   * ERROR, valid flags, and P2P on every device when there is more than one.
   */
  static async create(devices: readonly MigrationDevice[], opts: CoordinatorOptions = {}): Promise<Coordinator> {
    if (devices.length === 0) throw new CoordinatorError('validate', [{ device: '-', error: 'the device set is empty' }], []);
    const seen = new Set<string>();
    for (const d of devices) {
      if (seen.has(d.name)) throw new CoordinatorError('validate', [{ device: d.name, error: 'the device appears twice in the set' }], []);
      seen.add(d.name);
      if (!d.isOpen) throw new CoordinatorError('validate', [{ device: d.name, error: 'the device is closed' }], []);
    }
    const members: Member[] = [];
    const failures: { device: string; error: string; errno?: string }[] = [];
    for (const d of devices) {
      try {
        const flags = await d.migrationFlags();
        const state = await d.state();
        if (state === MigState.Error) failures.push({ device: d.name, error: 'the device is in ERROR (reset it first)' });
        members.push({ dev: d, flags, state, hung: false });
      } catch (err) {
        failures.push(describe(d.name, err));
      }
    }
    if (failures.length) throw new CoordinatorError('validate', failures, []);
    if (members.length > 1) {
      const noP2P = members.filter((m) => !(m.flags & MigrationFlag.P2P));
      if (noP2P.length) {
        throw new CoordinatorError(
          'validate',
          noP2P.map((m) => ({
            device: m.dev.name,
            error: `lacks P2P (flags ${describeFlags(m.flags).join('|')}): a set of ${members.length} devices needs every device to support RUNNING_P2P`,
          })),
          [],
        );
      }
    }
    return new Coordinator(members, opts);
  }

  get devices(): string[] {
    return this.#members.map((m) => m.dev.name);
  }

  /** Current known state of each device. */
  states(): Record<string, string> {
    return Object.fromEntries(this.#members.map((m) => [m.dev.name, m.hung ? `${stateName(m.state)} (hung)` : stateName(m.state)]));
  }

  /** The saving or resuming data fd each device currently has (owned by the coordinator). */
  dataFds(): Map<string, DataFd> {
    const out = new Map<string, DataFd>();
    for (const m of this.#members) if (m.dataFd && !m.dataFd.closed) out.set(m.dev.name, m.dataFd);
    return out;
  }

  #now(): number {
    return performance.now() - this.#t0;
  }

  async #timed<T>(m: Member, entry: Omit<TimelineEntry, 'start' | 'end' | 'result'>, call: () => Promise<T>): Promise<T> {
    if (this.#signal?.aborted) throw new Cancelled('cancelled');
    const start = this.#now();
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new ArcTimeout(`no answer within ${this.#arcTimeoutMs} ms`)), this.#arcTimeoutMs);
    });
    try {
      const r = await Promise.race([call(), timeout]);
      this.timeline.push({ ...entry, start, end: this.#now(), result: 'ok' });
      return r;
    } catch (err) {
      const result = err instanceof ArcTimeout ? 'timeout' : err instanceof VfioError && err.code ? err.code : String((err as Error).message ?? err);
      this.timeline.push({ ...entry, start, end: this.#now(), result });
      if (err instanceof ArcTimeout) m.hung = true;
      throw err;
    } finally {
      clearTimeout(timer);
    }
  }

  /** Walks one device to `target` one arc per SET, recording each arc. */
  async #walk(m: Member, target: MigState, phase: string): Promise<void> {
    if (m.state === target) return;
    const p = plan(m.state, target, m.flags);
    if (!p.ok) throw new VfioError({ operation: `${phase}: ${stateName(m.state)}->${stateName(target)}`, device: m.dev.name, hint: p.reason });
    for (const arc of p.arcs) await this.#arc(m, arc, phase);
  }

  async #arc(m: Member, arc: Arc, phase: string): Promise<void> {
    try {
      const r = await this.#timed(m, { device: m.dev.name, op: 'set', from: stateName(arc.from), to: stateName(arc.to), phase }, () =>
        m.dev.setState(arc.to, { signal: this.#signal }),
      );
      m.state = r.state;
      if (r.dataFd) {
        m.dataFd?.close();
        m.dataFd = r.dataFd;
      }
    } catch (err) {
      if (!m.hung) m.state = parseAfter(err) ?? (await this.#reread(m, phase));
      throw err;
    }
  }

  async #reread(m: Member, phase: string): Promise<MigState> {
    try {
      return await this.#timed(m, { device: m.dev.name, op: 'get', phase }, () => m.dev.state());
    } catch {
      return m.state;
    }
  }

  /** Runs `step` on every (non-hung) member in parallel; collects every failure. */
  async #parallel(phase: string, members: Member[], step: (m: Member) => Promise<void>): Promise<{ device: string; error: string; errno?: string }[]> {
    const results = await Promise.allSettled(members.map((m) => step(m)));
    const failures: { device: string; error: string; errno?: string }[] = [];
    results.forEach((r, i) => {
      if (r.status === 'rejected') failures.push(describe(members[i]!.dev.name, r.reason));
    });
    return failures;
  }

  async #phase(phase: string, step: (m: Member) => Promise<void>, members = this.#members): Promise<void> {
    const failures = await this.#parallel(phase, members, step);
    if (failures.length === 0) return;
    let note = '';
    if (this.#autoRollback) {
      const left = await this.rollback().catch((e: Error) => e.message);
      note = typeof left === 'string' ? `; rollback incomplete: ${left}` : '; every device was rolled back to RUNNING';
    }
    throw new CoordinatorError(phase, failures, this.#members.filter((m) => m.hung).map((m) => m.dev.name), note);
  }

  /** Source: RUNNING -> PRE_COPY on every device that offers PRE_COPY (opens saving fds). */
  async preCopy(): Promise<Map<string, DataFd>> {
    await this.#phase('pre-copy', async (m) => {
      if (m.flags & MigrationFlag.PRE_COPY) await this.#walk(m, MigState.PreCopy, 'pre-copy');
    });
    return this.dataFds();
  }

  /**
   * Source, after the vCPUs stopped: every device to RUNNING_P2P (PRE_COPY_P2P when in
   * PRE_COPY). A lone device without P2P goes to STOP (or stays in PRE_COPY).
   */
  async quiesce(): Promise<void> {
    await this.#phase('quiesce', async (m) => {
      if (m.flags & MigrationFlag.P2P) {
        await this.#walk(m, m.state === MigState.PreCopy ? MigState.PreCopyP2P : MigState.RunningP2P, 'quiesce');
      } else if (m.state !== MigState.PreCopy) {
        await this.#walk(m, MigState.Stop, 'quiesce');
      }
    });
  }

  /** Source: every device to STOP_COPY (only after quiesce); returns the saving fds. */
  async stopCopy(): Promise<Map<string, DataFd>> {
    const unquiesced = this.#members.filter((m) => m.state === MigState.Running || (m.state === MigState.PreCopy && m.flags & MigrationFlag.P2P));
    if (unquiesced.length) {
      throw new CoordinatorError('stop-copy', unquiesced.map((m) => ({ device: m.dev.name, error: `still ${stateName(m.state)}: quiesce first` })), []);
    }
    await this.#phase('stop-copy', (m) => this.#walk(m, MigState.StopCopy, 'stop-copy'));
    return this.dataFds();
  }

  /** Source, after the data was read: every device to STOP, closing the saving fds. */
  async finishSource(): Promise<void> {
    await this.#phase('finish', (m) => this.#walk(m, MigState.Stop, 'finish'));
    this.#closeFds();
  }

  /**
   * Destination, when the migration starts: every device RUNNING -> RESUMING. Returns the
   * resuming fds to write each device's state into.
   */
  async beginResume(): Promise<Map<string, DataFd>> {
    await this.#phase('resuming', (m) => this.#walk(m, MigState.Resuming, 'resuming'));
    return this.dataFds();
  }

  /**
   * Destination, once every device's data was written: STOP for all (the drivers validate
   * the data), RUNNING_P2P for all, then RUNNING for all.
   */
  async completeResume(): Promise<void> {
    await this.#phase('commit', (m) => this.#walk(m, MigState.Stop, 'commit'));
    this.#closeFds();
    await this.#phase('resume-p2p', async (m) => {
      if (m.flags & MigrationFlag.P2P) await this.#walk(m, MigState.RunningP2P, 'resume-p2p');
    });
    await this.#phase('resume', (m) => this.#walk(m, MigState.Running, 'resume'));
  }

  /** Destination in one call: beginResume, `load` writes each device's data, completeResume. */
  async resume(load: (device: string, fd: DataFd) => Promise<void>): Promise<void> {
    const fds = await this.beginResume();
    await this.#phase('load', async (m) => {
      const fd = fds.get(m.dev.name);
      if (!fd) throw new Error('no resuming data fd');
      await load(m.dev.name, fd);
    });
    await this.completeResume();
  }

  /**
   * Every device back to RUNNING from wherever it is, keeping the P2P rule in reverse:
   * first every device to RUNNING_P2P (or STOP), devices in ERROR are reset, then all to
   * RUNNING. A device that refuses is reset. Hung devices are reported, not touched.
   */
  async rollback(): Promise<void> {
    this.#closeFds();
    const live = this.#members.filter((m) => !m.hung);
    const resetMember = async (m: Member) => {
      await this.#timed(m, { device: m.dev.name, op: 'reset', phase: 'rollback' }, () => m.dev.reset());
      m.state = MigState.Running;
    };
    // 1: leave the saving/resuming group, toward the P2P barrier. A device that refuses
    // is reset only after every device finished this step: a reset device is RUNNING at
    // once, and no other device may still be on its way to STOP then.
    const needReset = new Set<Member>();
    await this.#parallel('rollback', live, async (m) => {
      if (m.state === MigState.Error || m.state === MigState.Running || m.state === MigState.PreCopy) return;
      // Leaving RESUMING through STOP would commit data that may be partial or corrupt
      // (some drivers, mtty among them, do not validate it): aborting a resume is a reset.
      if (m.state === MigState.Resuming) {
        needReset.add(m);
        return;
      }
      const barrier = m.flags & MigrationFlag.P2P ? MigState.RunningP2P : MigState.Stop;
      try {
        await this.#walk(m, barrier, 'rollback');
      } catch {
        if (!m.hung) needReset.add(m);
      }
    });
    // 2: reset what refused or is in ERROR; 3: everything to RUNNING.
    await this.#parallel('rollback', live, async (m) => {
      if (m.state !== MigState.Error && !needReset.has(m)) return;
      try {
        await resetMember(m);
      } catch (err) {
        // No usable reset: step 3 walks it to RUNNING instead, which is still better
        // than leaving it stopped; an ERROR device without reset stays reported.
        if (m.state === MigState.Error) throw err;
      }
    });
    const failures = await this.#parallel('rollback', live, async (m) => {
      if (m.state === MigState.Running) return;
      try {
        await this.#walk(m, MigState.Running, 'rollback');
      } catch {
        if (m.hung) throw new Error('hung during rollback');
        await resetMember(m);
      }
    });
    this.#closeFds();
    const hung = this.#members.filter((m) => m.hung).map((m) => m.dev.name);
    if (failures.length || hung.length) {
      throw new CoordinatorError('rollback', [...failures, ...hung.map((device) => ({ device, error: 'hung: an arc never returned; the device is left to the kernel' }))], hung);
    }
  }

  #closeFds(): void {
    for (const m of this.#members) {
      m.dataFd?.close();
      m.dataFd = undefined;
    }
  }

  /** The timeline as JSON: the raw material of downtime reports. */
  toJSON(): { devices: string[]; timeline: TimelineEntry[] } {
    return { devices: this.devices, timeline: this.timeline };
  }
}

function describe(device: string, err: unknown): { device: string; error: string; errno?: string } {
  if (err instanceof VfioError) return { device, error: err.message, ...(err.code ? { errno: err.code } : {}) };
  if (err instanceof ArcTimeout) return { device, error: `hung: ${err.message}`, errno: 'ETIMEDOUT' };
  if (err instanceof Cancelled) return { device, error: 'cancelled', errno: 'ECANCELED' };
  return { device, error: err instanceof Error ? err.message : String(err) };
}

/** The state a failed SET left the device in, as VfioDevice re-read and reported it. */
function parseAfter(err: unknown): MigState | undefined {
  return err instanceof VfioError && err.stateAfter ? parseMigState(err.stateAfter) : undefined;
}
