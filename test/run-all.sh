#!/usr/bin/env bash
# npm test: does its own set-up, runs every suite, and ends with one line
# "N passed, N failed" (each test counts; a suite that cannot run counts as a failure,
# loudly - on CI machines every suite must run). test/tally.mjs does the counting:
# failed hooks, a suite without a TAP plan and a non-zero exit status with no failure
# in the TAP all count as failures; skipped and todo tests are shown as skipped, never
# counted as passed.
set -uo pipefail
cd "$(dirname "$0")/.."
results=$(mktemp -d /tmp/vfio-mig-test.XXXXXX)
trap 'rm -rf "$results"' EXIT

say() { printf '\n=== %s ===\n' "$*"; }
# A check that is not a TAP suite (type-check, lint) is one TAP test: record NAME STATUS.
record() {
  if [ "$2" -eq 0 ]; then
    printf 'TAP version 13\nok 1 - %s\n1..1\n' "$1" > "$results/$1.tap"
  else
    printf 'TAP version 13\nnot ok 1 - %s (exit status %d)\n1..1\n' "$1" "$2" > "$results/$1.tap"
  fi
}
# A suite that could not run: one failure with the reason. not_run NAME REASON.
not_run() { printf 'TAP version 13\nnot ok 1 - %s suite not run: %s\n1..1\n' "$1" "$2" > "$results/$1.tap"; }
# Runs a TAP-producing command, keeping its output and its own exit status (not tee's):
# tap NAME COMMAND...
tap() {
  local name=$1; shift
  "$@" | tee "$results/$name.tap"
  echo "${PIPESTATUS[0]}" > "$results/$name.rc"
}

say "set-up: npm packages"
if [ ! -d node_modules/ava ] || [ ! -d node_modules/koffi ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund || { echo "npm ci failed"; echo "0 skipped (not counted as passed)"; echo "0 passed, 1 failed"; exit 1; }
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

# The rig's kernel cache (6.12 kernel, headers, sanitised uapi headers) before the unit
# tests: test/unit/abi.test.ts compiles against the 6.12 uapi headers, and on a fresh
# machine nothing else would have fetched them yet (test/rig/run.sh does it later).
say "set-up: rig kernel cache (6.12 uapi headers for the unit ABI test)"
if [ "$(id -u)" -eq 0 ] && [ "$host_setup" = ok ] && rig_env=$(test/rig/setup-cache.sh --print-env); then
  VFIO_MIG_RIG_UAPI=$(sed -n 's/^UAPI=//p' <<<"$rig_env")
  export VFIO_MIG_RIG_UAPI
  echo "6.12 uapi headers: $VFIO_MIG_RIG_UAPI"
else
  echo "RIG CACHE SET-UP NOT DONE (not root, host set-up failed, or test/rig/setup-cache.sh failed - see above):" \
    "the unit ABI test against the 6.12 headers will be skipped (a failure on CI), the rig suite will report it" >&2
fi

# lintian checks the .deb in test/unit/package.test.ts (npm run package's output).
if [ "$(id -u)" -eq 0 ] && ! command -v lintian >/dev/null; then
  say "set-up: lintian (for the package test)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends lintian || echo "lintian could not be installed: the package test will fail on it" >&2
fi

say "type-check"
npx --no-install tsc --noEmit; record typecheck $?

say "lint"
npx --no-install eslint .; record lint $?

say "unit tests (fake kernel, no root)"
tap unit node_modules/.bin/ava --tap test/unit

say "qemu tests (real qemu-system-x86_64 over QMP: events, migration, fd passing)"
if ! test/qemu/setup.sh; then
  echo "QEMU SUITE NOT RUN: test/qemu/setup.sh failed (QEMU >= 9.1 missing and not installable, see above)" >&2
  not_run qemu "test/qemu/setup.sh failed (QEMU >= 9.1 missing and not installable)"
else
  tap qemu node_modules/.bin/ava --tap --serial --timeout=5m test/qemu
fi

say "libvirt tests (two real libvirtd 11.3 hosts in network + mount namespaces)"
if [ "$(id -u)" -ne 0 ]; then
  echo "LIBVIRT SUITE NOT RUN: needs root (namespaces, bind mounts, a privileged libvirtd); run npm test as root" >&2
  not_run libvirt "needs root"
elif ! test/libvirt/setup.sh; then
  echo "LIBVIRT SUITE NOT RUN: test/libvirt/setup.sh failed (see above)" >&2
  not_run libvirt "test/libvirt/setup.sh failed"
else
  tap libvirt node_modules/.bin/ava --tap --serial --timeout=10m test/libvirt
  # A crashed run cannot tear its daemons down itself: remove what it left.
  node --import tsx test/libvirt/reap.ts
fi

say "rig tests (real 6.12 kernel in a QEMU guest, our edu driver and upstream mtty)"
if [ "$(id -u)" -ne 0 ]; then
  echo "RIG SUITE NOT RUN: needs root (apt-get for QEMU, /dev/kvm probe); run npm test as root" >&2
  not_run rig "needs root"
else
  # The guest runs JavaScript bundles built here: tsx under TCG costs 20-30 s per file.
  if ! node test/rig/build.mjs; then
    echo "RIG SUITE NOT RUN: bundling the rig tests failed (see above)" >&2
    not_run rig "bundling the rig tests failed"
  else
    # The whole rig suite runs in one boot: give it room (600 s is run.sh's default for one command).
    tap rig env VFIO_MIG_RIG_TIMEOUT="${VFIO_MIG_RIG_TIMEOUT:-2400}" test/rig/run.sh "node_modules/.bin/ava --config test/rig/ava.config.mjs --tap --concurrency=1 --match '!twelve*'"
    # tally counts a non-zero status (and a missing TAP plan) as a failure; say which.
    rc=$(cat "$results/rig.rc")
    if [ "$rc" -ge 124 ]; then
      echo "RIG SUITE DID NOT COMPLETE (runner exit $rc: 124 timeout, 125 guest crash, 126 set-up failure)" >&2
    fi
    # The parallelism claim needs more devices than libuv's 4 threads: a second boot with
    # twelve edu devices runs only that test.
    tap rig-edu12 env VFIO_MIG_RIG_EDU=12 test/rig/run.sh "node_modules/.bin/ava --config test/rig/ava.config.mjs --tap --concurrency=1 --match 'twelve*' test/.rig-build/coordinator.test.mjs"
  fi
fi

say "rig package tests (the .deb under real systemd and udev in the guest: igb VFs, burst, upgrade, purge)"
if [ "$(id -u)" -ne 0 ]; then
  echo "RIG PACKAGE SUITE NOT RUN: needs root; run npm test as root" >&2
  not_run rig-package "needs root"
else
  tap rig-package test/rig/package/run.sh --tap
fi

say "tally"
node test/tally.mjs "$results"/*.tap
