-- csrc/bus.c: delivery cursors beyond the four levels a bus starts with.
-- Each nested publish_sync takes one more cursor; the array grows past
-- its first four, and every level must still reach all of its audience in
-- subscription order, with the queued events after the nesting unwinds.

describe("publish_sync nested deeper than four levels", function()
  local DEPTH = 12
  local bus, log

  before_each(function()
    log = {}
    bus = H.bus()
    -- the first subscription goes one level deeper, the second records
    -- that the level's event reached it after the deeper levels returned
    bus:subscribe("level", function(ev)
      local n = ev.payload.n
      log[#log + 1] = "enter " .. n
      bus:publish("queued", { n = n })
      if n < DEPTH then
        assert(bus:publish_sync("level", { n = n + 1 }))
      end
      log[#log + 1] = "leave " .. n
    end)
    bus:subscribe("level", function(ev)
      log[#log + 1] = "second " .. ev.payload.n
    end)
    bus:subscribe("queued", function(ev)
      log[#log + 1] = "queued " .. ev.payload.n
    end)
  end)

  after_each(function() H.done() end)

  local function expected()
    local want = {}
    for n = 1, DEPTH do want[#want + 1] = "enter " .. n end
    for n = DEPTH, 1, -1 do
      want[#want + 1] = "leave " .. n
      want[#want + 1] = "second " .. n
    end
    return want
  end

  it("delivers every level to all its subscriptions, innermost first",
     function()
    local id = bus:publish_sync("level", { n = 1 })
    assert.is_number(id)
    assert.same(expected(), log)
  end)

  it("leaves the queued events for later, in the order they were published",
     function()
    bus:publish_sync("level", { n = 1 })
    log = {}
    assert.equal(DEPTH, bus:drain())
    local want = {}
    for n = 1, DEPTH do want[n] = "queued " .. n end
    assert.same(want, log)
  end)

  it("reuses the grown cursors for the next nesting", function()
    bus:publish_sync("level", { n = 1 })
    bus:drain()
    log = {}
    bus:publish_sync("level", { n = 1 })
    assert.same(expected(), log)
    assert.equal(DEPTH, bus:drain())
  end)

  it("nests as deep inside a handler that the queue delivers", function()
    bus:publish("level", { n = 1 })
    -- drain counts the level-1 event's two deliveries and the queued
    -- ones; the nested levels belong to publish_sync
    assert.equal(2 + DEPTH, bus:drain())
    local want = expected()
    for n = 1, DEPTH do want[#want + 1] = "queued " .. n end
    assert.same(want, log)
  end)
end)
