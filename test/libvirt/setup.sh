#!/usr/bin/env bash
# Installs what test/libvirt/ needs: QEMU 10 (through test/rig/setup-host.sh, which also
# owns the bookworm-backports apt source and its pin), libvirt 11.3 from
# bookworm-backports, tini (a child subreaper, see spec/libvirt-rig.md) and iproute2.
#
# libvirt packages are named one by one as pkg/bookworm-backports (never -t): -t would also
# move systemd, udev and libsystemd0 to backports. No libvirt-daemon-system: it only adds
# users, default configs and unit files; the tests write their own configs and start the
# daemons themselves (there is no systemd here).
#
# Idempotent and fast when done (one dpkg-query). Exit codes: 0 ok, 1 cannot complete.
set -euo pipefail

readonly SUITE=bookworm-backports
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
readonly here

log() { printf 'libvirt setup: %s\n' "$*" >&2; }
die() { printf 'libvirt setup: FAILED: %s\n' "$*" >&2; exit 1; }

# Daemon, QEMU driver, node-device driver (nodedev listing), client library and virsh.
readonly BPO_PKGS=(libvirt0 libvirt-common libvirt-daemon libvirt-daemon-common libvirt-daemon-log
  libvirt-daemon-driver-qemu libvirt-daemon-driver-nodedev libvirt-clients)
readonly BASE_PKGS=(tini iproute2 util-linux)

"$here/../rig/setup-host.sh" || die "test/rig/setup-host.sh failed (backports source or QEMU 10)"

libvirt_ok() {
  local status p v
  status=$(dpkg-query -W -f='${Package} ${db:Status-Abbrev} ${Version}\n' "${BPO_PKGS[@]}" "${BASE_PKGS[@]}" 2>/dev/null || true)
  for p in "${BASE_PKGS[@]}" "${BPO_PKGS[@]}"; do
    grep -q "^$p ii " <<<"$status" || return 1
  done
  v=$(awk '$1 == "libvirt0" { print $3 }' <<<"$status")
  dpkg --compare-versions "$v" ge '11.3'
}

libvirt_ok && exit 0

[[ $(id -u) -eq 0 ]] || die "libvirt 11.3 is missing and installing it needs root: run 'sudo $0' once"
export DEBIAN_FRONTEND=noninteractive
# The same lock as setup-host.sh: both write apt state.
exec 9>/run/lock/vfio-mig-setup-host.lock
flock 9

args=("${BASE_PKGS[@]}")
for p in "${BPO_PKGS[@]}"; do args+=("$p/$SUITE"); done
log "installing: ${args[*]}"
install() {
  # --force-confold: keep any existing /etc/libvirt files as they are (the tests never
  # read them: each test daemon gets its own config directory bind-mounted over it).
  apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold "${args[@]}" >&2
}
if ! install; then
  log "retrying after apt-get update (stale package lists are the usual cause)"
  apt-get update -qq >&2 || die "apt-get update failed"
  install || die "apt-get install failed (see the apt output above)"
fi
libvirt_ok || die "libvirt was installed but is not >= 11.3 from $SUITE: $(dpkg-query -W -f='${Version}' libvirt0 2>/dev/null)"
log "done: $(/usr/sbin/libvirtd --version)"
