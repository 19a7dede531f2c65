#!/usr/bin/env bash
# Installs what test/qemu/ needs: qemu-system-x86_64 >= 9.1 (VFIO_MIGRATION, migrate
# options used by the tests). test/rig/setup-host.sh owns the apt side (bookworm-backports
# source, pin, QEMU 10.0): reuse it, then only check the result.
# Idempotent and fast when done. Exit codes: 0 ok, 1 cannot complete.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
"$here/../rig/setup-host.sh" || { echo "qemu setup: FAILED: test/rig/setup-host.sh" >&2; exit 1; }
v=$(qemu-system-x86_64 --version 2>/dev/null | sed -nE '1s/^QEMU emulator version ([0-9]+)\.([0-9]+).*/\1 \2/p')
read -r major minor <<<"${v:-0 0}"
if (( major < 9 || (major == 9 && minor < 1) )); then
  echo "qemu setup: FAILED: need qemu-system-x86_64 >= 9.1, found '${v:-none}'" >&2
  exit 1
fi
