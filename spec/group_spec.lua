-- bus:group: subscriptions and periodic publishes that end together, so
-- a plugin loaded twice does not subscribe twice.
local buzz = require "buzz"

describe("bus:group", function()
  after_each(function() H.done() end)

  it("clears a name's earlier subscriptions and timers with clear = true",
     function()
    local clock = buzz.manual_clock(1000)
    local bus = H.bus{ clock = clock }
    local calls = 0
    local function load_plugin()
      local g = bus:group("myplugin", { clear = true })
      g:subscribe("editor.saved", function() calls = calls + 1 end)
      g:on("editor.saved")(function() calls = calls + 10 end)
      g:every(1, "myplugin.tick", function() return {} end)
      return g
    end
    load_plugin()
    local g = load_plugin()                 -- reloaded: not doubled
    local ticks = 0
    bus:subscribe("myplugin.tick", function() ticks = ticks + 1 end)
    bus:publish("editor.saved", {})
    bus:drain()
    assert.equal(11, calls)
    clock:advance(3)
    assert.equal(3, ticks)
    assert.equal(3, g:clear())              -- two subscriptions, a timer
    bus:publish("editor.saved", {})
    clock:advance(3)
    bus:drain()
    assert.equal(11, calls)
    assert.equal(3, ticks)
    assert.equal(0, g:clear())
  end)

  it("without clear goes on adding to the same group", function()
    local bus = H.bus()
    local a = bus:group("g")
    a:subscribe("x", function() end)
    local b = bus:group("g")
    assert.equal(a, b)
    b:subscribe("x", function() end)
    assert.equal(2, b:clear())
  end)

  it("refuses a bad name or options", function()
    local bus = H.bus()
    assert.has_error(function() bus:group("") end,
      "bad group name: expected a non-empty string such as \"myplugin\", "
      .. "got string")
    assert.has_error(function() bus:group("g", { clean = true }) end,
      "bad options to group: expected nil or { clear = true }")
    assert.has_error(function() bus:group("g").clear() end,
      "use group:clear(...), not group.clear(...)")
  end)
end)
