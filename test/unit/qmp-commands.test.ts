// Typed QMP wrappers and event decoders against an in-memory executor: the exact JSON each
// wrapper sends, and validation of what comes back.
import test from 'ava';
import * as qmp from '../../src/qmp/commands.ts';
import { QmpProtocolError } from '../../src/qmp/errors.ts';
import { decodeEvent, isFinalMigrationStatus, parseEventEnvelope, timestampMs, type QmpEvent } from '../../src/qmp/events.ts';

class Recorder implements qmp.QmpFdExecutor {
  sent: Array<{ command: string; args?: Record<string, unknown>; fd?: number }> = [];
  constructor(private readonly replies: Record<string, unknown> = {}) {}
  async execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    this.sent.push(args === undefined ? { command } : { command, args });
    return this.replies[command] ?? {};
  }
  async executeWithFd(command: string, args: Record<string, unknown> | undefined, fd: number): Promise<unknown> {
    this.sent.push({ command, ...(args ? { args } : {}), fd });
    return this.replies[command] ?? {};
  }
}

test('migration commands send the argument shapes of qapi/migration.json', async (t) => {
  const q = new Recorder();
  await qmp.migrateSetCapabilities(q, { events: true, 'pause-before-switchover': true });
  await qmp.migrateSetParameters(q, { 'downtime-limit': 500 });
  await qmp.migrate(q, { uri: 'unix:/run/mig.sock' });
  await qmp.migrateIncoming(q, { uri: 'tcp:0:4446' }, { exitOnError: false });
  await qmp.migrateContinue(q);
  await qmp.migrateCancel(q);
  await qmp.stop(q);
  await qmp.cont(q);
  await qmp.migrateSetCapabilities(q, {}); // nothing to send
  t.deepEqual(q.sent, [
    { command: 'migrate-set-capabilities', args: { capabilities: [{ capability: 'events', state: true }, { capability: 'pause-before-switchover', state: true }] } },
    { command: 'migrate-set-parameters', args: { 'downtime-limit': 500 } },
    { command: 'migrate', args: { uri: 'unix:/run/mig.sock' } },
    { command: 'migrate-incoming', args: { uri: 'tcp:0:4446', 'exit-on-error': false } },
    { command: 'migrate-continue', args: { state: 'pre-switchover' } },
    { command: 'migrate_cancel' },
    { command: 'stop' },
    { command: 'cont' },
  ]);
  await t.throwsAsync(qmp.migrate(q, { uri: '' }), { instanceOf: TypeError });
});

test('replies are validated: typed members must have their type, extra members are kept', async (t) => {
  const good = new Recorder({
    'query-version': { qemu: { major: 10, minor: 0, micro: 2 }, package: 'x' },
    'query-migrate': { status: 'active', ram: { transferred: 5 }, vfio: { transferred: 96 }, 'blocked-reasons': [], 'future-member': 1 },
    'query-migrate-capabilities': [{ capability: 'events', state: false }, { capability: 'brand-new', state: true }],
  });
  const v = await qmp.queryVersion(good);
  t.true(qmp.qemuAtLeast(v, 9, 1));
  t.false(qmp.qemuAtLeast(v, 10, 1));
  const mi = await qmp.queryMigrate(good);
  t.is(mi.vfio?.transferred, 96);
  t.is(mi['future-member'], 1);
  t.deepEqual((await qmp.queryMigrateCapabilities(good)).map((c) => c.capability), ['events', 'brand-new']);

  for (const [command, reply, call] of [
    ['query-status', { running: 'yes', status: 'running' }, qmp.queryStatus],
    ['query-status', [], qmp.queryStatus],
    ['query-migrate', { status: 3 }, qmp.queryMigrate],
    ['query-migrate', { vfio: {} }, qmp.queryMigrate],
    ['query-migrate', { 'blocked-reasons': [1] }, qmp.queryMigrate],
    ['query-version', { qemu: { major: 1.5, minor: 0, micro: 0 }, package: '' }, qmp.queryVersion],
    ['query-migrate-capabilities', { capability: 'events' }, qmp.queryMigrateCapabilities],
  ] as const) {
    await t.throwsAsync((call as (q: qmp.QmpExecutor) => Promise<unknown>)(new Recorder({ [command]: reply })), { instanceOf: QmpProtocolError }, `${command} ${JSON.stringify(reply)}`);
  }
});

test('fd commands go through executeWithFd and validate names and replies', async (t) => {
  const q = new Recorder({ 'add-fd': { 'fdset-id': 1, fd: 7 }, 'query-fdsets': [{ 'fdset-id': 1, fds: [{ fd: 7, opaque: 'o' }] }] });
  await qmp.getfd(q, 'mig', 5);
  t.deepEqual(await qmp.addFd(q, 5, { opaque: 'o' }), { fdsetId: 1, fd: 7 });
  t.deepEqual(await qmp.queryFdsets(q), [{ fdsetId: 1, fds: [{ fd: 7, opaque: 'o' }] }]);
  t.deepEqual(q.sent.slice(0, 2), [
    { command: 'getfd', args: { fdname: 'mig' }, fd: 5 },
    { command: 'add-fd', args: { opaque: 'o' }, fd: 5 },
  ]);
  await t.throwsAsync(qmp.getfd(q, '3mig', 5), { instanceOf: TypeError });
  await t.throwsAsync(qmp.getfd(q, 'a b', 5), { instanceOf: TypeError });
});

const ev = (event: string, data: Record<string, unknown> = {}): QmpEvent => ({ event, data, timestamp: { seconds: 2, microseconds: 500 }, seq: 1 });

test('event decoders: typed when well formed, undefined otherwise; unknown states kept', (t) => {
  t.is(decodeEvent(ev('MIGRATION', { status: 'pre-switchover' }), 'MIGRATION')?.typed.status, 'pre-switchover');
  t.is(decodeEvent(ev('MIGRATION', { status: 'brand-new' }), 'MIGRATION')?.typed.status, 'brand-new');
  t.is(decodeEvent(ev('MIGRATION', {}), 'MIGRATION'), undefined);
  t.is(decodeEvent(ev('MIGRATION_PASS', { pass: -1 }), 'MIGRATION_PASS'), undefined);
  t.is(decodeEvent(ev('STOP'), 'RESUME'), undefined);
  const v = decodeEvent(ev('VFIO_MIGRATION', { 'device-id': 'hostdev0', 'qom-path': '/machine/peripheral/hostdev0', 'device-state': 'stop-copy' }), 'VFIO_MIGRATION');
  t.deepEqual(v?.typed, { 'device-id': 'hostdev0', 'qom-path': '/machine/peripheral/hostdev0', 'device-state': 'stop-copy' });
  t.is(decodeEvent(ev('VFIO_MIGRATION', { 'device-id': 'hostdev0' }), 'VFIO_MIGRATION'), undefined);
  t.true(isFinalMigrationStatus('cancelled'));
  t.false(isFinalMigrationStatus('pre-switchover'));
  t.is(timestampMs({ seconds: 2, microseconds: 500 }), 2000.5);
});

test('event envelope validation', (t) => {
  t.deepEqual(parseEventEnvelope({ event: 'STOP', timestamp: { seconds: 1, microseconds: 2 } }), { event: 'STOP', data: {}, timestamp: { seconds: 1, microseconds: 2 } });
  for (const bad of [
    { event: 1, timestamp: { seconds: 1, microseconds: 2 } },
    { event: '', timestamp: { seconds: 1, microseconds: 2 } },
    { event: 'X', data: null, timestamp: { seconds: 1, microseconds: 2 } },
    { event: 'X', timestamp: { seconds: '1', microseconds: 2 } },
    { event: 'X' },
  ]) {
    t.is(typeof parseEventEnvelope(bad as Record<string, unknown>), 'string', JSON.stringify(bad));
  }
});
