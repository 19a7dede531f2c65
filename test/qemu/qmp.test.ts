// The QMP client against real qemu-system-x86_64 processes (QEMU >= 9.1; test/qemu/setup.sh
// installs 10.0 from bookworm-backports). Serial: two TCG guests at a time at most, the
// machine has 2 cores shared with other work.
import test from 'ava';
import net from 'node:net';
import { closeSync, openSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import * as qmp from '../../src/qmp/commands.ts';
import { QmpError } from '../../src/qmp/errors.ts';
import { startVm, tempDir } from './vm.ts';

test.serial('greeting, version, and QEMU errors as QmpError', async (t) => {
  const vm = await startVm(t, tempDir(t, 'qmp-q-'), 'basic');
  const v = await qmp.queryVersion(vm.qmp);
  t.deepEqual(v.qemu, vm.qmp.greeting.version.qemu);
  t.true(qmp.qemuAtLeast(v, 9, 1), `QEMU ${v.qemu.major}.${v.qemu.minor} has no VFIO_MIGRATION event`);
  t.log(`QEMU ${v.qemu.major}.${v.qemu.minor}.${v.qemu.micro} (${v.package})`);
  const nf = await t.throwsAsync(vm.qmp.execute('no-such-command'), { instanceOf: QmpError });
  t.is(nf?.class, 'CommandNotFound');
  const ns = await t.throwsAsync(qmp.migrateContinue(vm.qmp), { instanceOf: QmpError });
  t.is(ns?.class, 'GenericError');
  t.log(`migrate-continue outside pre-switchover: ${ns?.desc}`);
  // The connection survives errors.
  t.true((await qmp.queryStatus(vm.qmp)).running);
});

test.serial('stop/cont: STOP and RESUME events with QEMU timestamps, query-status follows', async (t) => {
  const vm = await startVm(t, tempDir(t, 'qmp-q-'), 'stopcont');
  t.true((await qmp.queryStatus(vm.qmp)).running);
  const mark = vm.qmp.lastSeq;
  await qmp.stop(vm.qmp);
  const stop = await vm.qmp.waitFor('STOP', undefined, 10_000, { since: mark });
  const st = await qmp.queryStatus(vm.qmp);
  t.false(st.running);
  t.is(st.status, 'paused');
  await qmp.cont(vm.qmp);
  const resume = await vm.qmp.waitFor('RESUME', undefined, 10_000, { since: mark });
  t.true((await qmp.queryStatus(vm.qmp)).running);
  const now = Date.now() / 1000;
  t.true(Math.abs(stop.timestamp.seconds - now) < 60, 'timestamp is QEMU wall-clock time');
  t.true(resume.seq > stop.seq);
});

test.serial('live migration over a unix socket held at pre-switchover, then migrate-continue', async (t) => {
  const dir = tempDir(t, 'qmp-m-');
  const [src, dst] = await Promise.all([startVm(t, dir, 'src'), startVm(t, dir, 'dst', { incoming: true })]);
  t.is((await qmp.queryStatus(dst.qmp)).status, 'inmigrate');
  await qmp.migrateSetCapabilities(src.qmp, { events: true, 'pause-before-switchover': true });
  await qmp.migrateSetCapabilities(dst.qmp, { events: true });
  const caps = await qmp.queryMigrateCapabilities(src.qmp);
  t.true(caps.find((c) => c.capability === 'pause-before-switchover')?.state);
  t.deepEqual((await qmp.queryMigrate(src.qmp))['blocked-reasons'] ?? [], []);

  const uri = `unix:${join(dir, 'mig.sock')}`;
  await qmp.migrateIncoming(dst.qmp, { uri });
  const mark = src.qmp.lastSeq;
  await qmp.migrate(src.qmp, { uri });
  const pre = await src.qmp.waitFor('MIGRATION', (e) => e.typed.status === 'pre-switchover' || e.typed.status === 'failed', 120_000, { since: mark });
  t.is(pre.typed.status, 'pre-switchover', src.log());

  // Held: the vCPUs are already stopped (QEMU stops the VM before pausing at pre-switchover)
  // and nothing moves on until we say so.
  const held = await qmp.queryStatus(src.qmp);
  t.false(held.running);
  t.is(held.status, 'finish-migrate');
  const stop = await src.qmp.waitFor('STOP', undefined, 1, { since: mark });
  t.true(stop.seq < pre.seq, 'STOP came before pre-switchover');
  await new Promise((r) => setTimeout(r, 300));
  t.is((await qmp.queryMigrate(src.qmp)).status, 'pre-switchover');
  t.is((await qmp.queryStatus(dst.qmp)).status, 'inmigrate');

  const dstMark = dst.qmp.lastSeq;
  await qmp.migrateContinue(src.qmp, 'pre-switchover');
  const done = await src.qmp.waitFor('MIGRATION', (e) => ['completed', 'failed', 'cancelled'].includes(e.typed.status), 60_000, { since: pre.seq });
  t.is(done.typed.status, 'completed', src.log());
  await dst.qmp.waitFor('RESUME', undefined, 30_000, { since: dstMark });
  const info = await qmp.queryMigrate(src.qmp);
  t.is(info.status, 'completed');
  t.true((info.ram?.transferred ?? 0) > 0);
  t.log(`total-time ${info['total-time']} ms, downtime ${info.downtime} ms, ram ${info.ram?.transferred} bytes`);
  t.is((await qmp.queryStatus(src.qmp)).status, 'postmigrate');
  const d = await qmp.queryStatus(dst.qmp);
  t.true(d.running);
  t.is(d.status, 'running');
});

test.serial('migrate_cancel at pre-switchover: the source runs again, nothing switched over', async (t) => {
  const dir = tempDir(t, 'qmp-c-');
  const [src, dst] = await Promise.all([startVm(t, dir, 'src'), startVm(t, dir, 'dst', { incoming: true })]);
  await qmp.migrateSetCapabilities(src.qmp, { events: true, 'pause-before-switchover': true });
  const uri = `unix:${join(dir, 'mig.sock')}`;
  await qmp.migrateIncoming(dst.qmp, { uri });
  const mark = src.qmp.lastSeq;
  await qmp.migrate(src.qmp, { uri });
  const pre = await src.qmp.waitFor('MIGRATION', (e) => e.typed.status === 'pre-switchover', 120_000, { since: mark });
  t.false((await qmp.queryStatus(src.qmp)).running);
  await qmp.migrateCancel(src.qmp);
  const end = await src.qmp.waitFor('MIGRATION', (e) => ['cancelled', 'failed', 'completed'].includes(e.typed.status), 30_000, { since: mark });
  t.is(end.typed.status, 'cancelled');
  await src.qmp.waitFor('RESUME', undefined, 30_000, { since: pre.seq });
  const st = await qmp.queryStatus(src.qmp);
  t.true(st.running);
  t.is(st.status, 'running');
  t.is((await qmp.queryMigrate(src.qmp)).status, 'cancelled');
});

test.serial('migrate_cancel while active (bandwidth-limited to a sink): the source never stops', async (t) => {
  const dir = tempDir(t, 'qmp-s-');
  const vm = await startVm(t, dir, 'src');
  // A sink instead of a second QEMU: it swallows the stream, so the migration stays active.
  const sinkPath = join(dir, 'sink.sock');
  let received = 0;
  const sink = net.createServer((s) => s.on('data', (d) => (received += d.length)).on('error', () => {}));
  await new Promise<void>((r) => sink.listen(sinkPath, r));
  t.teardown(() => sink.close());
  await qmp.migrateSetCapabilities(vm.qmp, { events: true });
  // 4 KiB/s: the idle 64 MiB guest's stream (~160 KB of zero-page records) takes ~40 s.
  await qmp.migrateSetParameters(vm.qmp, { 'max-bandwidth': 4096 });
  const mark = vm.qmp.lastSeq;
  await qmp.migrate(vm.qmp, { uri: `unix:${sinkPath}` });
  await vm.qmp.waitFor('MIGRATION', (e) => e.typed.status === 'active', 30_000, { since: mark });
  t.is((await qmp.queryMigrate(vm.qmp)).status, 'active');
  await qmp.migrateCancel(vm.qmp);
  const end = await vm.qmp.waitFor('MIGRATION', (e) => e.typed.status === 'cancelled' || e.typed.status === 'failed', 30_000, { since: mark });
  t.is(end.typed.status, 'cancelled');
  const st = await qmp.queryStatus(vm.qmp);
  t.true(st.running);
  t.is(vm.qmp.recentEvents().filter((e) => e.seq > mark && e.event === 'STOP').length, 0, 'the vCPUs were never stopped');
  for (let i = 0; i < 100 && received === 0; i++) await new Promise((r) => setTimeout(r, 20));
  t.true(received > 0, 'the stream did flow to the sink');
});

test.serial('fd passing: add-fd and getfd carry a descriptor over SCM_RIGHTS', async (t) => {
  const dir = tempDir(t, 'qmp-f-');
  const vm = await startVm(t, dir, 'fd');
  const file = join(dir, 'data');
  writeFileSync(file, 'state');
  const fd = openSync(file, 'r');
  t.teardown(() => closeSync(fd));

  // Without a descriptor QEMU refuses: proof that the one below really travelled.
  const none = await t.throwsAsync(vm.qmp.execute('getfd', { fdname: 'mig' }), { instanceOf: QmpError });
  t.regex(none!.desc, /file descriptor/i);

  const added = await qmp.addFd(vm.qmp, fd, { opaque: 'vfio-mig-test' });
  t.true(added.fdsetId >= 0);
  t.true(added.fd >= 0);
  const sets = await qmp.queryFdsets(vm.qmp);
  const set = sets.find((s) => s.fdsetId === added.fdsetId);
  t.deepEqual(set?.fds, [{ fd: added.fd, opaque: 'vfio-mig-test' }]);
  // A second fd into the same set, then removal.
  const again = await qmp.addFd(vm.qmp, fd, { fdsetId: added.fdsetId });
  t.is(again.fdsetId, added.fdsetId);
  t.not(again.fd, added.fd);
  await qmp.removeFd(vm.qmp, added.fdsetId);
  t.is((await qmp.queryFdsets(vm.qmp)).find((s) => s.fdsetId === added.fdsetId), undefined);

  await qmp.getfd(vm.qmp, 'mig', fd);
  await qmp.closefd(vm.qmp, 'mig');
  const gone = await t.throwsAsync(qmp.closefd(vm.qmp, 'mig'), { instanceOf: QmpError });
  t.regex(gone!.desc, /not found/i);
  // Commands before and after keep working (the sendmsg path did not desync the stream).
  t.true((await qmp.queryStatus(vm.qmp)).running);
});

test.serial('QEMU quitting rejects what is pending and the client reports the close', async (t) => {
  const vm = await startVm(t, tempDir(t, 'qmp-x-'), 'quit');
  const wait = vm.qmp.waitFor('NEVER_SENT', undefined, 60_000);
  await vm.qmp.execute('quit');
  await t.throwsAsync(wait);
  await vm.qmp.done;
  t.true(vm.qmp.closed);
  t.is(await vm.exited, 0);
});
