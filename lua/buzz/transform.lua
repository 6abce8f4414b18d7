--- Transformers: map, enrich, pluck and rename, as decorators around a
-- handler (buzz.map(fn)(handler)) and as route stages.
--
-- A transformer makes a new event table for the handler it wraps: the
-- event's fields, copied, with a new payload. The event other handlers
-- see is never changed, nor is its payload. A transformer that gives nil
-- drops the event: the handler is not called.
--   buzz.map(fn)          payload = fn(ev)
--   buzz.enrich(t | fn)   payload = a copy of the payload (a table, or
--                         none) with the fields of t, or of fn(ev), added
--   buzz.pluck(path)      payload = the value at path ("payload.cpu.user")
--   buzz.rename{ a = "b" } payload = a copy with field a renamed b
-- @module buzz.transform
local type, error, pairs, next, setmetatable, getmetatable =
      type, error, pairs, next, setmetatable, getmetatable

local M = {}

--- A transformer: apply(ev) -> the derived event, or nil to drop it.
--- Calling it with a handler decorates the handler.
local Stage = { __name = "buzz.transformer" }
Stage.__index = Stage
Stage.__tostring = function() return "buzz.transformer" end

local util = require "buzz.util"
local quote = util.quote

-- The event with payload in place of its own: a shallow copy.
local function derive(ev, payload)
  local t = {}
  for k, v in pairs(ev) do t[k] = v end
  t.payload = payload
  return t
end
M.derive = derive

local function stage(apply)
  return setmetatable({ apply = apply }, Stage)
end

--- Decorates handler: it gets the transformed event, or is not called
--- when the transformer drops it.
-- @local
function Stage:__call(handler)
  if type(handler) ~= "function" then
    error(("a transformer decorates a handler: buzz.map(fn)(function(ev) "
           .. "... end), got %s"):format(quote(handler)), 2)
  end
  local apply = self.apply
  return function(ev)
    local out = apply(ev)
    if out ~= nil then return handler(out) end
  end
end

local function check_fn(fn, what, example, level)
  if type(fn) ~= "function" then
    error(("bad argument to buzz.%s: expected %s, got %s")
          :format(what, example, quote(fn)), level + 1)
  end
end

--- payload = fn(ev); nil drops the event.
---@param fn function fn(ev) -> new payload | nil
---@return table transformer: transformer(handler) -> handler
function M.map(fn)
  check_fn(fn, "map", "a function(ev) returning the new payload", 2)
  return stage(function(ev)
    local p = fn(ev)
    if p == nil then return nil end
    return derive(ev, p)
  end)
end

-- A copy of a payload that is a table (or nil: an empty table), for
-- transformers that add or rename fields; nil if it is something else.
local function payload_copy(ev)
  local p = ev.payload
  if p == nil then return {} end
  if type(p) ~= "table" then return nil end
  local t = {}
  for k, v in pairs(p) do t[k] = v end
  return t
end

--- Adds fields to the payload: those of the table t, or of fn(ev) (nil
--- drops the event). An event whose payload is not a table is dropped.
---@param t table|function fields to add, or fn(ev) -> fields | nil
---@return table transformer
function M.enrich(t)
  if type(t) ~= "table" and type(t) ~= "function" then
    error(("bad argument to buzz.enrich: expected a table of fields or a "
           .. "function(ev) returning one, got %s"):format(quote(t)), 2)
  end
  local is_fn = type(t) == "function"
  return stage(function(ev)
    local fields = t
    if is_fn then
      fields = t(ev)
      if fields == nil then return nil end
      if type(fields) ~= "table" then
        error(("buzz.enrich: the function returned %s, not a table of "
               .. "fields"):format(quote(fields)), 0)
      end
    end
    local p = payload_copy(ev)
    if p == nil then return nil end
    for k, v in pairs(fields) do p[k] = v end
    return derive(ev, p)
  end)
end

--- payload = the value at path, a dot-separated path into the event
--- ("payload.cpu.user"); a missing value drops the event.
---@param path string a dot path into the event
---@return table transformer
function M.pluck(path)
  local steps = util.steps(path)
  if steps == nil then
    error(("bad argument to buzz.pluck: expected a path such as "
           .. "\"payload.cpu\", got %s"):format(quote(path)), 2)
  end
  local get = util.getter(steps)
  return stage(function(ev)
    local v = get(ev)
    if v == nil then return nil end
    return derive(ev, v)
  end)
end

--- Renames payload fields: { old = "new", ... }. A field that is absent
--- stays absent; an event whose payload is not a table is dropped.
---@param map table { old = "new", ... }
---@return table transformer
function M.rename(map)
  if type(map) ~= "table" or next(map) == nil then
    error(("bad argument to buzz.rename: expected a table such as "
           .. "{ cpu = \"cpu_pct\" }, got %s"):format(quote(map)), 2)
  end
  for from, to in pairs(map) do
    if type(from) ~= "string" or type(to) ~= "string" then
      error(("bad argument to buzz.rename: names are strings (%s = %s)")
            :format(quote(from), quote(to)), 2)
    end
  end
  return stage(function(ev)
    local p = payload_copy(ev)
    if p == nil then return nil end
    local moved = {}
    for from, to in pairs(map) do
      moved[to] = p[from]
      p[from] = nil
    end
    for to, v in pairs(moved) do p[to] = v end
    return derive(ev, p)
  end)
end

M.is_transformer = function(v) return getmetatable(v) == Stage end

return M
