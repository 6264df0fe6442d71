#!/bin/bash
# Where a trivial test's time goes, phase by phase (bench/breakdown): the
# runner built from this checkout, and optionally the one built from
# BASE_REF (a commit, e.g. the previous main), run alternately; prints each
# phase's median for both and the ratio new/old.
#
#   bench/breakdown.sh [RUNS] [BASE_REF]      (default 5 runs, no base)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
base=${2:-}

work=$(mktemp -d)
cleanup() {
  if [ -n "$base" ]; then git worktree remove --force "$work/base" 2>/dev/null || :; fi
  rm -rf "$work"
}
trap cleanup EXIT

go build -o "$work/new" .
go build -o "$work/breakdown" ./bench/breakdown
bins=("$work/new")
if [ -n "$base" ]; then
  git worktree add --detach -q "$work/base" "$base"
  # Before the command line moved to the module root it was ./runner.
  pkg=.
  [ -f "$work/base/main.go" ] || pkg=./runner
  (cd "$work/base" && go build -o "$work/old" "$pkg")
  bins+=("$work/old")
fi
# Both binaries boot their own recipe's image; build them up front so no
# run pays for it.
for b in "${bins[@]}"; do "$b" image build >/dev/null 2>&1; done
"$work/breakdown" -runs "$runs" "${bins[@]}"
