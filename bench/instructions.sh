#!/bin/sh
# Instructions per event for each case of bench/dispatch.lua (then of
# bench/failure.lua, bench/filter.lua, bench/aggregate.lua, bench/store.lua
# and bench/match.lua), counted by
# valgrind's callgrind: repeatable whatever else the machine is doing, where
# the CPU-time figures of `make bench` are not. Each case runs twice, with
# N and 3N events, and the difference is divided by 2N, so start-up cancels
# out. Usage: sh bench/instructions.sh [lua5.4|luajit] [N]
set -eu
cd "$(dirname "$0")/.."
lua=${1:-lua5.4}
n=${2:-10000}
count() {
  valgrind --tool=callgrind --callgrind-out-file=/dev/null \
    "$lua" "bench/${3:-failure}.lua" --case "$1" "$2" 2>&1 |
    sed -n 's/.*Collected : *//p' | tr -d ,
}
per_event() {
  a=$(count "$1" "$n" "${2:-}")
  b=$(count "$1" $((n * 3)) "${2:-}")
  echo $(( (b - a) / (n * 2) ))
}
# bench/dispatch.lua: issue 14's hot path against mediator_lua, one
# subscriber and a trivial handler (options tables made once).
echo "dispatch, instructions per event ($lua, callgrind; N = $n and $((n * 3)))"
for c in sync sync_key sync_opts queued mediator pcall event_table yieldable; do
  eval "ic_$c=$(per_event "$c" dispatch)"
  eval "v=\$ic_$c"
  printf '  %-12s %8d\n' "$c" "$v"
done
awk -v s="$ic_sync" -v k="$ic_sync_key" -v o="$ic_sync_opts" \
    -v q="$ic_queued" -v m="$ic_mediator" -v lua="$lua" 'BEGIN {
  g = (lua == "luajit") ? 0.25 : 1.2
  printf "  publish_sync vs mediator:     %.2fx (goal >= %gx) %s\n", m / s, g,
         (m / s >= g ? "met" : "MISS")
  if (lua != "luajit")
    printf "  publish + drain vs mediator:  %.2fx (goal >= 1x) %s\n", m / q,
           (m / q >= 1 ? "met" : "MISS")
  printf "  options: key %+.0f%%, key + priority + headers %+.0f%% (goal <= +10%%) %s\n",
         (k / s - 1) * 100, (o / s - 1) * 100, (o / s <= 1.1 ? "met" : "MISS")
}'
echo "failure handling, instructions per event ($lua)"
for c in plain retry0 retry1 plain_keyed ordered ordered1; do
  eval "ic_$c=$(per_event "$c")"
  eval "v=\$ic_$c"
  printf '  %-12s %8d\n' "$c" "$v"
done
# Rates are inverse to instructions: a ratio of rates is b/a here.
awk -v p="$ic_plain" -v r0="$ic_retry0" -v r1="$ic_retry1" \
    -v pk="$ic_plain_keyed" -v o="$ic_ordered" -v o1="$ic_ordered1" 'BEGIN {
  printf "  retry, 1%% failing vs 0%%:     %.3fx (target >= 0.90x) %s\n",
         r0 / r1, (r0 / r1 >= 0.9 ? "ok" : "MISS")
  printf "  retry 0%% vs plain:            %.3fx\n", p / r0
  printf "  ordered (1,000 keys) vs plain: %.3fx\n", pk / o
  printf "  ordered + retry, 1%% vs 0%%:    %.3fx\n", o / o1
}'
# bench/filter.lua: what a where{} filter costs an event it rejects (the
# core's prefilter tests the payload before any Lua runs).
echo "filters, instructions per event ($lua)"
for c in none reject reject4 keep; do
  printf '  %-12s %8d\n' "$c" "$(per_event "$c" filter)"
done
# bench/aggregate.lua: a tumbling-window average over 1,000 groups.
echo "windows, instructions per event ($lua)"
for c in window hand; do
  printf '  %-12s %8d\n' "$c" "$(per_event "$c" aggregate)"
done
# bench/store.lua: an append with a store, publish to commit (the writer
# thread's SQLite work included; groups vary a little from run to run).
echo "store appends, instructions per event ($lua)"
for c in batch none; do
  printf '  %-12s %8d\n' "$c" "$(per_event "$c" store)"
done
# bench/match.lua: publish_sync to 1,000 patterns, one hot type, then
# rotating through 2,000 / 4,000 / 5,000 / 6,000 / 8,200 / 16,400 types
# (the core's type cache and each of hot.lua's two memos hold 4,096: the
# cost rises gradually past it, no cliff), then 16,400 with 100,000
# subscriptions.
echo "type cache, instructions per event ($lua)"
for c in hot rot20 rot40 rot50 rot60 rot82 rot164 rot164_100k; do
  printf '  %-12s %8d\n' "$c" "$(per_event "$c" match)"
done
# bench/store.lua: reads of a generated store (bus:replay{}, bus:events{}),
# the row, its JSON and its event table. The store is generated (once,
# cached) before callgrind runs, so neither count holds that work.
"$lua" bench/store.lua --case replay 1 >/dev/null
echo "store reads, instructions per event ($lua)"
for c in replay events; do
  printf '  %-12s %8d\n' "$c" "$(per_event "$c" store)"
done
