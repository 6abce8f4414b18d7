-- LuaRocks build of buzz. From the repository root:
--
--   luarocks --lua-version=5.4 make --local rockspec/buzz-scm-1.rockspec
--
-- (`make rock` packs a source rock of this release from it and installs
-- that into a scratch tree). It builds offline: the C core needs only
-- Debian's libuv1-dev, libsqlite3-dev, libcjson-dev, libhttp-parser-dev,
-- libssl-dev and libhiredis-dev, found as external dependencies, and the rock depends on
-- nothing but Lua itself: Lua 5.4, or LuaJIT 2.1 (which LuaRocks calls
-- 5.1; the core's headers refuse PUC Lua 5.1, 5.2 and 5.3 by name).
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
buzz is an event bus for Lua 5.4 and LuaJIT 2.1: a C core (subject trie,
priority queue, libuv loop, SQLite store) under a small Lua API of
decorator-style routes in which every handler is a plain Lua function.
]],
  license = "MIT",
}

dependencies = {
  "lua >= 5.1, < 5.5",                -- 5.4, or LuaJIT (as 5.1)
}

external_dependencies = {
  LIBUV = { header = "uv.h", library = "uv" },
  SQLITE = { header = "sqlite3.h", library = "sqlite3" },
  CJSON = { header = "cjson/cJSON.h", library = "cjson" },
  HTTP_PARSER = { header = "http_parser.h", library = "http_parser" },
  HIREDIS = { header = "hiredis/hiredis.h", library = "hiredis" },
  OPENSSL = { header = "openssl/hmac.h", library = "crypto" },
}

build = {
  -- The Makefile builds the core under build/rock-core/ (never
  -- in the source tree, where ./?.so would find it first) and installs
  -- it, lua/buzz/*.lua and bin/buzz (LuaRocks wraps it for the installed
  -- Lua). The Lua modules it installs, one line each, as the record:
  --   ["buzz"] = "lua/buzz/init.lua"
  --   ["buzz.aggregate"] = "lua/buzz/aggregate.lua"
  --   ["buzz.alert"] = "lua/buzz/alert.lua"
  --   ["buzz.batch"] = "lua/buzz/batch.lua"
  --   ["buzz.breaker"] = "lua/buzz/breaker.lua"
  --   ["buzz.cliargs"] = "lua/buzz/cliargs.lua"
  --   ["buzz.clitop"] = "lua/buzz/clitop.lua"
  --   ["buzz.cliwrite"] = "lua/buzz/cliwrite.lua"
  --   ["buzz.clitext"] = "lua/buzz/clitext.lua"
  --   ["buzz.dlq"] = "lua/buzz/dlq.lua"
  --   ["buzz.drive"] = "lua/buzz/drive.lua"
  --   ["buzz.driver"] = "lua/buzz/driver.lua"
  --   ["buzz.errors"] = "lua/buzz/errors.lua"
  --   ["buzz.failure"] = "lua/buzz/failure.lua"
  --   ["buzz.filter"] = "lua/buzz/filter.lua"
  --   ["buzz.freeze"] = "lua/buzz/freeze.lua"
  --   ["buzz.gateway"] = "lua/buzz/gateway.lua"
  --   ["buzz.group"] = "lua/buzz/group.lua"
  --   ["buzz.hot"] = "lua/buzz/hot.lua"
  --   ["buzz.projection"] = "lua/buzz/projection.lua"
  --   ["buzz.stream"] = "lua/buzz/stream.lua"
  --   ["buzz.saga"] = "lua/buzz/saga.lua"
  --   ["buzz.state"] = "lua/buzz/state.lua"
  --   ["buzz.clistate"] = "lua/buzz/clistate.lua"
  --   ["buzz.cliredis"] = "lua/buzz/cliredis.lua"
  --   ["buzz.task"] = "lua/buzz/task.lua"
  --   ["buzz.luv"] = "lua/buzz/luv.lua"
  --   ["buzz.metrics"] = "lua/buzz/metrics.lua"
  --   ["buzz.middleware"] = "lua/buzz/middleware.lua"
  --   ["buzz.ngx"] = "lua/buzz/ngx.lua"
  --   ["buzz.ngxgate"] = "lua/buzz/ngxgate.lua"
  --   ["buzz.options"] = "lua/buzz/options.lua"
  --   ["buzz.page"] = "lua/buzz/page.lua"
  --   ["buzz.policy"] = "lua/buzz/policy.lua"
  --   ["buzz.publish"] = "lua/buzz/publish.lua"
  --   ["buzz.redis"] = "lua/buzz/redis.lua"
  --   ["buzz.redisconn"] = "lua/buzz/redisconn.lua"
  --   ["buzz.redisgroup"] = "lua/buzz/redisgroup.lua"
  --   ["buzz.redislead"] = "lua/buzz/redislead.lua"
  --   ["buzz.redisout"] = "lua/buzz/redisout.lua"
  --   ["buzz.redispart"] = "lua/buzz/redispart.lua"
  --   ["buzz.redistrim"] = "lua/buzz/redistrim.lua"
  --   ["buzz.redisngx"] = "lua/buzz/redisngx.lua"
  --   ["buzz.reducers"] = "lua/buzz/reducers.lua"
  --   ["buzz.router"] = "lua/buzz/router.lua"
  --   ["buzz.runner"] = "lua/buzz/runner.lua"
  --   ["buzz.schedule"] = "lua/buzz/schedule.lua"
  --   ["buzz.serve"] = "lua/buzz/serve.lua"
  --   ["buzz.sse"] = "lua/buzz/sse.lua"
  --   ["buzz.storable"] = "lua/buzz/storable.lua"
  --   ["buzz.store"] = "lua/buzz/store.lua"
  --   ["buzz.timers"] = "lua/buzz/timers.lua"
  --   ["buzz.trace"] = "lua/buzz/trace.lua"
  --   ["buzz.transform"] = "lua/buzz/transform.lua"
  --   ["buzz.util"] = "lua/buzz/util.lua"
  type = "make",
  build_target = "rock-core",
  build_variables = {
    CC = "$(CC)",
    CFLAGS = "$(CFLAGS)",
    LIBFLAG = "$(LIBFLAG)",
    LUA_INCDIR = "$(LUA_INCDIR)",
    ROCK_INCDIRS = "-I$(LIBUV_INCDIR) -I$(SQLITE_INCDIR) -I$(CJSON_INCDIR) "
                   .. "-I$(HTTP_PARSER_INCDIR) -I$(OPENSSL_INCDIR)",
    ROCK_LIBDIRS = "-L$(LIBUV_LIBDIR) -L$(SQLITE_LIBDIR) -L$(CJSON_LIBDIR) "
                   .. "-L$(HTTP_PARSER_LIBDIR) -L$(OPENSSL_LIBDIR)",
  },
  install_target = "rock-install",
  install_variables = {
    LUADIR = "$(LUADIR)",
    LIBDIR = "$(LIBDIR)",
    BINDIR = "$(BINDIR)",
  },
}
