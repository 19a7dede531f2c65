// vfio-mig receive --device ID... --from TRANSPORT [--qmp SOCKET [--uri URI]]: the
// destination engine (src/migration/engine-destination.ts). It listens (or reads stdin
// with --from -), checks each incoming descriptor against its destination device with
// src/compat while every device still runs, loads and verifies the state, and with
// --qmp keeps that QEMU (started with -incoming) paused until the devices run, then
// sends `cont`. Writes a timeline JSON. Exit 0 completed, 1 failed (devices reset, VM
// not continued), 2 usage.

import { parseArgs, UsageError } from './args.ts';
import { authOptions, compatAccept, deviceIds, finish, parseAddress, TRANSPORT_OPTIONS } from './migrate-devices.ts';

export const usage = 'vfio-mig receive --device ID... --from unix:PATH|tcp:HOST:PORT|- [--token HEX|--token-file FILE|--tls] [--map SRC=DST...] [--qmp SOCKET [--uri URI] [--no-cont]] [--timeline FILE] [--json]';

const HELP = [
  `usage: ${usage}`,
  '',
  'Receives device state from `vfio-mig migrate-devices` into devices vfio-mig holds.',
  'Without --token or --tls on a socket, a fresh token is made and printed on stderr.',
  '',
  '  --device ID        destination device (repeat); the n-th takes the n-th source device',
  '  --map SRC=DST      route a source device to a destination device by name instead',
  '  --from ADDRESS     unix:/path, tcp:host:port (listen), or - (stdin/stdout)',
  '  --qmp SOCKET       the destination QEMU (started with -incoming defer or -incoming URI)',
  '  --uri URI          send migrate-incoming URI first',
  '  --no-cont          leave the VM paused after the migration',
  '  --timeline FILE    where to write the timeline JSON (default: the state dir\'s timelines/)',
  '',
  'exit codes: 0 received, devices running (VM continued); 1 failed (devices reset); 2 usage',
  '',
].join('\n');

export async function run(argv: string[], out: NodeJS.WritableStream, err: NodeJS.WritableStream = process.stderr): Promise<number> {
  const args = parseArgs(argv, { flags: ['help', 'json', 'tls', 'no-cont'], options: ['device', 'from', 'qmp', 'uri', 'map', 'timeline', ...TRANSPORT_OPTIONS] });
  if (args.flags.has('help')) {
    out.write(HELP);
    return 0;
  }
  if (args.positional.length) throw new UsageError(`unexpected argument ${JSON.stringify(args.positional[0])}`);
  const ids = deviceIds(args);
  const from = args.options.get('from')?.at(-1);
  if (!from) throw new UsageError('--from ADDRESS is required');
  const address = parseAddress(from);
  const auth = authOptions(args);
  const qmpPath = args.options.get('qmp')?.at(-1);
  const uri = args.options.get('uri')?.at(-1);
  if ((uri || args.flags.has('no-cont')) && !qmpPath) throw new UsageError('--uri and --no-cont need --qmp');
  const map = new Map<string, string>();
  for (const m of args.options.get('map') ?? []) {
    const [s, d] = m.split('=');
    if (!s || !d) throw new UsageError(`--map takes SRC=DST, not ${JSON.stringify(m)}`);
    map.set(s, d);
  }
  const say = address === 'stdio' ? err : out;

  const { VfioDevice } = await import('../vfio/device.ts');
  const { receiveDestination } = await import('../migration/engine-destination.ts');
  const transport = await import('../migration/transport.ts');
  if (address !== 'stdio' && !auth.tls && auth.token === undefined) {
    auth.token = transport.newToken();
    err.write(`vfio-mig receive: token ${auth.token as string} (give it to migrate-devices --token)\n`);
  }
  const devices: import('../vfio/device.ts').VfioDevice[] = [];
  let qmp: import('../qmp/client.ts').QmpClient | undefined;
  let listener: import('../migration/transport.ts').Listener | undefined;
  try {
    for (const id of ids) devices.push(VfioDevice.open(id));
    if (qmpPath) {
      const { QmpClient } = await import('../qmp/client.ts');
      qmp = await QmpClient.connect({ path: qmpPath }, { connectTimeoutMs: 10_000, commandTimeoutMs: 30_000 });
    }
    if (address !== 'stdio') {
      listener = await transport.listen(address, { ...auth, acceptTimeoutMs: 600_000 });
      err.write(`vfio-mig receive: listening on ${from}\n`);
    }
    let next = 0;
    const names = devices.map((d) => d.name);
    const { outcome, timeline } = await receiveDestination({
      devices,
      accept: async () => (listener ? listener.accept() : transport.stdioTransport()),
      route: (src) => map.get(src) ?? names[next++] ?? `(no destination device left for ${src})`,
      check: (incoming, dst) => compatAccept(incoming, dst),
      ...(qmp ? { vm: { qmp, ...(uri ? { uri } : {}), ...(args.flags.has('no-cont') ? { noCont: true } : {}) } } : {}),
      log: (line) => void err.write(`vfio-mig: ${line}\n`),
    });
    return await finish('destination', args, outcome, timeline, say, err);
  } finally {
    await listener?.close().catch(() => undefined);
    await qmp?.close().catch(() => undefined);
    for (const d of devices) await d.close();
  }
}
