--- The luv host driver: a bus driven by a luv loop (plain luv, Neovim's
-- vim.loop or vim.uv, luvit), made by buzz.new{ loop = uv }.
--
-- Three handles on the host's loop, none of libuv's internals shared:
--
--   * a poll on bus:fd(), readable while events are pending (the core's
--     loop contract): a publish from any callback wakes the loop;
--   * a one-shot timer, armed to bus:timeout() before the loop blocks, so
--     that delayed events, retries with their backoff, sleeps and window
--     closes fire on the host's loop, whoever set them and from where;
--   * a prepare handle (unreferenced) that does that arming once per loop
--     iteration, before libuv computes how long to block.
--
-- Each wake-up runs one bounded turn of the bus (bus:_turn: the timers
-- that are due, then at most TURN deliveries), at most one per loop
-- iteration; what is left waits for the next iteration, so a flood of
-- events never starves the host's other callbacks.
--
-- The poll handle is referenced: like a listening socket, an open bus
-- keeps the loop alive, and uv.run() returns once bus:close() has closed
-- the three handles.
--
-- Neovim: luv callbacks are "fast" contexts where most of vim.api is
-- refused (E5560). When the loop is Neovim's own (vim.loop or vim.uv),
-- each turn runs through vim.schedule instead, so handlers may call
-- vim.api freely; the poll and the timer are stopped while a turn waits
-- for its schedule, so the editor's loop does not spin.
--
-- A handler waits for its own luv I/O with buzz.await(function(done)
-- uv.fs_stat(path, done) end): the callback, run by the host's loop,
-- resumes it (on Neovim through vim.schedule, which the driver hands the
-- supervisor). The driver never calls uv.run() itself.
-- @module buzz.luv
local type, pcall, rawget, setmetatable, tostring =
      type, pcall, rawget, setmetatable, tostring

local errors = require "buzz.errors"

local M = {}

local Driver = { __name = "buzz.luv" }
Driver.__index = Driver

--- Deliveries one turn makes at most.
M.TURN = 256

-- Neovim's vim.schedule when uv is Neovim's own loop, else nil.
local function neovim_schedule(uv)
  local vim = rawget(_G, "vim")
  if type(vim) ~= "table" or type(vim.schedule) ~= "function" then
    return nil
  end
  if uv == vim.loop or uv == vim.uv then return vim.schedule end
  return nil
end

-- One turn; never raises into the host's loop (luv exits the process on a
-- callback's error, Neovim shows it): what the bus raises goes to its
-- on_error, as the store's failures do.
function Driver:turn()
  local bus = self.bus
  local ok, err = pcall(bus._turn, bus, M.TURN)
  if not ok and bus._report then
    bus._report((errors.wrap("ELOOP", "buzz.luv: a turn of the bus raised",
                             err)))
  end
end

-- The poll is readable or the timer fired: a turn now, or, on Neovim,
-- once the editor runs scheduled callbacks.
function Driver:wanted()
  if self.is_closed then return end
  local schedule = self.schedule
  if schedule then
    if not self.is_scheduled then
      self.is_scheduled = true
      self.poll:stop()            -- level-triggered: it would fire on and on
      self.timer:stop()
      schedule(self.scheduled_turn)
    end
    return
  end
  if self.turned == self.iteration then return end  -- one per iteration
  self.turned = self.iteration
  self:turn()
end

-- A turn in vim.schedule's callback, then the poll watches again.
function Driver:run_scheduled()
  self.is_scheduled = false
  if self.is_closed then return end
  self:turn()
  if not self.is_closed then self.poll:start("r", self.on_ready) end
end

-- Before the loop blocks: the timer is armed to the bus's next deadline
-- (0 while deliveries or timers are due now), or stopped when there is
-- none.
function Driver:arm()
  self.iteration = self.iteration + 1
  if self.is_closed or self.is_scheduled then return end
  local ok, ms = pcall(self.bus.timeout, self.bus)
  if not ok then return end       -- closed under us; close() follows
  local timer = self.timer
  if ms < 0 then
    timer:stop()
  else
    if ms > 0 then self.uv.update_time() end  -- ms from now, not from the
    timer:start(ms, 0, self.on_ready)         -- start of this iteration
  end
end

--- Stops and closes the three handles; the loop then has nothing of the
--- bus's left. Idempotent; bus:close() calls it.
---
--- Closed outside uv.run() (after it returned, say), the handles would
--- wait for the loop's next run to be called back, and luv (1.44) crashes
--- at exit on a handle closed but never called back: then one
--- non-blocking pass of the loop completes the close. Not inside a run
--- (luv's loop_mode() says which), and not on Neovim, whose loop runs on.
function Driver:close()
  if self.is_closed then return end
  self.is_closed = true
  local handles = { self.poll, self.timer, self.prepare }
  for i = 1, #handles do
    local h = handles[i]
    if not h:is_closing() then h:close() end
  end
  local uv = self.uv
  if not self.schedule and type(uv.loop_mode) == "function"
     and uv.loop_mode() == nil then
    uv.run("nowait")
  end
end

--- Attaches bus to the luv loop uv. Returns the driver, or nil, err,
--- "ELOOP" when luv refuses a handle.
---@param bus table
---@param uv table a luv module
---@return table|nil driver, string|nil err, string|nil code
function M.attach(bus, uv)
  local fd = bus:fd()
  local poll, perr = uv.new_poll(fd)
  if not poll then
    return nil, ("ELOOP: cannot poll the bus's descriptor %d: %s")
                :format(fd, tostring(perr)), "ELOOP"
  end
  local timer = uv.new_timer()
  local prepare = uv.new_prepare()
  local d = setmetatable({
    bus = bus,                -- borrows; the bus owns the driver
    uv = uv,
    poll = poll,              -- owns; closed by close()
    timer = timer,            -- owns; closed by close()
    prepare = prepare,        -- owns; closed by close()
    schedule = neovim_schedule(uv),  -- vim.schedule on Neovim, else nil
    is_scheduled = false,     -- a turn waits for vim.schedule
    is_closed = false,
    iteration = 0,            -- loop iterations seen by the prepare handle
    turned = -1,              -- the iteration of the last turn
  }, Driver)
  if d.schedule then bus._sup.schedule = d.schedule end  -- buzz.await
  -- luv calls plain functions: these forward to the methods above.
  d.on_ready = function() d:wanted() end
  d.scheduled_turn = function() d:run_scheduled() end
  poll:start("r", d.on_ready)
  prepare:start(function() d:arm() end)
  prepare:unref()             -- the poll alone keeps the loop alive
  return d
end

return M
