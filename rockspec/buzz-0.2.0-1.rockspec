-- LuaRocks build of buzz. From the repository root:
--
--   luarocks --lua-version=5.4 make --local rockspec/buzz-scm-1.rockspec
--
-- (`make rock` packs a source rock of this release from it and installs
-- that into a scratch tree). It builds offline: the C core needs only Debian's
-- libuv1-dev, libsqlite3-dev and libcjson-dev, found as external
-- dependencies, and the rock depends on nothing but Lua itself.
rockspec_format = "3.0"
package = "buzz"
version = "0.2.0-1"

-- The release's source archive, made by `make rock` (git archive of the
-- tag) beside this file's copy under build/rock/, and packed with it into
-- buzz-0.2.0-1.src.rock: the rock carries its source, nothing is fetched.
source = {
  url = "buzz-0.2.0.tar.gz",
  dir = "buzz-0.2.0",
}

description = {
  summary = "An embeddable event-processing engine for Lua",
  detailed = [[
buzz is an event bus for Lua 5.1 to 5.4 and LuaJIT: a C core (subject trie,
priority queue, libuv loop, SQLite store) under a small Lua API of
decorator-style routes in which every handler is a plain Lua function.
]],
  license = "MIT",
}

dependencies = {
  "lua >= 5.1",                       -- LuaJIT counts as 5.1
}

external_dependencies = {
  LIBUV = { header = "uv.h", library = "uv" },
  SQLITE = { header = "sqlite3.h", library = "sqlite3" },
  CJSON = { header = "cjson/cJSON.h", library = "cjson" },
  HTTP_PARSER = { header = "http_parser.h", library = "http_parser" },
  OPENSSL = { header = "openssl/hmac.h", library = "crypto" },
}

build = {
  type = "builtin",
  modules = {
    -- The C core: every file in csrc/, in the Makefile's order.
    ["buzz.core"] = {
      sources = {
        "csrc/error.c",
        "csrc/map.c",
        "csrc/match.c",
        "csrc/queue.c",
        "csrc/bus.c",
        "csrc/loop.c",
        "csrc/json.c",
        "csrc/jsonenc.c",
        "csrc/jsondec.c",
        "csrc/store.c",
        "csrc/storeopen.c",
        "csrc/storeread.c",
        "csrc/storelock.c",
        "csrc/storewal.c",
        "csrc/ids.c",
        "csrc/dedup.c",
        "csrc/lbuzz.c",
        "csrc/lpublish.c",
        "csrc/lsubscribe.c",
        "csrc/ldurable.c",
        "csrc/ldispatch.c",
        "csrc/lhot.c",
        "csrc/lmetrics.c",
        "csrc/lstore.c",
        "csrc/lprefilter.c",
        "csrc/lutil.c",
        "csrc/lcheck.c",
        "csrc/http.c",
        "csrc/lhttp.c",
      },
      defines = { "_POSIX_C_SOURCE=200809L" },
      incdirs = {
        "csrc",
        "$(LIBUV_INCDIR)",
        "$(SQLITE_INCDIR)",
        "$(CJSON_INCDIR)",
        "$(HTTP_PARSER_INCDIR)",
        "$(OPENSSL_INCDIR)",
      },
      libdirs = {
        "$(LIBUV_LIBDIR)",
        "$(SQLITE_LIBDIR)",
        "$(CJSON_LIBDIR)",
        "$(HTTP_PARSER_LIBDIR)",
        "$(OPENSSL_LIBDIR)",
      },
      libraries = { "uv", "sqlite3", "cjson", "http_parser", "crypto" },
    },

    -- The Lua layer: one line per file under lua/, such as
    -- ["buzz.router"] = "lua/buzz/router.lua". (The builtin backend also
    -- copies all of lua/ into the tree, but the list is the record.)
    ["buzz"] = "lua/buzz/init.lua",
    ["buzz.aggregate"] = "lua/buzz/aggregate.lua",
    ["buzz.alert"] = "lua/buzz/alert.lua",
    ["buzz.batch"] = "lua/buzz/batch.lua",
    ["buzz.breaker"] = "lua/buzz/breaker.lua",
    ["buzz.cliargs"] = "lua/buzz/cliargs.lua",
    ["buzz.clitop"] = "lua/buzz/clitop.lua",
    ["buzz.clitext"] = "lua/buzz/clitext.lua",
    ["buzz.dlq"] = "lua/buzz/dlq.lua",
    ["buzz.drive"] = "lua/buzz/drive.lua",
    ["buzz.driver"] = "lua/buzz/driver.lua",
    ["buzz.errors"] = "lua/buzz/errors.lua",
    ["buzz.failure"] = "lua/buzz/failure.lua",
    ["buzz.filter"] = "lua/buzz/filter.lua",
    ["buzz.gateway"] = "lua/buzz/gateway.lua",
    ["buzz.hot"] = "lua/buzz/hot.lua",
    ["buzz.task"] = "lua/buzz/task.lua",
    ["buzz.luv"] = "lua/buzz/luv.lua",
    ["buzz.metrics"] = "lua/buzz/metrics.lua",
    ["buzz.middleware"] = "lua/buzz/middleware.lua",
    ["buzz.ngx"] = "lua/buzz/ngx.lua",
    ["buzz.ngxgate"] = "lua/buzz/ngxgate.lua",
    ["buzz.options"] = "lua/buzz/options.lua",
    ["buzz.page"] = "lua/buzz/page.lua",
    ["buzz.policy"] = "lua/buzz/policy.lua",
    ["buzz.publish"] = "lua/buzz/publish.lua",
    ["buzz.reducers"] = "lua/buzz/reducers.lua",
    ["buzz.router"] = "lua/buzz/router.lua",
    ["buzz.runner"] = "lua/buzz/runner.lua",
    ["buzz.schedule"] = "lua/buzz/schedule.lua",
    ["buzz.serve"] = "lua/buzz/serve.lua",
    ["buzz.sse"] = "lua/buzz/sse.lua",
    ["buzz.storable"] = "lua/buzz/storable.lua",
    ["buzz.store"] = "lua/buzz/store.lua",
    ["buzz.timers"] = "lua/buzz/timers.lua",
    ["buzz.trace"] = "lua/buzz/trace.lua",
    ["buzz.transform"] = "lua/buzz/transform.lua",
    ["buzz.util"] = "lua/buzz/util.lua",
  },

  -- The command-line tool; LuaRocks wraps it for the installed Lua.
  install = {
    bin = { buzz = "bin/buzz" },
  },
}
