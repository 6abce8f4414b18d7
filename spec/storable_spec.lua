-- lua/buzz/storable.lua: error text and failure records the store can
-- always keep, and what that means for a failing subscription: no event
-- is lost because of what its handler raised.
local buzz = require "buzz"
local storable = require "buzz.storable"
local core = require "buzz.core"

local tmp_store, remove_store = H.tmp_store, H.remove_store

describe("storable.text", function()
  local text = storable.text

  it("gives plain and UTF-8 text back as it is", function()
    for _, s in ipairs { "", "disk on fire", "caf\195\169 \226\156\147",
                         "\240\159\152\128 tab\tnewline\n\1" } do
      assert.equal(s, text(s))
    end
  end)

  it("writes NUL as \\0 and bytes that are not UTF-8 as \\xHH", function()
    local cases = {
      { "a\0b",               "a\\0b" },
      { "\255\254",           "\\xFF\\xFE" },
      { "caf\195",            "caf\\xC3" },            -- cut short
      { "\192\175",           "\\xC0\\xAF" },          -- overlong /
      { "\237\160\128",       "\\xED\\xA0\\x80" },     -- a surrogate
      { "\244\144\128\128",   "\\xF4\\x90\\x80\\x80" }, -- above U+10FFFF
      { "ok \226\130\172 \128 end", "ok \226\130\172 \\x80 end" },
    }
    for _, case in ipairs(cases) do
      assert.equal(case[2], text(case[1]))
      assert.truthy(core.json_encode(text(case[1])))
    end
  end)

  it("cuts text past the limit with a marker that counts what went",
     function()
    local s = ("x"):rep(70000)
    local t = text(s)
    assert.equal(("x"):rep(65536) .. "... [truncated 4464 bytes]", t)
    assert.equal("abc... [truncated 3 bytes]", text("abcdef", 3))
    -- never inside a character, nor inside an escape
    assert.equal("ab... [truncated 2 bytes]", text("ab\195\169", 3))
    assert.equal("a... [truncated 2 bytes]", text("a\0b", 2))
    assert.equal(s, text(s, false))
  end)
end)

describe("storable.describe", function()
  it("describes any value, never raising", function()
    local raising = setmetatable({}, { __tostring = function()
      error("no words", 0) end })
    local odd = setmetatable({}, { __tostring = function() return {} end })
    local cases = {
      { "plain",                       "plain" },
      { nil,                           "error raised with no value (nil)" },
      { { code = 42 },                 'error object {"code":42}' },
      { raising,      "error object (a table whose __tostring raised: "
                      .. "no words)" },
      { buzz.fatal("card\0declined"),  "card\\0declined" },
      { buzz.fatal(nil),               "error raised with no value (nil)" },
    }
    for _, case in ipairs(cases) do
      assert.equal(case[2], storable.describe(case[1]))
    end
    -- Lua 5.4 refuses a __tostring that gives no string; LuaJIT passes it
    assert.matches("^error object %(a table whose __tostring ",
                   storable.describe(odd))
    -- a table JSON cannot hold, and one it would take gigabytes to print
    assert.matches("^error object %(table: ",
                   storable.describe({ f = print }))
    local t = {}
    for _ = 1, 30 do t = { t, t } end
    assert.matches("^error object %(table: ", storable.describe(t))
  end)
end)

describe("storable.value", function()
  it("copies a value so that JSON holds it", function()
    local cyclic = { name = "loop" }
    cyclic.self = cyclic
    local v = storable.value {
      text = "a\0b", fn = print, nan = 0 / 0, cyclic = cyclic,
      list = { 1, "two\255", true }, [3] = "three", huge = 2 ^ 60,
    }
    assert.truthy(core.json_encode(v))
    assert.equal("a\\0b", v.text)
    assert.matches("^%(function", v.fn)
    assert.equal("(a cycle)", v.cyclic.self)
    assert.same({ 1, "two\\xFF", true }, v.list)
    assert.equal("three", v["3"])
  end)
end)

describe("a failing handler's event", function()
  local path

  before_each(function() path = tmp_store() end)
  after_each(function()
    H.done()
    remove_store(path)
  end)

  -- The error of issue 13: a NUL byte, bytes that are not UTF-8 and a
  -- megabyte of text. Neither the pending retry nor the dead letter could
  -- be encoded, so neither was stored, $DLQ was not published, and after
  -- a restart the event was gone.
  local NASTY = "card\0declined \255\254 " .. ("x"):rep(1024 * 1024)

  it("keeps its retry and dead letter, announces it on $DLQ, and is "
     .. "there to redrive after a restart, whatever the error's bytes",
     function()
    local clock = buzz.manual_clock(1000)
    local bus = H.bus { store = path, clock = clock,
                        on_error = function() end }
    local announced = {}
    bus:subscribe("$DLQ.pay.card", function(ev)
      announced[#announced + 1] = ev.payload
    end)
    bus:subscribe("pay.card", function() error(NASTY, 0) end,
                  { durable = "payments",
                    retry = { max = 2, base = 60, jitter = 0 } })
    bus:publish("pay.card", { amount = 5 })
    bus:drain()
    -- the first attempt failed: its retry is in the store
    local retries = assert(bus._core:state_list("retry"))
    assert.equal(1, #retries)
    local row = assert(core.json_decode(retries[1].value))
    assert.matches("^card\\0declined \\xFF\\xFE x", row.history[1].error)
    clock:advance(60)                        -- the last attempt fails
    assert.equal(0, #assert(bus._core:state_list("retry")))
    local dead = bus:dead_letters()
    assert.equal(1, #dead)
    assert.equal("exhausted", dead[1].reason)
    assert.matches("%.%.%. %[truncated %d+ bytes%]$", dead[1].error)
    assert.is_true(#dead[1].error < 70000)
    assert.matches("^card\\0declined", dead[1].attempts[2].traceback)
    assert.equal(1, #announced)
    assert.equal(dead[1].id, announced[1].id)
    assert.same({ amount = 5 }, announced[1].event.payload)
    bus:close()

    local again = H.bus { store = path, clock = clock }
    dead = again:dead_letters()
    assert.equal(1, #dead)
    assert.same({ amount = 5 }, dead[1].event.payload)
    local seen = {}
    again:subscribe("pay.card", function(ev)
      seen[#seen + 1] = ev.payload.amount
    end, { durable = "payments", retry = 2 })
    assert.equal(1, again:redrive { subscription = "payments" })
    again:drain()
    assert.same({ 5 }, seen)
    assert.same({}, again:dead_letters())
  end)

  it("is dead-lettered for a table whose __tostring raises, or nil",
     function()
    local bus = H.bus { store = path, on_error = function() end }
    local raising = setmetatable({}, { __tostring = function()
      error("no words") end })
    local values = { raising, nil }
    local i = 0
    bus:subscribe("e", function()
      i = i + 1
      error(values[i])
    end, { name = "s", retry = 1 })
    bus:publish("e", 1)
    bus:publish("e", 2)
    bus:drain()
    bus:close()
    local again = H.bus { store = path }
    local dead = again:dead_letters()
    assert.equal(2, #dead)
    assert.matches("^error object %(a table whose __tostring raised: ",
                   dead[1].error)
    assert.equal("error raised with no value (nil)", dead[2].error)
  end)

  it("is dead-lettered even when its handler made the event unstorable",
     function()
    local bus = H.bus { store = path, on_error = function() end }
    local announced = 0
    bus:subscribe("$DLQ.e", function() announced = announced + 1 end)
    bus:subscribe("e", function(ev)
      ev.payload.cb = print                  -- JSON cannot hold it
      error("after the damage")
    end, { name = "s", retry = 1 })
    bus:publish("e", { n = 1 })
    bus:drain()
    assert.equal(1, announced)
    bus:close()
    local again = H.bus { store = path }
    local dead = again:dead_letters()
    assert.equal(1, #dead)
    assert.equal(1, dead[1].event.payload.n)
    assert.matches("^%(function", dead[1].event.payload.cb)
  end)

  it("is announced on $DLQ trimmed to max_payload, and kept whole",
     function()
    local bus = H.bus { store = path, max_payload = 4096,
                        on_error = function() end }
    local announced
    bus:subscribe("$DLQ.e", function(ev) announced = ev.payload end)
    bus:subscribe("e", function() error(("y"):rep(3000), 0) end,
                  { name = "s", retry = { max = 3, base = 0, jitter = 0 } })
    bus:publish("e", ("p"):rep(3500))
    bus:drain()
    bus:drain()
    local dead = bus:dead_letters()
    assert.equal(1, #dead)
    assert.equal(3, #dead[1].attempts)
    assert.equal(3000, #dead[1].error)
    assert.truthy(announced, "no $DLQ event")
    assert.is_true(announced.is_trimmed)
    assert.equal(dead[1].id, announced.id)
    assert.is_nil(announced.event.payload)
    assert.equal(1, #announced.attempts)
    assert.is_nil(dead[1].is_trimmed)
  end)
end)

describe("on_error", function()
  -- Issue 13: an on_error that raised while it formatted an error whose
  -- __tostring raises was dropped without a word.
  it("that raises is reported on stderr, even for an error that cannot be "
     .. "made text", function()
    local ok, out = H.run([[
      local buzz = require "buzz"
      local bus = buzz.new{ on_error = function(err)
        error("formatting " .. tostring(err))
      end }
      bus:subscribe("e", function()
        error(setmetatable({}, { __tostring = function()
          error("no words", 0) end }))
      end)
      bus:subscribe("e", function() print("second handler ran") end)
      bus:publish("e")
      print("delivered", bus:drain())
    ]])
    assert(ok, out)
    assert.matches("buzz: on_error raised while reporting \"error object "
                   .. "(a table whose __tostring raised: no words)\"", out,
                   1, true)
    assert.matches("second handler ran", out, 1, true)
    assert.matches("delivered\t2", out, 1, true)
  end)
end)
