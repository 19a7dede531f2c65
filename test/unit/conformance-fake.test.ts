// The conformance suite against the fake kernel (the rig runs it against the real one).
import test from 'ava';
import { registerConformance } from '../conformance/suite.ts';
import { installFake } from '../fake/install.ts';
import { MigState } from '../../src/vfio/uapi.ts';

const fake = installFake(test);
fake.addDevice({ id: '0000:00:03.0', flags: 7, stateSize: 65536, seed: 11 });
fake.addDevice({ id: '0000:00:04.0', flags: 7, stateSize: 65536, seed: 12 });

registerConformance(test, {
  name: 'fake',
  pair: () => ['0000:00:03.0', '0000:00:04.0'],
  async setFlags(id, flags) {
    fake.device(id).spec.flags = BigInt(flags);
  },
  async arcLog(id) {
    return fake.device(id).arcLog.slice();
  },
  async clearArcLog(id) {
    fake.device(id).arcLog.length = 0;
  },
  async inject(id, arc, errno, outcome) {
    fake.inject(id, { arc, errno, outcome, mode: 'once' });
  },
  async clearInjection(id) {
    fake.device(id).failures.length = 0;
  },
  validatesStream: true,
  badDataState: MigState.Error,
  precopyEmpty: 'ENOMSG',
  openFds: () => fake.openFdCount(),
});
