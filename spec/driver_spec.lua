-- lua/buzz/driver.lua: the choice of host loop (buzz.new{ loop = ... }) and
-- the driver contract every host driver follows.
local buzz = require "buzz"
local driver = require "buzz.driver"

local CHOICES = 'expected a luv module (require "luv", vim.uv or vim.loop) '
                .. 'or "ngx"'

describe("buzz.new{ loop = ... }", function()
  after_each(function() H.done() end)

  -- Table-driven: each bad value and how the message shows it.
  local no_luv = "a table without new_poll and new_timer"
  local BAD = {
    { 42, "42", "a number" },
    { true, "true", "a boolean" },
    { "nginx", '"nginx"', "an unknown name" },
    { "luv", '"luv"', "the name of the luv module" },
    { {}, no_luv, "an empty table" },
    { { new_poll = function() end }, no_luv, "a table without new_timer" },
    { { new_timer = function() end }, no_luv, "a table without new_poll" },
    { { new_poll = 1, new_timer = 2 }, no_luv, "a table of non-functions" },
  }
  for _, case in ipairs(BAD) do
    it("rejects " .. case[3] .. " as the loop, naming the choices",
       function()
      local ok, err = pcall(buzz.new, { loop = case[1] })
      assert.is_false(ok)
      assert.are.equal(("bad loop %s: %s"):format(case[2], CHOICES), err)
    end)
  end

  it("points a bad loop's error at the caller of buzz.new", function()
    local ok, err = pcall(function()
      local bus = buzz.new{ loop = 7 }
      return bus
    end)
    assert.is_false(ok)
    assert.matches("^spec/driver_spec%.lua:%d+: bad loop 7: ", err)
  end)

  it("leaves a bus without loop alone: no driver, the plain publish",
     function()
    local bus = H.bus()
    assert.is_nil(rawget(bus, "_driver"))
    assert.is_nil(rawget(bus, "publish"))
  end)

  it("knows a luv module by new_poll and new_timer", function()
    assert.is_true(driver.is_luv(require "luv"))
    assert.is_true(driver.is_luv{ new_poll = print, new_timer = print })
    assert.is_false(driver.is_luv{ new_poll = print })
    assert.is_false(driver.is_luv("ngx"))
  end)
end)

describe("driver:wake()", function()
  after_each(function() H.done() end)

  -- A bus with a stand-in driver whose wake() counts its calls, set up
  -- as buzz.new does for a driver that has one.
  local function woken_bus()
    local bus = H.bus()
    local d = { wakes = 0, close = function() end }
    function d.wake(self) self.wakes = self.wakes + 1 end
    rawset(bus, "_driver", d)
    rawset(bus, "publish", driver.publisher(d, getmetatable(bus).publish))
    return bus, d
  end

  it("is called for each publish made outside a handler, not inside one",
     function()
    local bus, d = woken_bus()
    bus:subscribe("a", function() bus:publish("b") end)
    bus:subscribe("b", function() end)
    assert.is_truthy(bus:publish("a"))
    assert.are.equal(1, d.wakes)
    assert.are.same({ true, "delayed" },
                    { bus:publish("a", nil, { delay = 60 }) })
    assert.are.equal(2, d.wakes)
    assert.are.equal(2, bus:drain())    -- a, then b from inside a's handler
    assert.are.equal(2, d.wakes)
    bus:publish_sync("b")               -- delivers at once: nothing to wake
    assert.are.equal(2, d.wakes)
  end)

  it("keeps publish's errors pointing at the caller", function()
    local bus = woken_bus()
    local ok, err = pcall(function() bus:publish("a..b") end)
    assert.is_false(ok)
    assert.matches("^spec/driver_spec%.lua:%d+: bad type", err)
    ok, err = pcall(function() bus.publish("a") end)
    assert.is_false(ok)
    assert.matches("^spec/driver_spec%.lua:%d+: use bus:publish%(%.%.%.%), "
                   .. "not bus%.publish%(%.%.%.%)", err)
  end)

  it("costs a driver without wake() nothing: publish stays the method",
     function()
    assert.is_nil(driver.publisher({}, getmetatable(H.bus()).publish))
  end)

  it("is made once, whatever the number of buses", function()
    local plain = getmetatable(H.bus()).publish
    local d = { wake = function() end }
    assert.are.equal(driver.publisher(d, plain), driver.publisher(d, plain))
  end)
end)
