--- buzz.breaker: a supervised subscription's circuit breaker, as methods
-- of its Runner (lua/buzz/runner.lua). Closed, it counts the failures
-- within `within` ms; at `failures` it opens: deliveries are held, and
-- after `cool_down` ms it is half open and lets one probe through. The
-- probe's success closes it and releases what it held (through the
-- supervisor's run queue); its failure opens it again. Each change is
-- announced as $SYS.breaker.
-- @module buzz.breaker
local pairs = pairs

local M = {}
local B = {}               -- the runner's methods (M.install)

-- The runner's FIFO queues (install sets them).
local fifo, push, shift, size

function B:announce_breaker(state)
  local b = self.breaker
  b.state = state
  self.sup:announce("$SYS.breaker", {
    subscription = self.name, pattern = self.sub.pattern, state = state,
    held = size(self.held), at = self.sup:now() / 1000 })
end

function B:breaker_failed(job)
  local b = self.breaker
  if not b then return end
  if b.state == "half_open" then
    if b.probe == job then self:open_breaker() end
    return
  end
  if b.state ~= "closed" then return end
  local now, fails = self.sup:now(), b.fails
  push(fails, now)
  while size(fails) > 0 and fails[fails.first] <= now - b.within do
    shift(fails)
  end
  if size(fails) >= b.failures then self:open_breaker() end
end

function B:open_breaker()
  local b = self.breaker
  b.probe, b.fails = nil, fifo()
  b.timer = self.sup.timers:after(b.cool_down, B.half_open, self)
  self:announce_breaker("open")
end

function B.half_open(r)
  local b = r.breaker
  b.timer = nil
  if r.is_closed then return end
  r:announce_breaker("half_open")
  local job = shift(r.held)
  if job then r.sup:enqueue(job) end
  r.sup:flush()
end

function B:close_breaker()
  local b = self.breaker
  b.probe = nil
  self:announce_breaker("closed")
  while true do
    local job = shift(self.held)
    if job == nil then break end
    self.sup:enqueue(job)
  end
end

--- The breaker's state: "closed", "open" or "half_open" (nil: none).
function B:breaker_state()
  return self.breaker and self.breaker.state
end

--- Puts the breaker's methods on the Runner class; q holds the runner's
--- FIFO functions (fifo, push, shift, size).
function M.install(Runner, q)
  fifo, push, shift, size = q.fifo, q.push, q.shift, q.size
  for k, f in pairs(B) do Runner[k] = f end
end

return M
