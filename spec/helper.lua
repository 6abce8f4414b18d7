--- Test helper, loaded by busted before every spec file (.busted).
-- Points package.cpath at the build for the running interpreter and gives
-- specs a small harness in the global H (after luv's test harness):
--   H.bus(opts)        a bus that H.done() will check and close, made
--                      with freeze = true unless opts says otherwise
--   H.counter(n)       a function that must be called exactly n times
--   H.done()           asserts every counter met its count, closes buses
--   H.flavour          "lua5.4" or "luajit"; H.lua the interpreter command
--   H.build            the build directory of the running flavour
--   H.run(code)        runs Lua code in a child interpreter of the same
--                      flavour with the project's paths; ok, output
-- and, for specs that work with files and shell commands:
--   H.tool             a prefix that runs a system tool without LD_PRELOAD
--   H.quote(s)         s quoted for the shell (single quotes)
--   H.sh(cmd)          runs cmd in the shell; exit status, stdout
--   H.mktemp_dir()     a fresh directory from mktemp -d; H.remove_dir(dir)
--                      removes it (and only such a directory)
--   H.slurp(path)      the file's contents, or nil (and the error)
--   H.read(path)       the file's contents; the file must exist
--   H.spit(path, s)    writes s to the file, replacing it
--   H.eventually(fn, timeout, what)
--                      polls fn until it returns a true value, and
--                      returns that value; fails after timeout seconds
--   H.sqlite(path, sql) what the sqlite3 command prints for sql on path
--   H.damage_middle_of_log(path)
--                      overwrites a leaf page from the middle of a store's
--                      log, so that any pass over the log fails
--   H.ROOT             the checkout, as an absolute path
--   H.cli(args, env)   the shell command that runs bin/buzz with args and
--                      this checkout's modules (env: more VAR=value words,
--                      set after the caller's BUZZ_STORE and COLUMNS go)
-- make coverage: BUZZ_COVERAGE names a directory for Lua line counts.
if os.getenv("BUZZ_COVERAGE") then dofile("spec/coverage.lua") end

local flavour = jit and "luajit" or "lua5.4"
local build = os.getenv("BUZZ_BUILD") or ("build/" .. flavour)

package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = build .. "/?.so;" .. package.cpath

local H = { flavour = flavour, lua = flavour, build = build }

-- luv is loaded here, once for the whole run, so that every spec file gets
-- the same module: busted unloads what a spec file required, and a second
-- load of luv in one process initializes libuv's default loop again, which
-- the first load's finalizer then closes under it (a crash).
pcall(require, "luv")
local buses, counters = {}, {}

function H.bus(opts)
  local buzz = require "buzz"
  -- The suite's buses are frozen (lua/buzz/freeze.lua) unless a spec says
  -- freeze = false: a handler, stage or buzz's own code that changes an
  -- event it was given fails the delivery with EFROZEN.
  if opts == nil or opts.freeze == nil then
    local o = { freeze = true }
    for k, v in pairs(opts or {}) do o[k] = v end
    opts = o
  end
  local bus = assert(buzz.new(opts))
  buses[#buses + 1] = bus
  return bus
end

function H.counter(expected, fn)
  local c = { expected = expected, calls = 0, where = debug.traceback("", 2) }
  counters[#counters + 1] = c
  return function(...)
    c.calls = c.calls + 1
    if fn then return fn(...) end
  end
end

function H.done()
  local cs, bs = counters, buses
  counters, buses = {}, {}
  for _, bus in ipairs(bs) do bus:close() end
  for _, c in ipairs(cs) do
    if c.calls ~= c.expected then
      error(("callback called %d times, expected %d%s")
            :format(c.calls, c.expected, c.where), 2)
    end
  end
  for _, bus in ipairs(bs) do
    assert(bus:is_closed(), "a bus was left open")
  end
end

-- ------------------------------------------------------------ files

--- A fresh path for a store file (nothing is created).
function H.tmp_store()
  local base = os.tmpname()
  os.remove(base)
  return base .. ".db"
end

--- Removes a store file and the files SQLite and buzz keep beside it.
function H.remove_store(path)
  for _, suffix in ipairs { "", "-wal", "-shm", "-lock", "-journal" } do
    os.remove(path .. suffix)
  end
end

--- The contents of the file at path, or nil and io.open's error when it
-- cannot be opened (as when it does not exist).
function H.slurp(path)
  local f, err = io.open(path)
  if not f then return nil, err end
  local s = f:read("*a")
  f:close()
  return s
end

--- The contents of the file at path; raises an error when it cannot be
-- opened.
function H.read(path)
  return (assert(H.slurp(path)))
end

--- Writes the string s to the file at path, replacing what was there.
function H.spit(path, s)
  local f = assert(io.open(path, "w"))
  f:write(s)
  f:close()
end

-- ------------------------------------------------------------ the shell

--- A prefix for commands that run system tools (mktemp, rm, sleep,
-- script). Under make asan the sanitizer runtime is preloaded into every
-- child, and those tools would then fail on their own leaks.
H.tool = "env -u LD_PRELOAD "

--- s quoted for the shell: in single quotes, any ' in it as '\''.
function H.quote(s)
  return "'" .. s:gsub("'", [['\'']]) .. "'"
end

--- Runs cmd with the shell; returns its exit status (a number) and what
-- it wrote on stdout. Its stderr is not captured: a caller that wants it
-- in the output adds " 2>&1" to cmd. The command echoes its status, as
-- io.popen():close() gives none under LuaJIT.
function H.sh(cmd)
  local p = assert(io.popen(cmd .. "; echo \"__exit=$?\""))
  local out = p:read("*a")
  p:close()
  local status = tonumber(out:match("__exit=(%d+)%s*$"))
  return status, (out:gsub("__exit=%d+%s*$", ""))
end

--- Makes a fresh directory with mktemp -d; returns its absolute path.
function H.mktemp_dir()
  local status, out = H.sh(H.tool .. "mktemp -d 2>&1")
  local dir = out:match("^(/%S+)\n?$")
  assert(status == 0 and dir, "mktemp -d failed: " .. out)
  return dir
end

--- Removes dir and everything in it. Only what H.mktemp_dir made: an
-- absolute path named tmp.XXXXXX, never "/" or the checkout.
function H.remove_dir(dir)
  assert(dir:match("^/.*/tmp%.%w+$"), "refusing to remove " .. dir)
  H.sh(H.tool .. "rm -rf " .. H.quote(dir))
end

--- Calls fn every 0.05 s until it returns a true value, and returns that
-- value; raises "timed out waiting for <what>" after timeout seconds
-- (default 10; os.time, so to the second).
function H.eventually(fn, timeout, what)
  local deadline = os.time() + (timeout or 10)
  repeat
    local v = fn()
    if v then return v end
    os.execute(H.tool .. "sleep 0.05")
  until os.time() > deadline
  error(("timed out waiting for %s"):format(what or "a condition"), 2)
end

--- What the sqlite3 command prints (stdout and stderr) for sql on the
-- database at path.
function H.sqlite(path, sql)
  local p = assert(io.popen(("sqlite3 %q %q 2>&1"):format(path, sql)))
  local out = p:read("*a")
  p:close()
  return out
end

--- Overwrites one leaf page of the events table, from the middle of
-- the log, with 0xFF: a query that reads the log's rows (a scan)
-- fails on it with "database disk image is malformed", one that
-- reads an index or one end of the rowid order never meets it.
function H.damage_middle_of_log(path)
  local sqlite = H.sqlite
  sqlite(path, "PRAGMA wal_checkpoint(TRUNCATE)")
  local size = tonumber(sqlite(path, "PRAGMA page_size"))
  local leaves = tonumber(sqlite(path, "SELECT count(*) FROM dbstat "
                                 .. "WHERE name = 'events' AND "
                                 .. "pagetype = 'leaf'"))
  assert(leaves > 20, "the log spans too few pages")
  local page = tonumber(sqlite(path, ("SELECT pageno FROM dbstat WHERE "
    .. "name = 'events' AND pagetype = 'leaf' ORDER BY path LIMIT 1 "
    .. "OFFSET %d"):format(math.floor(leaves / 2))))
  local f = assert(io.open(path, "r+b"))
  f:seek("set", (page - 1) * size)
  f:write(("\255"):rep(size))
  f:close()
  local out = sqlite(path, "SELECT count(*), sum(length(payload)) FROM "
                    .. "events")
  assert(out:match("malformed"), "the damage is not met by a scan: " .. out)
end


-- ------------------------------------------------------------ children

-- Runs code in a fresh interpreter of the same flavour; returns the exit
-- status (true on success) and everything it printed (stdout and stderr),
-- then the status as a number. env: VAR=value words for the child.
function H.run(code, env)
  local path = os.tmpname()
  H.spit(path, code)
  local status, out = H.sh(("%s LUA_PATH='lua/?.lua;lua/?/init.lua;;' "
                            .. "LUA_CPATH='%s/?.so;;' %s %s 2>&1")
                           :format(env or "", build, H.lua, path))
  os.remove(path)
  return status == 0, out, status
end

-- ------------------------------------------------------------ bin/buzz

H.ROOT = (function()
  local p = assert(io.popen("pwd"))
  local dir = p:read("*l")
  p:close()
  return dir
end)()

-- Under make asan the sanitizer runtime is preloaded into every child,
-- and system tools (script, sleep) then fail on their own leaks: H.tool
-- runs them without it, and H.cli gives it back to bin/buzz.
local PRELOAD = os.getenv("LD_PRELOAD")

function H.cli(args, env)
  local root = H.ROOT
  local dir = H.build:sub(1, 1) == "/" and H.build or root .. "/" .. H.build
  local lpath = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;;"
  return ("env -u BUZZ_STORE -u COLUMNS %s %s LUA_PATH=%s LUA_CPATH=%s "
          .. "%s %s %s")
         :format(PRELOAD and "LD_PRELOAD=" .. H.quote(PRELOAD) or "",
                 env or "", H.quote(lpath), H.quote(dir .. "/?.so;;"), H.lua,
                 H.quote(root .. "/bin/buzz"), args)
end

_G.H = H
