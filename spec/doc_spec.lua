-- The reference in doc/ (make doc; CI regenerates it and fails on any
-- difference) has an entry for every public function: buzz.*, the bus's
-- methods, a subscription's, a route's and an aggregation's. A method
-- added without its doc comment (or marked @local by mistake) fails here.
local buzz = require("buzz")

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

local function entries()
  local names = {}
  local p = assert(io.popen("ls doc/index.html doc/modules/*.html"))
  for path in p:lines() do
    for name in read(path):gmatch('<a name = "([^"]+)"></a>') do
      names[name] = true
    end
  end
  p:close()
  return names
end

local function methods(obj)
  local out = {}
  local mt = getmetatable(obj)
  local idx = mt and mt.__index
  if type(idx) ~= "table" then return out end
  for k, v in pairs(idx) do
    if type(v) == "function" and not k:match("^_") then out[#out + 1] = k end
  end
  table.sort(out)
  return out
end

local function missing(names, list, prefix)
  local out = {}
  for _, k in ipairs(list) do
    if not names[prefix .. k] then out[#out + 1] = prefix .. k end
  end
  return out
end

describe("the reference (doc/)", function()
  local names = entries()
  local bus
  before_each(function() bus = buzz.new() end)
  after_each(function() bus:close() end)

  it("has the pages LDoc writes, for the modules tools/ldoc.ld lists",
     function()
    assert.truthy(read("doc/index.html"):find("buzz reference", 1, true))
    assert.truthy(names["new"])
    assert.truthy(names["Bus:publish"])
  end)

  it("documents every function of the buzz module", function()
    local list = {}
    for k, v in pairs(buzz) do
      if type(v) == "function" and not k:match("^_") then
        list[#list + 1] = k
      end
    end
    table.sort(list)
    assert.is_true(#list > 10)
    assert.same({}, missing(names, list, ""))
  end)

  it("documents every method of a bus and of a subscription", function()
    local bm = methods(bus)
    assert.is_true(#bm > 30)
    assert.same({}, missing(names, bm, "Bus:"))
    local sub = bus:subscribe("a.b", function() end)
    assert.same({}, missing(names, methods(sub), "Sub:"))
  end)

  it("documents every stage of a route and of an aggregation", function()
    local route = bus:route("metrics.cpu")
    -- route:group_by and :reduce exist only to say they come after
    -- :window{...} (router.lua); the aggregation's are the real ones.
    local rm = {}
    for _, k in ipairs(methods(route)) do
      if k ~= "group_by" and k ~= "reduce" then rm[#rm + 1] = k end
    end
    assert.is_true(#rm > 5)
    assert.same({}, missing(names, rm, "Route:"))
    local agg = route:window{ tumbling = 60 }
    assert.same({}, missing(names, methods(agg), "Agg:"))
  end)

  it("has no date in it, so that regenerating changes nothing", function()
    assert.falsy(read("doc/index.html"):find("Last updated %d"))
  end)
end)
