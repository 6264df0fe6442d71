#!/bin/bash
# extract-units.sh VMHARNESS RECIPE OUTDIR UNIT...
#
# Copies the named test units out of the systemd-tests package in the
# recipe's image (built or found in vmharness's cache), so the unit each
# test is given is the one packaged next to its script, whatever version the
# image has. The host's own apt cannot be asked: it may be an older Debian
# release than the image's (bookworm's systemd-tests is 252).
set -euo pipefail

if [[ $# -lt 4 ]]; then
    echo "usage: $0 VMHARNESS RECIPE OUTDIR UNIT..." >&2
    exit 2
fi
vmharness="$1" recipe="$2" outdir="$3"
shift 3

debugfs="$(command -v debugfs || true)"
for d in /usr/sbin /sbin; do
    [[ -n "$debugfs" ]] && break
    [[ -x "$d/debugfs" ]] && debugfs="$d/debugfs"
done
if [[ -z "$debugfs" ]]; then
    echo "$0: debugfs not found (apt-get install e2fsprogs)" >&2
    exit 1
fi

# The image directory is the last line vmharness prints.
image="$("$vmharness" image build --recipe "$recipe" | tail -n 1)"
rootfs="$image/rootfs.img"
if [[ ! -f "$rootfs" ]]; then
    echo "$0: vmharness image build printed '$image', which has no rootfs.img" >&2
    exit 1
fi

mkdir -p "$outdir"
for unit in "$@"; do
    src="/usr/lib/systemd/tests/testdata/units/$unit"
    tmp="$outdir/.$unit.tmp"
    rm -f "$tmp"
    # debugfs exits 0 even when the file is missing; the check below says so.
    "$debugfs" -R "dump $src $tmp" "$rootfs" 2>/dev/null
    if [[ ! -s "$tmp" ]]; then
        rm -f "$tmp"
        echo "$0: $src is not in the image $image (is systemd-tests in the recipe?)" >&2
        exit 1
    fi
    chmod 0644 "$tmp"
    mv -f "$tmp" "$outdir/$unit"
done
