// vfio-mig migrate-devices --device ID... --to TRANSPORT [--qmp SOCKET [--uri URI]]:
// the source engine (src/migration/engine-source.ts) for devices vfio-mig holds. With
// --qmp it coordinates with that QEMU's own migration (pause-before-switchover), started
// here with --uri or joined. Writes a timeline JSON (`vfio-mig report` renders it).
// Exit 0 when the migration completed, 1 when it failed (every source device is back in
// RUNNING and the VM continued: the outcome says what was done), 2 usage.
//
// Also the shared wiring of the engine commands (receive.ts, trial.ts use it): transport
// addresses, authentication options, descriptors, the compatibility check, the outcome.

import { join } from 'node:path';
import { readFileSync } from 'node:fs';
import { parseArgs, UsageError, type ParsedArgs } from './args.ts';
import type { EngineOutcome, EngineTimelineJson } from '../migration/engine.ts';
import type { Endpoint, AuthOptions } from '../migration/transport.ts';
import type { CompatDescriptor } from '../migration/stream.ts';
import type { AcceptVerdict } from '../migration/transfer.ts';

export const usage = 'vfio-mig migrate-devices --device ID... --to unix:PATH|tcp:HOST:PORT|- [--token HEX|--token-file FILE|--tls] [--qmp SOCKET [--uri URI]] [--no-pre-copy] [--timeline FILE] [--json]';

const HELP = [
  `usage: ${usage}`,
  '',
  'Migrates the state of devices vfio-mig holds to `vfio-mig receive` on the destination.',
  'With --qmp, around that QEMU\'s own migration of RAM and vCPUs: pause-before-switchover,',
  'then at pre-switchover (vCPUs stopped) every device RUNNING_P2P, STOP_COPY, streamed in',
  'parallel, committed on the destination, then migrate-continue.',
  '',
  '  --device ID        a PCI address or mdev UUID (repeat; the order pairs with receive\'s --device)',
  '  --to ADDRESS       unix:/path, tcp:host:port, or - (stdout/stdin, e.g. through ssh)',
  '  --token HEX        the 64-hex-digit token `vfio-mig receive` printed (or --token-file FILE, $VFIO_MIG_TOKEN)',
  '  --tls              mutual TLS with libvirt\'s PKI files (/etc/pki/...)',
  '  --qmp SOCKET       the source QEMU\'s QMP socket',
  '  --uri URI          start QEMU\'s migration to URI (without it: join a migration already started)',
  '  --no-pre-copy      do not send state while QEMU iterates (all of it moves after the vCPU stop)',
  '  --timeline FILE    where to write the timeline JSON (default: the state dir\'s timelines/)',
  '  --json             print the outcome as JSON',
  '',
  'exit codes: 0 migrated; 1 failed (source devices RUNNING, VM continued); 2 usage',
  '',
].join('\n');

export const TRANSPORT_OPTIONS = ['token', 'token-file'];

/** `unix:/path`, `tcp:host:port` (IPv6 as tcp:[::1]:port) or `-`. */
export function parseAddress(text: string): Endpoint | 'stdio' {
  if (text === '-') return 'stdio';
  if (text.startsWith('unix:')) {
    const path = text.slice(5);
    if (!path.startsWith('/')) throw new UsageError(`a unix address needs an absolute path: ${JSON.stringify(text)}`);
    return { path };
  }
  const m = /^tcp:(?:\[([0-9a-fA-F:.]+)\]|([A-Za-z0-9.-]+)):(\d{1,5})$/.exec(text);
  if (m) {
    const port = Number(m[3]);
    if (port > 65535) throw new UsageError(`bad port in ${JSON.stringify(text)}`);
    return { host: (m[1] ?? m[2])!, port };
  }
  throw new UsageError(`an address is unix:/path, tcp:host:port or -, not ${JSON.stringify(text)}`);
}

/** --tls / --token / --token-file / $VFIO_MIG_TOKEN. */
export function authOptions(args: ParsedArgs): AuthOptions {
  const out: AuthOptions = {};
  if (args.flags.has('tls')) out.tls = true;
  const token = args.options.get('token')?.at(-1);
  const file = args.options.get('token-file')?.at(-1);
  if (token && file) throw new UsageError('give --token or --token-file, not both');
  if (file) out.token = readFileSync(file, 'utf8').trim();
  else if (token) out.token = token;
  else if (process.env.VFIO_MIG_TOKEN) out.token = process.env.VFIO_MIG_TOKEN;
  return out;
}

export function deviceIds(args: ParsedArgs): string[] {
  const ids = [...(args.options.get('device') ?? [])];
  if (ids.length === 0) throw new UsageError('name at least one --device (PCI address or mdev UUID)');
  if (new Set(ids).size !== ids.length) throw new UsageError('a device is named twice');
  return ids;
}

/** This host's descriptor of a device (src/compat), as the stream carries it. */
export async function describeForStream(id: string): Promise<CompatDescriptor> {
  const { describeDevice } = await import('../compat/descriptor.ts');
  return describeDevice(id) as unknown as CompatDescriptor;
}

/**
 * The receiver's check: src/compat decides (the destination driver's own answer through
 * migration_version where both have one, else the descriptors' rules).
 */
export async function compatAccept(incoming: CompatDescriptor, destination: string): Promise<AcceptVerdict> {
  const { checkCompatibility } = await import('../compat/compatible.ts');
  const v = checkCompatibility(incoming as never, destination);
  return v.compatible ? { ok: true } : { ok: false, reason: `${v.reason} (decided by ${v.decidedBy}${v.errno ? `, ${v.errno}` : ''})` };
}

export async function defaultTimelinePath(side: string): Promise<string> {
  const { stateDir } = await import('../pci/state.ts');
  return join(stateDir(), 'timelines', `${side}-${new Date().toISOString().replace(/[:.]/g, '-')}.json`);
}

export function formatOutcome(o: EngineOutcome): string {
  const lines: string[] = [];
  lines.push(o.ok ? `${o.side}: migration completed${o.bytes !== undefined ? ` (${o.bytes} bytes of device state)` : ''}` : `${o.side}: migration FAILED in phase ${o.phase}: ${o.cause ?? 'unknown cause'}`);
  for (const [d, s] of Object.entries(o.devices)) lines.push(`  device ${d}: ${s}${o.routes?.[d] ? ` <- ${o.routes[d]}` : ''}`);
  if (o.routes) for (const [s, d] of Object.entries(o.routes)) lines.push(`  state of ${s} -> ${d}`);
  if (o.vm) lines.push(`  VM: ${'error' in o.vm ? `unknown (${o.vm.error})` : `${o.vm.status}${o.vm.running ? ' (running)' : ''}`}`);
  for (const r of o.recovery) lines.push(`  recovery: ${r}`);
  return `${lines.join('\n')}\n`;
}

export async function finish(side: string, args: ParsedArgs, outcome: EngineOutcome, timeline: EngineTimelineJson, out: NodeJS.WritableStream, err: NodeJS.WritableStream): Promise<number> {
  const { writeTimeline } = await import('../migration/engine.ts');
  const path = args.options.get('timeline')?.at(-1) ?? (await defaultTimelinePath(side));
  try {
    writeTimeline(path, timeline);
  } catch (e) {
    err.write(`vfio-mig: cannot write the timeline ${path}: ${(e as Error).message}\n`);
  }
  // With --to - stdout carries the stream: the summary goes to stderr then.
  const text = args.flags.has('json') ? `${JSON.stringify({ ...outcome, timeline: path })}\n` : `${formatOutcome(outcome)}  timeline: ${path} (vfio-mig report ${path})\n`;
  out.write(text);
  return outcome.ok ? 0 : 1;
}

export async function run(argv: string[], out: NodeJS.WritableStream, err: NodeJS.WritableStream = process.stderr): Promise<number> {
  const args = parseArgs(argv, { flags: ['help', 'json', 'tls', 'no-pre-copy'], options: ['device', 'to', 'qmp', 'uri', 'timeline', ...TRANSPORT_OPTIONS] });
  if (args.flags.has('help')) {
    out.write(HELP);
    return 0;
  }
  if (args.positional.length) throw new UsageError(`unexpected argument ${JSON.stringify(args.positional[0])}`);
  const ids = deviceIds(args);
  const to = args.options.get('to')?.at(-1);
  if (!to) throw new UsageError('--to ADDRESS is required');
  const address = parseAddress(to);
  const auth = authOptions(args);
  if (address !== 'stdio' && !auth.tls && auth.token === undefined) throw new UsageError('a socket needs --token (the receiver prints one) or --tls');
  const qmpPath = args.options.get('qmp')?.at(-1);
  const uri = args.options.get('uri')?.at(-1);
  if (uri && !qmpPath) throw new UsageError('--uri needs --qmp');
  // stdout is the stream with --to -: everything we say goes to stderr.
  const say = address === 'stdio' ? err : out;

  const { VfioDevice } = await import('../vfio/device.ts');
  const { migrateSource, qmpReconnector } = await import('../migration/engine-source.ts');
  const transport = await import('../migration/transport.ts');
  const devices: import('../vfio/device.ts').VfioDevice[] = [];
  let qmp: import('../qmp/client.ts').QmpClient | undefined;
  try {
    for (const id of ids) devices.push(VfioDevice.open(id));
    if (qmpPath) {
      const { QmpClient } = await import('../qmp/client.ts');
      qmp = await QmpClient.connect({ path: qmpPath }, { connectTimeoutMs: 10_000, commandTimeoutMs: 30_000 });
    }
    const estimates = new Map<string, number>();
    for (const d of devices) {
      // MIG_DATA_SIZE is optional in the uAPI: without it there is no ETA, nothing else.
      const size = await d.dataSize().catch(() => undefined);
      if (size !== undefined && size > 0n) estimates.set(d.name, Number(size));
    }
    const { outcome, timeline } = await migrateSource({
      devices,
      describe: (name) => describeForStream(name),
      connect: async () => (address === 'stdio' ? transport.stdioTransport() : transport.connect(address, auth)),
      ...(qmp && qmpPath ? { vm: { qmp, reconnect: async () => (qmp = await qmpReconnector(qmpPath)()), ...(uri ? { uri } : {}) } } : {}),
      preCopy: !args.flags.has('no-pre-copy'),
      estimates,
      log: (line) => void err.write(`vfio-mig: ${line}\n`),
    });
    return await finish('source', args, outcome, timeline, say, err);
  } finally {
    await qmp?.close().catch(() => undefined);
    // After a completed migration the source devices are in STOP: closing them hands them
    // back to the kernel, which resets them (their state now lives on the destination).
    for (const d of devices) await d.close();
  }
}
