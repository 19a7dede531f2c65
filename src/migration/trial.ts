// Trial migration of device state between two idle VFIO devices of the same type:
// save the source (directly in STOP_COPY, or through PRE_COPY first), load it into the
// destination (RESUMING -> STOP validates it), and put both back to RUNNING. It proves
// a source's state loads on a destination device before a VM is risked, and is what
// `npm run demo` shows. On any failure both devices are returned to RUNNING by the
// one recovery policy (src/migration/recover.ts).

import { VfioDevice } from '../vfio/device.ts';
import { readToEnd, readAvailable, writeAll, type Sink } from '../vfio/data.ts';
import { MigState } from '../vfio/uapi.ts';
import { MigrationFlag } from '../vfio/uapi.ts';
import { recoverToRunning, type RecoveryOutcome } from './recover.ts';

export type SaveVia = 'stop-copy' | 'pre-copy';

/** Saves the whole device state; the device is back in RUNNING afterwards. */
export async function saveState(dev: VfioDevice, via: SaveVia = 'stop-copy', sink?: Sink): Promise<Buffer> {
  const chunks: Buffer[] = [];
  const collect: Sink = async (c) => {
    chunks.push(Buffer.from(c));
    await sink?.(c);
  };
  const first = await dev.setState(via === 'pre-copy' ? MigState.PreCopy : MigState.StopCopy);
  const f = first.dataFd;
  if (!f) throw new Error(`${dev.name}: no data fd from ${via === 'pre-copy' ? 'PRE_COPY' : 'STOP_COPY'}`);
  try {
    if (via === 'pre-copy') {
      await readAvailable(f, collect);
      await dev.setState(MigState.StopCopy);
    }
    await readToEnd(f, collect);
    await dev.setState(MigState.Stop);
  } finally {
    f.close();
  }
  await dev.setState(MigState.Running);
  return Buffer.concat(chunks);
}

/** Loads a saved state; the device is RUNNING with the new state afterwards. */
export async function restoreState(dev: VfioDevice, stream: Buffer | Iterable<Buffer>): Promise<number> {
  const r = await dev.setState(MigState.Resuming);
  const f = r.dataFd;
  if (!f) throw new Error(`${dev.name}: no data fd from RESUMING`);
  let bytes: number;
  try {
    bytes = await writeAll(f, stream);
    await dev.setState(MigState.Stop);
  } finally {
    f.close();
  }
  await dev.setState(MigState.Running);
  return bytes;
}

export interface TrialResult {
  source: string;
  destination: string;
  via: SaveVia;
  bytes: number;
  saveMs: number;
  restoreMs: number;
  /** The destination re-saved exactly the bytes it was given (idle devices only). */
  verified: boolean;
}

export async function trialMigrate(sourceId: string, destinationId: string, opts: { via?: SaveVia; verify?: boolean } = {}): Promise<TrialResult> {
  const src = VfioDevice.open(sourceId);
  let dst: VfioDevice | undefined;
  try {
    dst = VfioDevice.open(destinationId);
    const flags = await src.migrationFlags();
    const dstFlags = await dst.migrationFlags();
    if (flags !== dstFlags) throw new Error(`migration flags differ: ${src.name} has ${flags}, ${dst.name} has ${dstFlags}`);
    const via = opts.via ?? (flags & MigrationFlag.PRE_COPY ? 'pre-copy' : 'stop-copy');
    const t0 = performance.now();
    const stream = await saveState(src, via);
    const t1 = performance.now();
    await restoreState(dst, stream);
    const t2 = performance.now();
    // Re-save the same way: a stream may record how it was taken (edu marks PRE_COPY).
    const verified = opts.verify === false ? false : (await saveState(dst, via)).equals(stream);
    return { source: src.name, destination: dst.name, via, bytes: stream.length, saveMs: t1 - t0, restoreMs: t2 - t1, verified };
  } catch (err) {
    // Both devices back to RUNNING by the one recovery policy (a destination caught in
    // RESUMING is reset, never committed); what recovery could not fix is named.
    const outcomes: RecoveryOutcome[] = [await recoverToRunning(src)];
    if (dst) outcomes.push(await recoverToRunning(dst));
    const bad = outcomes.filter((o) => !o.ok);
    if (bad.length && err instanceof Error) {
      err.message += `; recovery incomplete: ${bad.map((o) => `${o.device} left in ${o.state}${o.error ? ` (${o.error})` : ''}`).join('; ')}`;
    }
    throw err;
  } finally {
    await src.close();
    await dst?.close();
  }
}
