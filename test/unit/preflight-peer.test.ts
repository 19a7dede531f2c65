// Reaching the destination's vfio-mig: which route a libvirt URI takes, the ssh argv (no
// shell on this side, strict host and user names), the time bound, the facts' schema
// gate, and the source descriptors travelling on stdin.
import test from 'ava';
import { chmodSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { destinationFacts, peerCommandFromEnv, routeFor, runBounded, sshArgv, PeerUriError } from '../../src/compat/preflight/peer.ts';
import { HOST_FACTS_SCHEMA, HostFactsError, parseHostFacts, type HostFacts } from '../../src/compat/preflight/facts.ts';

const dir = mkdtempSync(join(tmpdir(), 'vfio-mig-peer-'));
test.after.always(() => rmSync(dir, { recursive: true, force: true }));

const FACTS: HostFacts = {
  schema: HOST_FACTS_SCHEMA,
  hostname: 'dst',
  collectedAt: '2026-12-05T00:00:00.000Z',
  kernel: { release: '6.12.95+deb12-amd64' },
  kernelConfig: { source: '/boot/config-6.12.95+deb12-amd64', iommufdDriver: false },
  libvirt: { version: '11.3.0' },
  qemu: { version: '10.0.2' },
  devices: [{ id: '0000:5e:00.2', kind: 'pci', driver: 'mlx5_vfio_pci', iommuGroup: 7, inUse: false, capabilities: { ok: true, flags: ['STOP_COPY', 'P2P'], stopCopyBytes: 4096 } }],
  compatibility: [],
};

const noLocal = async (): Promise<HostFacts> => {
  throw new Error('not local');
};

test('routes: ssh URIs go over ssh, local URIs in-process, tcp/tls elsewhere need a command or a file', (t) => {
  t.deepEqual(routeFor('qemu+ssh://root@dst.example.org:2222/system?keyfile=/root/.ssh/id_ed25519'), { kind: 'ssh', host: 'dst.example.org', user: 'root', port: 2222, keyfile: '/root/.ssh/id_ed25519' });
  t.deepEqual(routeFor('qemu+ssh://10.1.2.3/system'), { kind: 'ssh', host: '10.1.2.3' });
  t.deepEqual(routeFor('qemu+ssh://root@[fd00::2]/system'), { kind: 'ssh', host: 'fd00::2', user: 'root' });
  t.deepEqual(routeFor('qemu:///system'), { kind: 'local' });
  t.deepEqual(routeFor('qemu+unix:///system?socket=/tmp/vfio-mig-lv-x/B/run/libvirt-sock'), { kind: 'local' });
  t.is(routeFor('qemu+tcp://10.77.77.2/system').kind, 'unreachable');
  t.regex((routeFor('qemu+tls://dst/system') as { reason: string }).reason, /--dest-facts/);
  t.deepEqual(routeFor('qemu+tcp://10.77.77.2/system', ['ip', 'netns', 'exec', 'nsB', 'vfio-mig']), { kind: 'command', argv: ['ip', 'netns', 'exec', 'nsB', 'vfio-mig'] });
});

test('hostile ssh hosts, users and key files are refused before anything runs', (t) => {
  for (const uri of [
    'qemu+ssh://-oProxyCommand=touch%20x/system',
    'qemu+ssh://root@-oProxyCommand=x/system',
    'qemu+ssh://ro%20ot@dst/system',
    'qemu+ssh://-l@dst/system',
    'qemu+ssh://dst/system?keyfile=relative/key',
    'qemu+ssh://dst/system?keyfile=/k%20-oX',
    'not a uri',
  ]) {
    t.throws(() => routeFor(uri), { instanceOf: PeerUriError }, uri);
  }
});

test('ssh argv: BatchMode, a connect time bound, options before "--", the host after it, constant remote words', (t) => {
  const argv = sshArgv({ kind: 'ssh', host: 'dst', user: 'root', port: 2222 }, 10, {});
  t.deepEqual(argv, ['ssh', '-o', 'BatchMode=yes', '-o', 'ConnectTimeout=10', '-p', '2222', '-l', 'root', '--', 'dst', 'vfio-mig', 'host-facts', '--json', '--sources', '-']);
  t.is(sshArgv({ kind: 'ssh', host: 'dst' }, 10, { VFIO_MIG_REMOTE_COMMAND: '/opt/vfio-mig/bin/vfio-mig' })[7], '/opt/vfio-mig/bin/vfio-mig');
  t.throws(() => sshArgv({ kind: 'ssh', host: 'dst' }, 10, { VFIO_MIG_REMOTE_COMMAND: 'vfio-mig; reboot' }), { instanceOf: PeerUriError });
});

test('the peer command from the environment must be a JSON list of strings', (t) => {
  t.is(peerCommandFromEnv({}), undefined);
  t.deepEqual(peerCommandFromEnv({ VFIO_MIG_PEER_COMMAND: '["ip","netns","exec","nsB","vfio-mig"]' }), ['ip', 'netns', 'exec', 'nsB', 'vfio-mig']);
  t.throws(() => peerCommandFromEnv({ VFIO_MIG_PEER_COMMAND: 'ip netns exec nsB vfio-mig' }), { instanceOf: PeerUriError });
  t.throws(() => peerCommandFromEnv({ VFIO_MIG_PEER_COMMAND: '[]' }), { instanceOf: PeerUriError });
});

test.serial('over ssh (a stand-in ssh on PATH): the descriptors go on stdin, the facts come back parsed', async (t) => {
  const bin = join(dir, 'bin');
  mkdirSync(bin, { recursive: true });
  const log = join(dir, 'ssh.log');
  writeFileSync(
    join(bin, 'ssh'),
    `#!/bin/sh\nprintf '%s\\n' "$@" > ${log}\ncat > ${log}.stdin\ncat <<'EOF'\n${JSON.stringify(FACTS)}\nEOF\n`,
  );
  chmodSync(join(bin, 'ssh'), 0o755);
  const path = process.env.PATH;
  process.env.PATH = `${bin}:${path}`;
  try {
    const r = await destinationFacts({ uri: 'qemu+ssh://root@dst/system', queries: [{ key: 'hostdev0', descriptor: { id: '0000:3b:00.2' } }], local: noLocal, command: undefined });
    t.is(r.error, undefined);
    t.is(r.via, 'ssh root@dst');
    t.deepEqual(r.facts, FACTS);
    t.deepEqual(readFileSync(log, 'utf8').trim().split('\n').slice(-7), ['--', 'dst', 'vfio-mig', 'host-facts', '--json', '--sources', '-']);
    t.deepEqual(JSON.parse(readFileSync(`${log}.stdin`, 'utf8')), { sources: [{ key: 'hostdev0', descriptor: { id: '0000:3b:00.2' } }] });
  } finally {
    process.env.PATH = path;
  }
});

test('through a configured command: argv only (no shell), the destination URI appended; failures are one line', async (t) => {
  const script = join(dir, 'facts.mjs');
  writeFileSync(
    script,
    `let s='';process.stdin.on('data',c=>s+=c).on('end',()=>{const q=JSON.parse(s);const f=${JSON.stringify(FACTS)};f.hostname=process.argv.slice(2).join(' ');f.compatibility=q.sources.map(x=>({key:x.key,candidates:[]}));process.stdout.write(JSON.stringify(f))});`,
  );
  const r = await destinationFacts({ uri: 'qemu+tcp://10.77.77.2/system', queries: [{ key: 'hostdev0', descriptor: {} }], local: noLocal, command: [process.execPath, script] });
  t.is(r.error, undefined);
  t.is(r.facts!.hostname, 'host-facts --json --sources - --uri qemu+tcp://10.77.77.2/system');
  t.deepEqual(r.facts!.compatibility, [{ key: 'hostdev0', candidates: [] }]);
  const failing = await destinationFacts({ uri: 'qemu:///system', queries: [], local: noLocal, command: [process.execPath, '-e', 'console.error("vfio-mig: command not found"); process.exit(127)'] });
  t.regex(failing.error!, /host-facts failed: vfio-mig: command not found/);
  const garbage = await destinationFacts({ uri: 'qemu:///system', queries: [], local: noLocal, command: [process.execPath, '-e', 'console.log("Welcome to dst!")'] });
  t.regex(garbage.error!, /host facts: not JSON/);
  const missing = await destinationFacts({ uri: 'qemu:///system', queries: [], local: noLocal, command: [join(dir, 'no-such-binary')] });
  t.regex(missing.error!, /cannot run/);
});

test('a destination that does not answer is cut off at the time bound', async (t) => {
  const start = Date.now();
  const r = await destinationFacts({ uri: 'qemu:///system', queries: [], local: noLocal, command: [process.execPath, '-e', 'setTimeout(() => {}, 60000)'], timeoutMs: 500 });
  t.regex(r.error!, /did not answer within 500 ms/);
  t.true(Date.now() - start < 5000);
  await t.throwsAsync(runBounded([process.execPath, '-e', 'setTimeout(() => {}, 60000)'], '', 200), { message: /within 200 ms/ });
});

test('local URIs are answered in-process; --dest-facts reads a saved file', async (t) => {
  const local = await destinationFacts({ uri: 'qemu:///system', queries: [], local: async () => FACTS });
  t.is(local.via, 'local');
  t.is(local.facts!.hostname, 'dst');
  writeFileSync(join(dir, 'facts.json'), JSON.stringify(FACTS));
  const file = await destinationFacts({ uri: 'qemu+tcp://x/system', queries: [], local: noLocal, factsFile: join(dir, 'facts.json') });
  t.deepEqual(file.facts, FACTS);
  const unreachable = await destinationFacts({ uri: 'qemu+tcp://x/system', queries: [], local: noLocal, command: undefined });
  t.regex(unreachable.error!, /not ssh/);
});

test('host facts from another machine pass the schema gate or are refused', (t) => {
  t.deepEqual(parseHostFacts(JSON.stringify(FACTS)), FACTS);
  t.throws(() => parseHostFacts('[]'), { instanceOf: HostFactsError });
  t.throws(() => parseHostFacts({ ...FACTS, schema: undefined }), { message: /no schema/ });
  t.throws(() => parseHostFacts({ ...FACTS, schema: 'vfio-mig/host-facts/2' }), { message: /same vfio-mig version/ });
  t.throws(() => parseHostFacts({ ...FACTS, devices: [{ ...FACTS.devices[0], id: '../../etc' }] }), { message: /bad device id/ });
  t.throws(() => parseHostFacts({ ...FACTS, devices: 'all' }), { message: /devices is not a list/ });
  // Unknown members are dropped, odd flag names filtered, wrong types become unknown.
  const odd = parseHostFacts({ ...FACTS, extra: 1, kernelConfig: { iommufdDriver: 'yes' }, devices: [{ ...FACTS.devices[0], capabilities: { ok: true, flags: ['STOP_COPY', '<script>'], stopCopyBytes: -1 } }] });
  t.is(odd.kernelConfig.iommufdDriver, null);
  t.deepEqual(odd.devices[0]!.capabilities, { ok: true, flags: ['STOP_COPY'], stopCopyBytes: null });
  t.false('extra' in odd);
});
