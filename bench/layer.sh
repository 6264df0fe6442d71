#!/bin/bash
# Times build-tree layers (vmharness run --build-dir, images/layer):
#  1. making the layer of a Meson project that installs MB megabytes of
#     random files, with an empty cache (new layer) and with the layer
#     cached (what every run of an unchanged build pays: meson install,
#     scan, hash), by bench/layerbench;
#  2. `vmharness run --build-dir` of a trivial unit with the layer cached
#     (the whole run: meson install, hash, and a VM over the layer) against
#     the same run without --build-dir, alternating so machine noise hits
#     both alike.
# Prints each run, the medians and the ratios.
#
#   bench/layer.sh [RUNS] [MB]        (default 3 runs of each, 50 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
mb=${2:-50}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
go build -o "$work/vmharness" .
go build -o "$work/layerbench" ./bench/layerbench
base=$("$work/vmharness" image build 2>/dev/null)/rootfs.img
unit=bench/trivial.service

# The project: 4 files of 250 kB per MB in 10 directories, installed
# below /usr/share.
mkdir -p "$work/src"
for i in $(seq $((mb * 4))); do
  d="$work/src/data/d$((i % 10))"
  mkdir -p "$d"
  head -c 250000 /dev/urandom >"$d/f$i"
done
cat >"$work/src/meson.build" <<'MESON'
project('layerbench')
install_subdir('data', install_dir: get_option('datadir') / 'layerbench')
MESON
meson setup --prefix=/usr "$work/build" "$work/src" >/dev/null

echo "== making the layer ($mb MB, $runs cold and $runs warm)"
"$work/layerbench" -build-dir "$work/build" -base "$base" -work "$work" -runs "$runs" | tee "$work/layerbench.out"

now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# vm KIND [RUN ARGS...] runs the unit and appends its wall time to KIND.times.
vm() {
  local kind=$1
  shift
  local jdir="$work/journal-$kind"
  rm -rf "$jdir"
  local t0 t1
  t0=$(now)
  "$work/vmharness" run --name "bench-layer-$$" --journal-dir "$jdir" --keep-journal always "$@" "$unit" 2>"$work/$kind.log" \
    || { cat "$work/$kind.log" >&2; return 1; }
  t1=$(now)
  awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}' >>"$work/$kind.times"
}

echo "== vmharness run $unit without and with --build-dir (layer cached), alternating"
# The first --build-dir run makes the layer in the runner's cache; it is
# not timed.
vm warmup --build-dir "$work/build"
grep -o 'layer [0-9a-f]* built: .*' "$work/warmup.log" || true
: >"$work/plain.times"
: >"$work/layer.times"
for i in $(seq "$runs"); do
  vm plain
  vm layer --build-dir "$work/build"
  printf 'run %d: plain %.2fs  with --build-dir %.2fs\n' "$i" "$(tail -n1 "$work/plain.times")" "$(tail -n1 "$work/layer.times")"
done
grep -o 'layer [0-9a-f]* reused: .*' "$work/layer.log" || true
p=$(median <"$work/plain.times")
l=$(median <"$work/layer.times")
printf 'median of %d: plain %.2fs, with --build-dir %.2fs\n' "$runs" "$p" "$l"
printf 'ratio with --build-dir (cached layer) / plain: %.3f\n' "$(awk -v l="$l" -v p="$p" 'BEGIN {print l / p}')"
