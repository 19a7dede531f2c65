// The libvirt form of `vfio-mig watch` without a daemon: decoding libvirt's typed
// parameters, job statistics in query-migrate's names (figures as libvirt 11.3 returned
// them in test/libvirt/watch.test.ts runs), the final-status decision, the VFIO devices of
// a domain XML, and the CLI's input checks. The real migrations are test/libvirt/watch.test.ts.
import test from 'ava';
import { decodeTypedParams, encodeTypedParams, TypedParamError, TypedParamType as T, TYPED_PARAM_SIZE } from '../../src/libvirt/typed-params.ts';
import { asQueryMigrate, JobType, parseJobStats, type JobStats } from '../../src/libvirt/job-stats.ts';
import { migrationOutcome, runStateName, vfioDevicesFromXml } from '../../src/cli/watch-libvirt.ts';
import { finishWatch } from '../../src/cli/watch-common.ts';
import { main } from '../../src/cli/main.ts';

const strings = new Map<bigint, string>([[0x1000n, 'operation aborted: job cancelled by client']]);
const readString = (p: bigint): string => {
  const s = strings.get(p);
  if (s === undefined) throw new Error(`no string at ${p}`);
  return s;
};

test('typed parameters: every type decodes from libvirt\'s 96-byte layout', (t) => {
  const buf = encodeTypedParams([
    { field: 'operation', type: T.INT, value: 5 },
    { field: 'u', type: T.UINT, value: 0xfffffff0 },
    { field: 'l', type: T.LLONG, value: -5n },
    { field: 'time_elapsed', type: T.ULLONG, value: 14247n },
    { field: 'd', type: T.DOUBLE, value: 1.5 },
    { field: 'success', type: T.BOOLEAN, value: true },
    { field: 'errmsg', type: T.STRING, value: 0x1000n },
    { field: 'empty', type: T.STRING, value: 0n },
  ]);
  t.is(buf.length, 8 * TYPED_PARAM_SIZE);
  const m = decodeTypedParams(buf, 8, readString);
  t.deepEqual(Object.fromEntries(m), { operation: 5, u: 0xfffffff0, l: -5, time_elapsed: 14247, d: 1.5, success: true, errmsg: 'operation aborted: job cancelled by client', empty: '' });
});

test('typed parameters: a short buffer, a bad count or an unterminated name are errors; an unknown type is skipped', (t) => {
  const buf = encodeTypedParams([{ field: 'a', type: T.INT, value: 1 }, { field: 'b', type: 99, value: 0 }]);
  t.deepEqual([...decodeTypedParams(buf, 2, readString).keys()], ['a']);
  t.throws(() => decodeTypedParams(buf, 3, readString), { instanceOf: TypedParamError });
  t.throws(() => decodeTypedParams(buf, -1, readString), { instanceOf: TypedParamError });
  const bad = Buffer.alloc(TYPED_PARAM_SIZE, 0x41);
  t.throws(() => decodeTypedParams(bad, 1, readString), { instanceOf: TypedParamError, message: /not NUL-terminated/ });
  t.is(decodeTypedParams(Buffer.alloc(0), 0, readString).size, 0);
});

// As libvirt 11.3 answered during and after a real migration (test/libvirt/watch.test.ts).
const RUNNING = new Map<string, number | string | boolean>([
  ['operation', 5], ['time_elapsed', 2057], ['setup_time', 7], ['data_total', 2147876864], ['data_processed', 319777], ['memory_total', 2147876864],
  ['memory_processed', 319777], ['memory_remaining', 2057695232], ['memory_constant', 21983], ['memory_normal', 33], ['memory_normal_bytes', 135168],
  ['memory_bps', 469833], ['memory_dirty_rate', 0], ['memory_iteration', 1], ['memory_postcopy_requests', 0],
]);
const COMPLETED = new Map<string, number | string | boolean>([
  ['operation', 5], ['time_elapsed', 14247], ['time_elapsed_net', 14245], ['downtime', 27], ['downtime_net', 25], ['setup_time', 7], ['memory_total', 2147876864],
  ['memory_processed', 5282495], ['memory_remaining', 0], ['memory_iteration', 3], ['vfio_data_transferred', 4096],
]);

test('job statistics: a running migration is active, without a downtime yet', (t) => {
  const s = parseJobStats(JobType.UNBOUNDED, RUNNING);
  t.is(s.type, 'unbounded');
  t.is(s.operation, 'migration-out');
  t.is(s.timeElapsedMs, 2057);
  t.like(asQueryMigrate(s), { status: 'active', 'total-time': 2057, 'setup-time': 7, ram: { transferred: 319777, total: 2147876864, 'dirty-sync-count': 1, 'normal-bytes': 135168 } });
  t.false('downtime' in asQueryMigrate(s)!);
});

test('job statistics: a completed migration carries downtime, setup time, RAM and VFIO bytes under query-migrate names', (t) => {
  const s = parseJobStats(JobType.COMPLETED, COMPLETED);
  t.deepEqual(asQueryMigrate(s), {
    status: 'completed',
    'total-time': 14247,
    'setup-time': 7,
    downtime: 27,
    ram: { transferred: 5282495, total: 2147876864, remaining: 0, 'dirty-sync-count': 3 },
    vfio: { transferred: 4096 },
  });
  t.is(s.downtimeNetMs, 25);
  t.deepEqual(s.raw.operation, 5);
});

test('job statistics: failed, cancelled, success=false, no job', (t) => {
  t.like(asQueryMigrate(parseJobStats(JobType.FAILED, new Map([['errmsg', 'migration failed: Unable to write']]))), { status: 'failed', 'error-desc': 'migration failed: Unable to write' });
  t.is(asQueryMigrate(parseJobStats(JobType.CANCELLED, new Map()))!.status, 'cancelled');
  t.is(asQueryMigrate(parseJobStats(JobType.COMPLETED, new Map([['success', false]])))!.status, 'failed');
  t.is(asQueryMigrate(parseJobStats(JobType.NONE, new Map())), undefined);
  t.is(parseJobStats(42, new Map()).type, 'unknown');
  t.is(parseJobStats(JobType.UNBOUNDED, new Map([['operation', 99]])).operation, 'unknown');
});

const stats = (type: number, m: Map<string, number | string | boolean> = COMPLETED): JobStats => parseJobStats(type, m);

test('the final status: libvirt\'s finished job first, then QEMU corrected by where the domain runs', (t) => {
  t.deepEqual(migrationOutcome({ completedSource: stats(JobType.COMPLETED), qemuStatus: 'completed', sourceRunning: false, destActive: true }), { status: 'completed' });
  // libvirt keeps no statistics for a cancelled job: QEMU's event says it.
  t.deepEqual(migrationOutcome({ qemuStatus: 'cancelled', sourceRunning: true, destActive: false }), { status: 'cancelled' });
  t.deepEqual(migrationOutcome({ qemuStatus: 'cancelling', sourceRunning: true, destActive: false }), { status: 'cancelled' });
  t.deepEqual(migrationOutcome({ completedDest: stats(JobType.COMPLETED), sourceRunning: false, destActive: true }), { status: 'completed' });
  const rolledBack = migrationOutcome({ qemuStatus: 'completed', sourceRunning: true, destActive: false });
  t.is(rolledBack.status, 'failed');
  t.regex(rolledBack.note!, /runs on the source again/);
  const refused = migrationOutcome({ sourceRunning: true, destActive: false });
  t.is(refused.status, 'failed');
  t.regex(refused.note!, /QEMU never started migrating/);
  t.is(migrationOutcome({ sourceRunning: false, destActive: true }).status, 'completed');
  t.is(migrationOutcome({ completedSource: stats(JobType.FAILED, new Map()), qemuStatus: 'completed', sourceRunning: true, destActive: false }).status, 'failed');
});

test('run states as QEMU would name them', (t) => {
  t.is(runStateName({ state: 'running', code: 1, reason: 1 }, 'source'), 'running');
  t.is(runStateName({ state: 'paused', code: 3, reason: 2 }, 'destination'), 'inmigrate');
  t.is(runStateName({ state: 'paused', code: 3, reason: 2 }, 'source'), 'paused');
  t.is(runStateName({ state: 'shutoff', code: 5, reason: 4 }, 'source'), 'shutdown');
});

const XML = `<domain type='kvm' id='3' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>vm1</name>
  <devices>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x3b' slot='0x00' function='0x2'/></source>
      <alias name='hostdev0'/>
    </hostdev>
    <hostdev mode='subsystem' type='mdev' model='vfio-pci'>
      <source><address uuid='83B8F4F2-509F-382F-3C1E-E6BFE0FA0001'/></source>
      <alias name='hostdev1'/>
    </hostdev>
    <hostdev mode='subsystem' type='usb'>
      <source><vendor id='0x1234'/><product id='0x5678'/></source>
      <alias name='hostdev2'/>
    </hostdev>
    <hostdev mode='subsystem' type='pci'>
      <source><address domain='0x0000' bus='0x3c' slot='0x00' function='0x0'/></source>
    </hostdev>
  </devices>
  <qemu:override>
    <qemu:device alias='hostdev0'>
      <qemu:frontend><qemu:property name='migration-events' type='bool' value='true'/></qemu:frontend>
    </qemu:device>
  </qemu:override>
</domain>`;

test('VFIO devices from the live domain XML: alias = QEMU id, host side, migration-events checked', (t) => {
  const notes: string[] = [];
  const devs = vfioDevicesFromXml(XML, 'source', notes);
  t.deepEqual(devs, [
    { id: 'hostdev0', qomPath: '/machine/peripheral/hostdev0', host: '0000:3b:00.2' },
    { id: 'hostdev1', qomPath: '/machine/peripheral/hostdev1', host: '/sys/bus/mdev/devices/83b8f4f2-509f-382f-3c1e-e6bfe0fa0001' },
  ]);
  t.deepEqual(notes, ['hostdev1 on the source has no migration-events=on (<qemu:override> in the domain XML): QEMU sends no VFIO_MIGRATION events for it']);
});

test('a libvirt record analyses like a QMP one: the figures libvirt gave reach the analysis', (t) => {
  const ts = (ms: number): { seconds: number; microseconds: number } => ({ seconds: Math.floor(ms / 1000), microseconds: (ms % 1000) * 1000 });
  const ev = (seq: number, event: string, at: number, data: Record<string, unknown> = {}) => ({ event, data, timestamp: ts(at), seq });
  const t0 = 1_796_505_000_000;
  const r = finishWatch({
    started: t0,
    source: {
      endpoint: 'libvirt:qemu:///system/vm1',
      initialStatus: 'running',
      events: [ev(1, 'MIGRATION', t0, { status: 'setup' }), ev(2, 'MIGRATION', t0 + 5, { status: 'active' }), ev(3, 'STOP', t0 + 900), ev(4, 'MIGRATION', t0 + 950, { status: 'completed' })],
      migrate: asQueryMigrate(parseJobStats(JobType.COMPLETED, COMPLETED)),
    },
    destination: { endpoint: 'libvirt:qemu+ssh://b/system/vm1', events: [ev(1, 'MIGRATION', t0 + 960, { status: 'completed' }), ev(2, 'RESUME', t0 + 980)], migrate: { status: 'completed' } },
    ended: 'settled',
    notes: ['a note', 'a note'],
    timedOut: false,
    timeoutMs: 1000,
  });
  t.is(r.analysis.verdict, 'ok');
  t.is(r.analysis.downtimeMs, 27);
  t.is(r.analysis.qemu.vfioTransferred, 4096);
  t.is(r.analysis.events.stopToResumeMs, 80);
  t.deepEqual(r.notes, ['a note'], 'notes once');
});

async function cli(args: string[]): Promise<{ code: number; err: string }> {
  let err = '';
  const code = await main(['watch', ...args], { write: () => true } as unknown as NodeJS.WritableStream, { write: (c: string) => ((err += c), true) } as unknown as NodeJS.WritableStream);
  return { code, err };
}

test('the CLI refuses hostile or incomplete libvirt options with a usage error (exit 2) before connecting', async (t) => {
  const ok = ['--source-uri', 'qemu:///system', '--dest-uri', 'qemu+ssh://b/system'];
  const cases: Array<[string[], RegExp]> = [
    [['--source-domain', 'vm1', '--source-uri', 'qemu:///system'], /--dest-uri URI is required/],
    [['--source-uri', 'qemu:///system', '--dest-uri', 'qemu+ssh://b/system'], /--source-domain NAME is required/],
    [['--source-domain', '', ...ok], /needs a domain name/],
    [['--source-domain', '../../etc/passwd', ...ok], /not a domain name/],
    [['--source-domain', 'vm\u001b[2J', ...ok], /not a domain name/],
    [['--source-domain', 'x'.repeat(300), ...ok], /at most 255 bytes/],
    [['--source-domain', 'vm1', '--source-uri', '/etc/passwd', '--dest-uri', 'qemu+ssh://b/system'], /--source-uri: not a libvirt URI/],
    [['--source-domain', 'vm1', '--source-uri', 'qemu:///system', '--dest-uri', 'qemu+ssh://b/system\n--x'], /--dest-uri: not a libvirt URI/],
    [['--source-domain', 'vm1', '--source-uri', 'qemu:///system', '--dest-uri', '-c qemu:///x'], /--dest-uri: not a libvirt URI/],
    [['--source-domain', 'vm1', '--source-uri', 'qemu:///system', '--dest-uri', 'qemu:///system'], /same libvirt/],
    [['--source-domain', 'vm1', '--source-domain', 'vm2', ...ok], /given more than once/],
    [['--source-domain', 'vm1', ...ok, '--settle', '-1'], /--settle must be/],
  ];
  for (const [args, re] of cases) {
    const r = await cli(args);
    t.is(r.code, 2, args.join(' '));
    t.regex(r.err, re, args.join(' '));
  }
});
