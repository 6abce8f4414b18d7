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

-- Starts the shell command cmd in the background with $READY, a file it
-- must create once it is ready, and $FIFO, a FIFO it reads "go" from
-- before it goes on; waits until it is ready. Returns a function that says
-- "go" and waits until cmd has ended (idempotent; call it in finally, so
-- nothing outlives its test).
local function background(dir, cmd)
  local ready, fifo, out = dir .. "/bg.ready", dir .. "/bg.fifo",
                           dir .. "/bg.out"
  run_ok("mkfifo " .. quote(fifo))
  os.execute(("READY=%s FIFO=%s sh -c %s > %s 2>&1 &")
             :format(quote(ready), quote(fifo),
                     quote(cmd .. "; echo bg-done"), quote(out)))
  H.eventually(function()
    local text = H.slurp(out) or ""
    assert(not text:match("bg%-done"), text)      -- it ended too soon
    return H.slurp(ready)
  end, 10, "the background command to be ready")
  local is_released = false
  return function()
    if is_released then return end
    is_released = true
    local f = assert(io.open(fifo, "w"))
    f:write("go\n")
    f:close()
    H.eventually(function() return (H.slurp(out) or ""):match("bg%-done") end,
                 10, "the background command to end")
  end
end

-- background() for Lua code, run by a child interpreter with the
-- project's paths; arg[1] is $READY, arg[2] is $FIFO.
local function background_lua(dir, code)
  local script = dir .. "/bg.lua"
  H.spit(script, code)
  return background(dir, ("LUA_PATH='lua/?.lua;lua/?/init.lua;;' "
                          .. "LUA_CPATH='%s/?.so;;' %s %s \"$READY\" "
                          .. "\"$FIFO\""):format(H.build, H.lua, quote(script)))
end

-- Holds SQLite's write lock on the store at path (the sqlite3 shell in a
-- transaction) until the returned function is called: the store's writer
-- waits meanwhile, as on a stalled disk (for up to its busy timeout, 5 s).
local function hold_write_lock(dir, path)
  local script = dir .. "/hold.sh"
  H.spit(script, ([[
{ printf 'BEGIN IMMEDIATE;\n.output %%s\nSELECT 1;\n.output stdout\n' "$READY"
  head -n 1 "$FIFO" > /dev/null
  printf 'COMMIT;\n'; } | sqlite3 %s
]]):format(quote(path)))
  return background(dir, H.tool .. "sh " .. quote(script))
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
    -- the killed writer's reserved block is skipped, never reused
    local id = b:publish("e", { i = 6 })
    assert.is_true(id > 5, "id " .. tostring(id) .. " reused")
    b:close()
    local want = range(5)
    want[6] = id
    assert.same(want, stored_ids(hard))
    assert.same(want, stored_ids(t.path))
  end)

  it("leaves this process's SQLite locks in place when it refuses a "
     .. "writer", function()
    H.bus{ store = t.path }:close()
    local release = background_lua(t.dir, ([[
      local buzz = require "buzz"
      local bus = assert(buzz.new{ store = %q })
      assert(bus:publish("e", 1))
      assert(bus:flush())
      io.open(arg[1], "w"):close()
      io.open(arg[2]):read()
      bus:close()
    ]]):format(t.path))
    finally(release)
    local reader = H.bus{ store = t.path, readonly = true }
    assert.equal(1, reader:store_info().events)
    collectgarbage()     -- a finalizer that ends a read transaction later
    collectgarbage()     -- would drop a lock between the two counts
    local held = posix_locks(t.path)
    assert.is_true(held > 0, "a reader in WAL mode holds a shared lock")
    local b, _, code = buzz.new{ store = t.path }
    assert.is_nil(b)
    assert.equal("ELOCKED", code)
    -- closing any descriptor of the file would drop them all (POSIX
    -- locks are the process's); the reader may take one more meanwhile
    local after = posix_locks(t.path)
    assert.is_true(after >= held, ("locks held: %d before, %d after")
                                  :format(held, after))
  end)

  it("frees the file for the next writer when the first closes",
     function()
    local alias = aliases["./x/../events.db"](t.dir)
    H.bus{ store = t.path }:close()
    local b = H.bus{ store = alias }
    assert.equal(1, b:publish("e", 1))
  end)
end)

describe("the writer's backlog", function()
  local t = scratch()

  it("refuses events with EFULL past max_backlog bytes while the writer "
     .. "is stalled, and loses none it took", function()
    local limit = 1024 * 1024
    local bus = H.bus{ store = t.path, max_backlog = limit }
    assert.equal(1, bus:publish("e", { i = 1 }))
    assert(bus:flush())
    local release = hold_write_lock(t.dir, t.path)
    finally(release)
    local pad = ("x"):rep(200 * 1024)
    local accepted, err, code = 1, nil, nil
    for i = 2, 40 do
      local id
      id, err, code = bus:publish("e", { i = i, pad = pad })
      if not id then break end
      accepted = accepted + 1
      assert.equal(accepted, id)             -- a refusal consumes no id
    end
    assert.equal("EFULL", code)
    local waiting = tonumber(err:match(
      "^EFULL: the store's writer is behind: (%d+) bytes wait to be "
      .. "written %(max_backlog = 1048576%)"))
    assert.is_true(waiting and waiting <= limit, err)
    assert.is_true(accepted >= 3, "the backlog took some events")
    release()                    -- reads wait for the writer: only now
    assert.is_true(bus:flush())
    local info = bus:store_info()
    assert.equal(0, info.backlog_bytes)
    assert.is_true(info.backlog_peak <= limit, info.backlog_peak)
    assert.equal(limit, info.max_backlog)
    assert.is_true(info.refused >= 1)
    assert.equal(accepted + 1, bus:publish("e", { i = "after" }))
    bus:close()
    assert.same(range(accepted + 1), stored_ids(t.path))
  end)

  it("takes one event bigger than max_backlog when nothing waits",
     function()
    local bus = H.bus{ store = t.path, max_backlog = 65536 }
    assert.equal(1, bus:publish("e", ("x"):rep(100000)))
    assert.is_true(bus:flush())
  end)

  it("refuses a max_backlog out of range", function()
    for _, v in ipairs { 0, 1000, 2 ^ 49, 1e6 + 0.5, "big" } do
      assert.has_error(function()
        buzz.new{ store = t.path, max_backlog = v }
      end, ("bad max_backlog: expected an integer number of bytes from "
            .. "65536 (64 KiB) to 2^48, got %s"):format(
              type(v) == "string" and ("%q"):format(v) or tostring(v)))
    end
    assert.has_error(function() buzz.new{ max_backlog = 65536 } end,
      'max_backlog applies to a store: give buzz.new{ store = "events.db" }'
      .. " too, or drop max_backlog")
  end)
end)

describe("store paths the store cannot take", function()
  local t = scratch()

  it("refuses a path with a NUL byte instead of cutting it short",
     function()
    local cut = t.dir .. "/a"
    assert.has_error(function() buzz.new{ store = cut .. "\0b.db" } end,
      ("bad store: the path %q contains a NUL byte; give a path without "
       .. "one"):format(cut .. "\0b.db"))
    assert.has_error(function()
      require("buzz.core").new(10,
                               { store = { path = cut .. "\0b.db" } })
    end, "bad store: the path contains a NUL byte")
    assert.is_nil(H.slurp(cut), "nothing was created at the cut path")
  end)

  it("refuses \":memory:\", pointing at the memory bus, and leaves no "
     .. "file behind", function()
    local msg = 'bad store: ":memory:" cannot be shared by the store\'s '
                .. "writer thread and its reader; omit store for an "
                .. "in-memory bus"
    assert.has_error(function() buzz.new{ store = ":memory:" } end, msg)
    assert.has_error(function()
      require("buzz.core").new(10,
                               { store = { path = ":memory:" } })
    end, msg)
    for _, suffix in ipairs { "", "-lock", "-wal", "-shm" } do
      assert.is_nil(H.slurp(":memory:" .. suffix))
    end
  end)
end)

describe("the store's WAL", function()
  local t = scratch()

  it("counts the WAL in max_size", function()
    local max = 256 * 1024
    local bus = H.bus{ store = t.path, max_size = max }
    local pad, err = ("p"):rep(2000), nil
    for i = 1, 2000 do
      assert(bus:publish("e", { i = i, pad = pad }))
      local ok, e = bus:flush()
      local info = bus:store_info()
      assert.is_true(info.size_bytes <= max, ("%d bytes (WAL %d) after %d "
                     .. "events"):format(info.size_bytes, info.wal_bytes, i))
      if not ok then
        err = e
        break
      end
    end
    assert.matches("^ESTORE: database or disk is full: max_size is 262144 "
                   .. "bytes", err)
    bus:close()
    assert.is_true(#stored_ids(t.path) > 0)
  end)

  it("truncates the WAL once the writer is idle", function()
    local bus = H.bus{ store = t.path }
    for i = 1, 50 do
      assert(bus:publish("e", { i = i }))
      assert(bus:flush())
    end
    assert.is_true(bus:store_info().wal_bytes > 0)
    H.eventually(function() return bus:store_info().wal_bytes == 0 end, 10,
                 "the idle writer's WAL to be truncated")
    assert.same(range(50), stored_ids(t.path))
  end)
end)

-- Runs sqlite3 on the store at path; returns its output.
local function sqlite(path, sql)
  return run_ok("sqlite3 " .. quote(path) .. " " .. quote(sql))
end

-- Writes bytes over the file at path from offset on.
local function scribble(path, offset, bytes)
  local f = assert(io.open(path, "r+b"))
  f:seek("set", offset)
  f:write(bytes)
  f:close()
end

local function is_root()
  local _, out = sh(H.tool .. "id -u")
  return out:match("^0%s") ~= nil
end

describe("the store on a failing world", function()
  local t = scratch()

  it("returns ESTORE on a full disk, keeps every event it acknowledged, "
     .. "and reopens consistent once there is room", function()
    if not is_root() then
      pending("needs root to mount a 2 MiB tmpfs")
      return
    end
    local mnt = t.dir .. "/mnt"
    run_ok("mkdir " .. quote(mnt))
    local status, out = sh(H.tool .. "mount -t tmpfs -o size=2m tmpfs "
                           .. quote(mnt) .. " 2>&1")
    if status ~= 0 then
      pending("cannot mount a tmpfs: " .. out)
      return
    end
    local bus
    finally(function()
      if bus then bus:close() end
      sh(H.tool .. "umount " .. quote(mnt))
    end)
    local path = mnt .. "/events.db"
    run_ok("dd if=/dev/zero of=" .. quote(mnt .. "/filler")
           .. " bs=64k count=16")
    bus = assert(buzz.new{ store = path, durability = "sync",
                           on_error = function() end })
    local acked, pad, err, code = {}, ("z"):rep(60000), nil, nil
    for i = 1, 100 do
      local id
      id, err, code = bus:publish("e", { i = i, pad = pad })
      if not id then break end
      acked[#acked + 1] = id
    end
    assert.equal("ESTORE", code)
    assert.matches("^ESTORE: database or disk is full", err)
    assert.is_true(#acked > 0)
    bus:close()
    bus = nil
    run_ok("rm " .. quote(mnt .. "/filler"))
    bus = assert(buzz.new{ store = path, durability = "sync" })
    local ids = {}
    for ev in bus:events() do ids[#ids + 1] = ev.id end
    assert.same(acked, ids)
    local id = assert(bus:publish("e", { i = "after" }))
    assert.is_true(id > acked[#acked])
    bus:close()
    bus = nil
    assert.equal("ok\n", sqlite(path, "PRAGMA integrity_check"))
  end)

  it("gives ESTORE for a store in a read-only directory, never a crash",
     function()
    local bus = H.bus{ store = t.path }
    for i = 1, 3 do assert(bus:publish("e", { i = i })) end
    bus:close()
    local ro = t.dir .. "/ro"
    run_ok("mkdir " .. quote(ro))
    local root = is_root()
    if root then                       -- root writes through mode bits
      run_ok("mount -t tmpfs -o size=1m tmpfs " .. quote(ro))
      finally(function() sh(H.tool .. "umount " .. quote(ro)) end)
    end
    run_ok("cp " .. quote(t.path) .. " " .. quote(ro .. "/events.db"))
    if root then
      run_ok("mount -o remount,ro " .. quote(ro))
    else
      run_ok("chmod 0555 " .. quote(ro))
      finally(function() sh(H.tool .. "chmod 0755 " .. quote(ro)) end)
    end
    local b, err, code = buzz.new{ store = ro .. "/events.db" }
    assert.is_nil(b)
    assert.equal("ESTORE", code)
    assert.matches("^ESTORE: .*events%.db", err)
    b, err, code = buzz.new{ store = ro .. "/new.db" }
    assert.is_nil(b)
    assert.equal("ESTORE", code)
    assert.matches("^ESTORE: .*new%.db: cannot open or create it", err)
    -- SQLite reads a WAL-mode file only with a -shm file beside it, which
    -- it cannot create here
    b, err, code = buzz.new{ store = ro .. "/events.db", readonly = true }
    assert.is_nil(b)
    assert.equal("ESTORE", code)
    assert.matches("^ESTORE: .*events%.db: unable to open", err)
  end)

  it("gives ESTORE for garbage over the header, never a crash", function()
    local bus = H.bus{ store = t.path }
    for i = 1, 20 do assert(bus:publish("e", { i = i })) end
    bus:close()
    scribble(t.path, 0, ("\255"):rep(100))
    for _, ro in ipairs { false, true } do
      local b, err, code = buzz.new{ store = t.path, readonly = ro }
      assert.is_nil(b)
      assert.equal("ESTORE", code)
      assert.matches("^ESTORE: .*not a database", err)
    end
  end)

  it("gives ESTORE for garbage over a page of events, never a crash or a "
     .. "silent loss", function()
    local bus = H.bus{ store = t.path }
    local pad = ("q"):rep(500)
    for i = 1, 200 do assert(bus:publish("e", { i = i, pad = pad })) end
    bus:close()
    local page = tonumber(sqlite(t.path, "PRAGMA page_size"))
    local pages = tonumber(sqlite(t.path, "PRAGMA page_count"))
    scribble(t.path, page * (pages - 2), ("\170"):rep(page))
    local b, err, code = buzz.new{ store = t.path, readonly = true }
    if b then                          -- the schema survived: reads fail
      local ok, e = pcall(function()   -- at once (nil, err) or later (raise)
        local n = 0
        for _ in assert(b:events()) do n = n + 1 end
        return n
      end)
      b:close()
      assert.is_false(ok, "a damaged page cannot read back as events")
      assert.matches("malformed", tostring(e))
    else
      assert.equal("ESTORE", code)
      assert.matches("malformed", err)
    end
  end)

  it("opens a copy whose WAL was cut mid-frame as a consistent prefix",
     function()
    local ok, out = H.run(([[
      local buzz = require "buzz"
      local bus = assert(buzz.new{ store = %q, durability = "sync" })
      local pad = ("w"):rep(3000)
      for i = 1, 40 do assert(bus:publish("e", { i = i, pad = pad })) end
      print(bus:store_info().wal_bytes > 0)
      os.exit(0, false)             -- no close: the WAL stays behind
    ]]):format(t.path))
    assert.is_true(ok, out)
    assert.equal("true\n", out)
    local copy = t.dir .. "/copy.db"
    run_ok("cp " .. quote(t.path) .. " " .. quote(copy))
    local wal = H.read(t.path .. "-wal")
    H.spit(copy .. "-wal", wal:sub(1, math.floor(#wal / 2) + 100))
    local bus = H.bus{ store = copy }
    local ids = {}
    for ev in bus:events() do ids[#ids + 1] = ev.id end
    assert.is_true(#ids < 40, "the cut WAL lost its tail")
    assert.same(range(#ids), ids)            -- a prefix, no holes
    local id = bus:publish("e", { i = "next" })
    assert.is_true(id > 40, "an id the first writer reserved came again")
    bus:close()
    assert.equal("ok\n", sqlite(copy, "PRAGMA integrity_check"))
  end)
end)
