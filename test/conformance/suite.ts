// The VFIO layer's conformance suite. The same tests run against the fake kernel
// (test/unit/conformance-fake.test.ts) and against the real 6.12 kernel in the rig with
// our edu variant driver and the upstream mtty sample (test/rig/conformance.test.ts),
// so the fake is held to the kernel and src/vfio to both.

import type { TestFn, ExecutionContext } from 'ava';
import { VfioDevice } from '../../src/vfio/device.ts';
import { VfioError } from '../../src/vfio/errors.ts';
import { readToEnd, readAvailable, writeAll } from '../../src/vfio/data.ts';
import { saveState, restoreState, type SaveVia } from '../../src/migration/trial.ts';
import { ensureRunning } from '../../src/migration/recover.ts';
import { MigState, stateName, DEFINED_MIGRATION_FLAG_SETS } from '../../src/vfio/uapi.ts';
import { plan, supportedStates } from '../../src/vfio/fsm.ts';

export interface ArcEntry {
  from: MigState;
  to: MigState;
  errno: number;
}

/** What a backend (fake kernel or real driver) lets the suite observe and control. */
export interface ConformanceBackend {
  name: string;
  /** Two devices of the same type, both idle and RUNNING. */
  pair(): [string, string];
  /** Can the migration flags be changed (edu knob, fake spec)? */
  setFlags?(id: string, flags: number): Promise<void>;
  /** The arcs the driver really executed since the last clear. */
  arcLog?(id: string): Promise<ArcEntry[]>;
  clearArcLog?(id: string): Promise<void>;
  /** Inject one failure on an arc. */
  inject?(id: string, arc: string, errno: number, outcome: 'stay' | 'error'): Promise<void>;
  clearInjection?(id: string): Promise<void>;
  /** Does the driver validate the stream on RESUMING->STOP (checksum)? mtty does not. */
  validatesStream: boolean;
  /** The state a device is left in after bad data at RESUMING->STOP. */
  badDataState: MigState;
  /** What a PRE_COPY read with nothing pending returns. */
  precopyEmpty: 'ENOMSG' | 'zero';
  /** Open fds of this process (leak checks). */
  openFds(): number;
}

const save = (dev: VfioDevice, via: SaveVia = 'stop-copy') => saveState(dev, via);
const restore = (dev: VfioDevice, stream: Buffer) => restoreState(dev, stream);
const toRunning = ensureRunning;

export function registerConformance(test: TestFn, backend: ConformanceBackend): void {
  const t = test.serial;
  const label = (s: string) => `[${backend.name}] ${s}`;

  async function withDevices<T>(fn: (a: VfioDevice, b: VfioDevice) => Promise<T>): Promise<T> {
    const [idA, idB] = backend.pair();
    const a = VfioDevice.open(idA);
    let b: VfioDevice | undefined;
    try {
      b = VfioDevice.open(idB);
      return await fn(a, b);
    } finally {
      await a.close();
      await b?.close();
    }
  }

  t(label('save from one device restores into another, byte for byte'), async (tt) => {
    await withDevices(async (a, b) => {
      const stream = await save(a);
      tt.true(stream.length > 0);
      await restore(b, stream);
      tt.is(await b.state(), MigState.Running);
      const again = await save(b);
      tt.deepEqual(again, stream, 'the destination re-saves exactly the state it was given');
    });
  });

  t(label('MIG_DATA_SIZE in RUNNING equals the bytes STOP_COPY produces'), async (tt) => {
    await withDevices(async (a) => {
      const predicted = await a.dataSize();
      const stream = await save(a);
      tt.is(Number(predicted), stream.length);
    });
  });

  t(label('PRE_COPY: precopy info counts down the initial bytes, then STOP_COPY completes the same stream'), async (tt) => {
    await withDevices(async (a, b) => {
      const r = await a.setState(MigState.PreCopy);
      tt.truthy(r.dataFd, 'RUNNING->PRE_COPY opens a saving fd');
      const f = r.dataFd!;
      const first = await a.precopyInfo(f);
      tt.true(first.initialBytes > 0n, 'initial_bytes starts non-zero');
      tt.is(first.flags, 0, 'flags are ignored without the v2 opt-in');
      const chunks: Buffer[] = [];
      const n = await readAvailable(f, (c) => void chunks.push(Buffer.from(c)));
      tt.true(n > 0);
      const after = await a.precopyInfo(f);
      tt.is(after.initialBytes, 0n, 'initial_bytes reaches 0 once read');
      tt.is(await readAvailable(f, () => undefined), 0, `nothing more now (${backend.precopyEmpty})`);
      const sc = await a.setState(MigState.StopCopy);
      tt.is(sc.dataFd, undefined, 'PRE_COPY->STOP_COPY continues the same fd');
      await readToEnd(f, (c) => void chunks.push(Buffer.from(c)));
      await tt.throwsAsync(a.precopyInfo(f), { instanceOf: VfioError }, 'precopy info is refused outside PRE_COPY');
      await a.setState(MigState.Stop);
      f.close();
      await a.setState(MigState.Running);
      const stream = Buffer.concat(chunks);
      await restore(b, stream);
      tt.deepEqual(await save(b), await save(a), 'state restored through PRE_COPY equals the source');
    });
  });

  t(label('a flipped byte in the stream never passes unnoticed'), async (tt) => {
    await withDevices(async (a, b) => {
      const stream = await save(a);
      const bad = Buffer.from(stream);
      const at = Math.floor(bad.length / 2);
      bad[at] = bad[at]! ^ 0x01;
      if (backend.validatesStream) {
        const err = await tt.throwsAsync(restore(b, bad), { instanceOf: VfioError });
        tt.is(err?.code, 'EINVAL');
        tt.is(err?.stateAfter, stateName(backend.badDataState));
        tt.is(await b.state(), backend.badDataState);
        await b.reset();
        tt.is(await b.state(), MigState.Running, 'reset returns the device to RUNNING');
      } else {
        await restore(b, bad);
        tt.notDeepEqual(await save(b), stream, 'the corruption shows up in the restored state');
      }
    });
  });

  t(label('a truncated stream is rejected at RESUMING->STOP and the device recovers'), async (tt) => {
    await withDevices(async (a, b) => {
      const stream = await save(a);
      const r = await b.setState(MigState.Resuming);
      await writeAll(r.dataFd!, stream.subarray(0, stream.length - 7));
      const err = await tt.throwsAsync(b.setState(MigState.Stop), { instanceOf: VfioError });
      tt.is(err?.code, 'EINVAL');
      r.dataFd!.close();
      await toRunning(b);
      tt.is(await b.state(), MigState.Running);
    });
  });

  t(label('STOP_COPY -> PRE_COPY is refused before the kernel sees it'), async (tt) => {
    await withDevices(async (a) => {
      const r = await a.setState(MigState.StopCopy);
      await backend.clearArcLog?.(a.name);
      for (const target of [MigState.PreCopy, MigState.PreCopyP2P]) {
        const err = await tt.throwsAsync(a.setState(target), { instanceOf: VfioError });
        tt.regex(err?.message ?? '', /refused before calling the kernel/);
      }
      tt.is(await a.state(), MigState.StopCopy);
      if (backend.arcLog) tt.deepEqual(await backend.arcLog(a.name), []);
      r.dataFd!.close();
      await a.setState(MigState.Running);
    });
  });

  t(label('no fd leaks across open, save, restore, reset and close'), async (tt) => {
    const before = backend.openFds();
    await withDevices(async (a, b) => {
      await restore(b, await save(a));
      await a.reset();
    });
    tt.is(backend.openFds(), before);
  });

  if (backend.setFlags && backend.arcLog && backend.clearArcLog) {
    const { setFlags, arcLog, clearArcLog } = backend;
    for (const flags of DEFINED_MIGRATION_FLAG_SETS) {
      t(label(`flags ${flags}: every (from, to) request walks exactly the arcs fsm.ts predicts`), async (tt) => {
        const [idA, idB] = backend.pair();
        await setFlags(idA, flags);
        await setFlags(idB, flags);
        try {
          await withDevices(async (a) => {
            tt.is(await a.migrationFlags(), flags);
            const valid = await save(a); // a stream to feed RESUMING before leaving it
            const states = supportedStates(flags).filter((s) => s !== MigState.Error);
            for (const from of states) {
              for (const to of states) {
                await toRunning(a);
                const setup = await a.setState(from);
                if (from === MigState.Resuming) await writeAll(setup.dataFd!, valid);
                await clearArcLog(a.name);
                const expected = plan(from, to, flags);
                const what = `${stateName(from)} -> ${stateName(to)}`;
                if (!expected.ok) {
                  await tt.throwsAsync(a.setState(to), { instanceOf: VfioError }, what);
                  tt.deepEqual(await arcLog(a.name), [], `${what}: refused without an arc`);
                } else {
                  const r = await a.setState(to);
                  const seen = (await arcLog(a.name)).map((x) => `${stateName(x.from)}>${stateName(x.to)}:${x.errno}`);
                  tt.deepEqual(seen, expected.arcs.map((x) => `${stateName(x.from)}>${stateName(x.to)}:0`), what);
                  tt.is(await a.state(), to, what);
                  r.dataFd?.close();
                }
                setup.dataFd?.close();
              }
            }
            await toRunning(a);
          });
        } finally {
          await setFlags(idA, 7);
          await setFlags(idB, 7);
        }
      });
    }

    t(label('SET of a state outside the flags fails with EINVAL and no arc'), async (tt) => {
      const [id] = backend.pair();
      await setFlags(id, 1);
      try {
        await withDevices(async (a) => {
          await clearArcLog(a.name);
          for (const s of [MigState.RunningP2P, MigState.PreCopy, MigState.PreCopyP2P]) {
            const err = await tt.throwsAsync(a.setState(s), { instanceOf: VfioError });
            tt.is(err?.code, 'EINVAL');
          }
          tt.deepEqual(await arcLog(a.name), []);
        });
      } finally {
        await setFlags(id, 7);
      }
    });
  }

  if (backend.inject && backend.clearInjection) {
    const { inject, clearInjection } = backend;
    for (const outcome of ['stay', 'error'] as const) {
      t(label(`an injected failure (${outcome}) on STOP->STOP_COPY leaves the state the layer reports`), async (tt) => {
        const [id] = backend.pair();
        await inject(id, 'STOP>STOP_COPY', 5, outcome);
        try {
          await withDevices(async (a) => {
            const err = await tt.throwsAsync(a.setState(MigState.StopCopy), { instanceOf: VfioError });
            tt.is(err?.code, 'EIO');
            const expected = outcome === 'stay' ? MigState.Stop : MigState.Error;
            tt.is(err?.stateAfter, stateName(expected));
            tt.is(await a.state(), expected);
            if (outcome === 'error') {
              const again = await tt.throwsAsync(a.setState(MigState.Running), { instanceOf: VfioError });
              tt.is(again?.code, 'EINVAL', 'any SET in ERROR fails');
              await a.reset();
            } else {
              await a.setState(MigState.Running);
            }
            tt.is(await a.state(), MigState.Running);
          });
        } finally {
          await clearInjection(id);
        }
      });
    }
  }
}

export type { ExecutionContext };
