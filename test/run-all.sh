#!/usr/bin/env bash
# npm test: does its own set-up, runs every suite, and ends with one line
# "N passed, N failed" (each test counts; a suite that cannot run counts as a failure,
# loudly - on CI machines every suite must run).
set -uo pipefail
cd "$(dirname "$0")/.."
results=$(mktemp -d /tmp/vfio-mig-test.XXXXXX)
trap 'rm -rf "$results"' EXIT

say() { printf '\n=== %s ===\n' "$*"; }
# A check that is not a TAP suite (type-check, lint) counts as one test.
record() { printf '# pass %d\n# fail %d\n' "$(( $2 == 0 ))" "$(( $2 != 0 ))" > "$results/$1.tap"; }

say "set-up: npm packages"
if [ ! -d node_modules/ava ] || [ ! -d node_modules/koffi ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund || { echo "npm ci failed"; echo "0 passed, 1 failed"; exit 1; }
fi

# The CLI and the hooks run the esbuild bundles in dist/ (npm ci builds them through the
# `prepare` script; build again so the suites never run a bundle older than src/).
say "build (dist/: the bundles the CLI and the hooks run)"
npm run --silent build; record build $?

# Debian packages (QEMU 10 and libvirt 11.3 from bookworm-backports, busybox, kmod, ...)
# before any suite, so the unit tests that load libvirt0 find it too. The rig's kernel
# and modules are fetched by test/rig/run.sh itself.
say "set-up: Debian packages"
host_setup=fail
if [ "$(id -u)" -eq 0 ] && test/libvirt/setup.sh; then host_setup=ok; fi
[ "$host_setup" = ok ] || echo "HOST SET-UP INCOMPLETE: the qemu, libvirt and rig suites will report it" >&2

say "type-check"
npx --no-install tsc --noEmit; record typecheck $?

say "lint"
npx --no-install eslint .; record lint $?

say "unit tests (fake kernel, no root)"
node_modules/.bin/ava --tap test/unit | tee "$results/unit.tap"

say "qemu tests (real qemu-system-x86_64 over QMP: events, migration, fd passing)"
if ! test/qemu/setup.sh; then
  echo "QEMU SUITE NOT RUN: test/qemu/setup.sh failed (QEMU >= 9.1 missing and not installable, see above)" >&2
  printf '# pass 0\n# fail 1\n' > "$results/qemu.tap"
else
  node_modules/.bin/ava --tap --serial --timeout=5m test/qemu | tee "$results/qemu.tap"
fi

say "libvirt tests (two real libvirtd 11.3 hosts in network + mount namespaces)"
if [ "$(id -u)" -ne 0 ]; then
  echo "LIBVIRT SUITE NOT RUN: needs root (namespaces, bind mounts, a privileged libvirtd); run npm test as root" >&2
  printf '# pass 0\n# fail 1\n' > "$results/libvirt.tap"
elif ! test/libvirt/setup.sh; then
  echo "LIBVIRT SUITE NOT RUN: test/libvirt/setup.sh failed (see above)" >&2
  printf '# pass 0\n# fail 1\n' > "$results/libvirt.tap"
else
  node_modules/.bin/ava --tap --serial --timeout=10m test/libvirt | tee "$results/libvirt.tap"
  # A crashed run cannot tear its daemons down itself: remove what it left.
  node --import tsx test/libvirt/reap.ts
fi

say "rig tests (real 6.12 kernel in a QEMU guest, our edu driver and upstream mtty)"
if [ "$(id -u)" -ne 0 ]; then
  echo "RIG SUITE NOT RUN: needs root (apt-get for QEMU, /dev/kvm probe); run npm test as root" >&2
  printf '# pass 0\n# fail 1\n' > "$results/rig.tap"
else
  # The guest runs JavaScript bundles built here: tsx under TCG costs 20-30 s per file.
  if ! node test/rig/build.mjs; then
    rc=126
    echo "RIG SUITE NOT RUN: bundling the rig tests failed (see above)" >&2
  else
    test/rig/run.sh 'node_modules/.bin/ava --config test/rig/ava.config.mjs --tap --concurrency=1' | tee "$results/rig.tap"
    rc=${PIPESTATUS[0]}
  fi
  if [ "$rc" -ge 124 ]; then
    echo "RIG SUITE DID NOT COMPLETE (runner exit $rc: 124 timeout, 125 guest crash, 126 set-up failure)" >&2
    printf '# pass 0\n# fail 1\n' >> "$results/rig.tap"
  fi
fi

node test/tally.mjs "$results"/*.tap
