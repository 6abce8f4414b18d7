--- Routes: the fluent form of filters and transformers.
--
--   bus:route("metrics.cpu")
--     :where{ ["payload.host"] = { match = "^web" } }
--     :map(function(ev) return ev.payload.pct end)
--     :handle(function(ev) ... end, opts)
--
-- A route is immutable: each stage method returns a new route, so one
-- route can branch into several. handle() composes the stages around the
-- handler, in the order they were added, and subscribes it with opts (any
-- subscribe option: retry, ordered, durable...). Bad stages raise when
-- they are added.
-- @module buzz.router
local filter = require "buzz.filter"
local transform = require "buzz.transform"

local type, error, ipairs, setmetatable, getmetatable, tostring =
      type, error, ipairs, setmetatable, getmetatable, tostring

local M = {}

local Route = { __name = "buzz.route" }
Route.__index = Route
Route.__tostring = function(self)
  return ("buzz.route (%s, %d stages)"):format(self.pattern, #self.stages)
end

local BatchRoute = { __name = "buzz.batch_route" }
BatchRoute.__index = BatchRoute
BatchRoute.__tostring = function() return "buzz.batch_route" end

--- A route over pattern on bus (bus:route calls this).
function M.new(bus, pattern)
  return setmetatable({ bus = bus, pattern = pattern, stages = {} }, Route)
end

local function check_self(self, method)
  if getmetatable(self) ~= Route then
    error(("use route:%s(...), not route.%s(...)"):format(method, method), 3)
  end
end

-- A new route: self's stages and then stage.
local function with(self, stage)
  local stages = {}
  for i, s in ipairs(self.stages) do stages[i] = s end
  stages[#stages + 1] = stage
  return setmetatable({ bus = self.bus, pattern = self.pattern,
                        stages = stages }, Route)
end

-- What an aggregation does, asked of a route before :window or :batch:
-- say where it goes.
for _, name in ipairs{ "group_by", "reduce" } do
  Route[name] = function()
    error(("route:%s() comes after :window{...}: bus:route(pattern)"
           .. ":window{ size = 60 }:%s(...):reduce(...):publish(type)")
          :format(name, name), 2)
  end
end

--- Keeps the events a where-table holds for (see buzz.where).
function Route:where(spec)
  check_self(self, "where")
  return with(self, filter.where(spec))
end

--- Keeps the events a predicate (or any condition) holds for.
function Route:filter(c)
  check_self(self, "filter")
  if type(c) == "function" then return with(self, filter.filter(c)) end
  if filter.is_condition(c) then return with(self, c) end
  error(("bad argument to route:filter: expected a function(ev) or a "
         .. "condition (buzz.where, buzz.any...), got %s")
        :format(tostring(c)), 2)
end

--- payload = fn(ev); nil drops the event.
function Route:map(fn)
  check_self(self, "map")
  return with(self, transform.map(fn))
end

--- Adds the fields of t, or of fn(ev), to the payload.
function Route:enrich(t)
  check_self(self, "enrich")
  return with(self, transform.enrich(t))
end

--- payload = the value at path.
function Route:pluck(path)
  check_self(self, "pluck")
  return with(self, transform.pluck(path))
end

--- Renames payload fields.
function Route:rename(map)
  check_self(self, "rename")
  return with(self, transform.rename(map))
end

--- Windows over the route's events: see lua/buzz/aggregate.lua. Returns
--- an aggregation, to go on with :group_by, :reduce, then :publish or
--- :handle.
function Route:window(spec)
  check_self(self, "window")
  local agg = require("buzz.aggregate").new(self, spec, 3)
  return agg                           -- not a tail call: error levels
end

--- Batches of the events the route's stages pass on: returns an object
--- whose :handle(fn, ...) subscribes fn(events, attempt) (see
--- lua/buzz/batch.lua; opts as bus:batch's).
function Route:batch(opts)
  check_self(self, "batch")
  local decorate = require("buzz.batch").decorator(self.bus, self.pattern,
                                                   opts, 3, self)
  return setmetatable({ decorate = decorate }, BatchRoute)
end

--- Subscribes fn(events, attempt) to the route's batches; returns the
--- subscription (or nil, err, code).
function BatchRoute:handle(fn)
  if getmetatable(self) ~= BatchRoute then
    error("use batch:handle(fn), not batch.handle(fn)", 2)
  end
  local sub, err, code = self.decorate(fn, 3)
  return sub, err, code                -- not a tail call: error levels
end

--- handler with every stage around it, first stage outermost.
function Route:compose(handler)
  check_self(self, "compose")
  if type(handler) ~= "function" then
    error(("bad handler: expected a function, got %s"):format(type(handler)),
          2)
  end
  local fn = handler
  for i = #self.stages, 1, -1 do fn = self.stages[i](fn) end
  return fn
end

--- Subscribes the composed handler to the route's pattern; returns the
--- subscription (or nil, err, code as bus:subscribe does).
---@param handler function
---@param opts table|nil subscribe options
function Route:handle(handler, opts)
  check_self(self, "handle")
  if type(handler) ~= "function" then
    error(("bad handler: expected a function, got %s"):format(type(handler)),
          2)
  end
  local sub, err, code = self.bus:_subscribe(self.pattern,
                                             self:compose(handler), opts, 2)
  return sub, err, code                -- not a tail call: error levels
end

return M
