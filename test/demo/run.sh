#!/usr/bin/env bash
# npm run demo: sets itself up (npm packages; the rig installs QEMU and fetches its
# kernel on first use) and runs test/demo/demo.ts inside the rig guest.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ ! -d node_modules/koffi ] || [ ! -d node_modules/tsx ]; then
  npm ci --no-audit --no-fund
fi
node test/rig/build.mjs
exec test/rig/run.sh 'node --enable-source-maps test/.rig-build/demo.mjs'
