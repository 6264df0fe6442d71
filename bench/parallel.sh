#!/bin/bash
# Times the whole integration suite (one VM per test) under different
# `meson test --num-processes` values, with vmharness's VM admission
# deciding how many of those VMs run at once, and prints one line per run
# and the wall-time ratio of each run to the first.
#
#   bench/parallel.sh                        # --num-processes 2, then 8
#   JOBS="8 2 8 2" bench/parallel.sh         # any sequence of -j values
#   LIMITS="1 2 3" JOBS=8 bench/parallel.sh  # also vary VMHARNESS_MAX_VMS
#
# It configures its own build directory (build-bench/), builds the runner
# and the image first, and uses a private runtime directory, so only its
# own VMs take VM slots. Other VMs on the machine still share the CPUs:
# every 5 seconds it samples the load average and the QEMU processes that
# are not its own, and each line shows their means over the run ("other
# VMs"). VM-s is the sum of the tests' QEMU run times (from the reports),
# how long the VMs themselves took. Each run's Meson log is kept as
# build-bench/testlog-jJ-limitL.json, its reports in
# build-bench/reports-jJ-limitL/.
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
# QEMU processes not started by this benchmark (its VMs' command lines name
# its runtime directory).
others() {
  local n=0 p
  for p in $(pgrep -f '^[^ ]*qemu-system' || true); do
    grep -qF "$runtime" "/proc/$p/cmdline" 2>/dev/null || n=$((n + 1))
  done
  echo "$n"
}
sample() {
  while sleep 5; do echo "$(load) $(others)"; done
}

first=""
printf '%-4s %-7s %8s %6s %4s %4s %4s %4s %7s  %s\n' "-j" "limit" "wall(s)" "ratio" "ok" "skip" "fail" "tmo" "VM-s" "mean load / other VMs"
for limit in "${limits[@]}"; do
  for j in "${jobs[@]}"; do
    env=(VMHARNESS_RUNTIME_DIR="$runtime")
    if [[ $limit != default ]]; then
      env+=(VMHARNESS_MAX_VMS="$limit")
    fi
    rm -rf "$build/test/reports"
    sample >"$build/samples" &
    sampler=$!
    t0=$(date +%s.%N)
    status=0
    env "${env[@]}" meson test -C "$build" --suite integration-tests --no-rebuild \
      --num-processes "$j" >"$build/bench-j$j-limit$limit.log" 2>&1 || status=$?
    t1=$(date +%s.%N)
    kill "$sampler"
    wait "$sampler" 2>/dev/null || true
    log="$build/testlog-j$j-limit$limit.json"
    cp "$build/meson-logs/testlog.json" "$log"
    rm -rf "$build/reports-j$j-limit$limit"
    cp -r "$build/test/reports" "$build/reports-j$j-limit$limit"
    vms=$(cat "$build"/test/reports/*/report.json | sed -nE 's/.*"qemu_seconds": ([0-9.]+).*/\1/p' | paste -sd+ | bc)
    wall=$(echo "$t1 - $t0" | bc)
    [[ -n $first ]] || first=$wall
    count() { grep -c "\"result\": \"$1\"" "$log" || true; }
    ok=$(count OK) skip=$(count SKIP) timeouts=$(count TIMEOUT)
    fail=$(($(wc -l <"$log") - ok - skip))
    means=$(awk '{l += $1; o += $2; n++} END {if (n) printf "%.1f / %.1f", l / n, o / n; else print "-"}' "$build/samples")
    printf '%-4s %-7s %8.1f %6.3f %4d %4d %4d %4d %7.0f  %s\n' "$j" "$limit" "$wall" "$(echo "$wall / $first" | bc -l)" \
      "$ok" "$skip" "$fail" "$timeouts" "$vms" "$means"
    if ((status != 0)); then
      echo "parallel.sh: meson test -j $j (limit $limit) failed; see $build/bench-j$j-limit$limit.log" >&2
    fi
  done
done
