#!/bin/bash
# Times the whole integration suite (one VM per test) under different
# `meson test --num-processes` values, with vmharness's VM admission
# deciding how many of those VMs run at once, and prints one line per run
# and the wall-time ratio of each run to the first.
#
#   bench/parallel.sh                      # --num-processes 2, then 8
#   JOBS="8 2 8" bench/parallel.sh         # any sequence of -j values
#   LIMITS="1 2 3" JOBS=8 bench/parallel.sh  # also vary VMHARNESS_MAX_VMS
#
# It configures its own build directory (build-bench/), builds the runner
# and the image first, and uses a private runtime directory, so only its
# own VMs take VM slots; other VMs on the machine still share the CPUs,
# and each line says how loaded the machine was (load average and other
# QEMU processes at the start and end of the run). Each run's Meson log
# is kept as build-bench/testlog-jJ-limitL.json.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=(${JOBS:-2 8})
limits=(${LIMITS:-default})
build=build-bench

if [[ ! -d $build ]]; then
  meson setup "$build" >/dev/null
fi
meson compile -C "$build" >/dev/null
"$build/vmharness" image build >/dev/null
runtime=$(mktemp -d)
trap 'rm -rf "$runtime"' EXIT

load() { cut -d' ' -f1 /proc/loadavg; }
others() { pgrep -c -f '^[^ ]*qemu-system' || true; }

first=""
printf '%-6s %-7s %9s %7s %5s %5s %5s  %s\n' "-j" "limit" "wall (s)" "ratio" "ok" "fail" "tmo" "load / other QEMUs at start -> end"
for limit in "${limits[@]}"; do
  for j in "${jobs[@]}"; do
    env=(VMHARNESS_RUNTIME_DIR="$runtime")
    if [[ $limit != default ]]; then
      env+=(VMHARNESS_MAX_VMS="$limit")
    fi
    at_start="$(load) / $(others)"
    t0=$(date +%s.%N)
    status=0
    env "${env[@]}" meson test -C "$build" --suite integration-tests --no-rebuild \
      --num-processes "$j" >"$build/bench-j$j-limit$limit.log" 2>&1 || status=$?
    t1=$(date +%s.%N)
    log="$build/testlog-j$j-limit$limit.json"
    cp "$build/meson-logs/testlog.json" "$log"
    wall=$(echo "$t1 - $t0" | bc)
    [[ -n $first ]] || first=$wall
    ok=$(grep -c '"result": "OK"' "$log" || true)
    timeouts=$(grep -c '"result": "TIMEOUT"' "$log" || true)
    fail=$(($(wc -l <"$log") - ok))
    printf '%-6s %-7s %9.1f %7.3f %5d %5d %5d  %s -> %s / %s\n' "$j" "$limit" "$wall" "$(echo "$wall / $first" | bc -l)" \
      "$ok" "$fail" "$timeouts" "$at_start" "$(load)" "$(others)"
    if ((status != 0)); then
      echo "parallel.sh: meson test -j $j (limit $limit) failed; see $build/bench-j$j-limit$limit.log" >&2
    fi
  done
done
