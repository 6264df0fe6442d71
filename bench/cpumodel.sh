#!/bin/bash
# Compares guest→host vsock throughput under the harness's TCG CPU model
# ("max" without ERMS/FSRM/FSRS; harness/cpu.go says why) against plain
# "-cpu max", one VM each, alternating so machine noise hits both alike.
# Prints each VM's median single-stream rate (vsockbench's write-loop row),
# the medians of both and the ratio harness/max.
#
#   bench/cpumodel.sh [RUNS]        (default 3 VMs of each, 3 × 64 MiB per VM)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
go build -o "$work/vsockbench" ./bench/vsockbench

# rate runs one VM and prints the median rate of its single-stream
# guest→host write loop in MB/s.
rate() {
  "$work/vsockbench" -size 64 -repeat 3 -dials 20 -lines 200 -console-lines 50 "$@" >"$work/out" 2>&1 \
    || { cat "$work/out" >&2; return 1; }
  sed -nE 's/^ *guest→host, vsock Listen, write loop  .* ([0-9.]+) MB\/s .*/\1/p' "$work/out"
}
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

: >"$work/max.rates"
: >"$work/harness.rates"
for i in $(seq "$runs"); do
  m=$(rate -cpu max); echo "$m" >>"$work/max.rates"
  h=$(rate); echo "$h" >>"$work/harness.rates"
  printf 'run %d: -cpu max %s MB/s  harness model %s MB/s\n' "$i" "$m" "$h"
done
m=$(median <"$work/max.rates")
h=$(median <"$work/harness.rates")
model=$(sed -nE 's/.*: accel [^,]*, cpu ([^,]*(,[a-z]+=off)*), vsock.*/\1/p' "$work/out")
printf 'median of %d: -cpu max %.1f MB/s, -cpu %s %.1f MB/s, ratio %.2f\n' "$runs" "$m" "$model" "$h" "$(awk -v h="$h" -v m="$m" 'BEGIN {print h / m}')"
