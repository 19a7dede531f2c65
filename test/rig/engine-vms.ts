// Helpers for the engine inside the rig guest (test/rig/engine.test.ts, the demo): a pair
// of minimal nested QEMU 10 VMs with no OS and no VFIO device (vfio-mig holds the devices
// next to them; QEMU migrates only RAM and vCPU state), and one engine migration between
// two device sets over a token-authenticated unix socket, both sides in this process.

import { spawn, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { QmpClient } from '../../src/qmp/client.ts';
import { connectStartingQemu } from './qmp-start.ts';
import { listen, connect, newToken, type Transport } from '../../src/migration/transport.ts';
import { migrateSource, qmpReconnector, type SourceOptions, type SourceResult } from '../../src/migration/engine-source.ts';
import { receiveDestination, type DestinationOptions, type DestinationResult } from '../../src/migration/engine-destination.ts';
import { mergeTimelines, type EngineTimelineJson } from '../../src/migration/engine.ts';
import type { MigrationDevice } from '../../src/migration/coordinator.ts';
import { compatAccept, describeForStream } from '../../src/cli/migrate-devices.ts';

const QEMU = process.env.VFIO_MIG_QEMU ?? 'qemu-system-x86_64';

export interface EngineVm {
  name: string;
  proc: ChildProcess;
  qmpPath: string;
  qmp: QmpClient;
  exited: Promise<number | string>;
  log(): string;
  stop(): Promise<void>;
}

/** One minimal VM: q35, 64 MiB, no OS, TCG, one QMP socket. */
export async function startVm(dir: string, name: string, extra: string[] = []): Promise<EngineVm> {
  const qmpPath = join(dir, `${name}.qmp`);
  const args = ['-name', name, '-machine', 'q35', '-nodefaults', '-no-user-config', '-accel', 'tcg', '-m', '64', '-smp', '1', '-display', 'none', '-qmp', `unix:${qmpPath},server=on,wait=off`, ...extra];
  const proc = spawn(QEMU, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | string>((resolve) => proc.on('exit', (code, signal) => resolve(code ?? signal ?? -1)));
  let gone = false;
  void exited.then(() => (gone = true));
  let qmp: QmpClient;
  try {
    qmp = await connectStartingQemu(name, qmpPath, { gone: () => gone, stderr: () => stderr });
  } catch (err) {
    // Not left running when the start fails (nobody else holds this process yet).
    if (!gone) proc.kill('SIGKILL');
    await exited;
    throw err;
  }
  const vm: EngineVm = {
    name,
    proc,
    qmpPath,
    qmp,
    exited,
    log: () => stderr,
    async stop() {
      await vm.qmp.close().catch(() => undefined);
      if (gone) return;
      proc.kill('SIGTERM');
      const timer = setTimeout(() => proc.kill('SIGKILL'), 5_000);
      await exited;
      clearTimeout(timer);
    },
  };
  return vm;
}

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
