// The VFIO layer's conformance suite. The same tests run against the fake kernel
// (test/unit/conformance-fake.test.ts) and against the real 6.12 kernel in the rig with
// our edu variant driver and the upstream mtty sample (test/rig/conformance.test.ts),
// so the fake is held to the kernel and src/vfio to both. The fake's state machine is
// its own transcription of the kernel's (test/fake/kernel-fsm.ts), not src/vfio/fsm.ts,
// so "the arcs fsm.ts predicts" below is checked against an independent source.
//
// Requests the layer refuses by itself (a state outside the device's flags, ERROR as a
// target, out-of-range values) are also sent RAW with VfioDevice.probeRefusal(), so the
// refusal is checked against the kernel, not against ourselves. STOP_COPY ->
// PRE_COPY(_P2P) is never sent: unfixed kernels (6.12 included) spin forever on it.
//
// What each backend can do decides what runs; mtty runs everything but what it lacks:
// - the flags 1, 3, 5 walks and the "state outside the flags" part of the refusal test:
//   mtty's flags are fixed at STOP_COPY|P2P|PRE_COPY (mtty_init_dev), no knob;
// - arc-exact walks: mtty keeps no arc log, so its walk (flags 7) checks what user space
//   sees of each path instead: the final state and whether a data fd came back;
// - injected failures: only our edu driver (and the fake) can fail an arc on demand.

import type { TestFn, ExecutionContext } from 'ava';
import { VfioDevice } from '../../src/vfio/device.ts';
import { VfioError } from '../../src/vfio/errors.ts';
import { readToEnd, readAvailable, writeAll } from '../../src/vfio/data.ts';
import { saveState, restoreState, type SaveVia } from '../../src/migration/trial.ts';
import { ensureRunning } from '../../src/migration/recover.ts';
import { MigState, stateName, DEFINED_MIGRATION_FLAG_SETS, Ioctl, encodePrecopyInfo } from '../../src/vfio/uapi.ts';
import { plan, supportedStates, arcOpensSession } from '../../src/vfio/fsm.ts';
import { sys, SysError } from '../../src/host/sys.ts';

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
  /** The flags of a backend without setFlags (mtty: 7). */
  fixedFlags?: number;
  /** The arcs the driver really executed since the last clear. */
  arcLog?(id: string): Promise<ArcEntry[]>;
  clearArcLog?(id: string): Promise<void>;
  /**
   * The migration state a reopen finds after a close: 'kept' when close_device leaves
   * it alone (mtty, the fake), 'running' when open/close_device return to RUNNING (edu,
   * vfio-pci-core drivers such as mlx5).
   */
  stateAfterReopen: 'kept' | 'running';
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

  /** Best effort: a test that failed half-way must not leave the next one a stopped device. */
  async function settle(d: VfioDevice | undefined): Promise<void> {
    if (!d?.isOpen) return;
    try {
      if ((await d.state()) !== MigState.Running) await toRunning(d);
    } catch {
      // the test already failed; the next one reports a device it cannot use
    }
  }

  async function withDevices<T>(fn: (a: VfioDevice, b: VfioDevice) => Promise<T>): Promise<T> {
    const [idA, idB] = backend.pair();
    const a = VfioDevice.open(idA);
    let b: VfioDevice | undefined;
    try {
      b = VfioDevice.open(idB);
      return await fn(a, b);
    } finally {
      // The migration state outlives a close on mtty (and the fake): return to RUNNING.
      await settle(a);
      await settle(b);
      await a.close();
      await b?.close();
    }
  }

  /** The layer's answer to a request: 'accepted' or the errno name it refused with. */
  async function layerAnswer(d: VfioDevice, target: number): Promise<string> {
    try {
      const r = await d.setState(target);
      r.dataFd?.close();
      return 'accepted';
    } catch (err) {
      if (err instanceof VfioError) return err.code ?? 'no errno';
      throw err;
    }
  }

  /** Puts an open device into `from` (RESUMING gets a valid stream, so it can be left). */
  async function bringTo(d: VfioDevice, from: MigState, valid: Buffer) {
    await toRunning(d);
    const setup = await d.setState(from);
    if (from === MigState.Resuming) await writeAll(setup.dataFd!, valid);
    return setup;
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
        // Not even the raw probe may send it: an unfixed kernel would spin forever.
        await tt.throwsAsync(a.probeRefusal(target), { instanceOf: VfioError }, 'probeRefusal never sends it either');
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

  t(label(`the migration state ${backend.stateAfterReopen === 'kept' ? 'persists' : 'returns to RUNNING'} across close and reopen; closing a data fd changes no state`), async (tt) => {
    const [idA] = backend.pair();
    let a = VfioDevice.open(idA);
    try {
      const r = await a.setState(MigState.StopCopy);
      r.dataFd!.close();
      tt.is(await a.state(), MigState.StopCopy, 'closing the data fd leaves the device in STOP_COPY');
      await a.setState(MigState.Stop);
      tt.is(await a.state(), MigState.Stop);
      await a.close();
      a = VfioDevice.open(idA);
      const expected = backend.stateAfterReopen === 'kept' ? MigState.Stop : MigState.Running;
      tt.is(await a.state(), expected, `closed in STOP, reopened in ${stateName(expected)}`);
      // A saving session does not survive the close either way: a new one starts afresh.
      const again = await a.setState(MigState.StopCopy);
      tt.truthy(again.dataFd, 'a new STOP_COPY session and fd after reopen');
      const chunks: Buffer[] = [];
      await readToEnd(again.dataFd!, (c) => void chunks.push(Buffer.from(c)));
      tt.true(Buffer.concat(chunks).length > 0);
      again.dataFd!.close();
    } finally {
      await settle(a);
      await a.close();
    }
  });

  t(label('fd numbers: a closed data fd is EBADF and its number is the next one handed out (lowest free fd)'), async (tt) => {
    await withDevices(async (a) => {
      await a.state(); // a blocking-call thread is up before the numbers are watched
      const first = await a.setState(MigState.StopCopy);
      const n = first.dataFd!.fd;
      first.dataFd!.close();
      await first.dataFd!.released;
      const err = tt.throws(() => sys().ioctl(n, Ioctl.MIG_GET_PRECOPY_INFO, encodePrecopyInfo()), { instanceOf: SysError });
      tt.is(err?.code, 'EBADF', 'an ioctl on the closed number');
      await a.setState(MigState.Stop);
      const second = await a.setState(MigState.StopCopy);
      tt.is(second.dataFd!.fd, n, 'the kernel hands out the lowest free number: the one just closed');
      second.dataFd!.close();
    });
  });

  t(label('requests the layer refuses are refused by the kernel too, sent raw (ERROR, out of range, states outside the flags)'), async (tt) => {
    const flagSets = backend.setFlags ? DEFINED_MIGRATION_FLAG_SETS : [backend.fixedFlags ?? 7];
    const [idA] = backend.pair();
    let probes = 0;
    try {
      for (const flags of flagSets) {
        await backend.setFlags?.(idA, flags);
        const a = VfioDevice.open(idA);
        try {
          tt.is(await a.migrationFlags(), flags);
          const valid = await save(a);
          const supported = supportedStates(flags);
          const outside = [MigState.Error, 8, 9, 0x7fffffff, 0xffffffff, ...[1, 2, 3, 4, 5, 6, 7].filter((s) => !supported.includes(s))];
          for (const from of supported) {
            const setup = await bringTo(a, from, valid);
            await backend.clearArcLog?.(a.name);
            for (const target of outside) {
              if (from === MigState.StopCopy && (target === MigState.PreCopy || target === MigState.PreCopyP2P)) continue; // never sent
              const what = `flags ${flags}: ${stateName(from)} -> ${stateName(target)}`;
              tt.is(await layerAnswer(a, target), 'EINVAL', `${what}: the layer refuses`);
              tt.is(await a.probeRefusal(target), 'EINVAL', `${what}: the kernel refuses it too`);
              tt.is(await a.state(), from, `${what}: the device did not move`);
              probes++;
            }
            if (backend.arcLog) tt.deepEqual(await backend.arcLog(a.name), [], `flags ${flags} from ${stateName(from)}: no arc ran`);
            setup.dataFd?.close();
          }
        } finally {
          await settle(a);
          await a.close();
        }
      }
    } finally {
      await backend.setFlags?.(idA, 7);
    }
    tt.true(probes >= 35, `${probes} raw refusals checked`);
  });

  const walkFlags = backend.setFlags ? DEFINED_MIGRATION_FLAG_SETS : [backend.fixedFlags ?? 7];
  for (const flags of walkFlags) {
    const how = backend.arcLog ? 'walks exactly the arcs fsm.ts predicts' : 'ends where fsm.ts predicts, with a data fd exactly when its last arc opens a session';
    t(label(`flags ${flags}: every (from, to) request ${how}`), async (tt) => {
      const [idA, idB] = backend.pair();
      await backend.setFlags?.(idA, flags);
      await backend.setFlags?.(idB, flags);
      try {
        await withDevices(async (a) => {
          tt.is(await a.migrationFlags(), flags);
          const valid = await save(a); // a stream to feed RESUMING before leaving it
          const states = supportedStates(flags).filter((s) => s !== MigState.Error);
          for (const from of states) {
            for (const to of states) {
              const setup = await bringTo(a, from, valid);
              await backend.clearArcLog?.(a.name);
              const expected = plan(from, to, flags);
              const what = `${stateName(from)} -> ${stateName(to)}`;
              if (!expected.ok) {
                await tt.throwsAsync(a.setState(to), { instanceOf: VfioError }, what);
                if (backend.arcLog) tt.deepEqual(await backend.arcLog(a.name), [], `${what}: refused without an arc`);
                tt.is(await a.state(), from, `${what}: refused, the device did not move`);
              } else {
                const r = await a.setState(to);
                if (backend.arcLog) {
                  const seen = (await backend.arcLog(a.name)).map((x) => `${stateName(x.from)}>${stateName(x.to)}:${x.errno}`);
                  tt.deepEqual(seen, expected.arcs.map((x) => `${stateName(x.from)}>${stateName(x.to)}:0`), what);
                }
                tt.is(await a.state(), to, what);
                const last = expected.arcs[expected.arcs.length - 1];
                const opens = last ? arcOpensSession(last) : undefined;
                tt.is(r.dataFd !== undefined, opens !== undefined, `${what}: a data fd ${opens ? `(${opens})` : 'never'}`);
                if (r.dataFd && opens) tt.is(r.dataFd.kind, opens);
                r.dataFd?.close();
              }
              setup.dataFd?.close();
            }
          }
          await toRunning(a);
        });
      } finally {
        await backend.setFlags?.(idA, 7);
        await backend.setFlags?.(idB, 7);
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
              // ... and not only because the layer says so: the kernel refuses it raw.
              for (const target of [MigState.Running, MigState.Stop]) tt.is(await a.probeRefusal(target), 'EINVAL', `ERROR -> ${stateName(target)} sent raw`);
              tt.is(await a.state(), MigState.Error);
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
