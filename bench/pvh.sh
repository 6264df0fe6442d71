#!/bin/bash
# What the PVH boot saves (images/vmlinux): bare QEMU boots of the cached
# default image's kernel, once as the bzImage (vmlinuz, through its
# decompressor) and once as the uncompressed ELF (vmlinux, through its PVH
# entry), alternating, with the harness's machine and CPU model but no
# root file system, so each boot ends in the kernel's "unable to mount
# root" panic about 1.5 s into the kernel. Prints each boot's wall time and
# the kernel's last timestamp; wall minus that timestamp is QEMU's start,
# the firmware and (for vmlinuz) the decompressor.
#
#   bench/pvh.sh [RUNS]        (default 5 of each)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
go build -o "$work/vmharness" .
image=$("$work/vmharness" image build 2>/dev/null | tail -n1)
if [ ! -f "$image/vmlinux" ]; then
  echo "bench/pvh.sh: $image has no vmlinux (its build log says why)" >&2
  exit 1
fi
# The runner's TCG CPU model (harness/cpu.go): max without the REP
# string flags QEMU 7.2's TCG runs slowly.
cpu=max
for f in erms fsrm fsrs; do
  if qemu-system-x86_64 -cpu help | grep -qw "$f"; then cpu="$cpu,$f=off"; fi
done

boot() { # KERNEL: prints "wall kernel_last"
  local start end last
  start=$(date +%s.%N)
  qemu-system-x86_64 -accel tcg,thread=multi -cpu "$cpu" -smp 2 -m 1024M \
    -machine q35,smbios-entry-point-type=64 -nodefaults -display none -vga none -nic none \
    -no-reboot -serial "file:$work/console.log" \
    -kernel "$1" -append "console=ttyS0 panic=-1 root=/dev/nonexistent" </dev/null
  end=$(date +%s.%N)
  grep -a 'Kernel panic' "$work/console.log" >/dev/null || { echo "bench/pvh.sh: $1 did not reach the kernel's panic" >&2; exit 1; }
  last=$(grep -a -o '^\[ *[0-9.]*\]' "$work/console.log" | tail -n1 | tr -d '[] ')
  echo "$(echo "$end - $start" | bc) $last"
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

: >"$work/bz"; : >"$work/elf"
for i in $(seq "$runs"); do
  read -r w k < <(boot "$image/vmlinuz"); echo "$w $k" >>"$work/bz"
  echo "run $i vmlinuz: ${w}s wall, kernel's last message at ${k}s"
  read -r w k < <(boot "$image/vmlinux"); echo "$w $k" >>"$work/elf"
  echo "run $i vmlinux: ${w}s wall, kernel's last message at ${k}s"
done
bz=$(cut -d' ' -f1 "$work/bz" | median); elf=$(cut -d' ' -f1 "$work/elf" | median)
bzpre=$(awk '{print $1-$2}' "$work/bz" | median); elfpre=$(awk '{print $1-$2}' "$work/elf" | median)
printf '\nmedian of %d: vmlinuz %.2fs (%.2fs before the kernel), vmlinux %.2fs (%.2fs before the kernel), ratio %.2f\n' \
  "$runs" "$bz" "$bzpre" "$elf" "$elfpre" "$(echo "$elf / $bz" | bc -l)"
