#!/bin/bash
# Times `vmharness run` of a trivial unit against a bare QEMU boot of the
# same cached image and the same unit (injected the same way, as SMBIOS
# credentials, ending with SuccessAction=exit), alternating the two so
# machine noise hits both alike. The bare boot uses the CPU model the
# runner logged choosing. Prints each run, the medians and the ratio
# runner/bare.
#
#   bench/boot.sh [RUNS]        (default 5 of each)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
go build -o "$work/vmharness" .
image=$("$work/vmharness" image build 2>/dev/null | tail -n1)
unit=bench/trivial.service

# The same guest kernel command line the harness uses, without its vsock
# credentials: the difference measured is the harness, not the options.
cmdline="console=ttyS0 root=/dev/vda rw panic=-1 oops=panic systemd.crash_shell=0 systemd.crash_action=poweroff systemd.show_status=error systemd.mask=serial-getty@.service systemd.mask=systemd-networkd-wait-online.service systemd.journald.forward_to_console=0 systemd.firstboot=off systemd.unit=trivial.service"
printf 'io.systemd.credential.binary:systemd.extra-unit.trivial.service=%s' "$(base64 -w0 "$unit")" >"$work/unit.smbios"
printf 'io.systemd.credential.binary:systemd.unit-dropin.trivial.service=%s' \
  "$(printf '[Unit]\nWants=basic.target\nSuccessAction=exit\nSuccessActionExitStatus=123\nFailureAction=exit\n' | base64 -w0)" >"$work/dropin.smbios"

bare() {
  rm -f "$work/overlay.qcow2"
  qemu-img create -q -f qcow2 -b "$image/rootfs.img" -F raw "$work/overlay.qcow2"
  qemu-system-x86_64 -accel tcg,thread=multi -cpu "$cpu" -smp 2 -m 1024M -machine q35 \
    -nodefaults -display none -vga none -nic none -no-reboot \
    -serial "file:$work/bare-console.log" \
    -kernel "$image/vmlinuz" -initrd "$image/initrd.img" -append "$cmdline" \
    -drive "if=none,id=root,file=$work/overlay.qcow2,format=qcow2,discard=unmap,cache=unsafe" \
    -device virtio-blk-pci,drive=root -device virtio-rng-pci \
    -smbios "type=11,path=$work/unit.smbios" -smbios "type=11,path=$work/dropin.smbios"
}

# harness runs the unit with vmharness and sets cpu to the CPU model it
# logged choosing (harness/cpu.go), for the bare boot that follows.
harness() {
  VMHARNESS_KEEP_JOURNAL=never "$work/vmharness" run --name "bench-$$" --journal-dir "$work/journal" "$unit" 2>"$work/harness.log" \
    || { cat "$work/harness.log" >&2; return 1; }
  cpu=$(sed -nE 's/.*, cpu ([^ ]+), vsock .*/\1/p' "$work/harness.log")
  [ -n "$cpu" ] || { echo "boot.sh: no cpu model in the harness log" >&2; cat "$work/harness.log" >&2; return 1; }
}

now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

: >"$work/bare.times"
: >"$work/harness.times"
for i in $(seq "$runs"); do
  t0=$(now); harness; t1=$(now)
  awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}' >>"$work/harness.times"
  t0=$(now); bare; t1=$(now)
  awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}' >>"$work/bare.times"
  printf 'run %d: bare %.2fs  vmharness %.2fs\n' "$i" "$(tail -n1 "$work/bare.times")" "$(tail -n1 "$work/harness.times")"
done
b=$(median <"$work/bare.times")
h=$(median <"$work/harness.times")
printf 'median of %d: bare QEMU %.2fs, vmharness run %.2fs, ratio vmharness/bare %.3f\n' "$runs" "$b" "$h" "$(awk -v h="$h" -v b="$b" 'BEGIN {print h / b}')"
