#!/bin/sh
# /init of the rig's initramfs: runs as PID 1 under busybox sh inside the guest.
#
# 1. loads the 9p/overlay modules the initramfs carries (lib/modules/load-order),
# 2. mounts the host's / (9p tag "hostroot", read-only) under a tmpfs-backed overlay, so
#    the guest sees the host tree at the same paths and its writes vanish at power-off,
# 3. mounts the per-run results dir (9p tag "results", read-write) at its host path and
#    reads the run's parameters from its .rig/ folder (written by run.sh),
# 4. mounts fresh proc/sys/dev/devpts/shm/run/debugfs and the rig's module tree,
# 5. runs the command (or a shell) with the host's bash in the caller's directory, on
#    ttyS0 (QEMU writes it to the runner's stdout), writes its exit code to .rig/rc
#    and powers off.
# Anything that goes wrong is logged to the kernel log (ttyS1 -> kernel.log) and the
# guest powers off without an rc file, which the runner reports as exit 125.
#
# Keep this POSIX/busybox sh: the host's bash is only reachable after the chroot.

export PATH=/bin:/sbin
/bin/busybox --install -s /bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

log() { echo "rig-init: $*" >/dev/kmsg; }
# <2> (crit) so it reaches the console even while boot runs with "quiet".
log_crit() { echo "<2>rig-init: $*" >/dev/kmsg; }
power_off() { sync; poweroff -f; sleep 10; }
fail() { log_crit "FATAL: $*"; power_off; }

while read -r m; do
  insmod "/lib/modules/$m" || fail "insmod $m failed"
done </lib/modules/load-order

mkdir -p /mnt/lower /mnt/rw /mnt/results
# The virtio-9p devices normally exist by now; retry briefly in case probing lags.
mount_9p() { # tag dir options
  n=0
  until mount -t 9p -o "trans=virtio,version=9p2000.L,msize=512000,$3" "$1" "$2" 2>/dev/null; do
    n=$((n + 1))
    [ "$n" -ge 50 ] && fail "cannot mount the 9p share '$1'"
    sleep 0.1
  done
}
# cache=loose: the host root does not change under a run, and it makes node's many small
# reads (module resolution) far cheaper.
mount_9p hostroot /mnt/lower ro,cache=loose
# cache=mmap: write-through (the host sees results at once), mmap allowed.
mount_9p results /mnt/results cache=mmap

mount -t tmpfs -o mode=0755 rigrw /mnt/rw || fail "tmpfs for the overlay"
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay -o lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work rigroot /newroot \
  || fail "cannot mount the overlay root"

conf=/mnt/results/.rig
[ -f "$conf/results" ] || fail "no run parameters in the results share"
results=$(cat "$conf/results")
kver=$(cat "$conf/kver")
modtree=$(cat "$conf/modtree")
mode=$(cat "$conf/mode")
con=/dev/ttyS0
# Held open for the whole run: a tty forgets its window size when its last user closes it.
exec 3<>"$con"
size=$(cat "$conf/size" 2>/dev/null)
[ -f "$conf/verbose" ] && verbose=1 || verbose=0
[ "$kver" = "$(uname -r)" ] || fail "run parameters are for kernel $kver, this is $(uname -r)"

R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 shm $R/dev/shm
mount -t tmpfs -o mode=0755 run $R/run
mount -t debugfs debugfs $R/sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs $R/sys/kernel/tracing 2>/dev/null

if ! { mkdir -p "$R$results" && mount --move /mnt/results "$R$results"; }; then
  fail "cannot mount the results dir at $results"
fi
# /lib is a relative symlink (usr/lib) on merged-/usr Debian, so this stays inside $R.
if ! { mkdir -p "$R/lib/modules/$kver" && mount --bind "$R$modtree/lib/modules/$kver" "$R/lib/modules/$kver"; }; then
  fail "cannot bind the module tree $modtree"
fi

hostname vfio-mig-rig
ip link set lo up 2>/dev/null

# Stage 2 runs under the host's bash inside the new root: it reads the environment
# (NUL-separated NAME=value records, so any value is safe) and the command from files;
# nothing is evaluated except the command itself, by bash -c.
# shellcheck disable=SC2016  # expanded by the stage-2 bash, not here
stage2='
rig=$1 mode=$2
mapfile -d "" -t envs <"$rig/env"
cd -- "$(cat "$rig/cwd")" || { echo "rig: cannot cd to $(cat "$rig/cwd")" >&2; exit 126; }
if [ "$mode" = shell ]; then
  exec setsid -w -c env -i "${envs[@]}" bash --norc -i
fi
exec env -i "${envs[@]}" bash -c "$(cat "$rig/command")"
'

if [ "$mode" = shell ]; then
  stty -F "$con" sane
  [ -n "$size" ] && stty -F "$con" rows "${size% *}" cols "${size#* }"
  stdin=$con
else
  # Plain "\n" on the wire, so the runner's stdout is byte-for-byte the command's output.
  stty -F "$con" -onlcr -echo
  stdin=/dev/null
fi

# Boot ran "quiet" (serial output is slow under TCG); from here on every kernel message
# reaches kernel.log, e.g. driver probes and warnings during the command.
[ "$verbose" = 1 ] || echo 7 >/proc/sys/kernel/printk
cut -d' ' -f1 /proc/uptime >"$R$results/.rig/uptime-start"
log "command starts"
chroot $R /bin/bash -c "$stage2" rig-stage2 "$results/.rig" "$mode" <$stdin >"$con" 2>&1 3<&-
rc=$?
# tcsetattr(TCSADRAIN): returns once the console has sent everything, so the power-off
# below cannot cut off the end of the output.
stty -F "$con" -echo 2>/dev/null
cut -d' ' -f1 /proc/uptime >"$R$results/.rig/uptime-end"
log "command exited with $rc"

echo "$rc" >"$R$results/.rig/rc.tmp" && mv "$R$results/.rig/rc.tmp" "$R$results/.rig/rc"
sync
umount "$R$results" 2>/dev/null
power_off
