#!/bin/bash
# Boots one VM from the cached default image (building it on a cache miss)
# and measures vsock throughput both ways, connection setup latency and
# journal throughput; prints one table. Arguments go to vsockbench, e.g.
#
#   bench/vsock.sh                       (256 MiB per stream, 200 dials, 100000 journal lines)
#   bench/vsock.sh -size 64 -lines 20000 (a quicker run)
#   bench/vsock.sh -cpuprofile /tmp/vsockbench.pprof   (then: go tool pprof -top /tmp/vsockbench.pprof)
#
# See bench/README.md for what each row measures and past results.
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
go build -o "$work/vsockbench" ./bench/vsockbench
"$work/vsockbench" "$@"
