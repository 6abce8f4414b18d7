#!/bin/sh
# Runs one libFuzzer harness of make fuzz: build/fuzz/NAME for SECONDS
# over the seeds in fuzz/corpus/NAME, keeping what it finds new in
# build/fuzz/corpus/NAME and a crashing input in build/fuzz/crashes/.
# libFuzzer's progress goes to build/fuzz/NAME.log; on a failure its end
# is shown with the input's path. Extra arguments go to the harness.
#   sh fuzz/run.sh subject 60 -dict=fuzz/subject.dict
set -eu
name=$1 seconds=$2
shift 2
mkdir -p "build/fuzz/corpus/$name" build/fuzz/crashes
log="build/fuzz/$name.log"
if "build/fuzz/$name" -max_total_time="$seconds" -print_final_stats=1 \
     -artifact_prefix="build/fuzz/crashes/$name-" "$@" \
     "build/fuzz/corpus/$name" "fuzz/corpus/$name" >"$log" 2>&1; then
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  echo "fuzz $name: $runs inputs in ${seconds} s, no failure" \
       "($(ls "build/fuzz/corpus/$name" | wc -l) in build/fuzz/corpus/$name)"
else
  tail -n 40 "$log"
  echo "fuzz $name: FAILED; the input is in build/fuzz/crashes/" \
       "(replay: build/fuzz/$name build/fuzz/crashes/<file>)" >&2
  exit 1
fi
