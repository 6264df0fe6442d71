#!/bin/bash
# Times `vmharness run` of a trivial unit with each firmware and with a
# TPM, against the plain run (QEMU's BIOS, no TPM), alternating the kinds
# in every round so machine noise hits them alike. Prints each run, the
# medians and each kind's ratio to the plain run, and the load average
# before and after (other VMs on the machine make every number slower).
#
#   bench/devices.sh [RUNS]        (default 3 rounds)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
go build -o "$work/vmharness" .
"$work/vmharness" image build >/dev/null 2>&1
unit=bench/trivial.service

now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

kinds=(plain tpm uefi uefi-tpm uefi-secure-boot)
args_for() {
  case $1 in
  plain) ;;
  tpm) echo --tpm ;;
  uefi) echo --firmware uefi ;;
  uefi-tpm) echo --firmware uefi --tpm ;;
  uefi-secure-boot) echo --firmware uefi-secure-boot ;;
  esac
}

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq "$runs"); do
  for kind in "${kinds[@]}"; do
    t0=$(now)
    # shellcheck disable=SC2046 # args_for prints words to split
    "$work/vmharness" run --name "bench-dev-$$" --journal-dir "$work/journal" --keep-journal never \
      $(args_for "$kind") "$unit" 2>"$work/$kind.log" || { cat "$work/$kind.log" >&2; exit 1; }
    t1=$(now)
    t=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}')
    echo "$t" >>"$work/$kind.times"
    echo "round $round: $kind ${t} s"
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

base=$(median <"$work/plain.times")
for kind in "${kinds[@]}"; do
  m=$(median <"$work/$kind.times")
  echo "median $kind: $m s (ratio to plain $(awk -v a="$m" -v b="$base" 'BEGIN {printf "%.2f", a / b}'))"
done
