#!/usr/bin/env bash
# Runs inside `ip netns exec <ns>` (its own network and mount namespace): bind-mounts one
# fake host's directories over libvirt's fixed paths, then becomes that host's libvirtd
# under tini (a child subreaper: libvirt double-forks QEMU, see spec/libvirt-rig.md).
# The mounts are private to this mount namespace and vanish with its last process.
#   host-init.sh <host-dir>
set -euo pipefail
dir=${1:?usage: host-init.sh <host-dir>}
[[ -d $dir/etc && $dir == /* ]] || { echo "host-init: $dir is not a prepared host directory" >&2; exit 2; }
mount --make-rprivate /
for sub in etc:/etc/libvirt run:/run/libvirt lib:/var/lib/libvirt cache:/var/cache/libvirt log:/var/log/libvirt; do
  mkdir -p "${sub#*:}"
  mount --bind "$dir/${sub%%:*}" "${sub#*:}"
done
# -p: if the test process dies without teardown, libvirtd is told to stop.
exec tini -s -p SIGTERM -- /usr/sbin/libvirtd -f /etc/libvirt/libvirtd.conf -p "$dir/libvirtd.pid"
