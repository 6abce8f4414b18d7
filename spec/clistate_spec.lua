-- buzz state and buzz sagas (lua/buzz/clistate.lua): what the store
-- holds of projections and sagas, read-only.
local buzz = require "buzz"

describe("buzz state and buzz sagas", function()
  local path

  local function cli(args)
    local status, out = H.sh(H.cli("--store " .. H.quote(path) .. " " .. args)
                             .. " 2>&1")
    return status, out
  end

  before_each(function()
    path = H.tmp_store()
    local bus = assert(buzz.new{ store = path, on_error = function() end })
    bus:projection("orders", { types = "order.*", by = "key",
      apply = function(s, ev) s.n = (s.n or 0) + ev.payload.n end })
    bus:saga("build", { on = "task:start",
      id = function(ev) return ev.payload.id end,
      steps = { { name = "one", run = function() end },
                { name = "two", run = function(ctx)
                    if ctx.id == "bad" then error("broken") end
                  end } } })
    bus:publish("order.paid", { n = 2 }, { key = "a" })
    bus:publish("order.paid", { n = 5 }, { key = "b" })
    bus:publish("task:start", { id = "good" })
    bus:publish("task:start", { id = "bad" })
    bus:drain()
    bus:close()                               -- the projection's snapshot
  end)
  after_each(function() H.remove_store(path) end)

  it("prints a projection's snapshot, whole or one key", function()
    local hash = require("buzz.projection").hash
    local status, out = cli("state orders")
    assert.equal(0, status, out)
    assert.equal("projection orders, version 1, snapshot at event #2\n"
                 .. "a  " .. hash({ n = 2 }) .. '  {"n":2}\n'
                 .. "b  " .. hash({ n = 5 }) .. '  {"n":5}\n', out)
    status, out = cli("state orders b")
    assert.equal(0, status, out)
    assert.matches('{\n  "n": 5\n}', out, 1, true)
    status, out = cli("state orders a --json")
    assert.equal(0, status, out)
    assert.equal('{"hash":"' .. hash({ n = 2 }) .. '","key":"a",'
                 .. '"position":2,"projection":"orders","state":{"n":2}}\n',
                 out)
  end)

  it("says what is missing", function()
    local status, out = cli("state nope")
    assert.equal(1, status)
    assert.matches('no snapshot of projection "nope" in the store', out, 1,
                   true)
    status, out = cli("state orders zz")
    assert.equal(1, status)
    assert.matches('projection "orders" has no key "zz" in its snapshot',
                   out, 1, true)
    status, out = cli("state")
    assert.equal(2, status)
    assert.matches("usage: buzz state NAME [KEY] [--json]", out, 1, true)
    status, out = cli("sagas --failed --status completed")
    assert.equal(2, status)
    assert.matches("give --failed or --status, not both", out, 1, true)
  end)

  it("lists sagas, all or by status", function()
    local status, out = cli("sagas")
    assert.equal(0, status, out)
    local lines = {}
    for line in out:gmatch("[^\n]+") do lines[#lines + 1] = line end
    assert.equal(2, #lines)
    assert.matches("^build  bad  compensated  .*Z  step two  ECALLBACK: "
                   .. "saga build bad: step two %(attempt 1 of 1%)",
                   lines[1])
    assert.matches("^build  good  completed    .*Z  step 3$", lines[2])
    status, out = cli("sagas build --status completed --json")
    assert.equal(0, status, out)
    assert.matches('^{"data":{},"id":"good","saga":"build",.*'
                   .. '"status":"completed","step":3,', out)
    status, out = cli("sagas --failed")
    assert.equal(0, status, out)
    assert.equal("no failed sagas\n", out)
    status, out = cli("sagas other")
    assert.equal(0, status, out)
    assert.equal("no sagas\n", out)
  end)
end)
