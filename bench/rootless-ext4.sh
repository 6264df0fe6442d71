#!/bin/bash
# Three ways to turn mmdebstrap's unshare-mode tarball into an ext4 image
# without root on Debian 12 (e2fsprogs 1.47.0, whose mke2fs -d cannot
# read a tarball), timed on the same tarball, alternating, with what each
# gets right:
#
#   userns   what vmharness does (images/build_linux.go): unpack and
#            mkfs.ext4 -d in a user namespace with the user's subordinate
#            ids, device nodes added with debugfs, e2fsck -n
#   fixup    unpack without a namespace (every file the user's, no device
#            nodes, no security.* attributes), mkfs.ext4 -d, then a debugfs
#            script from the tarball's headers fixes every path's owner,
#            group and mode, makes the device nodes and sets the xattrs
#   diskfs   github.com/diskfs/go-diskfs v1.9.4's ext4 writer, straight
#            from the tarball (bench/diskfs-ext4)
#
# Run as an ordinary user with subordinate ids (as root: runuser -u USER
# -- bench/rootless-ext4.sh). Without ROOTFS.TAR it makes one with
# mmdebstrap --mode=unshare from the default recipe's packages plus
# iputils-arping (whose postinst sets a capability).
#
#   bench/rootless-ext4.sh [RUNS] [ROOTFS.TAR]      (default 3 runs)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
tarball=${2:-}
((EUID != 0)) || {
  echo "rootless-ext4: run as an ordinary user with subordinate ids" >&2
  exit 1
}

work=$(mktemp -d)
ns() {
  local u g
  u=$(awk -F: -v n="$(id -un)" '$1 == n { print $2 "," 1 "," $3; exit }' /etc/subuid)
  g=$(awk -F: -v n="$(id -un)" '$1 == n { print $2 "," 1 "," $3; exit }' /etc/subgid)
  unshare --map-root-user --map-users="$u" --map-groups="$g" -- "$@"
}
cleanup() { ns rm -rf "$work"; }
trap cleanup EXIT

(cd bench/diskfs-ext4 && go build -o "$work/diskfs-ext4" .)
if [[ -z "$tarball" ]]; then
  packages=$(sed -n '/"packages": \[/,/\]/p' images/default/recipe.json | grep -o '"[^"]*"' | grep -v packages | tr -d '"' | paste -sd,)
  tarball=$work/rootfs.tar
  echo "rootless-ext4: mmdebstrap --mode=unshare trixie with $packages,iputils-arping" >&2
  mmdebstrap --quiet --mode=unshare --variant=minbase --include="$packages,iputils-arping" trixie "$tarball"
fi
size=2G
bytes=$((2 << 30))
tar_mb=$(($(stat -c %s "$tarball") >> 20))
entries=$(tar -tf "$tarball" | wc -l)
echo "rootless-ext4: $tarball: $tar_mb MiB, $entries entries" >&2

devices() { tar --numeric-owner -tvf "$tarball" | awk '$1 ~ /^[cb]/ { print $NF }'; }

# Each method makes $work/METHOD.img from the tarball.
userns() {
  devices >"$work/exclude"
  ns sh -c 'set -e
    mkdir "$1"
    tar -C "$1" -xpf "$2" --numeric-owner --xattrs --xattrs-include="*" --anchored --no-wildcards --exclude-from="$3"
    /sbin/mkfs.ext4 -q -F -L root -E root_owner=0:0 -d "$1" "$4" "$5"
    rm -rf "$1"' sh "$work/tree" "$tarball" "$work/exclude" "$work/userns.img" "$size"
  tar --numeric-owner -tvf "$tarball" | awk '$1 ~ /^[cb]/ {
      split($3, mm, ","); p = substr($NF, 2); d = p; sub(/\/[^\/]*$/, "", d); b = p; sub(/.*\//, "", b)
      perm = 0; for (i = 2; i <= 10; i++) { perm = perm * 2 + (substr($1, i, 1) != "-") }
      printf "cd \"%s\"\nmknod \"%s\" %s %d %d\ncd /\nsif \"%s\" mode 0%o\n", d, b, substr($1, 1, 1), mm[1], mm[2], p, (substr($1, 1, 1) == "c" ? 8192 : 24576) + perm }' |
    /sbin/debugfs -w -f - "$work/userns.img" >/dev/null 2>&1
  /sbin/e2fsck -f -n "$work/userns.img" >/dev/null
}

fixup() {
  mkdir "$work/tree"
  devices >"$work/exclude"
  tar -C "$work/tree" -xf "$tarball" --anchored --no-wildcards --exclude-from="$work/exclude" 2>/dev/null || true
  chmod -R u+rwX "$work/tree"
  /sbin/mkfs.ext4 -q -F -L root -E root_owner=0:0 -d "$work/tree" "$work/fixup.img" "$size"
  rm -rf "$work/tree"
  mkdir -p "$work/xattrs"
  "$work/diskfs-ext4" debugfs-script "$tarball" "$work/xattrs" >"$work/fixup.debugfs"
  /sbin/debugfs -w -f "$work/fixup.debugfs" "$work/fixup.img" >/dev/null 2>"$work/fixup.err"
  rm -rf "$work/xattrs"
  /sbin/e2fsck -f -n "$work/fixup.img" >/dev/null
}

diskfs() {
  rm -f "$work/diskfs.img"
  "$work/diskfs-ext4" write "$tarball" "$work/diskfs.img" "$bytes" >"$work/diskfs.out"
}

declare -A times
for ((i = 1; i <= runs; i++)); do
  for m in userns fixup diskfs; do
    rm -f "$work/$m.img"
    start=$(date +%s.%N)
    if "$m" 2>"$work/$m.err"; then
      times[$m]+="$(echo "$(date +%s.%N) - $start" | bc) "
    else
      times[$m]+="fail "
      echo "rootless-ext4: run $i: $m failed: $(tail -n3 "$work/$m.err")" >&2
    fi
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ a[NR] = $1 } END { print (NR ? a[int((NR + 1) / 2)] : "n/a") }'; }
mu=$(echo "${times[userns]}" | median)
for m in userns fixup diskfs; do
  md=$(echo "${times[$m]}" | median)
  ratio=n/a
  [[ "$md" =~ ^[0-9.]+$ ]] && ratio=$(echo "scale=2; $md / $mu" | bc)
  printf '%-8s runs: %s  median %.1f s  ratio to userns %s\n' "$m" "${times[$m]}" "$md" "$ratio"
done

# What each image has where ownership, modes, device nodes and
# capabilities matter.
check() {
  local img=$1
  for p in /usr/bin/arping /usr/bin/su /dev/null /var/log/journal /var/lib/apt/lists/partial /etc/shadow; do
    /sbin/debugfs -R "stat $p" "$img" 2>/dev/null | awk -v p="$p" '
      /^Inode:/ { t = $0; sub(/.*Type: */, "", t); sub(/ *Mode:.*/, "", t); m = $0; sub(/.*Mode: */, "", m); sub(/ .*/, "", m) }
      /^User:/ { u = $2; g = $4 }
      /security.capability/ { c = " cap" } /Device major/ { d = " dev " $4 }
      END { if (t == "") t = "missing"; printf "  %-28s %-18s %-6s uid %s gid %s%s%s\n", p, t, m, u, g, c, d }'
  done
  echo "  e2fsck -f -n: $(/sbin/e2fsck -f -n "$img" >/dev/null 2>&1 && echo clean || echo ERRORS)"
}
for m in userns fixup diskfs; do
  echo "$m:"
  if [[ -f "$work/$m.img" ]]; then check "$work/$m.img"; fi
done
echo "diskfs: $(cat "$work/diskfs.out" 2>/dev/null)"
echo "debugfs fix-up: $(wc -l <"$work/fixup.debugfs") commands, $(grep -vc '^debugfs ' "$work/fixup.err" || true) error lines:"
grep -v '^debugfs ' "$work/fixup.err" | head -5 || true
