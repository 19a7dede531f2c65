// vfio-mig trial --device ID (--to ADDRESS [--peer-device ID] | --peer-device ID): a
// spare-device trial. The state of an idle device is moved, by the engine, into a spare
// device of the destination (`vfio-mig receive --device SPARE --from ADDRESS` there), or
// into another device of this host with only --peer-device. The verdict is stored as
// compatibility evidence next to the capability cache: <state dir>/trials/<device>.json.
// The trial device is RUNNING again afterwards. Exit 0 the state loaded, 1 it did not.

import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs, UsageError } from './args.ts';
import { authOptions, compatAccept, describeForStream, finish, parseAddress, TRANSPORT_OPTIONS } from './migrate-devices.ts';

export const usage = 'vfio-mig trial --device ID (--to unix:PATH|tcp:HOST:PORT|- [--token HEX|--tls] [--peer-device ID] | --peer-device ID) [--json]';

const HELP = [
  `usage: ${usage}`,
  '',
  "Proves that an idle device's state loads on a spare device before a VM is risked, and",
  'stores the verdict as evidence in the state dir (trials/<device>.json).',
  '',
  '  --device ID        the idle source device',
  '  --to ADDRESS       a `vfio-mig receive --device SPARE` on the destination',
  '  --peer-device ID   the spare device (recorded; alone: a spare on this host, no transport)',
  '',
  'exit codes: 0 the state loaded; 1 it did not (the reason is printed and stored); 2 usage',
  '',
].join('\n');

export interface TrialEvidence {
  schema: 1;
  device: string;
  peer: { address?: string; device?: string };
  ok: boolean;
  cause?: string;
  bytes?: number;
  at: string;
  descriptor: unknown;
}

export async function trialEvidencePath(device: string): Promise<string> {
  const { stateDir } = await import('../pci/state.ts');
  const { parseDeviceId, deviceIdString } = await import('../host/sysfs.ts');
  // The name becomes a path: only a validated PCI address or mdev UUID gets there.
  return join(stateDir(), 'trials', `${deviceIdString(parseDeviceId(device))}.json`);
}

export async function run(argv: string[], out: NodeJS.WritableStream, err: NodeJS.WritableStream = process.stderr): Promise<number> {
  const args = parseArgs(argv, { flags: ['help', 'json', 'tls'], options: ['device', 'to', 'peer-device', 'timeline', ...TRANSPORT_OPTIONS] });
  if (args.flags.has('help')) {
    out.write(HELP);
    return 0;
  }
  const ids = args.options.get('device') ?? [];
  if (ids.length !== 1) throw new UsageError('name exactly one --device');
  const device = ids[0]!;
  const to = args.options.get('to')?.at(-1);
  const peerDevice = args.options.get('peer-device')?.at(-1);
  if (!to && !peerDevice) throw new UsageError('give --to ADDRESS (a receiver) or --peer-device ID (a spare on this host)');
  const path = await trialEvidencePath(device).catch((e: Error) => {
    throw new UsageError(e.message);
  });
  const descriptor = await describeForStream(device);
  let evidence: TrialEvidence;
  let code: number;
  if (!to) {
    // Both devices here: the same engines, connected by an in-process pipe.
    const { VfioDevice } = await import('../vfio/device.ts');
    const { migrateSource } = await import('../migration/engine-source.ts');
    const { receiveDestination } = await import('../migration/engine-destination.ts');
    const { mergeTimelines } = await import('../migration/engine.ts');
    const { recoverToRunning } = await import('../migration/recover.ts');
    const { streamTransport } = await import('../migration/transport.ts');
    const { PassThrough } = await import('node:stream');
    const toPeer = new PassThrough();
    const toUs = new PassThrough();
    const src = VfioDevice.open(device);
    let dst: import('../vfio/device.ts').VfioDevice | undefined;
    try {
      dst = VfioDevice.open(peerDevice!);
      const peer = dst.name;
      const log = (line: string) => void err.write(`vfio-mig: ${line}\n`);
      const [so, de] = await Promise.all([
        migrateSource({ devices: [src], describe: () => descriptor, connect: async () => streamTransport(toUs, toPeer, peer), log }),
        receiveDestination({ devices: [dst], accept: async () => streamTransport(toPeer, toUs, src.name), route: () => peer, check: (incoming, d) => compatAccept(incoming, d), log }),
      ]);
      const back = await recoverToRunning(src);
      if (!back.ok) so.outcome.recovery.push(`the trial device is left in ${back.state}: ${back.error ?? ''}`);
      const outcome = so.outcome.ok && !de.outcome.ok ? { ...de.outcome, side: 'source' as const } : so.outcome;
      evidence = { schema: 1, device, peer: { device: peerDevice! }, ok: so.outcome.ok && de.outcome.ok, ...(outcome.cause ? { cause: outcome.cause } : {}), ...(de.outcome.bytes !== undefined ? { bytes: de.outcome.bytes } : {}), at: new Date().toISOString(), descriptor };
      code = await finish('trial', args, { ...outcome, ok: evidence.ok }, mergeTimelines(so.timeline, de.timeline), out, err);
    } catch (e) {
      evidence = { schema: 1, device, peer: { device: peerDevice! }, ok: false, cause: (e as Error).message, at: new Date().toISOString(), descriptor };
      out.write(`trial: FAILED: ${evidence.cause}\n`);
      code = 1;
    } finally {
      await src.close();
      await dst?.close();
    }
  } else {
    const address = parseAddress(to);
    const auth = authOptions(args);
    if (address !== 'stdio' && !auth.tls && auth.token === undefined) throw new UsageError('a socket needs --token (the receiver prints one) or --tls');
    const { VfioDevice } = await import('../vfio/device.ts');
    const { migrateSource } = await import('../migration/engine-source.ts');
    const { recoverToRunning } = await import('../migration/recover.ts');
    const transport = await import('../migration/transport.ts');
    const dev = VfioDevice.open(device);
    try {
      const { outcome, timeline } = await migrateSource({
        devices: [dev],
        describe: () => descriptor,
        connect: async () => (address === 'stdio' ? transport.stdioTransport() : transport.connect(address, auth)),
        log: (line) => void err.write(`vfio-mig: ${line}\n`),
      });
      // A spare stays with us: back to RUNNING (a completed trial left it in STOP).
      const back = await recoverToRunning(dev);
      if (!back.ok) outcome.recovery.push(`the trial device is left in ${back.state}: ${back.error ?? ''}`);
      evidence = { schema: 1, device, peer: { address: to, ...(peerDevice ? { device: peerDevice } : {}) }, ok: outcome.ok, ...(outcome.cause ? { cause: outcome.cause } : {}), ...(outcome.bytes !== undefined ? { bytes: outcome.bytes } : {}), at: new Date().toISOString(), descriptor };
      code = await finish('trial', args, outcome, timeline, address === 'stdio' ? err : out, err);
    } finally {
      await dev.close();
    }
  }
  try {
    mkdirSync(join(path, '..'), { recursive: true });
    writeFileSync(path, `${JSON.stringify(evidence, null, 2)}\n`);
    (to && parseAddress(to) === 'stdio' ? err : out).write(`trial evidence: ${path}\n`);
  } catch (e) {
    err.write(`vfio-mig trial: cannot store the evidence ${path}: ${(e as Error).message}\n`);
  }
  return code;
}
