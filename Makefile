# buzz: build, test, check and benchmark.
#
#   make demo    install what is missing, build, run examples/demo.lua
#   make test    install what is missing, build, run the suite (Lua 5.4 + LuaJIT)
#   make check   -Werror build of both flavours, luacheck, cppcheck
#   make asan    the suite with the C core under ASan + UBSan (Lua 5.4)
#   make bench   benchmarks, both interpreters
#   make bench-ic instructions per event of the failure-handling, filter
#                and window cases (callgrind: repeatable on a noisy machine)
#   make test-redis  the Redis specs (tagged #redis; make test runs them
#                but the #cluster ones, worker processes in a group):
#                each with a redis-server of its own on 127.0.0.1
#   make test-slow  the long fault specs (tagged #slow: many kill rounds,
#                a full disk), both interpreters; CI runs them
#   make fuzz    the libFuzzer harnesses (subjects, JSON) and the random
#                API sequences, FUZZ_SECONDS each (default 60); fuzz/
#   make coverage  C (gcov/lcov) and Lua line coverage of the suite;
#                fails below 90% (C) or 85% (Lua); build/coverage/
#
# The module is built once per interpreter into build/<flavour>/buzz/core.so.
# It is not linked against liblua: the host program provides the Lua API.

CC      ?= cc
FLAVOURS = lua5.4 luajit
JSON_SRCS = csrc/json.c csrc/jsonenc.c csrc/jsondec.c
SRCS     = csrc/error.c csrc/map.c csrc/match.c csrc/queue.c csrc/bus.c \
           csrc/loop.c $(JSON_SRCS) csrc/store.c csrc/storeopen.c csrc/storeread.c \
           csrc/storelock.c csrc/storewal.c csrc/ids.c csrc/dedup.c \
           csrc/engine.c csrc/consumer.c \
           csrc/lbuzz.c csrc/lpublish.c csrc/lsubscribe.c csrc/ldurable.c \
           csrc/ldispatch.c csrc/lhot.c csrc/lmetrics.c csrc/lstore.c \
           csrc/lprefilter.c csrc/lutil.c csrc/lcheck.c \
           csrc/http.c csrc/lhttp.c csrc/redis.c csrc/lredis.c
HDRS     = csrc/buzz.h csrc/store.h csrc/compat.h csrc/json.h csrc/jsonint.h csrc/lcheck.h \
           csrc/lcore.h csrc/engine.h csrc/storeint.h csrc/http.h csrc/redis.h

WARN     = -std=c99 -Wall -Wextra -pedantic -Wshadow -Wmissing-prototypes \
           -Werror=implicit-function-declaration
OPT     ?= -O2 -g
CFLAGS_COMMON = $(WARN) $(OPT) -fPIC -fvisibility=hidden -D_POSIX_C_SOURCE=200809L
DEP_CFLAGS := $(shell pkg-config --cflags libuv libcjson sqlite3 libcrypto 2>/dev/null)
DEP_LIBS   := $(shell pkg-config --libs libuv libcjson sqlite3 libcrypto 2>/dev/null \
                || echo -luv -lcjson -lsqlite3 -lcrypto -lpthread) -lhttp_parser -lhiredis
LDFLAGS_SO = -shared

lua_cflags = $(shell pkg-config --cflags $(1) 2>/dev/null)

LUA54   = lua5.4
LUAJIT  = luajit
BUSTED  = busted

.PHONY: all deps test test-redis test-slow check asan bench bench-ic bench-serve bench-redis bench-state bench-metrics test-browser rock-core rock-install demo doc \
        clean rock fuzz coverage

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
# The two passes run side by side (a core each), each into its log under
# build/, printed whole when both are done; either failing fails the run.
test: deps all
	@echo "busted: Lua 5.4 and LuaJIT side by side (build/test-*.log)"
	@$(BUSTED) --lua=$(LUA54) --exclude-tags=slow,browser,cluster $(BUSTED_ARGS) \
	  > build/test-lua5.4.log 2>&1 & pid=$$!; \
	$(BUSTED) --lua=$(LUAJIT) --exclude-tags=once,slow,browser,cluster $(BUSTED_ARGS) \
	  > build/test-luajit.log 2>&1; jit=$$?; \
	wait $$pid; lua54=$$?; \
	echo "== $(LUA54)"; cat build/test-lua5.4.log; \
	echo "== $(LUAJIT)"; cat build/test-luajit.log; \
	[ $$lua54 -eq 0 ] && [ $$jit -eq 0 ]

test-redis: deps all
	$(BUSTED) --lua=$(LUA54) --tags=redis $(BUSTED_ARGS)
	$(BUSTED) --lua=$(LUAJIT) --tags=redis $(BUSTED_ARGS)

test-slow: deps all
	$(BUSTED) --lua=$(LUA54) --tags=slow $(BUSTED_ARGS)
	$(BUSTED) --lua=$(LUAJIT) --tags=slow $(BUSTED_ARGS)

# The dashboard in Debian's chromium, driven by playwright-core from npm
# (tools/browser): installs both first, then runs the #browser spec.
test-browser: deps all
	sh tools/browser/deps.sh
	$(BUSTED) --lua=$(LUA54) --tags=browser $(BUSTED_ARGS)

check: deps
	$(MAKE) -B all EXTRA_CFLAGS=-Werror
	luacheck -q lua spec bench examples fuzz bin/buzz
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
	  $(BUSTED) --lua=$(LUA54) --exclude-tags=rock,once,slow,browser $(BUSTED_ARGS)

# Fuzzing (fuzz/README of sorts: the harnesses' head comments). The two
# libFuzzer harnesses are built by clang with ASan + UBSan; what they find
# new goes to build/fuzz/corpus/<name>, a crash to build/fuzz/crashes/
# (never the source tree); fuzz/corpus/<name> are the seeds. fuzz/api.lua
# runs on Lua 5.4 with the core under ASan + UBSan, as make asan does.
FUZZ_SECONDS ?= 60
FUZZ_CC      ?= clang
FUZZ_FLAGS    = -std=c99 -g -O1 -fno-omit-frame-pointer \
                -D_POSIX_C_SOURCE=200809L -fsanitize=fuzzer,address,undefined \
                -fno-sanitize-recover=undefined
FUZZ_ENGINE   = csrc/error.c csrc/map.c csrc/match.c csrc/queue.c csrc/bus.c

build/fuzz/subject: fuzz/subject.c $(FUZZ_ENGINE) csrc/buzz.h
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_FLAGS) fuzz/subject.c $(FUZZ_ENGINE) -o $@

build/fuzz/json: fuzz/json.c $(JSON_SRCS) csrc/error.c $(HDRS)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_FLAGS) $(call lua_cflags,lua5.4) $(DEP_CFLAGS) \
	  fuzz/json.c $(JSON_SRCS) csrc/error.c -o $@ \
	  $(shell pkg-config --libs lua5.4 libcjson) -lm

build/fuzz/asan/buzz/core.so: $(SRCS) $(HDRS)
	@mkdir -p $(dir $@)
	$(CC) $(WARN) $(ASAN_FLAGS) -fPIC -D_POSIX_C_SOURCE=200809L \
	  $(call lua_cflags,lua5.4) $(DEP_CFLAGS) $(SRCS) \
	  -o $@ $(LDFLAGS_SO) $(DEP_LIBS)

fuzz: deps build/fuzz/subject build/fuzz/json build/fuzz/asan/buzz/core.so
	sh fuzz/run.sh subject $(FUZZ_SECONDS) -dict=fuzz/subject.dict
	sh fuzz/run.sh json $(FUZZ_SECONDS)
	# (timeout: a run that never ends fails, rather than CI's whole budget)
	timeout $$(( $(FUZZ_SECONDS) * 6 + 120 )) env \
	LUA_PATH='lua/?.lua;lua/?/init.lua;;' LUA_CPATH='build/fuzz/asan/?.so;;' \
	LD_PRELOAD="$$($(CC) -print-file-name=libasan.so) $$($(CC) -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:fast_unwind_on_malloc=0 \
	LSAN_OPTIONS=suppressions=$(CURDIR)/tools/lsan.supp:print_suppressions=0 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  $(LUA54) fuzz/api.lua $(FUZZ_SECONDS)

# Coverage: one instrumented build per interpreter (objects apart, so gcov
# finds each file's notes), the suite on each, then tools/coverage.sh.
COV       = build/coverage
COV_FLAGS = -O0 -g --coverage -fPIC -D_POSIX_C_SOURCE=200809L
COV_OBJS  = $(patsubst csrc/%.c,%.o,$(SRCS))

$(COV)/lua5.4/obj/%.o: csrc/%.c $(HDRS)
	@mkdir -p $(dir $@)
	$(CC) $(WARN) $(COV_FLAGS) $(call lua_cflags,lua5.4) $(DEP_CFLAGS) \
	  -c $< -o $@

$(COV)/luajit/obj/%.o: csrc/%.c $(HDRS)
	@mkdir -p $(dir $@)
	$(CC) $(WARN) $(COV_FLAGS) $(call lua_cflags,luajit) $(DEP_CFLAGS) \
	  -c $< -o $@

# The objects stay: their notes (.gcno) and counts (.gcda) sit beside them.
.PRECIOUS: $(COV)/lua5.4/obj/%.o $(COV)/luajit/obj/%.o

$(COV)/%/buzz/core.so: $(addprefix $(COV)/%/obj/,$(COV_OBJS))
	@mkdir -p $(dir $@)
	$(CC) --coverage $^ -o $@ $(LDFLAGS_SO) $(DEP_LIBS)

coverage: deps $(COV)/lua5.4/buzz/core.so $(COV)/luajit/buzz/core.so
	sh tools/coverage.sh

bench: deps all
	$(LUA54) bench/run.lua
	$(LUAJIT) bench/run.lua

bench-serve: deps all
	$(LUA54) bench/serve.lua
	$(LUAJIT) bench/serve.lua

# The core with its metrics compiled out, beside the real one, for
# bench/metrics_cost.sh.
build/nometrics/%/buzz/core.so: $(SRCS) $(HDRS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_COMMON) -DBUZZ_NO_METRICS $(call lua_cflags,$*) \
	  $(DEP_CFLAGS) $(SRCS) -o $@ $(LDFLAGS_SO) $(DEP_LIBS)

bench-redis: deps all
	$(LUA54) bench/redis.lua
	$(LUAJIT) bench/redis.lua

bench-state: deps all
	$(LUA54) bench/projection.lua
	$(LUAJIT) bench/projection.lua

bench-metrics: deps all build/nometrics/lua5.4/buzz/core.so \
               build/nometrics/luajit/buzz/core.so
	sh bench/metrics_cost.sh $(LUA54)
	sh bench/metrics_cost.sh $(LUAJIT)

bench-ic: deps all
	sh bench/instructions.sh $(LUA54)

demo: deps all
	$(LUA54) examples/demo.lua

# LuaRocks' build (rockspec/, build type "make"): the core for the Lua
# whose headers LUA_INCDIR holds, always rebuilt, under build/rock-core/
# (never in the source tree, where ./?.so would load it first), then
# installed with the Lua layer and bin/buzz into the rock's directories.
ROCK_CORE = build/rock-core/buzz/core.so
rock-core:
	@mkdir -p $(dir $(ROCK_CORE))
	$(CC) $(WARN) $(CFLAGS) -fPIC -fvisibility=hidden -D_POSIX_C_SOURCE=200809L \
	  -I$(LUA_INCDIR) $(ROCK_INCDIRS) $(SRCS) -o $(ROCK_CORE) $(LIBFLAG) \
	  $(ROCK_LIBDIRS) -luv -lsqlite3 -lcjson -lhttp_parser -lhiredis -lcrypto -lpthread

rock-install:
	install -d $(LIBDIR)/buzz $(LUADIR)/buzz $(BINDIR)
	install -m 755 $(ROCK_CORE) $(LIBDIR)/buzz/core.so
	install -m 644 lua/buzz/*.lua $(LUADIR)/buzz/
	install -m 755 bin/buzz $(BINDIR)/buzz

# The release as a source rock: git archive of HEAD packed with
# rockspec/buzz-$(VERSION)-1.rockspec (its source pointed at that archive)
# into build/rock/buzz-$(VERSION)-1.src.rock, which is then installed into
# a scratch tree and loaded from there, away from the checkout.
VERSION = $(shell sed -n 's/^local M = { _VERSION = "\(.*\)" }/\1/p' lua/buzz/init.lua)
ROCK = build/rock
rock: deps
	rm -rf $(ROCK) && mkdir -p $(ROCK)
	git archive --prefix=buzz-$(VERSION)/ -o $(ROCK)/buzz-$(VERSION).tar.gz HEAD
	sed 's|url = "buzz-$(VERSION).tar.gz"|url = "file://$(CURDIR)/$(ROCK)/buzz-$(VERSION).tar.gz"|' \
	  rockspec/buzz-$(VERSION)-1.rockspec > $(ROCK)/buzz-$(VERSION)-1.rockspec
	cd $(ROCK) && luarocks --lua-version=5.4 pack buzz-$(VERSION)-1.rockspec
	luarocks --lua-version=5.4 --tree $(ROCK)/tree install --deps-mode=none \
	  $(ROCK)/buzz-$(VERSION)-1.src.rock
	cd /tmp && eval "$$(luarocks --lua-version=5.4 --tree $(CURDIR)/$(ROCK)/tree path)" && \
	  lua5.4 $(CURDIR)/tools/rock_check.lua $(VERSION) && \
	  $(CURDIR)/$(ROCK)/tree/bin/buzz --version

# The reference: LDoc (Debian's lua-ldoc) over the public modules that
# tools/ldoc.ld lists, from their doc comments, into doc/, which is checked in
# (README links to it). The "Last updated" line is dropped so that the
# output only changes when the code does: CI regenerates it and fails on
# any difference.
doc: deps
	rm -rf doc && ldoc -q -c tools/ldoc.ld . >/dev/null
	sed -i 's/Last updated [0-9-]* [0-9:]* //' doc/index.html doc/modules/*.html

clean:
	rm -rf build buzz luacov.* csrc/*.o
