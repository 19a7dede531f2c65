// The fake kernel's own copy of the VFIO core's migration state machine: a transcription
// of drivers/vfio/vfio_main.c vfio_mig_get_next_state() (vfio_from_fsm_table,
// state_flags_table and the loop that skips states the device's flags do not support)
// and of the arcs a driver executes for each hop (samples/vfio-mdev/mtty.c
// mtty_step_state()).
//
// It deliberately shares nothing with src/vfio/fsm.ts - not the table, not the helpers -
// so that the conformance suite, which checks src/vfio against this fake and this fake
// against the real kernel, compares two independent sources. The table is written the
// way the kernel writes it (designated initialisers by state name, rows in the kernel's
// order); the state numbers come from include/uapi/linux/vfio.h, not from src/vfio/uapi.ts.
// test/unit/fsm.test.ts checks the paths it produces against the spec's resolved path
// tables (spec/vfio-migration-uapi.md §4.3).

// enum vfio_device_mig_state (include/uapi/linux/vfio.h)
export const VFIO_DEVICE_STATE_ERROR = 0;
export const VFIO_DEVICE_STATE_STOP = 1;
export const VFIO_DEVICE_STATE_RUNNING = 2;
export const VFIO_DEVICE_STATE_STOP_COPY = 3;
export const VFIO_DEVICE_STATE_RESUMING = 4;
export const VFIO_DEVICE_STATE_RUNNING_P2P = 5;
export const VFIO_DEVICE_STATE_PRE_COPY = 6;
export const VFIO_DEVICE_STATE_PRE_COPY_P2P = 7;
/** enum { VFIO_DEVICE_NUM_STATES = VFIO_DEVICE_STATE_PRE_COPY_P2P + 1 } */
export const VFIO_DEVICE_NUM_STATES = VFIO_DEVICE_STATE_PRE_COPY_P2P + 1;

// struct vfio_device_feature_migration flags
export const VFIO_MIGRATION_STOP_COPY = 1 << 0;
export const VFIO_MIGRATION_P2P = 1 << 1;
export const VFIO_MIGRATION_PRE_COPY = 1 << 2;

const ERROR = VFIO_DEVICE_STATE_ERROR;
const STOP = VFIO_DEVICE_STATE_STOP;
const RUNNING = VFIO_DEVICE_STATE_RUNNING;
const STOP_COPY = VFIO_DEVICE_STATE_STOP_COPY;
const RESUMING = VFIO_DEVICE_STATE_RESUMING;
const RUNNING_P2P = VFIO_DEVICE_STATE_RUNNING_P2P;
const PRE_COPY = VFIO_DEVICE_STATE_PRE_COPY;
const PRE_COPY_P2P = VFIO_DEVICE_STATE_PRE_COPY_P2P;

type Row = Record<number, number>;

/** static const u8 vfio_from_fsm_table[VFIO_DEVICE_NUM_STATES][VFIO_DEVICE_NUM_STATES] */
const vfio_from_fsm_table: Record<number, Row> = {
  [STOP]: {
    [STOP]: STOP,
    [RUNNING]: RUNNING_P2P,
    [PRE_COPY]: RUNNING_P2P,
    [PRE_COPY_P2P]: RUNNING_P2P,
    [STOP_COPY]: STOP_COPY,
    [RESUMING]: RESUMING,
    [RUNNING_P2P]: RUNNING_P2P,
    [ERROR]: ERROR,
  },
  [RUNNING]: {
    [STOP]: RUNNING_P2P,
    [RUNNING]: RUNNING,
    [PRE_COPY]: PRE_COPY,
    [PRE_COPY_P2P]: RUNNING_P2P,
    [STOP_COPY]: RUNNING_P2P,
    [RESUMING]: RUNNING_P2P,
    [RUNNING_P2P]: RUNNING_P2P,
    [ERROR]: ERROR,
  },
  [PRE_COPY]: {
    [STOP]: RUNNING,
    [RUNNING]: RUNNING,
    [PRE_COPY]: PRE_COPY,
    [PRE_COPY_P2P]: PRE_COPY_P2P,
    [STOP_COPY]: PRE_COPY_P2P,
    [RESUMING]: RUNNING,
    [RUNNING_P2P]: RUNNING,
    [ERROR]: ERROR,
  },
  [PRE_COPY_P2P]: {
    [STOP]: RUNNING_P2P,
    [RUNNING]: RUNNING_P2P,
    [PRE_COPY]: PRE_COPY,
    [PRE_COPY_P2P]: PRE_COPY_P2P,
    [STOP_COPY]: STOP_COPY,
    [RESUMING]: RUNNING_P2P,
    [RUNNING_P2P]: RUNNING_P2P,
    [ERROR]: ERROR,
  },
  [STOP_COPY]: {
    [STOP]: STOP,
    [RUNNING]: STOP,
    [PRE_COPY]: ERROR,
    [PRE_COPY_P2P]: ERROR,
    [STOP_COPY]: STOP_COPY,
    [RESUMING]: STOP,
    [RUNNING_P2P]: STOP,
    [ERROR]: ERROR,
  },
  [RESUMING]: {
    [STOP]: STOP,
    [RUNNING]: STOP,
    [PRE_COPY]: STOP,
    [PRE_COPY_P2P]: STOP,
    [STOP_COPY]: STOP,
    [RESUMING]: RESUMING,
    [RUNNING_P2P]: STOP,
    [ERROR]: ERROR,
  },
  [RUNNING_P2P]: {
    [STOP]: STOP,
    [RUNNING]: RUNNING,
    [PRE_COPY]: RUNNING,
    [PRE_COPY_P2P]: PRE_COPY_P2P,
    [STOP_COPY]: STOP,
    [RESUMING]: STOP,
    [RUNNING_P2P]: RUNNING_P2P,
    [ERROR]: ERROR,
  },
  [ERROR]: {
    [STOP]: ERROR,
    [RUNNING]: ERROR,
    [PRE_COPY]: ERROR,
    [PRE_COPY_P2P]: ERROR,
    [STOP_COPY]: ERROR,
    [RESUMING]: ERROR,
    [RUNNING_P2P]: ERROR,
    [ERROR]: ERROR,
  },
};

/** static const unsigned int state_flags_table[VFIO_DEVICE_NUM_STATES] */
const state_flags_table: Record<number, number> = {
  [STOP]: VFIO_MIGRATION_STOP_COPY,
  [RUNNING]: VFIO_MIGRATION_STOP_COPY,
  [PRE_COPY]: VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY,
  [PRE_COPY_P2P]: VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P | VFIO_MIGRATION_PRE_COPY,
  [STOP_COPY]: VFIO_MIGRATION_STOP_COPY,
  [RESUMING]: VFIO_MIGRATION_STOP_COPY,
  [RUNNING_P2P]: VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P,
  [ERROR]: ~0 >>> 0,
};

/** (state_flags_table[s] & device->migration_flags) == state_flags_table[s], as u32 arithmetic. */
function supported(state: number, migrationFlags: number): boolean {
  const need = state_flags_table[state]!;
  return ((need & migrationFlags) >>> 0) === need;
}

/**
 * What vfio_mig_get_next_state() does for one hop:
 * - `{ rc: 0, next }`: the next state to step to;
 * - `{ rc: -EINVAL }` (as `errno: 'EINVAL'`): the current state is not one the flags
 *   support (the kernel also WARNs; ERROR always lands here), the target is out of range
 *   or unsupported (ERROR always), or - on kernels with the 2026 fix - the table yields
 *   ERROR;
 * - `{ spins: true }`: kernels without the 2026 fix (6.12 included) never leave the skip
 *   loop when the table yields ERROR (ERROR's flags ~0 are never "supported"): the ioctl
 *   spins forever holding the driver's state mutex. Only STOP_COPY -> PRE_COPY(_P2P) on
 *   a PRE_COPY device gets there.
 */
export type NextState = { rc: 0; next: number } | { rc: 'EINVAL'; why: string } | { spins: true };

export function vfioMigGetNextState(curFsm: number, newFsm: number, migrationFlags: number, opts: { fixed?: boolean } = {}): NextState {
  const flags = migrationFlags >>> 0;
  // if (WARN_ON(cur_fsm >= ARRAY_SIZE(vfio_from_fsm_table) || !supported(cur_fsm))) return -EINVAL;
  if (curFsm >= VFIO_DEVICE_NUM_STATES || !supported(curFsm, flags)) return { rc: 'EINVAL', why: 'current state not supported (WARN_ON)' };
  // if (new_fsm >= ARRAY_SIZE(vfio_from_fsm_table) || !supported(new_fsm)) return -EINVAL;
  // (new_fsm is a u32 from user space: negative or huge values are ">= ARRAY_SIZE")
  if (!Number.isInteger(newFsm) || newFsm < 0 || newFsm >= VFIO_DEVICE_NUM_STATES || !supported(newFsm, flags)) {
    return { rc: 'EINVAL', why: 'target out of range or not supported by the flags' };
  }
  // *next_fsm = vfio_from_fsm_table[cur_fsm][new_fsm];
  // while (!supported(*next_fsm)) *next_fsm = vfio_from_fsm_table[*next_fsm][new_fsm];
  let next = vfio_from_fsm_table[curFsm]![newFsm]!;
  while (!supported(next, flags)) {
    if (next === ERROR) {
      // Unfixed kernels: table[ERROR][*] == ERROR and ERROR is never supported.
      if (!opts.fixed) return { spins: true };
      break;
    }
    next = vfio_from_fsm_table[next]![newFsm]!;
  }
  // return (*next_fsm != VFIO_DEVICE_STATE_ERROR) ? 0 : -EINVAL;
  return next !== ERROR ? { rc: 0, next } : { rc: 'EINVAL', why: 'no path (table yields ERROR)' };
}

/**
 * What a driver does on one arc (mtty_step_state(); mlx5 and our edu driver agree):
 * - 'none': no data session changes (P2P quiescing, STOP <-> RUNNING without P2P);
 * - 'open-saving' / 'open-resuming': a new migration file, returned to user space as
 *   the data fd when this is the final arc;
 * - 'continue-saving': PRE_COPY(_P2P) -> STOP_COPY, the saving file goes on (no new fd);
 * - 'close': the session's files are disabled (PRE_COPY -> RUNNING, PRE_COPY_P2P ->
 *   RUNNING_P2P, STOP_COPY -> STOP);
 * - 'load-and-close': RESUMING -> STOP, the written state is loaded first (may fail);
 * - 'unexpected': an arc vfio_mig_get_next_state() never produces ("WARN_ON(true);
 *   return ERR_PTR(-EINVAL)").
 */
export type ArcAction = 'none' | 'open-saving' | 'open-resuming' | 'continue-saving' | 'close' | 'load-and-close' | 'unexpected';

export function driverArcAction(cur: number, next: number): ArcAction {
  const is = (a: number, b: number) => cur === a && next === b;
  if (is(RUNNING, RUNNING_P2P) || is(RUNNING_P2P, RUNNING) || is(RUNNING_P2P, STOP) || is(STOP, RUNNING_P2P) || is(PRE_COPY, PRE_COPY_P2P) || is(PRE_COPY_P2P, PRE_COPY)) return 'none';
  if (is(RUNNING, STOP) || is(STOP, RUNNING)) return 'none'; // devices without P2P
  if (is(RESUMING, STOP)) return 'load-and-close';
  if (is(PRE_COPY, RUNNING) || is(PRE_COPY_P2P, RUNNING_P2P) || is(STOP_COPY, STOP)) return 'close';
  if (is(RUNNING, PRE_COPY) || is(RUNNING_P2P, PRE_COPY_P2P) || is(STOP, STOP_COPY)) return 'open-saving';
  if (is(PRE_COPY_P2P, STOP_COPY) || is(PRE_COPY, STOP_COPY)) return 'continue-saving';
  if (is(STOP, RESUMING)) return 'open-resuming';
  return 'unexpected';
}

/** The kernel's state names, for messages. */
export const STATE_NAMES = ['ERROR', 'STOP', 'RUNNING', 'STOP_COPY', 'RESUMING', 'RUNNING_P2P', 'PRE_COPY', 'PRE_COPY_P2P'] as const;

export function kernelStateName(s: number): string {
  return STATE_NAMES[s] ?? `INVALID(${s})`;
}
