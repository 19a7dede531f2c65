#!/usr/bin/env bash
# The Debian package on a real kernel, under real systemd and udev (docs/packaging.md):
# builds the .deb twice (this version and a bumped one, for the upgrade) into
# scratch/rig-package/, bundles test/rig/package/*.test.ts, and runs them in the rig with
# igb SR-IOV NICs (QEMU's 82576 emulation, 7 VFs each) behind their own root ports.
#   test/rig/package/run.sh [ava arguments...]     e.g. --tap
# VFIO_MIG_RIG_IGB (default 2): the number of igb PFs (the VF burst is 7 per PF).
set -euo pipefail
cd "$(dirname "$0")/../../.."
igb=${VFIO_MIG_RIG_IGB:-2}
[[ $igb =~ ^[1-3]$ ]] || { echo "rig-package: VFIO_MIG_RIG_IGB must be 1-3" >&2; exit 2; }
node test/rig/package/build.mjs >&2
npm run --silent build >&2
debs=scratch/rig-package/debs
mkdir -p "$debs"
version=$(node -p 'require("./package.json").version')
node plugin/package-deb.mjs --out "$debs" >&2
node plugin/package-deb.mjs --out "$debs" --version "$version+up1" >&2
extra=""
for ((i = 0; i < igb; i++)); do
  extra+=" -device pcie-root-port,id=rpigb$i,bus=pcie.0,chassis=$((40 + i)),addr=$(printf '0x%x' $((0x1c + i))) -device igb,bus=rpigb$i"
done
export VFIO_MIG_RIG_QEMU_EXTRA="${VFIO_MIG_RIG_QEMU_EXTRA:-}$extra"
export VFIO_MIG_RIG_EDU=${VFIO_MIG_RIG_EDU:-2}
export VFIO_MIG_RIG_TIMEOUT=${VFIO_MIG_RIG_TIMEOUT:-2700}
export VFIO_MIG_PKG_DEBS=$PWD/$debs VFIO_MIG_PKG_VERSION=$version VFIO_MIG_PKG_IGB=$igb
exec test/rig/run.sh node_modules/.bin/ava --config test/rig/package/ava.config.mjs --concurrency=1 "$@"
