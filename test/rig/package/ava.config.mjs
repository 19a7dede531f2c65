// ava configuration for the package rig test inside the guest: the bundle
// test/rig/package/build.mjs made on the host (scratch/rig-package/), run by plain node.
export default {
  files: ['scratch/rig-package/*.test.mjs'],
  workerThreads: false,
  timeout: '30m',
  nodeArguments: ['--enable-source-maps'],
};
