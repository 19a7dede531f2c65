#!/usr/bin/env bash
# npm run demo: sets itself up (npm packages; the rig installs QEMU and fetches its
# kernel on first use), runs test/demo/demo.ts inside the rig guest, and copies what it
# wrote (timeline JSON, SVG report) to a results folder on this host:
# $VFIO_MIG_DEMO_RESULTS, default /tmp/vfio-mig-demo/<time>.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ ! -d node_modules/koffi ] || [ ! -d node_modules/tsx ]; then
  npm ci --no-audit --no-fund
fi
[ -f test/rig/engine.test.ts ] || { echo "demo: test/rig/engine.test.ts is missing" >&2; exit 1; }
node test/demo/build.mjs
results=${VFIO_MIG_DEMO_RESULTS:-/tmp/vfio-mig-demo/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$results"
# The guest writes to a host folder shared read-write at the same path.
rigtmp=$(mktemp -d "${TMPDIR:-/tmp}/vfio-mig-demo-rig.XXXXXX")
trap 'rm -rf "$rigtmp"' EXIT
status=0
# (the rig's results dir, made under $TMPDIR, is the one folder the guest may write to)
VFIO_MIG_DEMO_RESULTS="$results" TMPDIR="$rigtmp" VFIO_MIG_RIG_KEEP=1 \
  test/rig/run.sh 'node --enable-source-maps test/scratch/demo.mjs' 2> >(grep -v '^rig: results' >&2) || status=$?
for d in "$rigtmp"/vfio-mig-rig.*/demo; do
  [ -d "$d" ] && cp -r "$d"/. "$results"/
done
echo "demo: results in $results:"
ls -l "$results"
exit "$status"
