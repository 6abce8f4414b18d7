-- Ids with a store: never reused, in every durability mode, across clean
-- closes, crashes and a full disk (csrc/ids.c reserves them in blocks
-- ahead of use; spec/crash_spec.lua SIGKILLs a publisher in rounds).
local tmp_store, remove_store = H.tmp_store, H.remove_store

-- The block a store reserves at open (csrc/ids.c IDS_MIN).
local BLOCK = 1024

-- A child that opens the store, lets a second process take SQLite's write
-- lock (so the writer can commit nothing more), publishes five events,
-- lets a handler see them ("none" only: "batch" waits for the commit),
-- and SIGKILLs itself. It prints the ids publish returned and the ids its
-- handler saw.
local CRASH_CHILD = [[
local buzz = require "buzz"
local store, durability, flag = arg[1], arg[2], arg[3]
io.stdout:setvbuf("no")
local bus = assert(buzz.new{ store = store, durability = durability })
bus:subscribe("e", function(ev) print("saw " .. ev.id) end)
os.execute(("env -u LD_PRELOAD sqlite3 %q 'BEGIN IMMEDIATE' "
            .. "'.shell touch %s' '.shell sleep 1' 'COMMIT' >/dev/null 2>&1 &")
           :format(store, flag))
for _ = 1, 500 do
  local f = io.open(flag)
  if f then f:close() break end
  os.execute("env -u LD_PRELOAD sleep 0.01")
end
for i = 1, 5 do print("pub " .. assert(bus:publish("e", { i = i }))) end
if durability == "none" then bus:step(10) end  -- "batch" would wait
os.execute("kill -9 $PPID")
]]

-- Runs CRASH_CHILD; returns the highest id it printed and its output.
local function crash(path, durability)
  local dir = H.mktemp_dir()
  local ok, out = H.run(("arg = { %q, %q, %q }\n"):format(path, durability,
                                                         dir .. "/locked")
                        .. CRASH_CHILD)
  H.remove_dir(dir)
  assert.is_false(ok, "the child was not killed:\n" .. out)
  local high, n = 0, 0
  for id in out:gmatch("pub (%d+)\n") do
    high, n = math.max(high, tonumber(id)), n + 1
  end
  for id in out:gmatch("saw (%d+)\n") do
    high = math.max(high, tonumber(id))
  end
  assert.equal(5, n, "the child published less than expected:\n" .. out)
  return high, out
end

-- A child that publishes n events in "none" durability on a disk that may
-- be full, printing the ids publish returned and its handler saw, and the
-- error and last id after a refused publish.
local FULL_CHILD = [[
local buzz = require "buzz"
local bus = assert(buzz.new{ store = arg[1], durability = "none",
                             on_error = function() end })
bus:subscribe("e", function(ev) print("saw " .. ev.id) end)
local pad = string.rep("p", 900)
for i = 1, tonumber(arg[2]) do
  local id, err = bus:publish("e", { i = i, pad = pad })
  if id then
    print("pub " .. id)
  else
    print("refused " .. bus:stats().last_id .. " " .. err)
  end
  bus:step(10)
end
bus:close()
]]

-- Runs FULL_CHILD for n events where no file may grow past blocks of 512
-- bytes (ulimit -f; SIGXFSZ ignored, so such a write fails with EFBIG:
-- a full disk, for SQLite). Returns its output.
local function on_full_disk(path, blocks, n)
  local script = os.tmpname()
  H.spit(script, FULL_CHILD)
  local _, out = H.sh(("trap '' XFSZ; ulimit -f %d; "
                       .. "LUA_PATH='lua/?.lua;lua/?/init.lua;;' "
                       .. "LUA_CPATH='%s/?.so;;' %s %s %s %d 2>&1")
                      :format(blocks, H.build, H.lua, script, path, n))
  os.remove(script)
  return out
end

describe("ids with a store", function()
  local path

  before_each(function()
    path = tmp_store()
  end)

  after_each(function()
    H.done()
    remove_store(path)
  end)

  it("go on without a gap after a clean close", function()
    local bus = H.bus{ store = path }
    for i = 1, 3 do assert.equal(i, bus:publish("e", i)) end
    bus:close()
    bus = H.bus{ store = path, durability = "none" }
    assert.equal(4, bus:publish("e", 4))
    assert.equal(4, bus:stats().last_id)
  end)

  for _, durability in ipairs { "batch", "none" } do
    it(("are never given again after a crash before their commit (%q)")
       :format(durability), function()
      local high, out = crash(path, durability)
      local bus = H.bus{ store = path }
      local id = bus:publish("e", "after")
      assert.is_true(id > high, ("id %d was given again after the crash:\n%s")
                                :format(id, out))
      -- the crash skipped the rest of the reserved block, no more
      assert.is_true(id - high - 1 <= BLOCK,
                     ("id %d skips more than a block after %d"):format(id,
                                                                       high))
      local stored = {}                -- and nothing uncommitted came back
      for ev in bus:events() do stored[#stored + 1] = ev.id end
      assert.same({ id }, stored)
    end)
  end

  it("refuse a publish with ESTORE, using up no id, when none can be "
     .. "reserved", function()
    local bus = H.bus{ store = path }
    for i = 1, 3 do bus:publish("e", i) end
    bus:close()
    -- A reader keeps SQLite's files; the writer may write nothing at all.
    local reader = H.bus{ store = path, readonly = true }
    local out = on_full_disk(path, 0, 3)
    reader:close()
    local n = 0
    for last, err in out:gmatch("refused (%d+) ([^\n]+)") do
      assert.equal("3", last, out)        -- a refused publish used no id
      assert.matches("^ESTORE: cannot reserve ids, so nothing was "
                     .. "published: ", err)
      n = n + 1
    end
    assert.equal(3, n, out)
    assert.not_matches("saw", out)
    bus = H.bus{ store = path }
    assert.equal(4, bus:publish("e", 4))
  end)

  it("are never given again after a full disk in \"none\" durability, "
     .. "where handlers saw ids the store lost", function()
    local out = on_full_disk(path, 400, 3000)
    local high, lost = 0, 0
    for id in out:gmatch("%a+ (%d+)") do high = math.max(high, tonumber(id)) end
    local bus, stored = H.bus{ store = path }, {}
    for ev in bus:events() do stored[ev.id] = true end
    for id in out:gmatch("saw (%d+)") do
      if not stored[tonumber(id)] then lost = lost + 1 end
    end
    assert.is_true(lost > 0, "the disk never filled up:\n" .. out)
    local id = bus:publish("e", "after")
    assert.is_true(id > high, ("id %d was given again (ids up to %d were "
                               .. "handed out or seen)"):format(id, high))
  end)

  it("leave readers and the tool's view of the log unchanged", function()
    local bus = H.bus{ store = path }
    for i = 1, 3 do bus:publish("e", i) end
    bus:flush()
    local reader = H.bus{ store = path, readonly = true }
    assert.equal(3, reader:store_info().last_id)
    assert.equal(3, bus:store_info().last_id)
    bus:close()
    reader:close()
  end)

  it("count on from the log of a store written before reservations",
     function()
    local bus = H.bus{ store = path }
    for i = 1, 3 do bus:publish("e", i) end
    bus:close()
    -- what an older buzz left: no reservation row
    local p = assert(io.popen(("sqlite3 %q \"DELETE FROM meta\" 2>&1")
                              :format(path)))
    assert.equal("", p:read("*a"))
    p:close()
    bus = H.bus{ store = path }
    assert.equal(4, bus:publish("e", 4))
  end)
end)
