#!/bin/bash
# Times `vmharness run --snapshot` (start from a saved template VM)
# against the ordinary boot, on bench/trivial.service:
#  1. the one-time cost: a --snapshot run with no template cached (the
#     template VM's boot and save, then the restored test);
#  2. RUNS runs of each, alternating so machine noise hits both alike,
#     with the medians and their ratio; every run must pass.
# It removes the cached snapshot templates (the cache's snapshots/) first.
#
#   bench/snapshot.sh [RUNS]        (default 5 runs of each)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
go build -o "$work/vmharness" .
"$work/vmharness" image build >/dev/null 2>&1
unit=bench/trivial.service
cache=${VMHARNESS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmharness}

now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# vm KIND [ARGS...] runs the unit and appends its wall time to KIND.times;
# its log is KIND.log.
vm() {
  local kind=$1
  shift
  local t0 t1
  t0=$(now)
  "$work/vmharness" run --name "bench-snapshot-$$" --journal-dir "$work/journal" --keep-journal never "$@" "$unit" 2>"$work/$kind.log" \
    || { cat "$work/$kind.log" >&2; return 1; }
  t1=$(now)
  awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}' >>"$work/$kind.times"
}

echo "== one-time cost: --snapshot with no template cached"
rm -rf "$cache/snapshots"
: >"$work/cold.times"
vm cold --snapshot
built=$(sed -nE 's/.*snapshot template .*: built in ([0-9.]+)s$/\1/p' "$work/cold.log")
printf 'first --snapshot run %.2fs, of which the template %ss\n' "$(cat "$work/cold.times")" "$built"
du -sh "$cache/snapshots"/*/ | sed 's/^/template size: /'

echo "== vmharness run $unit without and with --snapshot, alternating"
: >"$work/boot.times"
: >"$work/snapshot.times"
for i in $(seq "$runs"); do
  vm boot
  vm snapshot --snapshot
  restore=$(sed -nE 's/.*snapshot: (state loaded in [0-9.]+s, test handed to the guest after [0-9.]+s)$/\1/p' "$work/snapshot.log")
  printf 'run %d: boot %.2fs  snapshot %.2fs  (%s)\n' "$i" \
    "$(tail -n1 "$work/boot.times")" "$(tail -n1 "$work/snapshot.times")" "$restore"
done
b=$(median <"$work/boot.times")
s=$(median <"$work/snapshot.times")
printf 'median of %d: boot %.2fs  snapshot %.2fs  ratio snapshot/boot %.3f\n' "$runs" "$b" "$s" "$(awk -v b="$b" -v s="$s" 'BEGIN {print s / b}')"
