-- buzz top (lua/buzz/clitop.lua) and the metrics rows it reads
-- (buzz.new's metrics_every): run as real processes against a store that
-- another process is writing; live under tmux, once with --once.
local buzz = require "buzz"
local core = require "buzz.core"

local quote, sh = H.quote, H.sh

-- A writer in its own process: a bus with metrics_every that publishes
-- order.placed and order.paid (whose handler always fails) for seconds.
local WRITER = [[
local buzz = require "buzz"
local bus = assert(buzz.new{ store = arg[1], metrics_every = 0.1,
                             on_error = function() end })
bus:subscribe("order.*", function() end, { name = "audit" })
bus:subscribe("order.paid", function() error("declined") end,
              { name = "billing", retry = false })
local stop = os.time() + tonumber(arg[2])
while os.time() < stop do
  for i = 1, 20 do
    bus:publish("order.placed", i)
    bus:publish("order.paid", i)
  end
  bus:drain()
  os.execute("sleep 0.02")
end
bus:close()
]]

describe("buzz top", function()
  local dir, path
  before_each(function()
    dir = H.mktemp_dir()
    path = dir .. "/events.db"
    H.spit(dir .. "/writer.lua", WRITER)
  end)
  after_each(function() H.remove_dir(dir) end)

  local function start_writer(seconds)
    local lpath = H.ROOT .. "/lua/?.lua;" .. H.ROOT .. "/lua/?/init.lua;;"
    local build = H.build:sub(1, 1) == "/" and H.build
                  or H.ROOT .. "/" .. H.build
    os.execute(("LUA_PATH=%s LUA_CPATH=%s %s %s %s %d >/dev/null 2>&1 &")
               :format(quote(lpath), quote(build .. "/?.so;;"), H.lua,
                       quote(dir .. "/writer.lua"), quote(path), seconds))
    H.eventually(function()
      local f = io.open(path)
      if f then f:close() end
      return f ~= nil
    end, 5, "the writer's store")
  end

  it("prints one frame with --once: rates by type and by subscription "
     .. "from the writer's metrics", function()
    start_writer(4)
    local f = H.eventually(function()
      local status, out = sh(H.cli(("--store %s top --once --interval 0.5 "
                                    .. "--json"):format(quote(path))))
      assert.equal(0, status, out)
      local frame = core.json_decode(out)
      return frame.buses == 1 and #frame.subscriptions == 2
             and frame.subscriptions[1].delivered_per_s > 0 and frame
    end, 5, "a frame with the writer's metrics")
    assert.equal(path, f.store)
    assert.is_true(f.events_per_s > 0)
    local types = {}
    for _, t in ipairs(f.types) do types[t.type] = t.per_s end
    assert.is_true(types["order.placed"] > 0 and types["order.paid"] > 0)
    local audit, billing = f.subscriptions[1], f.subscriptions[2]
    assert.equal("audit", audit.name)
    assert.equal("billing", billing.name)
    -- every billing delivery fails: the two rates come from the same rows
    assert.equal(billing.delivered_per_s, billing.failed_per_s)
    assert.equal(0, audit.failed_per_s)
    local status, out = sh(H.cli(("--store %s top --once --interval 0.2")
                                 :format(quote(path))))
    assert.equal(0, status, out)
    assert.matches("buzz top  " .. path:gsub("%p", "%%%0"), out)
    assert.matches("\nsubscription +delivered/s +failed/s +in flight "
                   .. "+waiting +held +breaker\n", out)
    assert.matches("\nbilling +[%d.]+ +[%d.]+ +0 +0 +0 +%-\n", out)
  end)

  it("says so when no bus shares its metrics", function()
    local bus = assert(buzz.new{ store = path })
    bus:publish("e", 1)
    bus:close()
    local status, out = sh(H.cli(("--store %s top --once --interval 0.1")
                                 :format(quote(path))))
    assert.equal(0, status, out)
    assert.matches("subscriptions: no bus shares its metrics", out, 1, true)
    assert.matches("\ndead letters 0  retries 0  delayed 0  buses 0\n", out,
                   1, true)
  end)

  it("redraws live in a terminal and quits on q", function()
    if not (sh("command -v tmux >/dev/null")) then
      pending("tmux is not installed")
      return
    end
    start_writer(6)
    local session = "buzz-top-" .. os.time() .. "-" .. math.random(1e6)
    local cmd = H.cli(("--store %s top --interval 0.2"):format(quote(path)))
    assert(sh(("%stmux new-session -d -s %s -x 120 -y 40 %s"):format(
      H.tool, session, quote(cmd .. "; echo exited $?; sleep 5"))))
    finally(function()
      sh(H.tool .. "tmux kill-session -t " .. session .. " 2>/dev/null")
    end)
    local screen = H.eventually(function()
      local _, out = sh(H.tool .. "tmux capture-pane -p -t " .. session)
      return out:find("billing", 1, true) and out:find("q quits", 1, true)
             and out
    end, 5, "a frame on the screen")
    assert.matches("events  last id %d+", screen)
    sh(H.tool .. "tmux send-keys -t " .. session .. " q")
    H.eventually(function()
      local _, out = sh(H.tool .. "tmux capture-pane -p -t " .. session)
      return out:find("exited 0", 1, true)
    end, 5, "top to exit 0 on q")
  end)

  it("refuses --json without --once, and a bad interval", function()
    local status, err
    local errf = dir .. "/err"
    status = sh(H.cli(("--store %s top --json 2>%s"):format(quote(path),
                                                            quote(errf))))
    err = H.slurp(errf)
    assert.equal(2, status)
    assert.matches("buzz: --json prints one frame: give --once too", err, 1,
                   true)
    status = sh(H.cli(("--store %s top --interval 0 2>%s"):format(
      quote(path), quote(errf))))
    err = H.slurp(errf)
    assert.equal(2, status)
    assert.matches('bad --interval "0": expected seconds, more than 0', err,
                   1, true)
  end)
end)

describe("buzz.new{ metrics_every }", function()
  after_each(function() H.done() end)

  it("writes the bus's counters to its store, and removes them at close",
     function()
    local path = H.tmp_store()
    finally(function() H.remove_store(path) end)
    local clock = buzz.manual_clock(1000)
    local bus = H.bus{ store = path, clock = clock, metrics_every = 1 }
    bus:subscribe("a", function() end, { name = "alpha" })
    for i = 1, 5 do bus:publish("a", i) end
    bus:drain()                        -- the first snapshot is due at once
    clock:advance(1)                   -- nothing changed: not written again
    assert(bus:flush())
    local reader = H.bus{ store = path, readonly = true }
    local rows = reader:_state_list("metrics")
    assert.equal(1, #rows)
    assert.matches("^%d+%.%d+$", rows[1].name)
    local snap = rows[1].value
    assert.equal(5, snap.subscriptions.alpha.delivered)
    assert.equal(5, snap.published.normal)
    assert.equal(1000000, snap.at)
    bus:close()
    assert.equal(0, #reader:_state_list("metrics"))
  end)

  it("is refused without a writable store", function()
    assert.has_error(function() buzz.new{ metrics_every = 1 } end,
      "metrics_every applies to a store: give buzz.new{ store = "
      .. "\"events.db\" } too, or drop metrics_every")
    assert.has_error(function()
      buzz.new{ store = H.tmp_store(), readonly = true, metrics_every = 1 }
    end, "metrics_every writes the bus's metrics into its store, and this "
         .. "bus opens it read-only")
    assert.has_error(function()
      buzz.new{ store = H.tmp_store(), metrics_every = 0 }
    end)
  end)
end)
