#!/bin/sh
# What the always-on metrics cost (issue 15: at most 3%): instructions per
# event, by callgrind, of bench/dispatch.lua's publish_sync and
# publish + drain cases with the core as built (build/<flavour>) and with
# one built with -DBUZZ_NO_METRICS (build/nometrics/<flavour>: the C
# counters compiled out, and the Lua layer counts nothing when
# core.metrics_built is false). N and 3N events, the difference over 2N,
# as bench/instructions.sh does. Usage: sh bench/metrics_cost.sh
# [lua5.4|luajit] [N] [RUNS]; make bench-metrics runs both interpreters.
# Lua 5.4 seeds its string hashes per process, which moves a figure by a
# few percent from run to run: each is the median of RUNS (3) runs.
set -eu
cd "$(dirname "$0")/.."
lua=${1:-lua5.4}
n=${2:-20000}
runs=${3:-3}
count() {
  BUZZ_BUILD=$1 valgrind --tool=callgrind --callgrind-out-file=/dev/null \
    "$lua" bench/dispatch.lua --case "$2" "$3" 2>&1 |
    sed -n 's/.*Collected : *//p' | tr -d ,
}
per_event() {
  i=0
  while [ "$i" -lt "$runs" ]; do
    a=$(count "$1" "$2" "$n")
    b=$(count "$1" "$2" $((n * 3)))
    echo $(( (b - a) / (n * 2) ))
    i=$((i + 1))
  done | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'
}
echo "metrics' cost, instructions per event ($lua, callgrind; N = $n and $((n * 3)), median of $runs)"
for c in sync queued; do
  on=$(per_event "build/$lua" "$c")
  off=$(per_event "build/nometrics/$lua" "$c")
  awk -v c="$c" -v on="$on" -v off="$off" 'BEGIN {
    d = (on / off - 1) * 100
    printf "  %-7s with metrics %6d, without %6d: %+.1f%% (goal <= +3%%) %s\n",
           c, on, off, d, (d <= 3 ? "met" : "MISS")
  }'
done
