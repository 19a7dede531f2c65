#!/usr/bin/env bash
# Fills the rig's cache (see docs/testing.md) with everything a guest boot needs:
#
#   kernel/<kver>/root/      bookworm-backports linux-image + headers + common + kbuild,
#                            unpacked with dpkg-deb -x (never installed on the host);
#                            modules decompressed (depmod and modprobe under TCG are much
#                            faster on plain .ko)
#   kernel/<kver>/vmlinux    uncompressed ELF from the bzImage, booted via PVH (no in-guest
#                            decompression under TCG)
#   kernel/<kver>/uapi/      sanitised userspace headers of that kernel (headers_install)
#   kernel/<kver>/mtty/      mtty.c from linux-source (same version) and mtty.ko
#   kernel/<kver>/initramfs-<hash>.cpio   busybox + guest-init.sh + 9p/overlay modules
#   build/<kver>/edu-<hash>/ the project's module (native/edu-vfio-pci), per source hash
#   modtree/<kver>-<hash>/   lib/modules/<kver> as the guest sees it: the kernel's modules
#                            plus extra/{edu_vfio_pci,mtty}.ko, indexed by kmod's depmod
#
# Usage: setup-cache.sh [--print-env]
#   --print-env  print KEY=VALUE lines describing the ready cache on stdout (the runner
#                reads them); all progress and errors go to stderr.
# Exit codes: 0 ok, 1 cannot complete (the reason is printed on stderr).
set -euo pipefail

RIG_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO=$(cd "$RIG_DIR/../.." && pwd -P)
readonly RIG_DIR REPO
readonly SUITE=bookworm-backports
EDU_SRC=${VFIO_MIG_RIG_EDU_SRC:-$REPO/native/edu-vfio-pci}
# Modules the initramfs needs to reach the 9p root and stack the overlay (the 6.12
# kernel has virtio-pci built in; built-ins are skipped automatically).
readonly INITRD_MODULES=(virtio_pci 9pnet_virtio 9p overlay)
# Kept this long after last use before garbage collection (old kernels, old module builds).
readonly GC_DAYS=2

print_env=0
case ${1:-} in
  --print-env) print_env=1 ;;
  '') ;;
  *) echo "usage: $0 [--print-env]" >&2; exit 2 ;;
esac

log() { printf 'rig setup-cache: %s\n' "$*" >&2; }
die() { printf 'rig setup-cache: FAILED: %s\n' "$*" >&2; exit 1; }
t0=$SECONDS
step() { log "[$((SECONDS - t0))s] $*"; }

# --- the cache dir ----------------------------------------------------------------------------
CACHE=${VFIO_MIG_RIG_CACHE:-${HOME:-/root}/.cache/vfio-mig}
mkdir -p "$CACHE" 2>/dev/null || die "cannot create the cache dir '$CACHE': set VFIO_MIG_RIG_CACHE to a writable directory"
# Absolute and symlink-free: the guest sees the host's / at the same paths, and the
# module tree links into the cache by absolute path.
CACHE=$(cd "$CACHE" && pwd -P)
probe="$CACHE/.write-test.$$"
if ! ( : >"$probe" ) 2>/dev/null; then
  die "the cache dir '$CACHE' is not writable (read-only file system or permissions): set VFIO_MIG_RIG_CACHE to a writable directory"
fi
rm -f "$probe"
readonly CACHE

# One set-up at a time per cache; a concurrent one waits here, then finds the work done.
exec 8>>"$CACHE/.lock"
if ! flock -n 8; then
  log "another set-up holds $CACHE/.lock, waiting for it"
  flock 8
fi

mkdir -p "$CACHE/tmp"
WORK=$(mktemp -d "$CACHE/tmp/setup.XXXXXX")
APT_TMP=
trap 'rm -rf "$WORK" ${APT_TMP:+"$APT_TMP"}' EXIT

avail_mib() { df -Pk "$CACHE" | awk 'NR == 2 { print int($4 / 1024) }'; }
need_space() { # MiB what -> die unless that much is free
  local have; have=$(avail_mib)
  if (( have < $1 )); then
    die "not enough disk space in $CACHE for $2: needs about $1 MiB, $have MiB available (free some space or set VFIO_MIG_RIG_CACHE elsewhere)"
  fi
}

# apt-cache rebuilds its package cache on every call on this image (Dir::Cache::pkgcache
# is "" in the Docker apt config), ~1 s each; a private one (38 MB, in TMPDIR, deleted at
# exit) makes the later calls of this set-up take 0.2 s.
apt_opts=()
apt_init() {
  [[ -n $APT_TMP ]] && return 0
  APT_TMP=$(mktemp -d "${TMPDIR:-/tmp}/vfio-mig-apt.XXXXXX") || die "cannot create a temporary dir in ${TMPDIR:-/tmp}"
  apt_opts=(-o "Dir::Cache::pkgcache=$APT_TMP/pkgcache.bin" -o "Dir::Cache::srcpkgcache=")
  # apt's _apt sandbox user cannot write into root's cache dir; downloads are still verified.
  if [[ $(id -u) -eq 0 ]]; then apt_opts+=(-o APT::Sandbox::User=root); fi
}
aptc() { apt_init; apt-cache "${apt_opts[@]}" "$@"; }

field() { # stanza-text field -> value of the first "field:" line
  awk -v f="$2:" '$1 == f { sub(/^[^:]*:[[:space:]]*/, ""); print; exit }' <<<"$1"
}

# --- which kernel ------------------------------------------------------------------------------
# The answer is remembered in current-kernel; apt is asked again only when its backports
# package list changed since (apt-get update) or the kernel is not complete.
bpo_list_newest() {
  local f newest=0 m
  for f in /var/lib/apt/lists/*_dists_"${SUITE}"_*Packages*; do
    [[ -f $f ]] || continue
    m=$(stat -c %Y "$f"); (( m > newest )) && newest=$m
  done
  echo "$newest"
}

declare -A K=()
read_current() {
  local k v
  K=()
  [[ -f $CACHE/current-kernel ]] || return 1
  while IFS='=' read -r k v; do [[ -n $k ]] && K[$k]=$v; done <"$CACHE/current-kernel"
  [[ -n ${K[kver]:-} && -f $CACHE/kernel/${K[kver]}/.complete ]]
}

resolve_kernel() {
  step "resolving the $SUITE kernel from the archive"
  local meta hdr_show
  apt_init
  if ! meta=$(aptc show --no-all-versions "linux-image-amd64/$SUITE" 2>&1); then
    if grep -q 'No space left' <<<"$meta"; then
      die "no space left in ${TMPDIR:-/tmp} for apt's temporary package cache (needs about 40 MiB): $(tr '\n' ' ' <<<"$meta")"
    fi
    die "cannot find linux-image-amd64 in $SUITE: $(tr '\n' ' ' <<<"$meta"). Run test/rig/setup-host.sh as root (it adds the $SUITE source and runs apt-get update)"
  fi
  local version image kver mm
  version=$(field "$meta" Version)
  image=$(field "$meta" Depends | grep -oE 'linux-image-[^ ,|]+' | head -n1)
  [[ -n $version && -n $image ]] || die "cannot read the kernel package from linux-image-amd64/$SUITE's Depends"
  kver=${image#linux-image-}
  mm=$(sed -nE 's/^([0-9]+\.[0-9]+)\..*/\1/p' <<<"$kver")
  [[ -n $mm ]] || die "unexpected kernel version '$kver'"
  hdr_show=$(aptc show --no-all-versions "linux-headers-$kver=$version" 2>&1) \
    || die "package linux-headers-$kver=$version is not in the archive ($hdr_show)"
  local deps common kbuild
  deps=$(field "$hdr_show" Depends)
  common=$(grep -oE 'linux-headers-[^ ,|]+-common' <<<"$deps" | head -n1)
  kbuild=$(grep -oE 'linux-kbuild-[^ ,|]+' <<<"$deps" | head -n1)
  [[ -n $common && -n $kbuild ]] || die "cannot find the -common and kbuild packages in linux-headers-$kver's Depends: $deps"
  # linux-source-X.Y must be the same version as the kernel: bookworm-security carries
  # newer linux-source-6.12 builds that would otherwise win.
  K=([kver]=$kver [version]=$version [image]=$image [headers]="linux-headers-$kver"
     [common]=$common [kbuild]=$kbuild [source]="linux-source-$mm")
}

write_current() {
  local k tmp; tmp=$(mktemp "$CACHE/current-kernel.XXXXXX")
  for k in kver version image headers common kbuild source; do printf '%s=%s\n' "$k" "${K[$k]}"; done >"$tmp"
  mv "$tmp" "$CACHE/current-kernel"
}

if [[ ${VFIO_MIG_RIG_REFRESH:-0} == 1 ]] || ! read_current \
   || (( $(bpo_list_newest) > $(stat -c %Y "$CACHE/current-kernel") )); then
  resolve_kernel
  write_current
fi
KVER=${K[kver]}
KDIR=$CACHE/kernel/$KVER
KROOT=$KDIR/root
KBUILD=$KROOT/usr/src/linux-headers-$KVER          # make -C target (arch headers)
HEADERS=$KROOT/usr/src/${K[common]}                # full header tree (include/uapi/...)
MODS=$KROOT/lib/modules/$KVER

# --- kernel download + unpack ---------------------------------------------------------------
pkg_sizes() { # pkg=ver... -> total "Size" (bytes) and the image's Installed-Size (KiB)
  aptc show --no-all-versions "$@" | awk '
    /^Package:/ { pkg = $2 }
    /^Size:/ { size += $2 }
    /^Installed-Size:/ { if (pkg ~ /^linux-image-/) img = $2; else other += $2 }
    END { printf "%d %d %d\n", size / 1048576, img / 1024, other / 1024 }'
}

download() { # dir pkg=ver... ; one retry after apt-get update when the lists are stale
  local dir=$1; shift
  local out
  apt_init
  if out=$(cd "$dir" && apt-get download "${apt_opts[@]}" -q "$@" 2>&1); then return 0; fi
  if [[ $(id -u) -eq 0 ]] && grep -qE '404|Unable to locate|Can.t find a source' <<<"$out"; then
    log "download failed, package lists may be stale: apt-get update and retry"
    apt-get update -qq >&2 || true
    out=$(cd "$dir" && apt-get download "${apt_opts[@]}" -q "$@" 2>&1) && return 0
  fi
  die "apt-get download $* failed: $(tail -n 5 <<<"$out")"
}

extract_vmlinux() { # bzImage out: payload offset/length from the boot header, then zstd/xz/gzip
  python3 - "$1" "$2.payload" <<'PY'
import struct, sys
img = open(sys.argv[1], 'rb').read()
if img[0x202:0x206] != b'HdrS':
    sys.exit('not a bzImage (no HdrS magic)')
setup_sects = img[0x1f1] or 4
off, length = struct.unpack_from('<II', img, 0x248)
start = (setup_sects + 1) * 512 + off
open(sys.argv[2], 'wb').write(img[start:start + length])
PY
  local magic; magic=$(od -An -tx1 -N4 "$2.payload" | tr -d ' ')
  # The kernel appends the uncompressed size (4 bytes) after the stream; decompressors
  # complain about it, so the ELF magic of the result is the real check.
  case $magic in
    28b52ffd) zstd -dcq "$2.payload" >"$2" 2>/dev/null || true ;;
    fd377a58) xz -dcq "$2.payload" >"$2" 2>/dev/null || true ;;
    1f8b*)    gzip -dcq "$2.payload" >"$2" 2>/dev/null || true ;;
    *) die "unknown bzImage payload compression (magic $magic)" ;;
  esac
  rm -f "$2.payload"
  [[ $(od -An -tx1 -N4 "$2" | tr -d ' ') == 7f454c46 ]] || die "vmlinux extraction from $1 did not give an ELF file"
}

make_uapi() { # sanitised userspace headers, like 'make headers_install'
  local out=$KDIR/uapi.tmp
  rm -rf "$out" "$KDIR/uapi"
  mkdir -p "$out/include"
  # headers_install.sh runs scripts/unifdef relative to the current dir: run it from kbuild.
  local kb; kb=$(cd "$KBUILD/scripts/.." && pwd -P)
  {
    (cd "$HEADERS/include/uapi" && find . -name '*.h' -printf "$HEADERS/include/uapi/%P\t%P\n")
    (cd "$HEADERS/arch/x86/include/uapi" && find . -name '*.h' -printf "$HEADERS/arch/x86/include/uapi/%P\t%P\n")
    (cd "$KBUILD/arch/x86/include/generated/uapi" && find . -name '*.h' -printf "$KBUILD/arch/x86/include/generated/uapi/%P\t%P\n")
    (cd "$KBUILD/include/generated/uapi" && find . -name '*.h' -printf "$KBUILD/include/generated/uapi/%P\t%P\n")
  } | while IFS=$'\t' read -r src rel; do
    mkdir -p "$out/include/$(dirname "$rel")"
    printf '%s\0%s\0' "$src" "$out/include/$rel"
  done | (cd "$kb" && xargs -0 -n2 -P"$(nproc)" sh scripts/headers_install.sh) \
    || die "headers_install of the $KVER uapi headers failed"
  mv "$out" "$KDIR/uapi"
}

kbuild_make() { # dir what -> build the external module in dir; compiler tail on failure
  local dir=$1 what=$2
  if ! make -C "$KBUILD" M="$dir" CONFIG_DEBUG_INFO_BTF_MODULES= -j"$(nproc)" modules >"$dir/build.log" 2>&1; then
    tail -n 40 "$dir/build.log" >&2
    die "building $what against $KVER failed (compiler output above, full log in $dir/build.log)"
  fi
}

fetch_kernel() {
  step "fetching kernel $KVER (${K[version]})"
  rm -rf "$KDIR"
  local v=${K[version]} sizes dl_mib img_mib other_mib
  local pkgs=("${K[image]}=$v" "${K[headers]}=$v" "${K[common]}=$v" "${K[kbuild]}=$v")
  sizes=$(pkg_sizes "${pkgs[@]}" "${K[source]}=$v") || die "a kernel package is missing in the archive: ${pkgs[*]} ${K[source]}=$v"
  read -r dl_mib img_mib other_mib <<<"$sizes"
  # .debs + unpacked tree with modules decompressed (~5x the .ko.xz) + vmlinux + margin.
  need_space $(( dl_mib + img_mib * 5 + other_mib + 128 )) "kernel $KVER (download $dl_mib MiB)"

  local dl=$WORK/debs; mkdir -p "$dl" "$KROOT"
  download "$dl" "${pkgs[@]}"
  local d
  for d in "$dl"/*.deb; do dpkg-deb -x "$d" "$KROOT" || die "dpkg-deb -x $d failed (disk full?)"; done
  (cd "$dl" && ls -1 -- *.deb) >"$KDIR/packages"
  rm -rf "$dl"

  step "decompressing modules"
  find "$MODS/kernel" -name '*.ko.xz' -print0 | xargs -0 -r -n 200 -P"$(nproc)" xz -d \
    || die "decompressing the kernel modules failed (disk full?)"
  find "$MODS/kernel" -name '*.ko.zst' -print0 | xargs -0 -r -n 200 -P"$(nproc)" zstd -dq --rm \
    || die "decompressing the kernel modules failed (disk full?)"

  # The arch headers' one-line Makefile includes the -common Makefile by its packaged
  # absolute path; point it into the cache. build/source links likewise.
  printf 'include %s/Makefile\n' "$HEADERS" >"$KBUILD/Makefile"
  ln -sfn "$KBUILD" "$MODS/build"
  ln -sfn "$HEADERS" "$MODS/source"
  depmod -b "$KROOT" "$KVER" || die "depmod for $KVER failed"

  step "extracting vmlinux"
  extract_vmlinux "$KROOT/boot/vmlinuz-$KVER" "$KDIR/vmlinux"

  step "installing uapi headers"
  make_uapi

  step "fetching mtty.c from ${K[source]}=$v"
  mkdir -p "$KDIR/mtty"
  download "$WORK" "${K[source]}=$v"
  local src_deb; src_deb=$(ls "$WORK"/linux-source-*.deb)
  # The deb holds one linux-source-X.Y.tar.xz; stream it and take only mtty.c (the
  # whole 1.4 GiB stream is decompressed up to it: ~15-20 s). pipefail off and
  # dpkg-deb's stderr dropped: the readers stop early once the member is found, and
  # the non-empty result is the check.
  set +o pipefail
  dpkg-deb --fsys-tarfile "$src_deb" 2>/dev/null \
    | tar -xO --wildcards './usr/src/linux-source-*.tar.xz' 2>/dev/null \
    | xz -dc -T0 2>/dev/null \
    | tar -xO --wildcards --occurrence=1 '*/samples/vfio-mdev/mtty.c' >"$KDIR/mtty/mtty.c"
  set -o pipefail
  rm -f "$src_deb"
  [[ -s $KDIR/mtty/mtty.c ]] || die "samples/vfio-mdev/mtty.c not found in ${K[source]}=$v"

  step "building mtty.ko"
  echo 'obj-m := mtty.o' >"$KDIR/mtty/Kbuild"
  kbuild_make "$KDIR/mtty" mtty.ko

  touch "$KDIR/.complete"
  step "kernel $KVER ready ($(du -sm "$KDIR" | cut -f1) MiB)"
}

[[ -f $KDIR/.complete ]] || fetch_kernel

# --- initramfs ----------------------------------------------------------------------------------
# Keyed by what goes in: guest-init.sh, busybox, the kernel, and this script (layout).
bb=/bin/busybox
[[ -x $bb ]] || die "$bb missing: run test/rig/setup-host.sh (busybox-static)"
initrd_key=$( { sha256sum <"$RIG_DIR/guest-init.sh"; sha256sum <"$bb"; sha256sum <"${BASH_SOURCE[0]}"; echo "$KVER"; } | sha256sum | cut -c1-16)
INITRD=$KDIR/initramfs-$initrd_key.cpio

module_order() { # names... -> module paths (relative to $MODS) in load order, deps first
  awk -v want="$*" '
    function base(p) { sub(/^.*\//, "", p); sub(/\.ko(\.(xz|zst|gz))?$/, "", p); gsub(/-/, "_", p); return p }
    function visit(p,   i, n, d) {
      if (p in seen) return
      seen[p] = 1
      n = split(deps[p], d, " ")
      for (i = n; i >= 1; i--) visit(d[i])   # modules.dep lists the deepest last
      order[++k] = p
    }
    FILENAME ~ /modules\.dep$/ { p = $1; sub(/:$/, "", p); $1 = ""; deps[p] = $0; path[base(p)] = p; next }
    FILENAME ~ /modules\.builtin$/ { builtin[base($1)] = 1; next }
    END {
      n = split(want, w, " ")
      for (i = 1; i <= n; i++) {
        m = w[i]; gsub(/-/, "_", m)
        if (m in builtin) continue
        if (!(m in path)) { print "MISSING " m; continue }
        visit(path[m])
      }
      for (i = 1; i <= k; i++) print order[i]
    }' "$MODS/modules.dep" "$MODS/modules.builtin"
}

if [[ ! -f $INITRD ]]; then
  step "building the initramfs"
  ir=$WORK/initramfs
  mkdir -p "$ir"/{bin,sbin,dev,proc,sys,mnt,newroot,lib/modules}
  cp "$bb" "$ir/bin/busybox"
  ln -s busybox "$ir/bin/sh"   # /init's interpreter; the other applets are linked at boot
  install -m 755 "$RIG_DIR/guest-init.sh" "$ir/init"
  order=$(module_order "${INITRD_MODULES[@]}")
  if grep -q '^MISSING ' <<<"$order"; then die "initramfs: module(s) not in $KVER: $(grep '^MISSING ' <<<"$order" | cut -d' ' -f2 | xargs)"; fi
  : >"$ir/lib/modules/load-order"
  for m in $order; do
    cp "$MODS/$m" "$ir/lib/modules/"
    basename "$m" >>"$ir/lib/modules/load-order"
  done
  # Uncompressed: decompressing a gzip initramfs under TCG costs more than loading it.
  (cd "$ir" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) >"$INITRD.tmp" \
    || die "writing the initramfs failed (disk full?)"
  mv "$INITRD.tmp" "$INITRD"
  rm -rf "$ir"
fi

# --- the project's module ------------------------------------------------------------------------
# Built in the cache, never in the checkout; keyed by a hash of its sources (and kernel and
# compiler), so a changed source rebuilds and an unchanged one is reused.
cc_version=$(gcc -dumpfullversion 2>/dev/null || gcc -dumpversion)
EDU_KOS=()
EDU_BUILD=
edu_files() { # relative paths of the source files (build artefacts excluded)
  (cd "$EDU_SRC" && find . -type f \
      ! -name '*.o' ! -name '*.ko' ! -name '*.mod' ! -name '*.mod.c' ! -name '.*.cmd' \
      ! -name '*.symvers' ! -name 'modules.order' ! -name '*.a' ! -name '.*.d' \
      ! -path './.tmp_versions/*' ! -name '*.ko.*' ! -name '*.md' -printf '%P\n' | LC_ALL=C sort)
}
if [[ -d $EDU_SRC ]]; then
  files=$(edu_files)
  [[ -n $files ]] || die "$EDU_SRC has no source files"
  edu_key=$( { echo "$KVER $cc_version"; while IFS= read -r f; do printf '%s ' "$f"; sha256sum <"$EDU_SRC/$f"; done <<<"$files"; } | sha256sum | cut -c1-16)
  EDU_BUILD=$CACHE/build/$KVER/edu-$edu_key
  if [[ ! -f $EDU_BUILD/.ok ]]; then
    step "building $(basename "$EDU_SRC") (sources changed: key $edu_key)"
    need_space 64 "the module build"
    rm -rf "$EDU_BUILD"; mkdir -p "$EDU_BUILD"
    while IFS= read -r f; do
      mkdir -p "$EDU_BUILD/$(dirname "$f")"; cp -p "$EDU_SRC/$f" "$EDU_BUILD/$f"
    done <<<"$files"
    kbuild_make "$EDU_BUILD" "$EDU_SRC"
    compgen -G "$EDU_BUILD/*.ko" >/dev/null || die "building $EDU_SRC produced no .ko (see $EDU_BUILD/build.log)"
    touch "$EDU_BUILD/.ok"
  fi
  for f in "$EDU_BUILD"/*.ko; do EDU_KOS+=("$f"); done
  touch "$EDU_BUILD/.ok"   # last use, for garbage collection
else
  log "note: $EDU_SRC does not exist, edu_vfio_pci.ko is not installed in the guest"
fi

# --- the guest's module tree -----------------------------------------------------------------
# lib/modules/<kver> with extra/ = our modules, indexed by kmod's depmod so modules.alias
# has their aliases (e.g. the vfio_pci: alias modpost makes for an override-only PCI id).
# kernel/ is a link into the unpacked kernel, so a tree is ~6 MiB and depmod takes ~1 s.
# Keyed by the modules' contents; concurrent runs each use the tree their set-up printed.
EXTRA_KOS=("$KDIR/mtty/mtty.ko" "${EDU_KOS[@]}")
mod_key=$( { echo "$KVER"; for f in "${EXTRA_KOS[@]}"; do printf '%s ' "$(basename "$f")"; sha256sum <"$f"; done; } | sha256sum | cut -c1-16)
MODTREE=$CACHE/modtree/$KVER-$mod_key
if [[ ! -f $MODTREE/.ok ]]; then
  step "indexing the guest module tree (key $mod_key)"
  mkdir -p "$CACHE/modtree"
  tmp=$(mktemp -d "$CACHE/modtree/.tmp.XXXXXX")
  m=$tmp/lib/modules/$KVER
  mkdir -p "$m/extra"
  ln -s "$MODS/kernel" "$m/kernel"
  ln -s "$KBUILD" "$m/build"
  ln -s "$HEADERS" "$m/source"
  cp "$MODS"/modules.{builtin,builtin.modinfo,order} "$m/"
  cp "${EXTRA_KOS[@]}" "$m/extra/"
  depmod -b "$tmp" "$KVER" || die "depmod of the guest module tree failed"
  touch "$tmp/.ok"
  rm -rf "$MODTREE"
  mv "$tmp" "$MODTREE"
  for f in "${EDU_KOS[@]}"; do
    name=$(basename "$f" .ko)
    if ! grep -q "^alias vfio_pci:.* $name\$" "$MODTREE/lib/modules/$KVER/modules.alias"; then
      log "note: $name.ko has no vfio_pci: alias (no override-only PCI id in its table)"
    fi
  done
fi
touch "$MODTREE/.ok" "$KDIR/.complete"   # last use, for garbage collection

# --- garbage collection (old kernels, module builds, trees) --------------------------------
gc() {
  local d
  for d in "$CACHE"/kernel/*/; do
    d=${d%/}; [[ $d == "$KDIR" ]] && continue
    if [[ ! -f $d/.complete ]] || [[ -n $(find "$d/.complete" -mtime +"$GC_DAYS" 2>/dev/null) ]]; then
      log "removing unused kernel $(basename "$d")"; rm -rf "$d" "$CACHE/build/$(basename "$d")"
    fi
  done
  for d in "$CACHE"/build/*/edu-* "$CACHE"/modtree/*-*; do
    [[ -d $d && $d != "$EDU_BUILD" && $d != "$MODTREE" ]] || continue
    if [[ ! -f $d/.ok ]] || [[ -n $(find "$d/.ok" -mtime +"$GC_DAYS" 2>/dev/null) ]]; then rm -rf "$d"; fi
  done
  find "$CACHE/modtree" -maxdepth 1 -name '.tmp.*' -mmin +60 -exec rm -rf {} + 2>/dev/null || true
  find "$CACHE/tmp" -mindepth 1 -maxdepth 1 -mmin +60 -exec rm -rf {} + 2>/dev/null || true
}
gc

(( SECONDS - t0 > 1 )) && step "set-up done, cache: $(du -sm "$CACHE" 2>/dev/null | cut -f1) MiB in $CACHE"

if (( print_env )); then
  printf '%s=%s\n' \
    CACHE "$CACHE" \
    KVER "$KVER" \
    KERNEL_VERSION "${K[version]}" \
    VMLINUX "$KDIR/vmlinux" \
    INITRD "$INITRD" \
    MODTREE "$MODTREE" \
    KBUILD "$KBUILD" \
    HEADERS "$HEADERS" \
    UAPI "$KDIR/uapi/include" \
    EDU_BUILD "$EDU_BUILD"
fi
