--- Batching: a subscription whose handler gets arrays of events.
--
--   bus:batch("metrics.>", { size = 100, interval = 5 })(function(events)
--     db:insert_many(events)
--   end)
--
-- Events are collected in arrival order. A batch is handed over when it
-- holds size events, when its payloads reach max_bytes (JSON bytes; the
-- event that would go over starts the next batch), or interval seconds
-- after its first event came, whichever is first. The handler is called as
-- fn(events, attempt).
--
-- A batch is one job for the failure machinery: retry, breaker, timeout
-- and concurrency (default 1: one batch at a time) apply to it as a unit,
-- and a batch that exhausts its retries is dead-lettered as its events,
-- one letter each, so that redrive() feeds them to the batch again.
--
-- adaptive = true (or { target = seconds, min = n, max = n }) moves the
-- size toward the one whose handler takes target seconds (default 0.1),
-- from the latency per event of the batches so far, between min (1) and
-- max (10 times size).
--
-- With durable = "name" on a store, what is not finished (buffered, or
-- handed over and not yet done or dead) survives a crash: the oldest such
-- event id is kept as a state row, and the next run feeds the events from
-- there up to the consumer's position into the batch again before new
-- ones. That is at least once: a batch that finished after an unfinished
-- older one comes again too. A durable batch without retry is
-- dead-lettered when it fails (as with retry = 1); retry = false opts
-- out.
-- @module buzz.batch
local policies = require "buzz.policy"
local util = require "buzz.util"
local errors = require "buzz.errors"
local core = require "buzz.core"
local middleware = require "buzz.middleware"

local type, pairs, setmetatable, ipairs = type, pairs, setmetatable, ipairs
local floor, ceil, min, max = math.floor, math.ceil, math.min, math.max
local json_encode = core.json_encode
local quote = util.quote

local M = {}

local Batcher = {}
Batcher.__index = Batcher

-- Options that are the batch's, and options for the failure machinery
-- (the rest go to the subscription that collects).
local BATCH_KEYS = { size = true, interval = true, max_bytes = true,
                     adaptive = true }
local RUN_KEYS = { retry = true, breaker = true, timeout = true,
                   concurrency = true }
local KNOWN = "adaptive, breaker, concurrency, durable, filter, interval, "
              .. "max_bytes, name, retry, size, start, timeout"

local fail = util.fail

-- v if it is nil or positive, else raises (util counts levels from its
-- caller, this file from itself: the same level reaches the same frame).
local function positive(v, name, is_int, level)
  if v == nil then return nil end
  local n = util.positive(v, "batch " .. name, is_int, level)
  return n                             -- not a tail call: error levels
end

local function adaptive_spec(a, size, level)
  if a == nil or a == false then return nil end
  if a == true then a = {} end
  if type(a) ~= "table" then
    fail(level, "bad batch adaptive: expected true or a table such as "
         .. "{ target = 0.1, min = 1, max = 1000 }, got %s", quote(a))
  end
  for k in pairs(a) do
    if k ~= "target" and k ~= "min" and k ~= "max" then
      fail(level, "unknown option %s in adaptive (known: max, min, target)",
           quote(k))
    end
  end
  local target = positive(a.target, "adaptive.target", false, level + 1)
  local lo = positive(a.min, "adaptive.min", true, level + 1) or 1
  local hi = positive(a.max, "adaptive.max", true, level + 1)
             or max(lo, size * 10)
  if lo > hi then
    fail(level, "bad batch adaptive: min (%d) is above max (%d)", lo, hi)
  end
  return { target = floor((target or 0.1) * 1000 + 0.5), min = lo, max = hi }
end

-- Splits opts into the batch's settings, the runner's policy and the
-- collecting subscription's options.
local function split(opts, pattern, level)
  if opts ~= nil and type(opts) ~= "table" then
    fail(level, "bad options to batch: expected a table such as { size = "
         .. "100, interval = 5 }, got %s", quote(opts))
  end
  opts = opts or {}
  local sub_opts, run = {}, {}
  for k, v in pairs(opts) do
    if RUN_KEYS[k] then
      run[k] = v
    elseif k == "ordered" or k == "once" then
      fail(level, "a batch subscription cannot be %s: its handler gets "
           .. "many events at a time", k)
    elseif not BATCH_KEYS[k] then
      if k ~= "name" and k ~= "durable" and k ~= "start" and k ~= "filter"
      then
        fail(level, "unknown option %s to batch (known: %s)", quote(k),
             KNOWN)
      end
      sub_opts[k] = v
    end
  end
  local size = positive(opts.size, "size", true, level + 1) or 100
  local interval = positive(opts.interval, "interval", false, level + 1) or 1
  local spec = {
    size = size, interval = floor(interval * 1000 + 0.5),
    max_bytes = positive(opts.max_bytes, "max_bytes", true, level + 1),
    adaptive = adaptive_spec(opts.adaptive, size, level + 1),
  }
  if opts.name ~= nil and (type(opts.name) ~= "string" or opts.name == "")
  then
    fail(level, "bad name: expected a string such as \"billing\", got %s",
         quote(opts.name))
  end
  if opts.durable ~= nil and (type(opts.durable) ~= "string"
                              or opts.durable == "") then
    fail(level, "bad durable: expected a consumer name such as "
         .. "\"billing\", got %s", quote(opts.durable))
  end
  if run.timeout ~= nil then
    positive(run.timeout, "timeout", false, level + 1)
  end
  if run.concurrency ~= nil then
    positive(run.concurrency, "concurrency", true, level + 1)
  end
  -- A durable batch is at least once: without a policy a failed batch
  -- becomes dead letters (retry = 1), not a silent loss; false opts out.
  local retry = run.retry
  if retry == nil and opts.durable ~= nil then retry = 1 end
  -- The collecting subscription is plain: the batch's runner, not the
  -- subscription, handles failures (retry = false: no durable default).
  sub_opts.retry = false
  local policy = {
    name = opts.name or opts.durable or pattern,
    retry = retry and policies.retry(retry, level) or nil,
    breaker = run.breaker ~= nil
              and policies.breaker(run.breaker, level) or nil,
    ordered = false,
    timeout = run.timeout and floor(run.timeout * 1000 + 0.5),
    concurrency = run.concurrency or 1,
    is_durable = false,       -- the batch keeps its own row (see mark)
  }
  return spec, policy, sub_opts
end


-- ------------------------------------------------------------ batcher

function Batcher:now()
  return self.bus:_now()
end

-- The oldest event id not finished (buffered or handed over), or nil.
function Batcher:low()
  local low = self.n > 0 and self.buf[1].id or nil
  for _, id in pairs(self.open) do
    if low == nil or id < low then low = id end
  end
  return low
end

-- Keeps the durable row in step with low().
function Batcher:mark()
  if not self.row then return end
  local low = self:low()
  if low == self.marked then return end
  self.marked = low
  local bus = self.bus
  if low then
    bus:_state_put("batch", self.row, { from = low })
  else
    bus:_state_del("batch", self.row)
  end
end

--- Takes one event into the batch being collected.
-- @local
function Batcher:add(ev)
  local bytes = 0
  if self.max_bytes then
    bytes = #(json_encode(ev.payload) or "")
    if self.n > 0 and self.bytes + bytes > self.max_bytes then
      self:flush()
    end
  end
  local n = self.n + 1
  self.buf[n], self.n, self.bytes = ev, n, self.bytes + bytes
  if n == 1 then
    self.timer = self.bus:_after(self.interval, Batcher.flush, self)
    self:mark()
  end
  if n >= self.size or (self.max_bytes and self.bytes >= self.max_bytes)
  then
    self:flush()
  end
end

--- Closes the collected events into a batch (no-op when empty) and hands
--- the closed batches over in order, unless the batch is recovering (then
--- the first turn after bus:batch() returns does).
-- @local
function Batcher:flush()
  if self.n > 0 then
    if self.timer then self.timer:cancel() end
    local events = self.buf
    self.buf, self.n, self.bytes, self.timer = {}, 0, 0, nil
    local b = { batch = events, type = "batch", n = #events }
    self.open[b] = events[1].id
    local q = self.closed
    q[#q + 1] = b
  end
  self:hand_over()
end

-- Hands the closed batches over, in order (not while recovering).
function Batcher:hand_over()
  if self.is_recovering then return end
  local q, r = self.closed, self.runner
  if #q == 0 or r.is_closed then return end
  self.closed = {}
  for _, b in ipairs(q) do r:admit(r:job(b, 1, 0)) end
  r.sup:flush()
end

-- What the runner calls with a batch (or, redriven, one dead event).
function Batcher:run(b)
  if not b.batch then return self:add(b) end
  local t0 = self:now()
  self.fn(b.batch, b.attempt or 1)
  if self.adaptive then self:adapt(self:now() - t0, b.n) end
end

-- Moves the size toward adaptive.target, from the latency per event of a
-- batch of n that took ms.
function Batcher:adapt(ms, n)
  local a = self.adaptive
  local want
  if ms <= 0 then
    want = self.size * 2
  else
    want = n * a.target / ms
  end
  local size = (self.size + want) / 2      -- halfway, rounded toward want
  size = want > self.size and ceil(size) or floor(size)
  self.size = min(a.max, max(a.min, size))
end

-- The runner is through with a job: done, dead, or dropped.
function Batcher:released(job)
  local b = job.ev
  if b.batch then
    self.open[b] = nil
    self:mark()
  end
end

--- Flushes what is collected; the batches not started are dropped (with
--- durable, the next run takes them up again).
-- @local
function Batcher:stop()
  if self.is_stopped then return end
  self:flush()
  self.is_stopped = true
  self.runner:close()
end

function Batcher:stats()
  local st = self.runner:stats()
  st.size, st.buffered = self.size, self.n
  local open = 0
  for _ in pairs(self.open) do open = open + 1 end
  st.batches = open
  return st
end

-- A durable batch's earlier run left events unfinished: they are fed
-- again, from the oldest up to the consumer's position, before new ones.
function Batcher:recover(test, collect)
  local bus = self.bus
  local v = bus:_state_get("batch", self.row)
  local from = type(v) == "table" and v.from
  if type(from) ~= "number" then return end
  local acked = bus:_position(self.row)
  if not acked or acked < from then return end
  self.is_recovering = true
  local ok, err = pcall(bus.replay, bus, {
    types = self.pattern, from = from, to = acked,
    handler = function(ev)
      if test == nil or test(ev) then collect(ev) end
    end })
  self.is_recovering = false
  if #self.closed > 0 then             -- the partial one waits as usual
    bus:_after(0, Batcher.hand_over, self)
  end
  if not ok then
    local text = errors.wrap("ESTORE", ("batch %s could not take up its "
                                        .. "unfinished events")
                                       :format(self.row), err)
    bus:_report_error(("%s; they are in the log from #%d to #%d "
                       .. "(bus:replay{ from = %d, to = %d, handler = ... } "
                       .. "feeds them)"):format(text, from, acked, from, acked))
  end
end


-- ------------------------------------------------------------ the API

--- bus:batch(pattern, opts) returns a function that takes the handler
--- and returns the subscription (or nil, err, code).
--- With route, the route's stages (where, map...) run before the batch,
--- which collects the events they pass on. The decorator's level, when
--- given, is where its misuse is raised (default 2, its caller).
---@param bus table
---@param pattern string
---@param opts table|nil size, interval, max_bytes, adaptive, and
--- subscribe's failure options
---@param level integer|nil
---@param route table|nil
---@return function decorator(fn) -> subscription | nil, err, code
-- @local
function M.decorator(bus, pattern, opts, level, route)
  -- (util and failure count levels from their caller, this file from
  -- itself: the same level reaches the same frame)
  util.check_subject_value(pattern, "pattern", "metrics.>", true, level)
  local spec, policy, sub_opts = split(opts, pattern, level + 1)
  return function(fn, lvl)
    lvl = lvl or 2
    if type(fn) ~= "function" then
      fail(lvl, "bad handler: expected a function(events), got %s",
           quote(fn))
    end
    if bus._mw.freeze then        -- buzz.new{ freeze = true }
      fn = middleware.frozen(bus, fn, opts and opts.name or pattern)
    end
    local self = setmetatable({
      bus = bus, fn = fn, pattern = pattern, size = spec.size,
      interval = spec.interval, max_bytes = spec.max_bytes,
      adaptive = spec.adaptive, buf = {}, n = 0, bytes = 0, timer = nil,
      open = {},              -- batch -> its first event id
      closed = {},            -- batches not handed over yet, in order
      row = nil, marked = nil, is_recovering = false, is_stopped = false,
    }, Batcher)
    local sup = bus._sup
    local r = sup:runner({ pattern = pattern }, function(b)
      return self:run(b)
    end, policy, lvl)
    r.on_release = function(job) self:released(job) end
    self.runner = r
    local collect = function(ev)
      if not self.is_stopped then self:add(ev) end
    end
    if route then collect = route:compose(collect) end
    local sub, err, code = bus:_subscribe(pattern, collect, sub_opts, lvl)
    if not sub then
      r:close()
      return nil, err, code
    end
    r.sub, sub._engine = sub, self
    if sub_opts.durable and bus._store and not bus._readonly then
      self.row = sub_opts.durable
      self:recover(sub._test, collect)
    end
    return sub
  end
end

return M
