#!/usr/bin/env bash
# Host set-up for the real-kernel test rig (see docs/testing.md).
#
# Installs what the rig needs on the host:
#   - QEMU 10 (qemu-system-x86 from bookworm-backports: QEMU < 8 has no VFIO migration v2),
#   - busybox-static (the initramfs userland), kmod (depmod/modprobe, also used in the
#     guest through the shared root), and the tools set-up uses to build modules/initramfs.
#
# bookworm-backports is added as a *private* source with a pin at priority 100 so that
# nothing except what we explicitly ask for (pkg/bookworm-backports) ever comes from it.
#
# Idempotent and fast when already done: only dpkg-query is consulted; apt-get update runs
# only when a package or the backports package list is missing.
# Exit codes: 0 ok, 1 cannot complete (the reason is printed on stderr).
set -euo pipefail

readonly SUITE=bookworm-backports
readonly SRC_FILE=/etc/apt/sources.list.d/vfio-mig-backports.sources
readonly PIN_FILE=/etc/apt/preferences.d/vfio-mig-backports

# Packages taken from bookworm (the pin keeps them there).
readonly BASE_PKGS=(
  busybox-static   # initramfs /init runs on it
  kmod             # depmod for the module tree; modprobe in the guest (softdeps work)
  zstd xz-utils    # the 6.12 bzImage payload is zstd; modules are .ko.xz
  python3          # bzImage header parsing for the vmlinux extraction
  gcc make libc6-dev  # out-of-tree modules (and C probes run inside the guest)
  libelf1 libssl3  # linux-kbuild's host tools (objtool, sign-file) are linked against them
  cpio gzip        # initramfs
  util-linux coreutils  # flock, setsid, timeout
  pciutils         # lspci inside the guest, for debugging
)
# Taken from backports on purpose: QEMU 10.0.
readonly BPO_PKGS=(qemu-system-x86)

log() { printf 'rig setup-host: %s\n' "$*" >&2; }
die() { printf 'rig setup-host: FAILED: %s\n' "$*" >&2; exit 1; }

# Is a backports source configured (ours, or one the admin already had)?
have_bpo_source() {
  [[ -f $SRC_FILE ]] && return 0
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    # Only active lines: '#' comments and deb822 "Enabled: no" are rare enough to not
    # matter for the fast path; apt itself is the judge during installation.
    if grep -Eq "^[^#]*[[:space:]]${SUITE}([[:space:]]|$)" "$f"; then return 0; fi
  done
  return 1
}

pkg_installed() { # name -> 0 if installed (any version)
  [[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null || true) == "ii " ]]
}

qemu_is_bpo() { # QEMU 10 from backports (epoch 1, upstream >= 10)
  local v
  v=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null) || return 1
  pkg_installed qemu-system-x86 && dpkg --compare-versions "$v" ge '1:10'
}

all_done() {
  have_bpo_source || return 1
  # One dpkg-query for all packages keeps the warm path fast (a rig run calls us).
  local p status missing=0
  status=$(dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n' "${BASE_PKGS[@]}" "${BPO_PKGS[@]}" 2>/dev/null || true)
  for p in "${BASE_PKGS[@]}" "${BPO_PKGS[@]}"; do
    grep -qxF "$p ii " <<<"$status" || { missing=1; break; }
  done
  (( ! missing )) && qemu_is_bpo
}

# --- fast path: nothing to do ----------------------------------------------------------
if all_done; then
  exit 0
fi

[[ $(id -u) -eq 0 ]] || die "host packages are missing and installing them needs root: run 'sudo $0' once (needs: ${BASE_PKGS[*]} ${BPO_PKGS[*]}/$SUITE)"

export DEBIAN_FRONTEND=noninteractive

# Serialise with other set-ups (apt has its own lock, but we also write apt config).
exec 9>/run/lock/vfio-mig-setup-host.lock
flock 9

# --- the backports source -----------------------------------------------------------------
mirror_and_key() { # prints "<uri> <signed-by>" of the system's main bookworm source
  local f uri key
  # deb822 first (Debian 12 default): a stanza whose Suites list has the word "bookworm".
  for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list.d/*.sources; do
    [[ -f $f && $f != "$SRC_FILE" ]] || continue
    # awk: split into stanzas on blank lines; report URIs/Signed-By of the first match.
    if out=$(awk -v RS= '
        /(^|\n)Suites:[^\n]*[[:space:]]bookworm([[:space:]\n]|$)/ {
          uri = ""; key = ""
          n = split($0, L, "\n")
          for (i = 1; i <= n; i++) {
            if (L[i] ~ /^URIs:/)      { sub(/^URIs:[[:space:]]*/, "", L[i]); split(L[i], U, /[[:space:]]+/); uri = U[1] }
            if (L[i] ~ /^Signed-By:/) { sub(/^Signed-By:[[:space:]]*/, "", L[i]); key = L[i] }
          }
          if (uri != "") { print uri, key; exit }
        }' "$f") && [[ -n $out ]]; then
      printf '%s\n' "$out"; return 0
    fi
  done
  # One-line format fallback: "deb [opts] URI bookworm main".
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f $f ]] || continue
    uri=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { if ($(i+1) == "bookworm") { print $i; exit } else break } }' "$f")
    if [[ -n $uri ]]; then printf '%s\n' "$uri"; return 0; fi
  done
  return 1
}

added_source=0
if ! have_bpo_source; then
  read -r uri key < <(mirror_and_key) || die "cannot find the bookworm mirror URI in /etc/apt/sources.list{,.d/*} to derive the $SUITE source from"
  [[ -n ${key:-} ]] || key=/usr/share/keyrings/debian-archive-keyring.gpg
  log "adding $SUITE from $uri as $SRC_FILE (pinned to 100 in $PIN_FILE)"
  tmp=$(mktemp "$SRC_FILE.XXXXXX")
  cat >"$tmp" <<EOF
# Added by vfio-mig test/rig/setup-host.sh: only packages requested as
# pkg/$SUITE are taken from here (see $PIN_FILE).
Types: deb
URIs: $uri
Suites: $SUITE
Components: main
Signed-By: $key
EOF
  chmod 644 "$tmp"
  tmp_pin=$(mktemp "$PIN_FILE.XXXXXX")
  cat >"$tmp_pin" <<EOF
# Added by vfio-mig test/rig/setup-host.sh: never upgrade anything to $SUITE
# implicitly; the rig asks for qemu-system-x86/$SUITE explicitly.
Package: *
Pin: release n=$SUITE
Pin-Priority: 100
EOF
  chmod 644 "$tmp_pin"
  mv "$tmp_pin" "$PIN_FILE"   # the pin first, so the source is never active without it
  mv "$tmp" "$SRC_FILE"
  added_source=1
fi

# --- packages --------------------------------------------------------------------------------
bpo_lists_present() { compgen -G "/var/lib/apt/lists/*_dists_${SUITE}_*Packages*" >/dev/null; }

apt_update() {
  log "apt-get update"
  apt-get update -qq >&2 || die "apt-get update failed (network or mirror problem, see above)"
}

if (( added_source )) || ! bpo_lists_present; then
  apt_update
  updated=1
else
  updated=0
fi

install_args=()
for p in "${BASE_PKGS[@]}"; do install_args+=("$p"); done
for p in "${BPO_PKGS[@]}"; do install_args+=("$p/$SUITE"); done

apt_install() {
  # pkg/suite (not -t), so only the named packages come from backports. apt does not
  # pull a backports version of a *dependency* by itself ("Depends: qemu-system-common
  # (= 1:10...) but 1:7.2 is to be installed"), so simulate first and add exactly the
  # dependencies apt names as pkg/suite, a few rounds at most (QEMU needs 3: -common,
  # -data, seabios). Nothing else moves: systemd, libc etc. stay on bookworm.
  local round sim extra
  for round in 1 2 3 4 5 6; do
    if sim=$(apt-get install -s --no-install-recommends "${install_args[@]}" 2>&1); then
      break
    fi
    extra=$(sed -nE 's/^ +([^ ]+ : )?(Pre)?Depends: ([^ ]+) \([^)]*\) but ([^ ]+ is to be|it is not going to be) installed$/\3/p' <<<"$sim" | sort -u)
    if [[ -z $extra ]]; then
      printf '%s\n' "$sim" | tail -n 20 >&2
      return 1
    fi
    local d
    for d in $extra; do install_args+=("$d/$SUITE"); done
    log "round $round: dependencies also needed from $SUITE: ${extra//$'\n'/ }"
  done
  # --force-confold keeps existing config files untouched.
  apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confold "${install_args[@]}" >&2
}

log "installing: ${install_args[*]}"
if ! apt_install; then
  if (( updated )); then
    die "apt-get install failed (see the apt output above)"
  fi
  # Stale package lists are the usual cause (a version vanished from the mirror).
  apt_update
  apt_install || die "apt-get install failed even after apt-get update (see the apt output above)"
fi

all_done || die "packages were installed but the check still fails: qemu-system-x86 is $(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || echo missing), need >= 1:10 from $SUITE"
log "done: $(qemu-system-x86_64 --version | head -n1)"
