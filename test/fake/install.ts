// Installs a FakeKernel as the syscall backend for one ava test file (each file runs in
// its own process) and points the sysfs/dev roots at its temp tree.
import type { TestFn } from 'ava';
import { FakeKernel, type FakeKernelOptions } from './fake-kernel.ts';
import { setSyscalls } from '../../src/host/sys.ts';

export function installFake(test: TestFn, opts: FakeKernelOptions = {}): FakeKernel {
  const fake = new FakeKernel(opts);
  Object.assign(process.env, fake.env());
  setSyscalls(fake);
  test.after.always(() => fake.dispose());
  return fake;
}
