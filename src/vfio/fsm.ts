// The kernel's migration FSM as data: vfio_mig_get_next_state()'s next-hop table and
// its skip-unsupported-states rule, so we can predict exactly which arcs (one driver
// call each) a SET will walk, and refuse requests the kernel must never see.

import { MigState, MigrationFlag, MIG_STATE_COUNT, stateName } from './uapi.ts';

const { Error: ERR, Stop: STOP, Running: RUN, StopCopy: SC, Resuming: RES, RunningP2P: RP2P, PreCopy: PC, PreCopyP2P: PCP2P } = MigState;

/**
 * NEXT_HOP[current][target]: the next state on the shortest path when every optional
 * state is supported (include/uapi/linux/vfio.h design rules, drivers/vfio/vfio_main.c).
 * Columns in enum order: ERROR STOP RUNNING STOP_COPY RESUMING RUNNING_P2P PRE_COPY PRE_COPY_P2P.
 */
export const NEXT_HOP: readonly (readonly MigState[])[] = [
  /* ERROR        */ [ERR, ERR, ERR, ERR, ERR, ERR, ERR, ERR],
  /* STOP         */ [ERR, STOP, RP2P, SC, RES, RP2P, RP2P, RP2P],
  /* RUNNING      */ [ERR, RP2P, RUN, RP2P, RP2P, RP2P, PC, RP2P],
  /* STOP_COPY    */ [ERR, STOP, STOP, SC, STOP, STOP, ERR, ERR],
  /* RESUMING     */ [ERR, STOP, STOP, STOP, RES, STOP, STOP, STOP],
  /* RUNNING_P2P  */ [ERR, STOP, RUN, STOP, STOP, RP2P, RUN, PCP2P],
  /* PRE_COPY     */ [ERR, RUN, RUN, PCP2P, RUN, RUN, PC, PCP2P],
  /* PRE_COPY_P2P */ [ERR, RP2P, RP2P, SC, RP2P, RP2P, PC, PCP2P],
];

const ALL_FLAGS = 0xffffffff;

/** Flags a state needs the device to advertise (ERROR needs "all", so it is never valid). */
export const REQUIRED_FLAGS: readonly number[] = [
  /* ERROR        */ ALL_FLAGS,
  /* STOP         */ MigrationFlag.STOP_COPY,
  /* RUNNING      */ MigrationFlag.STOP_COPY,
  /* STOP_COPY    */ MigrationFlag.STOP_COPY,
  /* RESUMING     */ MigrationFlag.STOP_COPY,
  /* RUNNING_P2P  */ MigrationFlag.STOP_COPY | MigrationFlag.P2P,
  /* PRE_COPY     */ MigrationFlag.STOP_COPY | MigrationFlag.PRE_COPY,
  /* PRE_COPY_P2P */ MigrationFlag.STOP_COPY | MigrationFlag.P2P | MigrationFlag.PRE_COPY,
];

export function stateSupported(state: MigState, flags: number): boolean {
  const need = REQUIRED_FLAGS[state];
  return need !== undefined && (need & flags) === need;
}

/** The states a device with these flags can be asked for (ERROR never). */
export function supportedStates(flags: number): MigState[] {
  const out: MigState[] = [];
  for (let s = 0; s < MIG_STATE_COUNT; s++) if (stateSupported(s, flags)) out.push(s);
  return out;
}

export type HopResult = { ok: true; next: MigState } | { ok: false; errno: 'EINVAL'; reason: string };

/**
 * One step of vfio_mig_get_next_state(), including the 2026 fix: when the table yields
 * ERROR the walk stops with EINVAL (unfixed kernels spin forever on it).
 */
export function nextHop(current: MigState, target: number, flags: number): HopResult {
  if (!stateSupported(current, flags)) {
    return { ok: false, errno: 'EINVAL', reason: `current state ${stateName(current)} is not supported by flags ${flags}` };
  }
  if (!Number.isInteger(target) || target < 0 || target >= MIG_STATE_COUNT || !stateSupported(target as MigState, flags)) {
    return { ok: false, errno: 'EINVAL', reason: `target ${stateName(target)} is not a state this device supports (flags ${flags})` };
  }
  let next = NEXT_HOP[current]![target]!;
  while (next !== ERR && !stateSupported(next, flags)) next = NEXT_HOP[next]![target]!;
  if (next === ERR) {
    return { ok: false, errno: 'EINVAL', reason: `no path from ${stateName(current)} to ${stateName(target)}` };
  }
  return { ok: true, next };
}

export interface Arc {
  from: MigState;
  to: MigState;
}

export type Plan = { ok: true; arcs: Arc[] } | { ok: false; errno: 'EINVAL'; reason: string; refusedByUs: boolean };

/**
 * The arcs the kernel will execute for SET `target` from `from`, or why it (or we)
 * refuse. `refusedByUs` marks requests we block before the kernel sees them because an
 * unfixed kernel would hang (STOP_COPY -> PRE_COPY/PRE_COPY_P2P) or that name ERROR.
 */
export function plan(from: MigState, target: number, flags: number): Plan {
  if (target === ERR) {
    return { ok: false, errno: 'EINVAL', reason: 'ERROR can never be requested; it is only a failure outcome', refusedByUs: true };
  }
  if (from === SC && (target === PC || target === PCP2P)) {
    return {
      ok: false,
      errno: 'EINVAL',
      reason: `${stateName(from)} -> ${stateName(target)} is forbidden (unfixed kernels loop forever in vfio_mig_get_next_state)`,
      refusedByUs: true,
    };
  }
  const arcs: Arc[] = [];
  let cur = from;
  while (cur !== target) {
    const hop = nextHop(cur, target, flags);
    if (!hop.ok) return { ...hop, refusedByUs: false };
    arcs.push({ from: cur, to: hop.next });
    cur = hop.next;
    if (arcs.length > MIG_STATE_COUNT) throw new Error(`FSM table loops from ${stateName(from)} to ${stateName(target)}`);
  }
  // target == current is a successful no-op: drivers loop `while (cur != target)` and
  // never consult the table, so nothing is validated and no fd is returned.
  return { ok: true, arcs };
}

/** Arcs that open a new data session (the only arcs that return a data fd). */
export function arcOpensSession(arc: Arc): 'saving' | 'resuming' | undefined {
  if ((arc.from === RUN && arc.to === PC) || (arc.from === RP2P && arc.to === PCP2P) || (arc.from === STOP && arc.to === SC)) {
    return 'saving';
  }
  if (arc.from === STOP && arc.to === RES) return 'resuming';
  return undefined;
}

/** Arcs that end the current data session (its fd then fails, typically ENODEV). */
export function arcClosesSession(arc: Arc): boolean {
  return (
    (arc.from === SC && arc.to === STOP) ||
    (arc.from === PC && arc.to === RUN) ||
    (arc.from === PCP2P && arc.to === RP2P) ||
    (arc.from === RES && arc.to === STOP)
  );
}

export function isSavingState(s: MigState): boolean {
  return s === PC || s === PCP2P || s === SC;
}

/** States in which the device still initiates DMA / runs (relevant for the P2P rule). */
export function isRunningState(s: MigState): boolean {
  return s === RUN || s === PC;
}

export type FlagCheck = { ok: true; flags: number; unknown: bigint } | { ok: false; flags: number; unknown: bigint; reason: string };

const KNOWN_FLAG_BITS = BigInt(MigrationFlag.STOP_COPY | MigrationFlag.P2P | MigrationFlag.PRE_COPY);

/**
 * Reads a GET MIGRATION result by bits, as QEMU does (hw/vfio/migration.c): STOP_COPY is
 * required, P2P and PRE_COPY are optional, and bits a newer kernel may define are
 * tolerated and shown, never refused - refusing them would make every device of a
 * newer driver unmigratable for no reason. `flags` holds the known bits only.
 */
export function checkMigrationFlags(raw: bigint): FlagCheck {
  const flags = Number(raw & KNOWN_FLAG_BITS);
  const unknown = raw & ~KNOWN_FLAG_BITS;
  if ((flags & MigrationFlag.STOP_COPY) === 0) {
    return { ok: false, flags, unknown, reason: `flags 0x${raw.toString(16)} lack STOP_COPY, which every migratable device must support` };
  }
  return { ok: true, flags, unknown };
}

/** Flag names, with any bit this layer does not know shown as "unknown flag 0x8". */
export function describeFlags(flags: number, unknown = 0n): string[] {
  const names: string[] = [];
  if (flags & MigrationFlag.STOP_COPY) names.push('STOP_COPY');
  if (flags & MigrationFlag.P2P) names.push('P2P');
  if (flags & MigrationFlag.PRE_COPY) names.push('PRE_COPY');
  for (let bit = 3n; unknown >> bit !== 0n; bit++) {
    if ((unknown >> bit) & 1n) names.push(`unknown flag 0x${(1n << bit).toString(16)}`);
  }
  return names;
}
