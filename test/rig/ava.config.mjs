// ava configuration for the rig suite inside the guest: the tests are the JavaScript
// bundles test/rig/build.mjs made on the host, run by plain node (no tsx loader).
export default {
  files: ['test/.rig-build/*.test.mjs'],
  workerThreads: false,
  timeout: '10m',
  nodeArguments: ['--enable-source-maps'],
};
