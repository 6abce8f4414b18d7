#!/bin/sh
# make coverage: runs the suite on the coverage builds (make builds
# build/coverage/<flavour>/buzz/core.so with --coverage first), then
# reports C line coverage (gcov through lcov) and Lua line coverage
# (spec/coverage.lua's line hook), per file, under build/coverage/.
# Fails when C lines are below COVERAGE_MIN_C (90) or Lua lines below
# COVERAGE_MIN_LUA (85), or when a spec failed.
#
# COVERAGE_LUAJIT=1 adds a LuaJIT pass for the C figure (LuaJIT's side of
# compat.h): it doubles the time for about 0.2 points, so it is off by
# default. That pass runs without the Lua line hook: the hook's garbage
# changes when finalizers run, and json_spec checks that some run inside
# a json call; it added no Lua line the Lua 5.4 pass had not seen.
set -u
cd "$(dirname "$0")/.."
COV=build/coverage
BUSTED=${BUSTED:-busted}
rm -rf "$COV/hits" && mkdir -p "$COV/hits"
find "$COV" -name '*.gcda' -delete
hits="$(pwd)/$COV/hits"
failed=0

echo "== coverage: the suite on Lua 5.4"
out="$COV/busted.log"
BUZZ_BUILD=$COV/lua5.4 BUZZ_COVERAGE=$hits \
  $BUSTED --lua=lua5.4 --exclude-tags=slow,rock,browser ${BUSTED_ARGS:-} >"$out" 2>&1 \
  || failed=1
cat "$out"
if [ "${COVERAGE_LUAJIT:-0}" != 0 ]; then
  echo "== coverage: the suite on LuaJIT"
  # A 16 MiB stack: on LuaJIT json.c's encoder takes about 8.4 KiB of C
  # stack per nesting level (a luaL_Buffer of 8 KiB in each frame), so the
  # 1000 levels json_spec encodes overflow the usual 8 MiB at -O0.
  ( ulimit -s 16384
    BUZZ_BUILD=$COV/luajit \
      $BUSTED --lua=luajit --exclude-tags=once,slow,rock,browser ${BUSTED_ARGS:-} ) \
    >>"$out" 2>&1 || failed=1
  tail -n 40 "$out"
fi

echo "== coverage: report"
lcov --quiet --capture --directory "$COV" --output-file "$COV/all.info" \
  2>"$COV/lcov.log" || { cat "$COV/lcov.log"; exit 1; }
lcov --quiet --extract "$COV/all.info" "$(pwd)/csrc/*" \
  --output-file "$COV/c.info" 2>>"$COV/lcov.log" || { cat "$COV/lcov.log"; exit 1; }
lua5.4 tools/coverage.lua "$COV/c.info" "$COV/hits" "$COV" \
  "${COVERAGE_MIN_C:-90}" "${COVERAGE_MIN_LUA:-85}"
status=$?
echo "(report: $COV/report.txt; uncovered lines: $COV/uncovered.txt)"
if [ "$failed" != 0 ]; then
  # CI shows the end of the log: repeat what failed there.
  grep -E -A 12 '^(Failure|Error) ' "$out" | head -n 120 >&2
  echo "coverage: a spec failed under the coverage build" >&2
  exit 1
fi
exit $status
