// Moving a device set's state through a vfio-mig state stream: the source writes every
// device's STOP_COPY data into one verified stream; the destination feeds each device's
// data to its RESUMING fd as it arrives, and commits (RESUMING -> STOP -> RUNNING) only
// after every device's checksum matched. A corrupted or truncated stream therefore never
// reaches a commit: the destination devices are reset to RUNNING instead.

import type { Coordinator } from './coordinator.ts';
import { StreamWriter, readStream, StreamError, type DeviceDescriptor } from './stream.ts';
import { readToEnd, writeAll } from '../vfio/data.ts';

/**
 * Source, after coordinator.stopCopy(): streams every device's data, device by device,
 * then moves the devices to STOP. `describe` supplies each device's descriptor. On any
 * error every source device is rolled back to RUNNING and the error thrown.
 */
export async function saveSet(source: Coordinator, describe: (device: string) => DeviceDescriptor, out: (b: Buffer) => void | Promise<void>): Promise<number> {
  const fds = source.dataFds();
  if (fds.size !== source.devices.length) throw new Error(`only ${fds.size} of ${source.devices.length} devices have a saving fd: call stopCopy() first`);
  const w = new StreamWriter(out);
  let bytes = 0;
  try {
    await w.begin(fds.size);
    for (const name of source.devices) {
      await w.beginDevice({ ...describe(name), device: name });
      bytes += await readToEnd(fds.get(name)!, (c) => w.data(c));
      await w.endDevice();
    }
    await w.end();
  } catch (err) {
    // A failed read or a sink that gave up: the source devices are still stopped, so
    // they go back to RUNNING before the error reaches the caller, as in loadSet.
    await source.rollback().catch(() => undefined);
    throw err;
  }
  await source.finishSource();
  return bytes;
}

/**
 * Destination: loads a stream into the coordinator's devices. `route` maps each source
 * device named in the stream to a destination device of `destination`. On any stream or
 * device error every destination device is rolled back to RUNNING and the error thrown.
 */
export async function loadSet(destination: Coordinator, src: AsyncIterable<Buffer> | Iterable<Buffer>, route: (sourceDevice: string, d: DeviceDescriptor) => string): Promise<{ bytes: number; devices: number }> {
  const fds = await destination.beginResume();
  const verified = new Set<string>();
  let bytes = 0;
  const target = new Map<string, string>();
  try {
    for await (const e of readStream(src)) {
      if (e.type === 'device') {
        const dst = route(e.descriptor.device, e.descriptor);
        if (!fds.has(dst)) throw new StreamError(`no destination device ${JSON.stringify(dst)} in this set`, e.descriptor.device);
        if ([...target.values()].includes(dst)) throw new StreamError(`two source devices map to ${dst}`, e.descriptor.device);
        target.set(e.descriptor.device, dst);
      } else if (e.type === 'data') {
        await writeAll(fds.get(target.get(e.device)!)!, e.chunk);
        bytes += e.chunk.length;
      } else if (e.type === 'device-verified') {
        verified.add(target.get(e.device)!);
      }
    }
    const missing = destination.devices.filter((d) => !verified.has(d));
    if (missing.length) throw new StreamError(`the stream has no state for ${missing.join(', ')}`);
  } catch (err) {
    await destination.rollback().catch(() => undefined);
    throw err;
  }
  await destination.completeResume();
  return { bytes, devices: verified.size };
}
