#!/usr/bin/env bash
# The real-kernel test rig: runs a command inside a throw-away QEMU guest that boots
# Debian's bookworm-backports 6.12 kernel, sees the host's / read-only (writes go to a
# tmpfs overlay), has a vIOMMU and QEMU "edu" PCI devices, and can load vfio-pci,
# mtty and the project's edu_vfio_pci module. See docs/testing.md.
#
#   test/rig/run.sh '<command>'     run <command> with bash in the guest, in the current
#                                   directory; exits with its exit code
#   test/rig/run.sh prog arg...     the same for an argument vector (quoting kept)
#   test/rig/run.sh --shell         interactive shell in the guest (Ctrl-A x quits QEMU)
#   test/rig/run.sh --setup         only the host and cache set-up
#
# Exit codes: the command's own, or 124 timeout, 125 guest died without an exit code,
# 126 rig set-up failed (the reason is printed). Knobs: VFIO_MIG_RIG_* (see usage()).
set -euo pipefail

RIG_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
readonly RIG_DIR
readonly EXIT_TIMEOUT=124 EXIT_DIED=125 EXIT_SETUP=126

usage() {
  cat <<'EOF'
usage: test/rig/run.sh '<command>' | prog arg... | --shell | --setup
Runs <command> with bash inside a QEMU guest booting Debian's 6.12 kernel (see
docs/testing.md). Exit code: the command's, or 124 timeout, 125 guest died, 126 set-up failed.
Environment knobs:
  VFIO_MIG_RIG_TIMEOUT=600     seconds before the guest is killed (exit 124)
  VFIO_MIG_RIG_EDU=4           number of edu devices (each behind its own pcie-root-port)
  VFIO_MIG_RIG_ROOT_PORTS=1    0: put the edu devices on the root bus instead
  VFIO_MIG_RIG_KEEP=1          keep the results dir (kernel.log, .rig/) after the run
  VFIO_MIG_RIG_VERBOSE=1       kernel messages and the QEMU command line on stderr
  VFIO_MIG_RIG_TIMING=1        print boot/command/total timings on stderr
  VFIO_MIG_RIG_ACCEL=auto      auto | kvm | tcg
  VFIO_MIG_RIG_TCG_THREAD=single  single | multi (TCG vCPU threads)
  VFIO_MIG_RIG_MEM=2G  VFIO_MIG_RIG_CPUS=2
  VFIO_MIG_RIG_PASS_ENV='A B'  also pass these host variables into the guest
                               (every VFIO_MIG_* variable is passed anyway)
  VFIO_MIG_RIG_CACHE=~/.cache/vfio-mig   downloads, kernel, module builds
  VFIO_MIG_RIG_EDU_SRC=native/edu-vfio-pci   source dir of the project's module
  VFIO_MIG_RIG_QEMU_EXTRA='...' extra QEMU arguments (split on spaces)
  VFIO_MIG_RIG_APPEND='...'     extra kernel command line
  VFIO_MIG_RIG_REFRESH=1       ask apt again which backports kernel is current
EOF
}

msg() { printf 'rig: %s\n' "$*" >&2; }
setup_failed() { msg "set-up failed: $*"; exit "$EXIT_SETUP"; }

mode=cmd
case ${1:-} in
  --setup) mode=setup; shift ;;
  --shell) mode=shell; shift ;;
  -h|--help) usage; exit 0 ;;
  '') usage >&2; exit 2 ;;
esac
(( $# == 0 )) || [[ $mode == cmd ]] || { usage >&2; exit 2; }

command_text=
if [[ $mode == cmd ]]; then
  if (( $# == 1 )); then
    command_text=$1                    # a bash script, as given
  else
    command_text=$(printf '%q ' "$@")  # an argv: keep each argument's boundaries
  fi
fi

# --- knobs -------------------------------------------------------------------------------------
int_knob() { # name default -> value (dies on a non-integer)
  local v=${!1:-$2}
  [[ $v =~ ^[0-9]+$ ]] || setup_failed "$1 must be a non-negative integer, got '$v'"
  printf '%s' "$v"
}
TIMEOUT=$(int_knob VFIO_MIG_RIG_TIMEOUT 600)
EDU=$(int_knob VFIO_MIG_RIG_EDU 4)
CPUS=$(int_knob VFIO_MIG_RIG_CPUS 2)
(( EDU <= 16 )) || setup_failed "VFIO_MIG_RIG_EDU is at most 16"
MEM=${VFIO_MIG_RIG_MEM:-2G}
[[ $MEM =~ ^[0-9]+[MG]?$ ]] || setup_failed "VFIO_MIG_RIG_MEM must look like 2G or 2048M, got '$MEM'"
ROOT_PORTS=${VFIO_MIG_RIG_ROOT_PORTS:-1}
KEEP=${VFIO_MIG_RIG_KEEP:-0}
VERBOSE=${VFIO_MIG_RIG_VERBOSE:-0}
TIMING=${VFIO_MIG_RIG_TIMING:-0}
t_start=$(date +%s.%N)

# --- set-up (fast when warm) ---------------------------------------------------------------
"$RIG_DIR/setup-host.sh" || setup_failed "host packages (test/rig/setup-host.sh, reason above)"
declare -A S=()
setup_out=$("$RIG_DIR/setup-cache.sh" --print-env) || setup_failed "cache (test/rig/setup-cache.sh, reason above)"
while IFS='=' read -r k v; do [[ -n $k ]] && S[$k]=$v; done <<<"$setup_out"
for k in KVER VMLINUX INITRD MODTREE KBUILD HEADERS UAPI; do
  [[ -n ${S[$k]:-} ]] || setup_failed "setup-cache.sh did not report $k"
done
t_setup=$(date +%s.%N)

if [[ $mode == setup ]]; then
  msg "set-up ok: kernel ${S[KVER]} (${S[KERNEL_VERSION]:-?}), cache ${S[CACHE]:-?}"
  exit 0
fi

command -v qemu-system-x86_64 >/dev/null || setup_failed "qemu-system-x86_64 not found"

# --- accelerator -----------------------------------------------------------------------------
# KVM only where it can boot a stock kernel. kvm_pvm (this machine kind) provides a
# /dev/kvm that only runs PVM-built guest kernels; Debian's kernel hangs there.
accel_args=() machine=q35 accel='' why=
case ${VFIO_MIG_RIG_ACCEL:-auto} in
  auto)
    if [[ ! -e /dev/kvm ]]; then why="no /dev/kvm"
    elif [[ ! -r /dev/kvm || ! -w /dev/kvm ]]; then why="/dev/kvm not writable"
    elif [[ -e /sys/module/kvm_pvm ]]; then why="kvm_pvm cannot boot stock kernels"
    elif ! grep -qwE 'vmx|svm' /proc/cpuinfo; then why="no vmx/svm in /proc/cpuinfo"
    else accel=kvm why="/dev/kvm usable, vmx/svm present"
    fi
    [[ -n $accel ]] || accel=tcg ;;
  kvm) accel=kvm why="VFIO_MIG_RIG_ACCEL=kvm" ;;
  tcg) accel=tcg why="VFIO_MIG_RIG_ACCEL=tcg" ;;
  *) setup_failed "VFIO_MIG_RIG_ACCEL must be auto, kvm or tcg" ;;
esac
if [[ $accel == kvm ]]; then
  # intremap=on with KVM needs the split irqchip (the IOAPIC is emulated in QEMU).
  machine=q35,kernel-irqchip=split
  accel_args=(-accel kvm -cpu host)
else
  # thread=single (all vCPUs in one host thread) by default: measured on this 2-core
  # machine while other work ran, it was faster than thread=multi in every A/B pair
  # (boot+node: 24-29 s vs 29-40 s; CPU 12-13 s vs 16-18 s), and it cannot hit the
  # multi-thread race that makes QEMU abort in iotlb_to_section (seen here once).
  tcg_thread=${VFIO_MIG_RIG_TCG_THREAD:-single}
  [[ $tcg_thread == multi || $tcg_thread == single ]] || setup_failed "VFIO_MIG_RIG_TCG_THREAD must be multi or single"
  accel_args=(-accel "tcg,thread=$tcg_thread,tb-size=256" -cpu max)
fi
msg "accel=$accel ($why)"

# --- per-run results dir ---------------------------------------------------------------------
# Shared read-write with the guest at the same path; nothing fixed, so runs don't clash.
R=$(mktemp -d "${TMPDIR:-/tmp}/vfio-mig-rig.XXXXXX") || setup_failed "cannot create a results dir in ${TMPDIR:-/tmp}"
R=$(cd "$R" && pwd -P)
chmod 755 "$R"
mkdir "$R/.rig"
qpid=
# shellcheck disable=SC2317  # called through the EXIT trap
cleanup() {
  if [[ -n $qpid ]] && kill -0 "$qpid" 2>/dev/null; then kill "$qpid" 2>/dev/null; wait "$qpid" 2>/dev/null || true; fi
  if [[ $KEEP == 1 ]]; then msg "results kept in $R"; else rm -rf "$R"; fi
}
trap cleanup EXIT
trap 'msg "interrupted"; exit 130' INT
trap 'msg "terminated"; exit 143' TERM
if [[ $KEEP == 1 ]]; then msg "results in $R"; else msg "results in $R (removed at exit; VFIO_MIG_RIG_KEEP=1 keeps it)"; fi

# The guest's environment: only what is listed here, NUL-separated so any value is safe.
declare -A E=()
while IFS= read -r name; do
  [[ $name == VFIO_MIG_* ]] && E[$name]=${!name}
done < <(compgen -e)
for name in ${VFIO_MIG_RIG_PASS_ENV:-}; do
  [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || setup_failed "VFIO_MIG_RIG_PASS_ENV: '$name' is not a variable name"
  [[ -n ${!name+set} ]] && E[$name]=${!name}
done
node_bin=$(command -v node || true)
guest_path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
if [[ -n $node_bin ]]; then
  node_dir=$(dirname "$(readlink -f "$node_bin")")
  case :$guest_path: in *:"$node_dir":*) ;; *) guest_path=$node_dir:$guest_path ;; esac
  [[ $(dirname "$node_bin") == "$node_dir" ]] || guest_path=$(dirname "$node_bin"):$guest_path
else
  msg "warning: node is not on the host PATH, so not in the guest either"
fi
E[PATH]=$guest_path
E[HOME]=/root
E[USER]=root
E[LOGNAME]=root
E[SHELL]=/bin/bash
E[LANG]=C.UTF-8
E[VFIO_MIG_IN_RIG]=1
E[VFIO_MIG_RIG_RESULTS]=$R
E[VFIO_MIG_RIG_KVER]=${S[KVER]}
E[VFIO_MIG_RIG_HEADERS]=${S[HEADERS]}
E[VFIO_MIG_RIG_KBUILD]=${S[KBUILD]}
E[VFIO_MIG_RIG_UAPI]=${S[UAPI]}
E[VFIO_MIG_RIG_ACCEL]=$accel
if [[ $mode == shell ]]; then
  E[TERM]=${TERM:-vt100}
  E[PS1]='[rig \W]\$ '
else
  E[TERM]=dumb
fi
for name in "${!E[@]}"; do printf '%s=%s\0' "$name" "${E[$name]}"; done >"$R/.rig/env"

# Run parameters for guest-init.sh, one value per file (no parsing of paths needed).
printf '%s\n' "$R" >"$R/.rig/results"
printf '%s\n' "${S[KVER]}" >"$R/.rig/kver"
printf '%s\n' "${S[MODTREE]}" >"$R/.rig/modtree"
printf '%s\n' "$mode" >"$R/.rig/mode"
printf '%s\n' "$(pwd -P)" >"$R/.rig/cwd"
printf '%s' "$command_text" >"$R/.rig/command"   # a file: no kernel command-line limit
if [[ $mode == shell ]] && [[ -t 0 ]]; then
  # The guest's tty cannot learn the window size over a serial line: tell it once.
  size=$(stty size 2>/dev/null || true)
  if [[ $size =~ ^[1-9][0-9]*\ [1-9][0-9]*$ ]]; then printf '%s\n' "$size" >"$R/.rig/size"; fi
fi
: >"$R/kernel.log"

# --- QEMU ---------------------------------------------------------------------------------------
qesc() { printf '%s' "${1//,/,,}"; }   # QEMU option values escape ',' as ',,'
# quiet: the boot's ~500 console lines cost seconds under TCG; guest-init.sh turns the
# console log level back up before the command, and oopses/panics always print in full.
# ttyS0 carries the command's output (QEMU: stdout), ttyS1 the kernel log (kernel.log).
# (A virtio console was tried for ttyS0: hvc under TCG was 15x slower and lost bytes.)
append="console=ttyS1 rdinit=/init panic=-1 oops=panic intel_iommu=on iommu=pt"
# Boot-time savers under TCG, irrelevant to what the rig tests: no crypto self-tests
# (~0.5 s), no speculation mitigations (pure emulation overhead), no TSC calibration
# watchdog, no audit, only the two serial ports QEMU has, and three built-in initcalls
# skipped (jitter-entropy RNG health test, encrypted keys, KDF self-test: ~0.6 s).
append+=" cryptomgr.notests mitigations=off tsc=reliable audit=0 8250.nr_uarts=2"
append+=" initcall_blacklist=jent_mod_init,init_encrypted,crypto_kdf108_init"
if [[ $VERBOSE == 1 ]]; then : >"$R/.rig/verbose"; else append+=" quiet"; fi
append+=" ${VFIO_MIG_RIG_APPEND:-}"
# shellcheck disable=SC2054  # the commas are QEMU's, inside single arguments
q=(qemu-system-x86_64 -nodefaults -no-user-config -display none -no-reboot
   -machine "$machine" "${accel_args[@]}" -m "$MEM" -smp "$CPUS"
   -kernel "${S[VMLINUX]}" -initrd "${S[INITRD]}" -append "$append"
   # The vIOMMU first: VFIO in the guest needs it (Debian's kernels have no noiommu),
   # and interrupt remapping spares vfio_iommu_type1's allow_unsafe_interrupts.
   -device intel-iommu,intremap=on
   -fsdev local,id=fsroot,path=/,security_model=none,readonly=on,multidevs=remap
   -device virtio-9p-pci,fsdev=fsroot,mount_tag=hostroot
   -fsdev "local,id=fsres,path=$(qesc "$R"),security_model=none"
   -device virtio-9p-pci,fsdev=fsres,mount_tag=results
   -chardev "file,id=klog,path=$(qesc "$R/kernel.log")"
)
# shellcheck disable=SC2054
if [[ $mode == shell ]]; then
  q+=(-chardev stdio,id=con0,mux=on,signal=off)   # Ctrl-C goes to the guest; Ctrl-A x quits
else
  q+=(-chardev stdio,id=con0,signal=off)
fi
q+=(-serial chardev:con0 -serial chardev:klog)
# Each edu behind its own PCIe root port: the kernel can then reset it with a secondary
# bus reset (VFIO_DEVICE_RESET), and it gets an IOMMU group of its own.
for ((i = 0; i < EDU; i++)); do
  if [[ $ROOT_PORTS == 1 ]]; then
    q+=(-device "pcie-root-port,id=rp$i,bus=pcie.0,chassis=$((i + 1)),addr=$(printf '0x%x' $((0x10 + i)))"
        -device "edu,bus=rp$i")
  else
    q+=(-device "edu,bus=pcie.0,addr=$(printf '0x%x' $((0x10 + i)))")
  fi
done
if [[ -n ${VFIO_MIG_RIG_QEMU_EXTRA:-} ]]; then
  read -r -a extra <<<"$VFIO_MIG_RIG_QEMU_EXTRA"   # plain word splitting, no evaluation
  q+=("${extra[@]}")
fi
[[ $VERBOSE == 1 ]] && msg "qemu: ${q[*]}"

launch() { # -> qrc: QEMU's (or timeout's) exit status
  : >"$R/kernel.log"
  rm -f "$R/.rig/rc" "$R/.rig/uptime-start" "$R/.rig/uptime-end"
  set +e
  if [[ $mode == shell ]]; then
    # Explicit <&0: a background job's stdin would otherwise be /dev/null. Still in our
    # process group, so it may read the terminal; in the background so traps can kill it.
    "${q[@]}" <&0 2>"$R/.rig/qemu.stderr" &
    qpid=$!
    wait "$qpid"
    qrc=$?
    qpid=
  else
    # timeout puts QEMU in its own process group; stdin stays away from the guest.
    timeout -k 5 "$TIMEOUT" "${q[@]}" </dev/null 2>"$R/.rig/qemu.stderr" &
    qpid=$!
    if [[ $VERBOSE == 1 ]]; then tail -n +1 -F --pid="$qpid" "$R/kernel.log" >&2 2>/dev/null & fi
    wait "$qpid"
    qrc=$?
    qpid=
  fi
  set -e
}

[[ $mode == shell ]] && msg "guest shell: 'exit' powers off, Ctrl-A x kills QEMU"
launch
# Multi-threaded TCG (VFIO_MIG_RIG_TCG_THREAD=multi) has a rare race: QEMU aborts in
# iotlb_to_section while the guest reprograms PCI BARs (seen once in ~50 boots here).
# If QEMU itself aborted before the command started, nothing of the command ran: boot
# once more.
if [[ ! -f $R/.rig/uptime-start ]] && (( qrc == 134 )) && grep -q 'Assertion' "$R/.rig/qemu.stderr"; then
  msg "QEMU aborted during boot ($(grep -m1 -o 'Assertion.*' "$R/.rig/qemu.stderr")), booting again"
  launch
fi
t_end=$(date +%s.%N)

if [[ $TIMING == 1 ]]; then
  # Guest uptime when init started and saw the end of the command.
  boot=$(cat "$R/.rig/uptime-start" 2>/dev/null || true)
  cmdt=$(cat "$R/.rig/uptime-end" 2>/dev/null || true)
  msg "$(awk -v a="$t_start" -v b="$t_setup" -v c="$t_end" -v u="${boot:-}" -v x="${cmdt:-}" 'BEGIN {
    printf "timing: set-up %.2fs, guest uptime at command start %ss, command %s, total %.2fs",
      b - a, (u == "" ? "?" : u), (u == "" || x == "" ? "?" : sprintf("%.2fs", x - u)), c - a }')"
fi

kernel_tail() { msg "kernel log tail ($R/kernel.log):"; tail -n "${1:-40}" "$R/kernel.log" | sed 's/^/  /' >&2; }

if [[ -f $R/.rig/rc ]]; then
  rc=$(<"$R/.rig/rc")
  [[ $rc =~ ^[0-9]+$ ]] || { msg "bad exit code file: '$rc'"; exit "$EXIT_DIED"; }
  [[ $VERBOSE == 1 ]] && msg "exit code $rc"
  exit "$rc"
fi
if (( qrc == 124 )); then
  msg "timeout: the guest ran longer than VFIO_MIG_RIG_TIMEOUT=$TIMEOUT s and was killed"
  kernel_tail 15
  exit "$EXIT_TIMEOUT"
fi
if [[ ! -s $R/kernel.log ]]; then
  # QEMU never got the kernel going: a rig problem, not a guest one.
  msg "QEMU failed to start (exit $qrc):"
  sed 's/^/  /' "$R/.rig/qemu.stderr" >&2
  exit "$EXIT_SETUP"
fi
msg "the guest died without an exit code (QEMU exit $qrc)"
[[ -s $R/.rig/qemu.stderr ]] && sed 's/^/  qemu: /' "$R/.rig/qemu.stderr" >&2
kernel_tail 40
exit "$EXIT_DIED"
