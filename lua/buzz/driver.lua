--- Host drivers: which loop drives a bus made with buzz.new{ loop = ... }.
--
-- A driver attaches a bus to a host's event loop, so that the host's loop
-- delivers its events and fires its timers, and bus:run() is not needed
-- (it raises on such a bus). The choices:
--
--   * a luv module: require "luv", Neovim's vim.loop or vim.uv, luvit's
--     uv (any table with new_poll and new_timer) -> lua/buzz/luv.lua;
--   * "ngx": OpenResty's timers -> lua/buzz/ngx.lua.
--
-- The contract of a driver object, whatever the host:
--
--   driver:close()   stops and releases what the driver holds on the
--                    host (handles, timers); bus:close() calls it once,
--                    before the core is closed. It never raises.
--   driver:wake()    optional, for hosts that cannot watch bus:fd(): the
--                    bus calls it just before each publish made outside a
--                    handler. It must not deliver there and then; it
--                    schedules a turn of the bus on the host. A driver
--                    without it costs publish nothing.
--
-- A driver drives the bus through bus:_turn(max) (timers that are due,
-- then at most max deliveries), bus:fd() and bus:timeout().
-- @module buzz.driver
local type, error, require, rawget, setmetatable =
      type, error, require, rawget, setmetatable
local quote = require("buzz.util").quote

local M = {}

local CHOICES = 'a luv module (require "luv", vim.uv or vim.loop) or "ngx"'

--- True if v looks like a luv module: a table with new_poll and new_timer.
---@param v any
---@return boolean
function M.is_luv(v)
  return type(v) == "table" and type(v.new_poll) == "function"
         and type(v.new_timer) == "function"
end

--- The driver module for loop, raising at level (counted from the
--- caller of check) when loop is none of the choices. Called by buzz.new
--- before it makes anything, so a bad loop leaves nothing behind.
---@param loop any
---@param level integer
---@return table module with attach(bus, loop)
function M.check(loop, level)
  if M.is_luv(loop) then return require "buzz.luv" end
  if loop == "ngx" then return require "buzz.ngx" end
  local what = quote(loop)
  if type(loop) == "table" then
    what = "a table without new_poll and new_timer"
  end
  error(("bad loop %s: expected %s"):format(what, CHOICES), level + 1)
end

--- Attaches bus to the host loop; returns the driver object, or nil, err,
--- code when the host refuses (a handle it cannot make). Raises at level
--- for a loop that is none of the choices.
---@param bus table
---@param loop any
---@param level integer
---@return table|nil driver, string|nil err, string|nil code
function M.attach(bus, loop, level)
  local host = M.check(loop, level + 1)
  if loop == "ngx" then
    local d, err, code = host.attach(bus)
    return d, err, code
  end
  local d, err, code = host.attach(bus, loop)
  return d, err, code
end

-- The waking publish made from each plain publish (there is one: made
-- once, not per bus).
local waking = setmetatable({}, { __mode = "k" })

--- What bus.publish becomes on a bus driven by d: nil when d has no
--- wake() (the plain method on the metatable serves), else a publish that
--- calls d:wake() first when it is called outside a handler. It is set on
--- the bus table itself, so other buses keep the plain method; it wakes
--- and then tail-calls publish, so publish's errors still point at its
--- caller.
---@param d table driver
---@param publish function the plain Bus.publish
---@return function|nil
function M.publisher(d, publish)
  if type(d.wake) ~= "function" then return nil end
  local f = waking[publish]
  if not f then
    f = function(self, etype, payload, opts)
      local drv = type(self) == "table" and rawget(self, "_driver")
      if drv and self._core and not self:_is_in_handler() then drv:wake() end
      return publish(self, etype, payload, opts)
    end
    waking[publish] = f
  end
  return f
end

return M
