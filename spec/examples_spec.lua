--- Every file in examples/ runs to completion under the interpreter running
-- busted, so the examples (and the README that points at them) cannot
-- drift from the code. Each example asserts its own facts and exits
-- non-zero if one fails; the traces of demo.lua and orchestrator.lua are
-- also checked here.

local function list_examples()
  local p = assert(io.popen("ls examples/*.lua 2>/dev/null"))
  local files = {}
  for line in p:lines() do files[#files + 1] = line end
  p:close()
  return files
end

-- examples/live.lua serves until LIVE_SECONDS have passed, on a port
-- the system picks, with its store in a temporary file.
local LIVE_STORE = H.tmp_store()

local function run_example(file)
  return H.run(("dofile(%q)"):format(file),
               "LIVE_SECONDS=1 PORT=0 LIVE_STORE=" .. LIVE_STORE)
end

-- Expected lines of examples/demo.lua, in order; each is matched whole.
local DEMO_LINES = {
  "== three orders arrive; fraud control flags C",
  "published #1 #2 #3 (normal) and #4 (critical); draining",
  -- the critical cancellation overtakes the three orders before it
  "  [audit]     #4 order.cancelled        order C  corr=req-C cause=-",
  "  [marketing] first order of the day is A: gift voucher sent",
  "  [inventory] order C was cancelled; nothing to reserve",
  -- a follow-up inherits the correlation id and names its cause
  "  [audit]     #5 order.reserved         order A  corr=req-A cause=#1",
  "  [on_error]  handler for \"order.reserved\" failed on #6 (order B): "
    .. "card declined",
  -- the subscriptions after the failing one still get the event
  "  [sms]       order B: reserved",
  "  [shipping]  order A shipped",
  "drain() made 21 deliveries",
  "notifier unsubscribed (6 texts sent so far)",
  "publish F4 -> #11",
  "publish F5 refused: nil, \"EFULL: queue is full (4 pending events); "
    .. "drain the bus or raise queue_limit\", \"EFULL\"",
  "publish F5 -> #20",
  "7 orders shipped in all: A F1 F2 F3 F4 F5 F6",
  "close() discarded 1 pending event; bus closed",
}

-- Expected lines of examples/orchestrator.lua, in order; each is matched
-- whole. t+Ns is the manual clock: retries come 1 s, then 2 s, apart.
local ORCHESTRATOR_LINES = {
  "t+0s  launch T1 \"fix a typo in the README\"  corr=task-T1",
  "t+0s  launch T3 \"port the core to Plan 9\"  corr=task-T3",
  "t+0s    agent  T1 attempt 1 succeeded",
  "t+0s    agent  T3 attempt 1 failed: the model's patch does not apply",
  "t+0s  callback T1 agent: succeeded (1 attempt)",
  "t+0s    build  T2 attempt 1 failed: linker killed (out of memory)",
  "t+0s  task T1 succeeded",
  "t+1s    agent  T3 attempt 2 failed: the model's patch does not apply",
  "t+1s    build  T2 attempt 2 failed: linker killed (out of memory)",
  "t+3s    agent  T3 attempt 3 failed: the model's patch does not apply",
  "t+3s    build  T2 attempt 3 succeeded",
  "t+3s    agent  T3 dead-lettered (exhausted after 3 attempts)",
  "t+3s  callback T2 build: succeeded (3 attempts)",
  "t+3s  task T2 succeeded",
  "t+3s  callback T3 agent: failed (3 attempts)",
  "t+3s  task T3 failed",
  "t+3s  notify: task T3 failed at agent: the model's patch does not apply",
  "T1 succeeded agent 1 attempt, build 1 attempt",
  "T2 succeeded agent 1 attempt, build 3 attempts",
  "T3 failed    agent 3 attempts, build never ran",
  "5 callbacks, 1 notification, 1 dead letter; all checks passed",
}

-- Lines that must appear exactly once in out (T3's build never runs, so
-- no build line or callback names it; only T3 is notified).
local ORCHESTRATOR_ONCE = {
  "callback T1 agent:", "callback T1 build:", "callback T2 agent:",
  "callback T2 build:", "callback T3 agent:", "notify: ",
}
local ORCHESTRATOR_NEVER = {
  "build  T3", "callback T3 build", "notify: task T1", "notify: task T2",
}

-- Asserts that every line of want is a whole line of out, in order, and
-- that the last of want is out's last line.
local function assert_lines(out, want)
  local lines, at = {}, 0
  for line in out:gmatch("([^\n]*)\n") do lines[#lines + 1] = line end
  for _, w in ipairs(want) do
    local found
    for i = at + 1, #lines do
      if lines[i] == w then found = i break end
    end
    assert.is_truthy(found, ("missing, or out of order: %q\nin:\n%s")
                            :format(w, out))
    at = found
  end
  assert.are.equal(want[#want], lines[#lines])
end

local function count(out, s)
  local n, at = 0, 1
  while true do
    local i = out:find(s, at, true)
    if not i then return n end
    n, at = n + 1, i + #s
  end
end

describe("examples/", function()
  local files = list_examples()

  it("holds demo.lua and finds every example", function()
    assert.is_true(#files >= 2, "found: " .. table.concat(files, ", "))
    local names = {}
    for _, f in ipairs(files) do names[f] = true end
    assert.is_true(names["examples/demo.lua"])
    assert.is_true(names["examples/backpressure.lua"])
    assert.is_true(names["examples/orchestrator.lua"])
  end)

  for _, file in ipairs(files) do
    it("runs " .. file .. " to completion", function()
      local ok, out, status = run_example(file)
      assert.are.equal(0, status, out)
      assert.is_true(ok)
      assert.is_nil(out:find("buzz: ", 1, true), "reported on stderr: " .. out)
    end)
  end

  it("serves examples/live.lua's page and stream while it runs",
     function()
    local ok, out = run_example("examples/live.lua")
    H.remove_store(LIVE_STORE)
    assert.is_true(ok, out)
    assert.matches("open http://127%.0%.0%.1:%d+/%?token=change%-this%-token",
                   out)
    local pushes = tonumber(out:match("(%d+) pushes published"))
    assert.is_true(pushes >= 1 and pushes <= 3, out)
  end)

  it("runs each example from the checkout as the README says, with no "
     .. "LUA_PATH or LUA_CPATH", function()
    for _, file in ipairs(files) do
      local status, out = H.sh(("env -u LUA_PATH -u LUA_CPATH -u LUA_INIT "
                                .. "LIVE_SECONDS=1 PORT=0 LIVE_STORE=%s %s %s "
                                .. "2>&1"):format(H.quote(LIVE_STORE),
                                                  H.lua, file))
      H.remove_store(LIVE_STORE)
      assert.are.equal(0, status, file .. ": " .. out)
    end
  end)

  it("prints the demo's trace in order", function()
    local ok, out = run_example("examples/demo.lua")
    assert.is_true(ok, out)
    assert_lines(out, DEMO_LINES)
  end)

  it("prints the orchestrator's trace in order", function()
    local ok, out = run_example("examples/orchestrator.lua")
    assert.is_true(ok, out)
    assert_lines(out, ORCHESTRATOR_LINES)
    for _, s in ipairs(ORCHESTRATOR_ONCE) do
      assert.are.equal(1, count(out, s), ("%q in:\n%s"):format(s, out))
    end
    for _, s in ipairs(ORCHESTRATOR_NEVER) do
      assert.are.equal(0, count(out, s), ("%q in:\n%s"):format(s, out))
    end
  end)

  it("fails when an example's assertion fails", function()
    -- The harness itself must be able to fail: an example that raises.
    local ok, out, status = H.run('assert(false, "an example failed")')
    assert.is_false(ok)
    assert.are_not.equal(0, status)
    assert.matches("an example failed", out, 1, true)
  end)
end)
