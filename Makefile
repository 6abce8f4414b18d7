# buzz: build, test, check and benchmark.
#
#   make demo    install what is missing, build, run examples/demo.lua
#   make test    install what is missing, build, run the suite (Lua 5.4 + LuaJIT)
#   make check   -Werror build of both flavours, luacheck, cppcheck
#   make asan    the suite with the C core under ASan + UBSan (Lua 5.4)
#   make bench   benchmarks, both interpreters
#   make bench-ic instructions per event of the failure-handling, filter
#                and window cases (callgrind: repeatable on a noisy machine)
#   make test-slow  the long fault specs (tagged #slow: many kill rounds,
#                a full disk), both interpreters; CI runs them
#
# The module is built once per interpreter into build/<flavour>/buzz/core.so.
# It is not linked against liblua: the host program provides the Lua API.

CC      ?= cc
FLAVOURS = lua5.4 luajit
SRCS     = csrc/error.c csrc/map.c csrc/match.c csrc/queue.c csrc/bus.c \
           csrc/loop.c csrc/json.c csrc/store.c csrc/ids.c csrc/dedup.c \
           csrc/lbuzz.c
HDRS     = csrc/buzz.h csrc/compat.h csrc/json.h

WARN     = -std=c99 -Wall -Wextra -pedantic -Wshadow -Wmissing-prototypes \
           -Werror=implicit-function-declaration
OPT     ?= -O2 -g
CFLAGS_COMMON = $(WARN) $(OPT) -fPIC -fvisibility=hidden -D_POSIX_C_SOURCE=200809L
DEP_CFLAGS := $(shell pkg-config --cflags libuv libcjson sqlite3 2>/dev/null)
DEP_LIBS   := $(shell pkg-config --libs libuv libcjson sqlite3 2>/dev/null \
                || echo -luv -lcjson -lsqlite3 -lpthread)
LDFLAGS_SO = -shared

lua_cflags = $(shell pkg-config --cflags $(1) 2>/dev/null)

LUA54   = lua5.4
LUAJIT  = luajit
BUSTED  = busted

.PHONY: all deps test test-slow check asan bench bench-ic demo \
        clean rock

all: build/lua5.4/buzz/core.so build/luajit/buzz/core.so

deps:
	@sh tools/deps.sh

build/lua5.4/buzz/core.so: $(SRCS) $(HDRS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_COMMON) $(EXTRA_CFLAGS) $(call lua_cflags,lua5.4) $(DEP_CFLAGS) \
	  $(SRCS) -o $@ $(LDFLAGS_SO) $(DEP_LIBS)

build/luajit/buzz/core.so: $(SRCS) $(HDRS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_COMMON) $(EXTRA_CFLAGS) $(call lua_cflags,luajit) $(DEP_CFLAGS) \
	  $(SRCS) -o $@ $(LDFLAGS_SO) $(DEP_LIBS)

# The suite: the same command the README gives. Both interpreters; the
# helper picks build/<flavour> for package.cpath. Specs tagged #once test
# programs that do not depend on busted's interpreter (the rocks of both,
# nginx with the LuaJIT build): the first pass runs them, the second not.
# Specs tagged #slow (many kill rounds, a full disk) run in make test-slow.
test: deps all
	$(BUSTED) --lua=$(LUA54) --exclude-tags=slow $(BUSTED_ARGS)
	$(BUSTED) --lua=$(LUAJIT) --exclude-tags=once,slow $(BUSTED_ARGS)

test-slow: deps all
	$(BUSTED) --lua=$(LUA54) --tags=slow $(BUSTED_ARGS)
	$(BUSTED) --lua=$(LUAJIT) --tags=slow $(BUSTED_ARGS)

check: deps
	$(MAKE) -B all EXTRA_CFLAGS=-Werror
	luacheck -q lua spec bench examples bin/buzz
	cppcheck --quiet --error-exitcode=1 --enable=warning,portability \
	  --inline-suppr --std=c99 -Icsrc $(SRCS)

# AddressSanitizer + UndefinedBehaviorSanitizer. lua5.4 itself is not
# instrumented, so the ASan runtime is preloaded. #rock and #once specs
# drive other programs (luarocks, nginx with the LuaJIT build), which
# never load the instrumented core.
ASAN_FLAGS = -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined \
             -fno-sanitize-recover=undefined
asan: deps
	@mkdir -p build/asan/buzz
	$(CC) $(WARN) $(ASAN_FLAGS) -fPIC -D_POSIX_C_SOURCE=200809L \
	  $(call lua_cflags,lua5.4) $(DEP_CFLAGS) $(SRCS) \
	  -o build/asan/buzz/core.so $(LDFLAGS_SO) $(DEP_LIBS)
	BUZZ_BUILD=build/asan \
	LD_PRELOAD="$$($(CC) -print-file-name=libasan.so) $$($(CC) -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:fast_unwind_on_malloc=0 \
	LSAN_OPTIONS=suppressions=$(CURDIR)/tools/lsan.supp:print_suppressions=0 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  $(BUSTED) --lua=$(LUA54) --exclude-tags=rock,once,slow $(BUSTED_ARGS)

bench: deps all
	$(LUA54) bench/run.lua
	$(LUAJIT) bench/run.lua

bench-ic: deps all
	sh bench/instructions.sh $(LUA54)

demo: deps all
	$(LUA54) examples/demo.lua

rock: deps
	luarocks --lua-version=5.4 make --local rockspec/buzz-scm-1.rockspec

clean:
	rm -rf build buzz luacov.* csrc/*.o
