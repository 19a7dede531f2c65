// The one recover-to-RUNNING policy. Every failure path (coordinator rollback, trial,
// state transfer, qualify, the conformance suite) returns a device to RUNNING through
// this file, so the rules hold everywhere:
//   - RUNNING: nothing to do;
//   - ERROR: only VFIO_DEVICE_RESET leaves it;
//   - RESUMING: reset, never RESUMING -> STOP. STOP is the commit: the driver would load
//     whatever partial or corrupt data was written (mtty validates nothing). If the reset
//     fails the device stays in RESUMING and is reported, never committed;
//   - any other state: walk to RUNNING along the kernel's path; reset if that fails.
// Recovery has its own time bound and ignores the caller's cancellation signal: a
// cancelled migration must still leave its devices running.

import { MigState, stateName } from '../vfio/uapi.ts';

/** What recovery needs of a device; VfioDevice implements it. */
export interface RecoverableDevice {
  readonly name: string;
  state(): Promise<MigState>;
  setState(target: MigState): Promise<unknown>;
  reset(): Promise<void>;
}

export type RecoveryStep = 'none' | 'reset' | 'walk';

/** The policy as data: how a device in each state gets back to RUNNING. */
export const RECOVERY_STEP: Readonly<Record<MigState, RecoveryStep>> = {
  [MigState.Running]: 'none',
  [MigState.Error]: 'reset',
  [MigState.Resuming]: 'reset',
  [MigState.Stop]: 'walk',
  [MigState.StopCopy]: 'walk',
  [MigState.RunningP2P]: 'walk',
  [MigState.PreCopy]: 'walk',
  [MigState.PreCopyP2P]: 'walk',
};

export function recoveryStep(state: MigState): RecoveryStep {
  return RECOVERY_STEP[state];
}

export interface RecoveryOutcome {
  device: string;
  /** The state recovery found (or 'unknown' when it could not be read). */
  from: string;
  action: 'none' | 'walked' | 'reset' | 'walk failed, reset';
  /** The state the device is in afterwards, as re-read from the kernel. */
  state: string;
  ok: boolean;
  error?: string;
}

export const DEFAULT_RECOVERY_TIMEOUT_MS = 30_000;

class RecoveryTimeout extends Error {}

function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new RecoveryTimeout(`${what}: no answer within ${ms} ms`)), ms);
  });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

const message = (err: unknown): string => (err instanceof Error ? err.message : String(err));

/**
 * Returns one device to RUNNING by the policy above, within `timeoutMs` (default 30 s).
 * Never throws: the outcome says what was done and where the device ended.
 */
export async function recoverToRunning(dev: RecoverableDevice, opts: { timeoutMs?: number } = {}): Promise<RecoveryOutcome> {
  const ms = opts.timeoutMs ?? DEFAULT_RECOVERY_TIMEOUT_MS;
  const deadline = performance.now() + ms;
  const left = () => Math.max(1, deadline - performance.now());
  const readState = async (): Promise<string> => {
    try {
      return stateName(await within(dev.state(), left(), 'GET state'));
    } catch (err) {
      return `unknown (${message(err)})`;
    }
  };
  let from: MigState;
  try {
    from = await within(dev.state(), left(), 'GET state');
  } catch (err) {
    // The state cannot be read: a reset is the only move that is safe from any state.
    try {
      await within(dev.reset(), left(), 'VFIO_DEVICE_RESET');
      const state = await readState();
      return { device: dev.name, from: 'unknown', action: 'reset', state, ok: state === 'RUNNING', error: message(err) };
    } catch (resetErr) {
      return { device: dev.name, from: 'unknown', action: 'reset', state: 'unknown', ok: false, error: `${message(err)}; reset: ${message(resetErr)}` };
    }
  }
  const step = recoveryStep(from);
  if (step === 'none') return { device: dev.name, from: stateName(from), action: 'none', state: 'RUNNING', ok: true };
  if (step === 'walk') {
    try {
      await within(dev.setState(MigState.Running), left(), `${stateName(from)} -> RUNNING`);
      const state = await readState();
      return { device: dev.name, from: stateName(from), action: 'walked', state, ok: state === 'RUNNING' };
    } catch (walkErr) {
      const outcome = await resetOutcome(dev, from, 'walk failed, reset', left, readState);
      return { ...outcome, error: outcome.error ? `${message(walkErr)}; ${outcome.error}` : message(walkErr) };
    }
  }
  return resetOutcome(dev, from, 'reset', left, readState);
}

async function resetOutcome(
  dev: RecoverableDevice,
  from: MigState,
  action: RecoveryOutcome['action'],
  left: () => number,
  readState: () => Promise<string>,
): Promise<RecoveryOutcome> {
  try {
    await within(dev.reset(), left(), 'VFIO_DEVICE_RESET');
  } catch (err) {
    // A failed reset leaves the device where it was - for RESUMING that is the point:
    // it is reported uncommitted rather than walked through STOP.
    const state = await readState();
    return { device: dev.name, from: stateName(from), action, state, ok: false, error: `reset failed: ${message(err)}${state === 'RESUMING' ? ' (left in RESUMING, uncommitted)' : ''}` };
  }
  const state = await readState();
  return { device: dev.name, from: stateName(from), action, state, ok: state === 'RUNNING' };
}

/** Throws one error naming every device recovery could not return to RUNNING. */
export function assertRecovered(outcomes: RecoveryOutcome[]): void {
  const bad = outcomes.filter((o) => !o.ok);
  if (bad.length) throw new Error(`recovery incomplete: ${bad.map((o) => `${o.device} in ${o.state}${o.error ? ` (${o.error})` : ''}`).join('; ')}`);
}

/** recoverToRunning, throwing when the device did not end in RUNNING. */
export async function ensureRunning(dev: RecoverableDevice, opts: { timeoutMs?: number } = {}): Promise<RecoveryOutcome> {
  const outcome = await recoverToRunning(dev, opts);
  assertRecovered([outcome]);
  return outcome;
}
