--- Every file in examples/ runs to completion under the interpreter running
-- busted, so the examples (and the README that points at them) cannot
-- drift from the code. Each example asserts its own facts and exits
-- non-zero if one fails; demo.lua's trace is also checked here.

local function list_examples()
  local p = assert(io.popen("ls examples/*.lua 2>/dev/null"))
  local files = {}
  for line in p:lines() do files[#files + 1] = line end
  p:close()
  return files
end

local function run_example(file)
  return H.run(("dofile(%q)"):format(file))
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

describe("examples/", function()
  local files = list_examples()

  it("holds demo.lua and finds every example", function()
    assert.is_true(#files >= 2, "found: " .. table.concat(files, ", "))
    local names = {}
    for _, f in ipairs(files) do names[f] = true end
    assert.is_true(names["examples/demo.lua"])
    assert.is_true(names["examples/backpressure.lua"])
  end)

  for _, file in ipairs(files) do
    it("runs " .. file .. " to completion", function()
      local ok, out, status = run_example(file)
      assert.are.equal(0, status, out)
      assert.is_true(ok)
      assert.is_nil(out:find("buzz: ", 1, true), "reported on stderr: " .. out)
    end)
  end

  it("prints the demo's trace in order", function()
    local ok, out = run_example("examples/demo.lua")
    assert.is_true(ok, out)
    local lines, at = {}, 0
    for line in out:gmatch("([^\n]*)\n") do lines[#lines + 1] = line end
    for _, want in ipairs(DEMO_LINES) do
      local found
      for i = at + 1, #lines do
        if lines[i] == want then found = i break end
      end
      assert.is_truthy(found, ("missing, or out of order: %q\nin:\n%s")
                              :format(want, out))
      at = found
    end
    assert.are.equal(DEMO_LINES[#DEMO_LINES], lines[#lines])
  end)

  it("fails when an example's assertion fails", function()
    -- The harness itself must be able to fail: an example that raises.
    local ok, out, status = H.run('assert(false, "an example failed")')
    assert.is_false(ok)
    assert.are_not.equal(0, status)
    assert.matches("an example failed", out, 1, true)
  end)
end)
