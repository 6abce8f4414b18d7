--- buzz.group: bus:group(name [, { clear = true }]), subscriptions and
-- periodic publishes that end together, as Neovim's augroups do: a plugin
-- that is loaded again calls bus:group("myplugin", { clear = true }) and
-- its earlier subscriptions and timers are gone instead of doubled.
--
--   local g = bus:group("myplugin", { clear = true })
--   g:subscribe("editor.*", fn [, opts])    -- as bus:subscribe
--   g:on("editor.*" [, opts])(fn)           -- as bus:on
--   g:every(seconds, type, payload_fn)      -- as bus:every
--   g:clear()                               -- ends them all; returns how
--                                           -- many
-- The same name gives the same group; without clear it goes on adding.
-- @module buzz.group
local type, error, setmetatable, getmetatable, next =
      type, error, setmetatable, getmetatable, next

local M = {}
local Group = {}
Group.__index = Group

local function check_self(self, method)
  if getmetatable(self) ~= Group then
    error(("use group:%s(...), not group.%s(...)"):format(method, method), 3)
  end
end

local function keep(self, thing)
  self.items[#self.items + 1] = thing
  return thing
end

--- As bus:subscribe; the subscription ends with the group.
function Group:subscribe(pattern, handler, opts)
  check_self(self, "subscribe")
  local sub, err, code = self.bus:_subscribe(pattern, handler, opts, 2)
  if sub then keep(self, sub) end
  return sub, err, code
end

--- As bus:on: the decorator's subscription ends with the group.
function Group:on(pattern, opts)
  check_self(self, "on")
  local decorate = self.bus:on(pattern, opts)
  return function(handler)
    local sub, err, code = decorate(handler)
    if sub then keep(self, sub) end
    return sub, err, code
  end
end

--- As bus:every; the periodic publish stops with the group.
function Group:every(seconds, etype, payload_fn)
  check_self(self, "every")
  local h, err, code = self.bus:every(seconds, etype, payload_fn)
  if h then keep(self, h) end
  return h, err, code
end

--- Ends every subscription and periodic publish of the group; returns
--- how many were still going.
function Group:clear()
  check_self(self, "clear")
  local n = 0
  for i = #self.items, 1, -1 do
    local x = self.items[i]
    self.items[i] = nil
    if x.unsubscribe then
      if x:unsubscribe() then n = n + 1 end
    elseif x.cancel then
      if x:cancel() ~= false then n = n + 1 end
    end
  end
  return n
end

--- The group name of the bus: subscriptions and periodic publishes that
--- end together. With { clear = true } what the group held ends first.
---@tparam string name
---@tparam[opt] table opts { clear = true }
---@return the group (subscribe, on, every, clear)
-- @function Bus:group
local function bus_group_doc() end   -- (for the reference: the method
local _ = bus_group_doc              -- is made by install, below)

--- Puts bus:group on the bus class; check_bus is init.lua's.
-- @local
function M.install(Bus, check_bus)
  function Bus:group(name, opts)
    check_bus(self, "group")
    if type(name) ~= "string" or name == "" then
      error(("bad group name: expected a non-empty string such as "
             .. "\"myplugin\", got %s"):format(type(name)), 2)
    end
    if opts ~= nil and (type(opts) ~= "table"
                        or next(opts) ~= nil and opts.clear == nil) then
      error("bad options to group: expected nil or { clear = true }", 2)
    end
    local groups = self._groups or {}
    self._groups = groups
    local g = groups[name]
    if g and opts and opts.clear then g:clear() end
    if not g then
      g = setmetatable({ bus = self, name = name, items = {} }, Group)
      groups[name] = g
    end
    return g
  end
end

return M
