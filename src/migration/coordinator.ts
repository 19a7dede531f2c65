// Moves a set of devices through migration together, following the multi-device rule:
// on the source every device reaches RUNNING_P2P (or PRE_COPY_P2P) before any device
// goes to STOP or STOP_COPY; on the destination every device reaches RUNNING_P2P before
// any goes to RUNNING. Devices move in parallel (one arc at a time within a device), so
// the added downtime is the slowest device's, not the sum - QEMU walks them one by one.
// Every arc is timed into a timeline (from the moment the ioctl was issued, not queued),
// every arc has a timeout, and a failed phase rolls every device back to RUNNING by the
// recovery policy of recover.ts (ERROR and RESUMING are reset). Rollback runs on its own
// time bound and is not cancelled by the signal that cancelled the migration. An arc
// that outlives its timeout is "slow", not forgotten: when it finally returns, the
// device is walked back to RUNNING too (settled() waits for that).

import { MigState, stateName, MigrationFlag, parseMigState } from '../vfio/uapi.ts';
import { plan, describeFlags, type Arc } from '../vfio/fsm.ts';
import type { DataFd } from '../vfio/data.ts';
import type { SetStateResult } from '../vfio/device.ts';
import { VfioError } from '../vfio/errors.ts';
import { recoveryStep, DEFAULT_RECOVERY_TIMEOUT_MS } from './recover.ts';
import { prewarm } from '../host/sys.ts';

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
  /**
   * ms since the coordinator was created (performance.now based): when the ioctl was
   * issued to the kernel where the syscall backend reports it, else when it was queued.
   */
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
  /** Bound on one whole rollback (default 30 s); it ignores `signal`. */
  rollbackTimeoutMs?: number;
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
  /** The device has an arc in flight that timed out: nothing else is sent to it until it returns. */
  hung: boolean;
  /** Settles when a timed-out arc finally returned and the device was walked back. */
  late?: Promise<void>;
  dataFd?: DataFd;
}

export class Coordinator {
  readonly timeline: TimelineEntry[] = [];
  readonly #members: Member[];
  readonly #t0 = performance.now();
  readonly #arcTimeoutMs: number;
  readonly #signal: AbortSignal | undefined;
  readonly #autoRollback: boolean;
  readonly #rollbackTimeoutMs: number;
  /** Set once a phase failed: a late arc's device is then walked back when it returns. */
  #failed = false;

  private constructor(members: Member[], opts: CoordinatorOptions) {
    this.#members = members;
    this.#arcTimeoutMs = opts.arcTimeoutMs ?? 10_000;
    this.#signal = opts.signal;
    this.#autoRollback = opts.autoRollback ?? true;
    this.#rollbackTimeoutMs = opts.rollbackTimeoutMs ?? DEFAULT_RECOVERY_TIMEOUT_MS;
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
    // One blocking-call thread per device before the first arc: the arcs of N devices
    // then really run at once on the real kernel, and thread start-up is paid here, not
    // inside the downtime (a no-op on the fake kernel).
    await prewarm(members.length);
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

  /**
   * Runs one kernel call with the arc timeout, recording it in the timeline. `signal` is
   * the migration's cancellation; rollback passes none. A call that times out marks its
   * device hung; when it returns later the device is handed to #lateReturn.
   */
  async #timed<T>(
    m: Member,
    entry: Omit<TimelineEntry, 'start' | 'end' | 'result'>,
    call: () => Promise<T>,
    opts: { signal?: AbortSignal; issuedAt?: (r: T) => number | undefined; deadline?: number } = {},
  ): Promise<T> {
    if (opts.signal?.aborted) throw new Cancelled('cancelled');
    const queued = this.#now();
    const limit = Math.max(1, Math.min(this.#arcTimeoutMs, (opts.deadline ?? Infinity) - performance.now()));
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new ArcTimeout(`no answer within ${Math.round(limit)} ms`)), limit);
    });
    const running = call();
    try {
      const r = await Promise.race([running, timeout]);
      const issued = opts.issuedAt?.(r);
      this.timeline.push({ ...entry, start: issued === undefined ? queued : issued - this.#t0, end: this.#now(), result: 'ok' });
      return r;
    } catch (err) {
      const result = err instanceof ArcTimeout ? 'timeout' : err instanceof VfioError && err.code ? err.code : String((err as Error).message ?? err);
      this.timeline.push({ ...entry, start: queued, end: this.#now(), result });
      if (err instanceof ArcTimeout) {
        m.hung = true;
        const late: Promise<void> = this.#lateReturn(m, running, entry.phase).finally(() => {
          if (m.late === late) m.late = undefined;
        });
        m.late = late;
      }
      throw err;
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * A timed-out call returned after all: slow, not hung. The device's state is taken
   * from the result (or re-read), a data fd it opened is closed, and when the migration
   * failed meanwhile the device is walked back to RUNNING like the others were.
   */
  async #lateReturn(m: Member, running: Promise<unknown>, phase: string): Promise<void> {
    const t = this.#now();
    const settled = await running.then(
      (r) => ({ ok: true as const, r }),
      (e: unknown) => ({ ok: false as const, e }),
    );
    this.timeline.push({ device: m.dev.name, op: 'get', phase: `${phase} (late return)`, start: t, end: this.#now(), result: settled.ok ? 'ok' : describe(m.dev.name, settled.e).errno ?? 'error' });
    m.hung = false;
    const r = settled.ok ? (settled.r as Partial<SetStateResult> | undefined) : undefined;
    r?.dataFd?.close();
    m.state = r?.state !== undefined ? r.state : ((settled.ok ? undefined : parseAfter(settled.e)) ?? (await this.#reread(m, `${phase} (late return)`)));
    if (this.#failed && m.state !== MigState.Running) {
      await this.#recoverAlone(m, `${phase} (late return)`).catch(() => undefined);
    }
  }

  /**
   * Waits until every arc that outlived its timeout returned and its device was walked
   * back (or `timeoutMs` passed); returns the devices still hung. Call it before closing
   * devices after a failure, so that a slow device is not left stopped.
   */
  async settled(timeoutMs = this.#rollbackTimeoutMs): Promise<string[]> {
    const deadline = performance.now() + timeoutMs;
    // A late device's own walk back may time out and return late again: loop until no
    // device is hung or the time is up.
    for (;;) {
      const pending = this.#members.filter((m) => m.late).map((m) => m.late!);
      const left = deadline - performance.now();
      if (pending.length === 0 || left <= 0) break;
      let timer: NodeJS.Timeout | undefined;
      const timedOut = await Promise.race([
        Promise.allSettled(pending).then(() => false),
        new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(true), left))),
      ]);
      clearTimeout(timer);
      if (timedOut) break;
    }
    return this.#members.filter((m) => m.hung).map((m) => m.dev.name);
  }

  /** Walks one device to `target` one arc per SET, recording each arc. */
  async #walk(m: Member, target: MigState, phase: string, rollback?: { deadline: number }): Promise<void> {
    if (m.state === target) return;
    const p = plan(m.state, target, m.flags);
    if (!p.ok) throw new VfioError({ operation: `${phase}: ${stateName(m.state)}->${stateName(target)}`, device: m.dev.name, hint: p.reason });
    for (const arc of p.arcs) await this.#arc(m, arc, phase, rollback);
  }

  async #arc(m: Member, arc: Arc, phase: string, rollback?: { deadline: number }): Promise<void> {
    // Rollback arcs are not cancellable by the migration's signal and share one deadline.
    const signal = rollback ? undefined : this.#signal;
    try {
      const r = await this.#timed(m, { device: m.dev.name, op: 'set', from: stateName(arc.from), to: stateName(arc.to), phase }, () => m.dev.setState(arc.to, signal ? { signal } : {}), {
        signal,
        issuedAt: (res) => res.timing?.issuedAt,
        deadline: rollback?.deadline,
      });
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

  /** VFIO_DEVICE_RESET, then the state as the kernel reports it (never assumed). */
  async #reset(m: Member, phase: string, deadline: number): Promise<void> {
    await this.#timed(m, { device: m.dev.name, op: 'reset', phase }, () => m.dev.reset(), { deadline });
    m.state = await this.#reread(m, phase);
  }

  /** One device back to RUNNING on its own (a late return), by the recovery policy. */
  async #recoverAlone(m: Member, phase: string): Promise<void> {
    m.dataFd?.close();
    m.dataFd = undefined;
    const deadline = performance.now() + this.#rollbackTimeoutMs;
    if (recoveryStep(m.state) === 'walk') {
      try {
        await this.#walk(m, MigState.Running, phase, { deadline });
        return;
      } catch {
        if (m.hung) return;
      }
    }
    if (m.state !== MigState.Running) await this.#reset(m, phase, deadline);
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
    this.#failed = true;
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
   * Every device back to RUNNING from wherever it is, by the recovery policy of
   * recover.ts and keeping the P2P rule in reverse: first every device that walks leaves
   * the saving/resuming group toward RUNNING_P2P (or STOP), then devices in ERROR or
   * RESUMING and those that refused are reset (a reset device is RUNNING at once, so no
   * reset runs while another device is still on its way to STOP), then all go to
   * RUNNING. Hung devices are reported and walked back when their arc returns. Runs
   * within its own time bound and ignores the migration's cancellation signal.
   */
  async rollback(): Promise<void> {
    this.#failed = true;
    this.#closeFds();
    const deadline = performance.now() + this.#rollbackTimeoutMs;
    const live = this.#members.filter((m) => !m.hung);
    const needReset = new Set<Member>();
    // 1: toward the P2P barrier.
    await this.#parallel('rollback', live, async (m) => {
      const step = recoveryStep(m.state);
      if (step === 'none' || m.state === MigState.PreCopy) return;
      if (step === 'reset') {
        needReset.add(m);
        return;
      }
      const barrier = m.flags & MigrationFlag.P2P ? MigState.RunningP2P : MigState.Stop;
      try {
        await this.#walk(m, barrier, 'rollback', { deadline });
      } catch {
        if (!m.hung) needReset.add(m);
      }
    });
    // 2: reset what the policy resets or what refused. A failed reset leaves the device
    // where it is (RESUMING stays uncommitted) and is reported below.
    const resetFailed = new Map<Member, string>();
    await this.#parallel('rollback', live, async (m) => {
      if (!needReset.has(m) && m.state !== MigState.Error) return;
      try {
        await this.#reset(m, 'rollback', deadline);
      } catch (err) {
        resetFailed.set(m, describe(m.dev.name, err).error);
      }
    });
    // 3: everything that walks, to RUNNING.
    const failures = await this.#parallel('rollback', live, async (m) => {
      if (m.state === MigState.Running || m.hung) return;
      if (resetFailed.has(m)) throw new Error(`reset failed, left in ${stateName(m.state)}${m.state === MigState.Resuming ? ' (uncommitted)' : ''}: ${resetFailed.get(m)}`);
      if (recoveryStep(m.state) !== 'walk') throw new Error(`left in ${stateName(m.state)}`);
      try {
        await this.#walk(m, MigState.Running, 'rollback', { deadline });
      } catch (err) {
        if (m.hung) return;
        try {
          await this.#reset(m, 'rollback', deadline);
        } catch {
          throw err;
        }
        if ((m.state as MigState) !== MigState.Running) throw new Error(`left in ${stateName(m.state)} after reset`);
      }
    });
    this.#closeFds();
    const hung = this.#members.filter((m) => m.hung).map((m) => m.dev.name);
    if (failures.length || hung.length) {
      throw new CoordinatorError(
        'rollback',
        [...failures, ...hung.map((device) => ({ device, error: 'hung: an arc has not returned; it is walked back to RUNNING when it does (await settled())' }))],
        hung,
      );
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
