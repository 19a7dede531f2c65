// The VFIO layer against the real 6.12 kernel: our edu variant driver (all four flag
// sets, arc logs, injected failures) and the upstream mtty sample, with the same suite
// that runs against the fake kernel in test/unit. mtty runs every test it has the
// capability for (see test/conformance/suite.ts): its flags are fixed at 7, it keeps no
// arc log and cannot fail an arc on demand.
import test from 'ava';
import { registerConformance } from '../conformance/suite.ts';
import { MigState } from '../../src/vfio/uapi.ts';
import { requireRig, prepareEdu, prepareMtty, eduKnob, eduInject, eduArcLog, openFdCount } from './guest.ts';

requireRig(test);

const inRig = Boolean(process.env.VFIO_MIG_IN_RIG);
const edu = inRig ? prepareEdu() : ['0000:00:00.0', '0000:00:00.1'];
const mtty = inRig ? prepareMtty(2) : [];

registerConformance(test, {
  name: 'edu-vfio-pci',
  pair: () => [edu[0]!, edu[1]!],
  async setFlags(id, flags) {
    eduKnob(id, 'flags', flags);
  },
  async arcLog(id) {
    return eduArcLog(id);
  },
  async clearArcLog(id) {
    eduKnob(id, 'arc_log', 'clear'); // a 0-byte write never reaches the driver
  },
  async inject(id, arc, errno, outcome) {
    eduInject(id, arc, { errno, outcome });
  },
  async clearInjection(id) {
    eduKnob(id, 'fail_arc', 'none');
  },
  // edu_open_device()/edu_close_device() set RUNNING.
  stateAfterReopen: 'running',
  validatesStream: true,
  badDataState: MigState.Error,
  precopyEmpty: 'ENOMSG',
  openFds: openFdCount,
});

registerConformance(test, {
  name: 'mtty',
  pair: () => [mtty[0]!, mtty[1]!],
  // mtty_init_dev() sets STOP_COPY|P2P|PRE_COPY; there is no knob.
  fixedFlags: 7,
  // mtty_close() only disables the migration files: the state survives a close.
  stateAfterReopen: 'kept',
  validatesStream: false,
  badDataState: MigState.Resuming,
  precopyEmpty: 'zero',
  openFds: openFdCount,
});
