// Helpers for the engine inside the rig guest (test/rig/engine.test.ts, the demo): a pair
// of minimal nested QEMU 10 VMs with no OS and no VFIO device (vfio-mig holds the devices
// next to them; QEMU migrates only RAM and vCPU state), and one engine migration between
// two device sets over a token-authenticated unix socket, both sides in this process.

import { join } from 'node:path';
import { startVm, type NestedVm } from './nested-qemu.ts';
import { listen, connect, newToken, type Transport } from '../../src/migration/transport.ts';
import { migrateSource, qmpReconnector, type SourceOptions, type SourceResult } from '../../src/migration/engine-source.ts';
import { receiveDestination, type DestinationOptions, type DestinationResult } from '../../src/migration/engine-destination.ts';
import { mergeTimelines, type EngineTimelineJson } from '../../src/migration/engine.ts';
import type { MigrationDevice } from '../../src/migration/coordinator.ts';
import { compatAccept, describeForStream } from '../../src/cli/migrate-devices.ts';

export type EngineVm = NestedVm;

/** Source running; destination waiting with -incoming defer. */
export async function startVmPair(dir: string): Promise<{ src: EngineVm; dst: EngineVm; ramUri: string }> {
  const src = await startVm(dir, 'src');
  let dst: EngineVm;
  try {
    dst = await startVm(dir, 'dst', ['-incoming', 'defer']);
  } catch (err) {
    await src.stop();
    throw err;
  }
  return { src, dst, ramUri: `unix:${join(dir, 'ram.sock')}` };
}

export interface EngineRun {
  source: SourceResult;
  destination: DestinationResult;
  merged: EngineTimelineJson;
}

/**
 * One migration: the destination engine listens on a unix socket (token), the source
 * connects. `vms` makes it QMP-coordinated (QEMU's RAM over vms.ramUri).
 */
export async function runEngines(opts: {
  dir: string;
  source: readonly MigrationDevice[];
  destination: readonly MigrationDevice[];
  vms?: { src: EngineVm; dst: EngineVm; ramUri: string };
  sourceExtra?: Partial<SourceOptions>;
  destinationExtra?: Partial<DestinationOptions>;
  /** Wraps the source's transport (tests corrupt or cut the stream here). */
  wrap?: (t: Transport) => Transport;
  log?: (line: string) => void;
}): Promise<EngineRun> {
  const token = newToken();
  const path = join(opts.dir, `state-${Date.now()}-${Math.random().toString(16).slice(2)}.sock`);
  const listener = await listen({ path }, { token });
  const dstNames = opts.destination.map((d) => d.name);
  let next = 0;
  let ready!: () => void;
  const validated = new Promise<void>((resolve) => (ready = resolve));
  const userHook = opts.destinationExtra?.onPhase;
  try {
    const destination = receiveDestination({
      devices: opts.destination,
      accept: () => listener.accept(),
      route: () => dstNames[next++]!,
      check: (incoming, dst) => compatAccept(incoming, dst),
      ...(opts.vms ? { vm: { qmp: opts.vms.dst.qmp, uri: opts.vms.ramUri } } : {}),
      ...(opts.log ? { log: opts.log } : {}),
      ...opts.destinationExtra,
      onPhase: async (p) => {
        if (p === 'validated') ready();
        await userHook?.(p);
      },
    });
    // The destination listens for QEMU's RAM (migrate-incoming) before the source sends it.
    await Promise.race([validated, destination]);
    const source = migrateSource({
      devices: opts.source,
      describe: (name) => describeForStream(name),
      connect: async () => {
        const t = await connect({ path }, { token });
        return opts.wrap ? opts.wrap(t) : t;
      },
      ...(opts.vms ? { vm: { qmp: opts.vms.src.qmp, reconnect: qmpReconnector(opts.vms.src.qmpPath), uri: opts.vms.ramUri } } : {}),
      ...(opts.log ? { log: opts.log } : {}),
      ...opts.sourceExtra,
    });
    const [s, d] = await Promise.all([source, destination]);
    return { source: s, destination: d, merged: mergeTimelines(s.timeline, d.timeline) };
  } finally {
    await listener.close().catch(() => undefined);
  }
}
