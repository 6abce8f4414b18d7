--- buzz.reducers: what a window folds its events with. buzz.agg's
-- reducers (count, sum, avg, min, max, percentile, distinct), each
-- { init, step, finish, save, load }; custom reducers and tables of named
-- reducers checked and combined into one (as_reducer); and the dot-path
-- getter that reducers and group_by read events with. aggregate.lua
-- runs them; this module keeps no state.
-- @module buzz.reducers
local type, pairs, ipairs, setmetatable, getmetatable =
      type, pairs, ipairs, setmetatable, getmetatable
local ceil = math.ceil
local sort = table.sort

local util = require "buzz.util"
local quote, fail = util.quote, util.fail

local M = {}

-- A function reading the value at a dot path of the event.
function M.getter(path, what, level)
  if type(path) == "function" then return path end
  local steps = util.steps(path)
  if steps == nil then
    fail(level, "bad %s: expected a path such as \"payload.pct\" or a "
         .. "function(ev), got %s", what, quote(path))
  end
  return util.getter(steps)
end



--- A reducer: init() -> state, step(state, ev) -> state, finish(state) ->
--- value.
local Reducer = { __name = "buzz.reducer" }
Reducer.__index = Reducer

local function same(s) return s end

-- save(state) gives a form JSON holds (for checkpoints), load(form) the
-- state again; both default to the state itself.
local function reducer(init, step, finish, save, load)
  return setmetatable({ init = init, step = step, finish = finish or same,
                        save = save or same, load = load or same },
                      Reducer)
end

local function number_at(path, level)
  local steps = type(path) == "string" and util.steps(path)
  if steps and #steps == 2 then          -- "payload.pct", unrolled
    local s1, s2 = steps[1], steps[2]
    return function(ev)
      local p = ev[s1]
      if type(p) ~= "table" then return nil end
      local v = p[s2]
      if type(v) == "number" and v == v then return v end
      return nil
    end
  end
  local get = M.getter(path or "payload", "reducer path", level + 1)
  return function(ev)
    local v = get(ev)
    if type(v) == "number" and v == v then return v end
    return nil
  end
end

local agg = {}
M.agg = agg

--- The number of events.
function agg.count()
  return reducer(function() return 0 end,
                 function(n) return n + 1 end)
end

--- The sum of the numbers at path (default "payload"); others are skipped.
function agg.sum(path)
  local num = number_at(path, 3)
  return reducer(function() return 0 end, function(s, ev)
    local v = num(ev)
    return v and s + v or s
  end)
end

--- The mean of the numbers at path, or nil when there were none.
function agg.avg(path)
  local num = number_at(path, 3)
  return reducer(function() return { sum = 0, n = 0 } end, function(s, ev)
    local v = num(ev)
    if v then s.sum, s.n = s.sum + v, s.n + 1 end
    return s
  end, function(s)
    if s.n == 0 then return nil end
    return s.sum / s.n
  end)
end

local function extreme(path, is_min)
  local num = number_at(path, 4)
  return reducer(function() return nil end, function(s, ev)
    local v = num(ev)
    if v == nil then return s end
    if s == nil or (is_min and v < s) or (not is_min and v > s) then
      return v
    end
    return s
  end)
end

--- The least number at path, or nil.
function agg.min(path) return extreme(path, true) end

--- The greatest number at path, or nil.
function agg.max(path) return extreme(path, false) end

--- The p-th percentile (0 < p <= 100, nearest rank) of the numbers at
--- path, or nil. Keeps every value of the window.
function agg.percentile(p, path)
  if type(p) ~= "number" or p ~= p or p <= 0 or p > 100 then
    fail(2, "bad percentile %s: expected a number above 0 and at most 100",
         quote(p))
  end
  local num = number_at(path, 3)
  return reducer(function() return {} end, function(s, ev)
    local v = num(ev)
    if v then s[#s + 1] = v end
    return s
  end, function(s)
    if #s == 0 then return nil end
    sort(s)
    return s[math.max(1, ceil(p / 100 * #s))]
  end)
end

--- The number of distinct values at path (nil values not counted).
function agg.distinct(path)
  local get = M.getter(path or "payload", "reducer path", 3)
  return reducer(function() return { seen = {}, n = 0 } end, function(s, ev)
    local v = get(ev)
    if v ~= nil and v == v and not s.seen[v] then
      s.seen[v], s.n = true, s.n + 1
    end
    return s
  end, function(s) return s.n end, function(s)
    local list = {}                    -- keys of any type, as a list
    for v in pairs(s.seen) do list[#list + 1] = v end
    return list
  end, function(list)
    local s = { seen = {}, n = #list }
    for _, v in ipairs(list) do s.seen[v] = true end
    return s
  end)
end

-- A reducer from what reduce() is given: a reducer, a custom table
-- { init, step, finish }, or a table of named reducers.
function M.as_reducer(r, level)
  if getmetatable(r) == Reducer then return r end
  if type(r) ~= "table" then
    fail(level, "bad reducer %s: expected buzz.agg.count(), sum(path), "
         .. "avg(path), min(path), max(path), percentile(p, path), "
         .. "distinct(path), a table { init, step, finish } or a table of "
         .. "named reducers", quote(r))
  end
  if r.step ~= nil or r.init ~= nil then
    for _, k in ipairs { "finish", "save", "load" } do
      if r[k] ~= nil and type(r[k]) ~= "function" then
        r = nil
        break
      end
    end
    if not r or type(r.init) ~= "function" or type(r.step) ~= "function"
       or (r.save == nil) ~= (r.load == nil) then
      fail(level, "bad reducer: a custom reducer is { init = function() "
           .. "end, step = function(state, ev) end, and optionally finish "
           .. "= function(state) end, save = function(state) end with "
           .. "load = function(saved) end }")
    end
    return reducer(r.init, r.step, r.finish, r.save, r.load)
  end
  local names = {}
  for name in pairs(r) do
    if type(name) ~= "string" then
      fail(level, "bad reducer table: names are strings, got %s",
           quote(name))
    end
    names[#names + 1] = name
  end
  if #names == 0 then
    fail(level, "bad reducer: an empty table reduces nothing")
  end
  sort(names)
  local parts = {}
  for i, name in ipairs(names) do
    local part = r[name]
    if getmetatable(part) ~= Reducer then
      fail(level, "bad reducer %q: expected a buzz.agg reducer, got %s",
           name, quote(part))
    end
    parts[i] = part
  end
  return reducer(function()
    local s = {}
    for i, part in ipairs(parts) do s[i] = part.init() end
    return s
  end, function(s, ev)
    for i, part in ipairs(parts) do s[i] = part.step(s[i], ev) end
    return s
  end, function(s)
    local out = {}
    for i, name in ipairs(names) do out[name] = parts[i].finish(s[i]) end
    return out
  end, function(s)
    local out = {}                     -- { v = } boxes: a state may be nil
    for i, part in ipairs(parts) do out[i] = { v = part.save(s[i]) } end
    return out
  end, function(saved)
    local s = {}
    for i, part in ipairs(parts) do s[i] = part.load(saved[i].v) end
    return s
  end)
end

return M
