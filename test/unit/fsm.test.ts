// fsm.ts against the resolved path tables of the uAPI spec (§4.3), transcribed here
// independently of the next-hop table so a wrong table entry cannot pass. The fake
// kernel's own transcription of the kernel's table (test/fake/kernel-fsm.ts) is held to
// the same tables, and the two transcriptions to each other.
import test from 'ava';
import { plan, nextHop, checkMigrationFlags, supportedStates, arcOpensSession, arcClosesSession, describeFlags, NEXT_HOP } from '../../src/vfio/fsm.ts';
import { MigState, parseMigState, stateName } from '../../src/vfio/uapi.ts';
import { vfioMigGetNextState, driverArcAction } from '../fake/kernel-fsm.ts';

const ABBREV: Record<string, MigState> = {
  STOP: MigState.Stop, RUN: MigState.Running, SC: MigState.StopCopy, RES: MigState.Resuming,
  RP2P: MigState.RunningP2P, PC: MigState.PreCopy, PCP2P: MigState.PreCopyP2P,
};

// "cur target: hops" rows; "—" = no-op, "X" = EINVAL.
const TABLES: Record<number, string> = {
  1: `
    STOP: STOP=— RUN=RUN SC=SC RES=RES
    RUN: STOP=STOP RUN=— SC=STOP,SC RES=STOP,RES
    SC: STOP=STOP RUN=STOP,RUN SC=— RES=STOP,RES
    RES: STOP=STOP RUN=STOP,RUN SC=STOP,SC RES=—`,
  3: `
    STOP: STOP=— RUN=RP2P,RUN SC=SC RES=RES RP2P=RP2P
    RUN: STOP=RP2P,STOP RUN=— SC=RP2P,STOP,SC RES=RP2P,STOP,RES RP2P=RP2P
    SC: STOP=STOP RUN=STOP,RP2P,RUN SC=— RES=STOP,RES RP2P=STOP,RP2P
    RES: STOP=STOP RUN=STOP,RP2P,RUN SC=STOP,SC RES=— RP2P=STOP,RP2P
    RP2P: STOP=STOP RUN=RUN SC=STOP,SC RES=STOP,RES RP2P=—`,
  5: `
    STOP: STOP=— RUN=RUN SC=SC RES=RES PC=RUN,PC
    RUN: STOP=STOP RUN=— SC=STOP,SC RES=STOP,RES PC=PC
    SC: STOP=STOP RUN=STOP,RUN SC=— RES=STOP,RES PC=X
    RES: STOP=STOP RUN=STOP,RUN SC=STOP,SC RES=— PC=STOP,RUN,PC
    PC: STOP=RUN,STOP RUN=RUN SC=SC RES=RUN,STOP,RES PC=—`,
  7: `
    STOP: STOP=— RUN=RP2P,RUN SC=SC RES=RES RP2P=RP2P PC=RP2P,RUN,PC PCP2P=RP2P,PCP2P
    RUN: STOP=RP2P,STOP RUN=— SC=RP2P,STOP,SC RES=RP2P,STOP,RES RP2P=RP2P PC=PC PCP2P=RP2P,PCP2P
    SC: STOP=STOP RUN=STOP,RP2P,RUN SC=— RES=STOP,RES RP2P=STOP,RP2P PC=X PCP2P=X
    RES: STOP=STOP RUN=STOP,RP2P,RUN SC=STOP,SC RES=— RP2P=STOP,RP2P PC=STOP,RP2P,RUN,PC PCP2P=STOP,RP2P,PCP2P
    RP2P: STOP=STOP RUN=RUN SC=STOP,SC RES=STOP,RES RP2P=— PC=RUN,PC PCP2P=PCP2P
    PC: STOP=RUN,RP2P,STOP RUN=RUN SC=PCP2P,SC RES=RUN,RP2P,STOP,RES RP2P=RUN,RP2P PC=— PCP2P=PCP2P
    PCP2P: STOP=RP2P,STOP RUN=RP2P,RUN SC=SC RES=RP2P,STOP,RES RP2P=RP2P PC=PC PCP2P=—`,
};

for (const [flags, table] of Object.entries(TABLES)) {
  test(`plan() reproduces the spec's resolved paths for flags ${flags}`, (t) => {
    let cases = 0;
    for (const line of table.trim().split('\n')) {
      const [cur, rest] = line.trim().split(': ');
      const from = ABBREV[cur!]!;
      for (const cell of rest!.split(' ')) {
        const [tgt, hops] = cell.split('=');
        const to = ABBREV[tgt!]!;
        const p = plan(from, to, Number(flags));
        const what = `${cur} -> ${tgt}`;
        if (hops === 'X') {
          t.false(p.ok, what);
        } else if (hops === '—') {
          t.deepEqual(p, { ok: true, arcs: [] }, what);
        } else {
          t.true(p.ok, what);
          const got = p.ok ? p.arcs.map((a) => a.to) : [];
          t.deepEqual(got, hops!.split(',').map((h) => ABBREV[h]!), what);
        }
        cases++;
      }
    }
    t.true(cases >= 16);
  });
}

/**
 * The fake kernel's driver loop over its own transcription of vfio_mig_get_next_state()
 * (test/fake/kernel-fsm.ts): the states it steps through, or how it stops.
 */
function fakeWalk(from: number, to: number, flags: number, fixed = false): number[] | 'EINVAL' | 'spins' | 'unexpected arc' {
  const hops: number[] = [];
  let cur = from;
  while (cur !== to) {
    const r = vfioMigGetNextState(cur, to, flags, { fixed });
    if ('spins' in r) return 'spins';
    if (r.rc !== 0) return 'EINVAL';
    if (driverArcAction(cur, r.next) === 'unexpected') return 'unexpected arc';
    hops.push(r.next);
    cur = r.next;
    if (hops.length > 8) throw new Error('the fake FSM loops');
  }
  return hops;
}

for (const [flags, table] of Object.entries(TABLES)) {
  test(`the fake kernel's own FSM (test/fake/kernel-fsm.ts) reproduces the spec's resolved paths for flags ${flags}`, (t) => {
    let cases = 0;
    for (const line of table.trim().split('\n')) {
      const [cur, rest] = line.trim().split(': ');
      const from = ABBREV[cur!]!;
      for (const cell of rest!.split(' ')) {
        const [tgt, hops] = cell.split('=');
        const to = ABBREV[tgt!]!;
        const what = `${cur} -> ${tgt}`;
        if (hops === 'X') {
          // STOP_COPY -> PRE_COPY(_P2P): unfixed kernels (the rig's 6.12) spin; fixed ones EINVAL.
          t.is(fakeWalk(from, to, Number(flags)), 'spins', what);
          t.is(fakeWalk(from, to, Number(flags), true), 'EINVAL', `${what} (2026 fix)`);
        } else {
          t.deepEqual(fakeWalk(from, to, Number(flags)), hops === '—' ? [] : hops!.split(',').map((h) => ABBREV[h]!), what);
        }
        cases++;
      }
    }
    t.true(cases >= 16);
  });
}

test("the fake kernel's FSM and fsm.ts, two independent transcriptions, agree on every request", (t) => {
  let compared = 0;
  for (let flags = 0; flags < 16; flags++) {
    for (let from = 0; from < 8; from++) {
      for (const to of [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0x7fffffff, 0xffffffff, -1]) {
        const what = `flags ${flags}: ${stateName(from)} -> ${stateName(to)}`;
        const fake = fakeWalk(from, to, flags, true);
        const p = plan(from, to, flags);
        const ours = p.ok ? p.arcs.map((a) => a.to) : 'EINVAL';
        // Where we refuse by ourselves (ERROR as target, STOP_COPY -> PRE_COPY) the
        // kernel is no more lenient - except that requesting the current state is a
        // no-op to the kernel, even ERROR while in ERROR.
        if (!p.ok && p.refusedByUs && from === to) t.deepEqual(fake, [], what);
        else if (!p.ok && p.refusedByUs) t.is(fake, 'EINVAL', what);
        else if (from === to) t.deepEqual(fake, [], what);
        else t.deepEqual(fake, ours, what);
        compared++;
      }
    }
  }
  t.is(compared, 16 * 8 * 13);
});

test('states the flags do not support are refused, as the kernel does', (t) => {
  const p = plan(MigState.Running, MigState.RunningP2P, 1);
  t.false(p.ok);
  if (!p.ok) t.false(p.refusedByUs, 'the kernel itself returns EINVAL here');
  t.false(plan(MigState.Running, 8, 7).ok, 'VFIO_DEVICE_STATE_NR is invalid');
  t.false(plan(MigState.Running, -1, 7).ok);
  t.false(plan(MigState.Running, 2.5, 7).ok);
});

test('ERROR is never a target and every request from ERROR fails', (t) => {
  const p = plan(MigState.Running, MigState.Error, 7);
  t.false(p.ok);
  if (!p.ok) t.true(p.refusedByUs);
  for (const to of [MigState.Stop, MigState.Running, MigState.RunningP2P]) {
    t.false(nextHop(MigState.Error, to, 7).ok);
    t.false(plan(MigState.Error, to, 7).ok);
  }
});

test('STOP_COPY -> PRE_COPY(_P2P) is refused by us, even where flags lack PRE_COPY', (t) => {
  for (const flags of [1, 3, 5, 7]) {
    for (const to of [MigState.PreCopy, MigState.PreCopyP2P]) {
      const p = plan(MigState.StopCopy, to, flags);
      t.false(p.ok);
      if (!p.ok) t.true(p.refusedByUs, `flags ${flags} -> ${stateName(to)}`);
    }
  }
});

test('the raw table never routes through a saving state as an interior hop', (t) => {
  const saving = new Set([MigState.PreCopy, MigState.PreCopyP2P, MigState.StopCopy]);
  for (let from = 1; from < 8; from++) {
    for (let to = 1; to < 8; to++) {
      const p = plan(from, to, 7);
      if (!p.ok) continue;
      p.arcs.slice(0, -1).forEach((a) => {
        // PC -> PCP2P -> SC is the one allowed saving-group walk.
        if (saving.has(a.to)) t.true(saving.has(from) && saving.has(to), `${stateName(from)}->${stateName(to)} via ${stateName(a.to)}`);
      });
    }
  }
  t.is(NEXT_HOP.length, 8);
});

test('checkMigrationFlags reads bits like QEMU: STOP_COPY required, unknown bits tolerated and shown', (t) => {
  for (const f of [1n, 3n, 5n, 7n]) t.deepEqual(checkMigrationFlags(f), { ok: true, flags: Number(f), unknown: 0n });
  for (const f of [0n, 2n, 4n, 6n, 8n, 10n]) {
    const r = checkMigrationFlags(f);
    t.false(r.ok, `flags ${f} lack STOP_COPY`);
    if (!r.ok) t.regex(r.reason, /STOP_COPY/);
  }
  const newer = checkMigrationFlags(9n);
  t.deepEqual(newer, { ok: true, flags: 1, unknown: 8n }, 'a bit a newer kernel may define is kept aside, not refused');
  const high = checkMigrationFlags((1n << 40n) | 7n);
  t.true(high.ok);
  t.is(high.flags, 7, 'planning uses the known bits only');
  t.deepEqual(describeFlags(high.flags, high.unknown), ['STOP_COPY', 'P2P', 'PRE_COPY', 'unknown flag 0x10000000000']);
  t.deepEqual(describeFlags(newer.flags, newer.unknown), ['STOP_COPY', 'unknown flag 0x8']);
});

test('supportedStates and describeFlags follow the flag requirements', (t) => {
  t.deepEqual(supportedStates(1), [MigState.Stop, MigState.Running, MigState.StopCopy, MigState.Resuming]);
  t.deepEqual(supportedStates(3), [MigState.Stop, MigState.Running, MigState.StopCopy, MigState.Resuming, MigState.RunningP2P]);
  t.is(supportedStates(7).length, 7);
  t.deepEqual(describeFlags(7), ['STOP_COPY', 'P2P', 'PRE_COPY']);
  t.deepEqual(describeFlags(5), ['STOP_COPY', 'PRE_COPY']);
});

test('session opening and closing arcs match the spec', (t) => {
  t.is(arcOpensSession({ from: MigState.Stop, to: MigState.StopCopy }), 'saving');
  t.is(arcOpensSession({ from: MigState.Running, to: MigState.PreCopy }), 'saving');
  t.is(arcOpensSession({ from: MigState.RunningP2P, to: MigState.PreCopyP2P }), 'saving');
  t.is(arcOpensSession({ from: MigState.Stop, to: MigState.Resuming }), 'resuming');
  t.is(arcOpensSession({ from: MigState.PreCopyP2P, to: MigState.StopCopy }), undefined);
  t.true(arcClosesSession({ from: MigState.StopCopy, to: MigState.Stop }));
  t.true(arcClosesSession({ from: MigState.Resuming, to: MigState.Stop }));
  t.false(arcClosesSession({ from: MigState.PreCopy, to: MigState.PreCopyP2P }));
});

test('parseMigState accepts kernel and QEMU spellings and rejects junk', (t) => {
  t.is(parseMigState('STOP_COPY'), MigState.StopCopy);
  t.is(parseMigState('pre-copy-p2p'), MigState.PreCopyP2P);
  t.is(parseMigState('5'), MigState.RunningP2P);
  t.is(parseMigState('8'), undefined);
  t.is(parseMigState('RUNNING; rm -rf /'), undefined);
  t.is(stateName(42), 'INVALID(42)');
});
