-- Error reporting: every failure buzz reports, to on_error or as a
-- `nil, err, code` return, is "CODE: message" with CODE in the core's one
-- error map (core.errors, from csrc/buzz.h), and the default on_error
-- prints it once as "buzz: CODE: message".
local buzz = require "buzz"
local core = require "buzz.core"

local function noop() end

-- A bus on a manual clock whose on_error keeps what it gets.
local function clocked(opts)
  local clock = buzz.manual_clock(1000)
  local got = {}
  opts = opts or {}
  opts.clock = clock
  opts.on_error = function(err) got[#got + 1] = err end
  return H.bus(opts), clock, got
end

local function tmpstore()
  local dir = H.mktemp_dir()
  return dir .. "/events.db", dir
end

-- { what, function() -> { errs reported to on_error }, or nil, err, code }
local CASES = {
  { "a full queue (publish)", function()
      local bus = H.bus{ queue_limit = 1 }
      bus:subscribe("t", noop)
      assert(bus:publish("t"))
      return bus:publish("t")
    end },
  { "publish_sync nested too deep", function()
      local bus = H.bus()
      local res
      bus:subscribe("deep", function(ev)
        if ev.payload < 200 then
          local id, err, code = bus:publish_sync("deep", ev.payload + 1)
          if not id and not res then res = { err, code } end
        end
      end)
      bus:publish_sync("deep", 1)
      return nil, res[1], res[2]
    end },
  { "a store locked by another bus", function()
      local path, dir = tmpstore()
      finally(function() H.remove_dir(dir) end)
      H.bus{ store = path }
      return buzz.new{ store = path }
    end },
  { "a handler past its timeout", function()
      local bus, clock, got = clocked()
      bus:subscribe("slow", function() buzz.sleep(10) end, { timeout = 1 })
      bus:publish("slow")
      bus:drain()
      clock:advance(2)
      return got
    end },
  { "a handler that yields what buzz cannot resume", function()
      local bus, _, got = clocked()
      bus:subscribe("y", function() coroutine.yield("x") end)
      bus:publish("y")
      bus:drain()
      return got
    end },
  { "every(): a payload function that raises", function()
      local bus, clock, got = clocked()
      bus:every(1, "tick", function() error("no payload today") end)
      clock:advance(1)
      return got
    end },
}

describe("error reporting", function()
  after_each(function() H.done() end)

  it("exposes the core's error map with every code the layer uses",
     function()
    for _, code in ipairs { "ENOMEM", "ESUBJECT", "EFULL", "ECLOSED",
                            "ELOOP", "EINVAL", "ESTORE", "ELOCKED",
                            "ETOOBIG", "EDEPTH", "EDECODE", "EINHANDLER",
                            "ETIMEOUT", "EYIELD", "ECALLBACK" } do
      assert.is_string(core.errors[code], code)
    end
  end)

  for _, case in ipairs(CASES) do
    it(case[1] .. ": \"CODE: message\" with a code from core.errors",
       function()
      local a, err, code = case[2]()
      if type(a) == "table" then             -- what on_error got
        assert.is_true(#a > 0, "nothing reached on_error")
        for _, e in ipairs(a) do
          assert.is_string(e)
          local c = e:match("^(E%u+): %S")
          assert.is_truthy(c, e)
          assert.is_string(core.errors[c], e)
        end
      else                                   -- a `nil, err, code` triple
        assert.is_nil(a)
        assert.is_string(code)
        assert.is_string(core.errors[code], code)
        assert.equal(code .. ": ", err:sub(1, #code + 2))
      end
    end)
  end

  it("the default on_error prints buzz: CODE: message once", function()
    local ok, out = H.run([[
      local buzz = require "buzz"
      local clock = buzz.manual_clock(1000)
      local bus = buzz.new{ clock = clock }
      bus:every(1, "tick", function() error("no payload today", 0) end)
      clock:advance(1)
      bus:close()
    ]])
    assert.is_true(ok, out)
    assert.matches("buzz: ECALLBACK: every%(tick%): payload function "
                   .. "raised: no payload today\n", out)
    assert.not_matches("buzz: buzz:", out, 1, true)
  end)

  it("the default on_error does not double a report's own buzz: prefix",
     function()
    local ok, out = H.run([[
      require("buzz.errors").default_on_error("buzz: the window closed")
      require("buzz.errors").default_on_error("EFULL: queue is full")
    ]])
    assert.is_true(ok, out)
    assert.matches("buzz: the window closed\nbuzz: EFULL: queue is full\n",
                   out, 1, true)
    assert.not_matches("buzz: buzz:", out, 1, true)
  end)
end)
