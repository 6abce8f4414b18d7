-- The store under faults, with real files and real processes: two writers
-- through other names of one file, a full disk, a read-only directory,
-- corrupted and truncated files, a writer that falls behind, and paths the
-- store cannot take.
local buzz = require "buzz"

local sh, quote = H.sh, H.quote

-- Every event of the store at path, read back by a reader, as ids.
local function stored_ids(path)
  local r = assert(buzz.new{ store = path, readonly = true })
  local ids = {}
  for ev in r:events() do ids[#ids + 1] = ev.id end
  r:close()
  return ids
end

-- 1..n, for comparing with stored_ids.
local function range(n)
  local t = {}
  for i = 1, n do t[i] = i end
  return t
end

local function run_ok(cmd)
  local status, out = sh(H.tool .. cmd .. " 2>&1")
  assert(status == 0, cmd .. ": " .. out)
  return out
end

-- Starts code in a child interpreter in the background, with arg[1] a
-- file to write once it is ready and arg[2] a FIFO to read "go" from
-- before it goes on; waits until it is ready. Returns a function that says
-- "go" and waits until the child has printed "done" (idempotent; call it
-- in finally, so no child outlives its test).
local function background(dir, code)
  local script, ready, fifo, out = dir .. "/bg.lua", dir .. "/bg.ready",
                                   dir .. "/bg.fifo", dir .. "/bg.out"
  H.spit(script, code)
  run_ok("mkfifo " .. quote(fifo))
  os.execute(("LUA_PATH='lua/?.lua;lua/?/init.lua;;' LUA_CPATH='%s/?.so;;' "
              .. "%s %s %s %s > %s 2>&1 &")
             :format(H.build, H.lua, quote(script), quote(ready), quote(fifo),
                     quote(out)))
  H.eventually(function()
    local text = H.slurp(out) or ""
    assert(not text:match("lua.*: "), text)       -- it failed
    return H.slurp(ready)
  end, 10, "the child to be ready")
  local is_released = false
  return function()
    if is_released then return end
    is_released = true
    local f = assert(io.open(fifo, "w"))
    f:write("go\n")
    f:close()
    H.eventually(function() return (H.slurp(out) or ""):match("done") end,
                 10, "the child to finish")
  end
end

-- The POSIX (fcntl) locks this process holds on the file at path, as
-- /proc/locks shows them: the locks SQLite takes.
local function posix_locks(path)
  local pid = assert(io.open("/proc/self/stat")):read("*n")
  local _, out = sh(H.tool .. "stat -c %i " .. quote(path))
  local ino = assert(out:match("%d+"))
  local n = 0
  for line in io.lines("/proc/locks") do
    local kind, who, file = line:match("^%d+: (%S+)%s+%S+%s+%S+%s+(%d+) "
                                       .. "%x+:%x+:(%d+) ")
    if kind == "POSIX" and tonumber(who) == pid and file == ino then
      n = n + 1
    end
  end
  return n
end

-- A scratch directory with t.path = dir/events.db; removed after each test.
local function scratch()
  local t = {}
  before_each(function()
    t.dir = H.mktemp_dir()
    t.path = t.dir .. "/events.db"
  end)
  after_each(function()
    H.done()
    H.remove_dir(t.dir)
  end)
  return t
end

describe("one writer per store file", function()
  local t = scratch()

  -- Other names of dir/events.db, made after the store exists.
  local aliases = {
    ["a symlink"] = function(dir)
      run_ok("ln -s events.db " .. quote(dir .. "/link.db"))
      return dir .. "/link.db"
    end,
    ["a hard link"] = function(dir)
      run_ok("ln " .. quote(dir .. "/events.db") .. " "
             .. quote(dir .. "/hard.db"))
      return dir .. "/hard.db"
    end,
    ["./x/../events.db"] = function(dir)
      run_ok("mkdir " .. quote(dir .. "/x"))
      return dir .. "/./x/../events.db"
    end,
  }

  for _, kind in ipairs { "a symlink", "a hard link", "./x/../events.db" } do
    it("refuses a second writer through " .. kind .. " with ELOCKED, in "
       .. "this process and from another, and loses nothing", function()
      local first = H.bus{ store = t.path }
      local alias = aliases[kind](t.dir)
      for i = 1, 10 do assert(first:publish("e", { i = i })) end
      local b, err, code = buzz.new{ store = alias }
      assert.is_nil(b)
      assert.equal("ELOCKED", code)
      assert.matches("^ELOCKED: .* is locked by another writer %(pid "
                     .. "%d+%) in this process", err)
      local ok, out = H.run(([[
        local buzz = require "buzz"
        local b, err, code = buzz.new{ store = %q }
        print(code, err)
        local r = assert(buzz.new{ store = %q, readonly = true })
        r:close()
      ]]):format(alias, alias))
      assert.is_true(ok, out)
      assert.matches("^ELOCKED\tELOCKED: .* is locked by another writer "
                     .. "%(pid %d+%)", out)
      -- the other way round: the alias writes, the first name is refused
      assert(first:flush())
      first:close()
      local second = H.bus{ store = alias }
      b, _, code = buzz.new{ store = t.path }
      assert.is_nil(b)
      assert.equal("ELOCKED", code)
      for i = 11, 20 do assert.equal(i, second:publish("e", { i = i })) end
      second:close()
      assert.same(range(20), stored_ids(t.path))
    end)
  end

  it("refuses a writer in a child while this process writes through "
     .. "another name", function()
    local first = H.bus{ store = t.path }
    local alias = aliases["a symlink"](t.dir)
    assert(first:publish("e", 1))
    local ok, out = H.run(([[
      local buzz = require "buzz"
      local b, err, code = buzz.new{ store = %q }
      print(code)
    ]]):format(alias))
    assert.is_true(ok, out)
    assert.equal("ELOCKED\n", out)
  end)

  it("gives a writer through a hard link the WAL a killed writer left "
     .. "under the first name", function()
    H.bus{ store = t.path }:close()             -- the file, to link to
    local hard = aliases["a hard link"](t.dir)
    local ok, out = H.run(([[
      local buzz = require "buzz"
      local bus = assert(buzz.new{ store = %q, durability = "sync" })
      for i = 1, 5 do assert(bus:publish("e", { i = i })) end
      print(bus:store_info().last_id)
      os.exit(0, false)             -- no close: the WAL stays behind
    ]]):format(t.path))
    assert.is_true(ok, out)
    assert.equal("5\n", out)
    local f = assert(io.open(t.path .. "-wal"))
    assert.is_true(f:seek("end") > 0, "the WAL holds the commits")
    f:close()
    local b = H.bus{ store = hard }
    assert.equal(6, b:publish("e", { i = 6 }))
    b:close()
    assert.same(range(6), stored_ids(hard))
    assert.same(range(6), stored_ids(t.path))
  end)

  it("leaves this process's SQLite locks in place when it refuses a "
     .. "writer", function()
    H.bus{ store = t.path }:close()
    local release = background(t.dir, ([[
      local buzz = require "buzz"
      local bus = assert(buzz.new{ store = %q })
      assert(bus:publish("e", 1))
      assert(bus:flush())
      io.open(arg[1], "w"):close()
      io.open(arg[2]):read()
      bus:close()
      print("done")
    ]]):format(t.path))
    finally(release)
    local reader = H.bus{ store = t.path, readonly = true }
    assert.equal(1, reader:store_info().events)
    local held = posix_locks(t.path)
    assert.is_true(held > 0, "a reader in WAL mode holds a shared lock")
    local b, _, code = buzz.new{ store = t.path }
    assert.is_nil(b)
    assert.equal("ELOCKED", code)
    assert.equal(held, posix_locks(t.path))
  end)

  it("frees the file for the next writer when the first closes",
     function()
    local alias = aliases["./x/../events.db"](t.dir)
    H.bus{ store = t.path }:close()
    local b = H.bus{ store = alias }
    assert.equal(1, b:publish("e", 1))
  end)
end)
