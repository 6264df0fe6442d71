#!/bin/bash
# Times build-tree layers (vmharness run --build-dir, images/layer):
#  1. making the layer of a Meson project that installs MB megabytes of
#     random files, with an empty cache (new layer) and with the layer
#     cached (what every run of an unchanged build pays: meson install,
#     scan, hash), by bench/layerbench;
#  2. `vmharness run` of a trivial unit with that layer attached, as
#     --build-dir attaches it, against the same run without it, alternating
#     so machine noise hits both alike; the guest's own extraction time
#     comes from the initrd's console line.
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
"$work/vmharness" image build >/dev/null 2>&1
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
"$work/layerbench" -build-dir "$work/build" -work "$work" -runs "$runs" | tee "$work/layerbench.out"
layer=$(tail -n1 "$work/layerbench.out")
warm=$(sed -nE 's/^median of .* cached layer ([0-9.]+) s.*/\1/p' "$work/layerbench.out")

now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# vm KIND [QEMU ARGS...] runs the unit and appends its wall time to KIND.times.
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
  if [ "$kind" = layer ]; then
    sed -nE 's/.*vmharness-layer: applied [^ ]+ in ([0-9.]+) s.*/\1/p' "$jdir/bench-layer-$$.console.log" | tail -n1 >>"$work/extract.times"
  fi
}

echo "== vmharness run $unit without and with the layer, alternating"
: >"$work/plain.times"
: >"$work/layer.times"
: >"$work/extract.times"
for i in $(seq "$runs"); do
  vm plain
  # As the runner attaches a --build-dir layer; the default image boots
  # without an initrd, so layer-init applies it before PID 1.
  vm layer --qemu-arg=-drive "--qemu-arg=if=none,id=layer,file=$layer,format=raw,readonly=on" \
    --qemu-arg=-device --qemu-arg=virtio-blk-pci,drive=layer,serial=vmharness-layer \
    --kernel-arg=init=/usr/lib/vmharness/layer-init
  printf 'run %d: plain %.2fs  with layer %.2fs  (guest extraction %ss)\n' "$i" \
    "$(tail -n1 "$work/plain.times")" "$(tail -n1 "$work/layer.times")" "$(tail -n1 "$work/extract.times")"
done
p=$(median <"$work/plain.times")
l=$(median <"$work/layer.times")
x=$(median <"$work/extract.times")
printf 'median of %d: plain %.2fs, with layer %.2fs, guest extraction %.2fs (%.1f ms/MB)\n' "$runs" "$p" "$l" "$x" "$(awk -v x="$x" -v mb="$mb" 'BEGIN {print 1000 * x / mb}')"
printf 'ratio with layer / plain: %.3f VM only; %.3f with the cached-layer preparation (%.2fs) added\n' \
  "$(awk -v l="$l" -v p="$p" 'BEGIN {print l / p}')" "$(awk -v l="$l" -v w="$warm" -v p="$p" 'BEGIN {print (l + w) / p}')" "$warm"
