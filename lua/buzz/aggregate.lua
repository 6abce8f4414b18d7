--- Windowed aggregation: a route's events, grouped and reduced per window.
--
--   bus:route("metrics.cpu")
--     :window{ tumbling = 60 }            -- or sliding = 60, every = 10;
--                                         -- session = 30; count = 100
--     :group_by("payload.host")           -- or a function(ev)
--     :reduce(buzz.agg.avg("payload.pct"))  -- or { name = reducer, ... }
--     :publish("metrics.cpu.avg")         -- or :handle(function(r) end)
--
-- Each window and group gives one result: { group, window_start,
-- window_end (epoch ms, as ev.ts), count, value } (value is a table of
-- values for a table of reducers). Time is the event's (ev.ts) unless
-- the window says time = "processing" (the bus's clock at delivery).
--
-- Windows close on the bus's timers: a time window at its end plus
-- allowed_lateness (seconds), a session gap seconds (plus lateness) after
-- its group's last event; count windows when full. An event for a window
-- that has closed is late: it goes to the window's late = function(ev), or
-- is published on $SYS.late. Results of one window come in the order its
-- groups were first seen. State is kept only for open windows: a window's
-- groups are dropped when it closes. A count window's partial groups stay
-- until they fill. Open windows are memory only: a restart loses them.
-- @module buzz.aggregate
local type, error, pairs, ipairs, setmetatable, getmetatable, pcall =
      type, error, pairs, ipairs, setmetatable, getmetatable, pcall
local floor = math.floor

local M = {}

local util = require "buzz.util"
local errors = require "buzz.errors"
local core = require "buzz.core"
local quote = util.quote

local fail = util.fail
local reducers = require "buzz.reducers"
local getter, as_reducer = reducers.getter, reducers.as_reducer

M.agg = reducers.agg

-- ------------------------------------------------------------ windows

local KINDS = { "count", "session", "sliding", "tumbling" }
local WINDOW_OPTIONS = { tumbling = true, sliding = true, every = true,
                         session = true, count = true,
                         allowed_lateness = true, time = true, late = true,
                         idle = true, checkpoint = true }

-- (util counts levels from its caller, this file from itself: the same
-- level reaches the same frame)
local function seconds_ms(v, what, level)
  return floor(util.positive(v, "window " .. what, false, level) * 1000
               + 0.5)
end

-- Checks a window spec; returns it with times in ms.
local function window_spec(spec, level)
  if type(spec) ~= "table" then
    fail(level, "bad window: expected a table such as { tumbling = 60 }, "
         .. "got %s", quote(spec))
  end
  for k in pairs(spec) do
    if not WINDOW_OPTIONS[k] then
      fail(level, "unknown window option %s (known: allowed_lateness, "
           .. "checkpoint, count, every, idle, late, session, sliding, "
           .. "time, tumbling)", quote(k))
    end
  end
  local kind
  for _, k in ipairs(KINDS) do
    if spec[k] ~= nil then
      if kind then
        fail(level, "a window is one kind: give one of tumbling, sliding, "
             .. "session or count, not both %s and %s", kind, k)
      end
      kind = k
    end
  end
  if not kind then
    fail(level, "bad window: give its kind, as in { tumbling = 60 }, "
         .. "{ sliding = 60, every = 10 }, { session = 30 } or "
         .. "{ count = 100 }")
  end
  local w = { kind = kind, late = spec.late,
              is_processing = spec.time == "processing" }
  if spec.time ~= nil and spec.time ~= "event"
     and spec.time ~= "processing" then
    fail(level, "bad window time %s: expected \"event\" (ev.ts, the "
         .. "default) or \"processing\"", quote(spec.time))
  end
  if spec.late ~= nil and type(spec.late) ~= "function" then
    fail(level, "bad window late: expected a function(ev), got %s",
         quote(spec.late))
  end
  w.lateness = 0
  if spec.allowed_lateness ~= nil then
    if type(spec.allowed_lateness) ~= "number"
       or spec.allowed_lateness ~= spec.allowed_lateness
       or spec.allowed_lateness < 0
       or spec.allowed_lateness > util.MAX_SECONDS then
      fail(level, "bad window allowed_lateness: expected seconds >= 0, got "
           .. "%s%s", quote(spec.allowed_lateness),
           type(spec.allowed_lateness) == "number"
           and spec.allowed_lateness > util.MAX_SECONDS
           and (" (allowed: up to %g)"):format(util.MAX_SECONDS) or "")
    end
    w.lateness = floor(spec.allowed_lateness * 1000 + 0.5)
  end
  w.checkpoint = seconds_ms(spec.checkpoint or 1, "checkpoint", level + 1)
  if kind == "count" then
    w.size = util.positive(spec.count, "window count", true, level)
    if spec.every ~= nil then
      fail(level, "every goes with sliding windows, not count")
    end
    if spec.idle ~= nil then
      w.idle = seconds_ms(spec.idle, "idle", level + 1)
    end
  elseif spec.idle ~= nil then
    fail(level, "idle goes with count windows: a %s window closes by "
         .. "time", kind)
  else
    w.size = seconds_ms(spec[kind], kind, level + 1)
    if kind == "sliding" then
      w.every = seconds_ms(spec.every, "every", level + 1)
      if w.every > w.size then
        fail(level, "bad window: every (%g s) is longer than the window "
             .. "(%g s)", spec.every, spec.sliding)
      end
    elseif spec.every ~= nil then
      fail(level, "every goes with sliding windows, not %s", kind)
    end
  end
  return w
end

-- ------------------------------------------------------------ the engine

-- The state of one aggregation on a bus: open windows by start, each with
-- its groups in first-seen order.
local Engine = {}
Engine.__index = Engine

local function new_engine(bus, w, group_of, red, emit)
  return setmetatable({
    bus = bus, w = w, group_of = group_of, red = red, emit = emit,
    windows = {},        -- start -> { start, stop, groups = {}, order = {} }
    sessions = {},       -- group -> { start, stop, state, count, timer }
    counts = {},         -- group -> { state, count, start, timer }
    is_active = true, sub = nil,
    -- checkpoints (a durable aggregation on a store): its row's name, the
    -- id of the last event taken, whether anything changed since the
    -- last checkpoint, and the watermark while the log is replayed
    row = nil, last_id = nil, is_dirty = false, replay_now = nil,
  }, Engine)
end

function Engine:now()
  return self.replay_now or self.bus:_now()
end

function Engine:result(group, start, stop, state, count)
  return { group = group, window_start = start, window_end = stop,
           count = count, value = self.red.finish(state) }
end

function Engine:late(ev)
  local fn = self.w.late
  if fn then
    local ok, err = pcall(fn, ev)
    if not ok then
      self.bus:_report_error((errors.wrap("ECALLBACK", "late(ev) raised",
                                          err)), ev)
    end
    return
  end
  self.bus:_announce("$SYS.late", {      -- a refusal is reported
    type = ev.type, id = ev.id, ts = ev.ts,
    pattern = self.sub and self.sub.pattern })
end

-- The window starting at start, opened now if need be.
function Engine:window(start, stop)
  local win = self.windows[start]
  if win == nil then
    win = { start = start, stop = stop, groups = {}, order = {} }
    self.windows[start] = win
    self.bus:_at(stop + self.w.lateness, Engine.close_window, self,
                 start)
  end
  return win
end

-- Adds ev to the window starting at start (open, or opened now).
function Engine:add_to(start, stop, group, ev)
  local win = self:window(start, stop)
  local g = win.groups[group]
  if g == nil then
    g = { state = self.red.init(), count = 0 }
    win.groups[group] = g
    win.order[#win.order + 1] = group
  end
  g.state = self.red.step(g.state, ev)
  g.count = g.count + 1
end

function Engine.close_window(self, start)
  local win = self.windows[start]
  if win == nil then return end
  self.windows[start] = nil
  if not self.is_active then return end
  for _, group in ipairs(win.order) do
    local g = win.groups[group]
    self.emit(self:result(group, win.start, win.stop, g.state, g.count), self)
  end
  self:changed(true)
end

-- The open group of a session (in sessions) or count window (in counts)
-- closes: its result goes out.
local function close_group(self, open, group, stop_field)
  local x = open[group]
  if x == nil then return end
  open[group] = nil
  if self.is_active then
    self.emit(self:result(group, x.start, x[stop_field], x.state, x.count),
              self)
    self:changed(true)
  end
end

function Engine.close_session(self, group)
  close_group(self, self.sessions, group, "stop")
end

-- A count window's group that has been idle too long goes as it is.
function Engine.close_count(self, group)
  close_group(self, self.counts, group, "last")
end

function Engine:arm_session(group, s)
  local w = self.w
  if s.timer then s.timer:cancel() end
  local due = s.stop + w.lateness
  if w.is_processing then due = self:now() + w.size + w.lateness end
  s.timer = self.bus:_at(due, Engine.close_session, self, group)
end

function Engine:arm_count(group, c)
  if not self.w.idle then return end
  if c.timer then c.timer:cancel() end
  c.timer = self.bus:_at(self:now() + self.w.idle,
                         Engine.close_count, self, group)
end

--- Takes one event of the route.
-- @local
function Engine:add(ev)
  local id = ev.id
  if self.row and id then
    local last = self.last_id
    if last and id <= last then return end  -- in the checkpoint already
    self.last_id, self.is_dirty = id, true
  end
  local w = self.w
  local group = self.group_of(ev)
  if group == nil then group = false end  -- one group for "no value"
  local ts = w.is_processing and self:now() or ev.ts or self:now()
  if w.kind == "count" then
    local c = self.counts[group]
    if c == nil then
      c = { state = self.red.init(), count = 0, start = ts }
      self.counts[group] = c
    end
    c.state, c.count, c.last = self.red.step(c.state, ev), c.count + 1, ts
    if c.count >= w.size then
      self.counts[group] = nil
      if c.timer then c.timer:cancel() end
      self.emit(self:result(group, c.start, ts, c.state, c.count), self)
      self:changed(true)
    else
      self:arm_count(group, c)
    end
  elseif w.kind == "session" then
    local s = self.sessions[group]
    if s == nil then
      if ts + w.size + w.lateness <= self:now() then
        return self:late(ev)           -- its session has closed
      end
      s = { start = ts, stop = ts + w.size, state = self.red.init(),
            count = 0 }
      self.sessions[group] = s
    elseif ts + w.size > s.stop then
      s.stop = ts + w.size
    end
    if ts < s.start then s.start = ts end
    s.state, s.count = self.red.step(s.state, ev), s.count + 1
    self:arm_session(group, s)
  elseif w.kind == "tumbling" then        -- one window holds ts
    local size = w.size
    local start = floor(ts / size) * size
    local win = self.windows[start]      -- open until its timer closes it
    if win == nil then                   -- new, or closed: the clock says
      if start + size + w.lateness <= self:now() then return self:late(ev) end
      win = self:window(start, start + size)
    end
    local g = win.groups[group]          -- open windows only are kept
    if g == nil then
      g = { state = self.red.init(), count = 0 }
      win.groups[group] = g
      win.order[#win.order + 1] = group
    end
    g.state, g.count = self.red.step(g.state, ev), g.count + 1
  else
    local size = w.size
    local step = w.every
    -- The windows holding ts start at the multiples of step in
    -- (ts - size, ts]; one that is not open and whose end plus lateness
    -- the clock has passed has closed (or would have, had it had events).
    local now = self:now()
    local start = floor((ts - size) / step) * step + step
    local added = false
    while start <= ts do
      if self.windows[start] or start + size + w.lateness > now then
        self:add_to(start, start + size, group, ev)
        added = true
      end
      start = start + step
    end
    if not added then self:late(ev) end
  end
end

--- Drops every open window: the subscription ended.
-- @local
function Engine:stop()
  self.is_active = false
  for _, s in pairs(self.sessions) do
    if s.timer then s.timer:cancel() end
  end
  for _, c in pairs(self.counts) do
    if c.timer then c.timer:cancel() end
  end
  if self.tick then self.tick:cancel() end
  self.windows, self.sessions, self.counts = {}, {}, {}
end

-- ------------------------------------------------------------ checkpoints

-- A durable aggregation on a store keeps its open windows as a state row
-- (kind "window", named as the consumer): every w.checkpoint seconds if
-- events came, and whenever a window closes. The row holds the id of the
-- last event taken; after a restart the engine loads it, replays the log
-- from there up to the consumer's position, and skips events it holds
-- already, so nothing is lost or counted twice. Lateness during the
-- replay is judged by the events' own times, as it was when they came.
-- Results a crash emitted again are published with a dedup key (the
-- aggregation, group and window), which the store drops within its
-- dedup_window.

-- Something changed; with now, the checkpoint is written at once.
function Engine:changed(now)
  if not self.row then return end
  self.is_dirty = true
  if now and not self.replay_now then self:checkpoint() end
end

local function saved_groups(red, win)
  local out = {}
  for i, group in ipairs(win.order) do
    local g = win.groups[group]
    out[i] = { g = group, s = red.save(g.state), c = g.count }
  end
  return out
end

function Engine:snapshot()
  local red = self.red
  local windows, sessions, counts = {}, {}, {}
  for _, win in pairs(self.windows) do
    windows[#windows + 1] = { start = win.start, stop = win.stop,
                              groups = saved_groups(red, win) }
  end
  table.sort(windows, function(a, b) return a.start < b.start end)
  for open, out in pairs { [self.sessions] = sessions,
                           [self.counts] = counts } do
    for group, x in pairs(open) do     -- a session's stop, a count's last
      out[#out + 1] = { g = group, start = x.start, stop = x.stop,
                        last = x.last, s = red.save(x.state), c = x.count }
    end
  end
  return { last = self.last_id, now = self:now(), windows = windows,
           sessions = sessions, counts = counts }
end

function Engine:checkpoint()
  if not (self.is_dirty and self.is_active and self.bus._core) then
    return
  end
  self.is_dirty = false
  local ok, snap = pcall(self.snapshot, self)
  if not ok then
    return self.bus:_report_error(errors.text("ECALLBACK", (
      "aggregation %s could not save its open windows (a reducer's save "
      .. "raised: %s); the last checkpoint stands")
      :format(self.row, tostring(snap))))
  end
  self.bus:_state_put("window", self.row, snap)  -- reports a refusal
end

function Engine.tick_checkpoint(self)
  self.tick = nil
  if not self.is_active then return end
  self:checkpoint()
  self.tick = self.bus:_after(self.w.checkpoint,
                              Engine.tick_checkpoint, self):unref()
end

-- Puts back what a checkpoint row holds.
function Engine:restore(snap)
  local red = self.red
  self.last_id = type(snap.last) == "number" and snap.last or nil
  for _, x in ipairs(snap.windows or {}) do
    local win = self:window(x.start, x.stop)
    for _, g in ipairs(x.groups) do
      win.groups[g.g] = { state = red.load(g.s), count = g.c }
      win.order[#win.order + 1] = g.g
    end
  end
  -- sessions and count groups: one open group each, with its timer
  for field, arm in pairs { sessions = Engine.arm_session,
                            counts = Engine.arm_count } do
    for _, x in ipairs(snap[field] or {}) do
      local open = { start = x.start, stop = x.stop, last = x.last,
                     state = red.load(x.s), count = x.c }
      self[field][x.g] = open
      arm(self, x.g, open)
    end
  end
end

--- A durable aggregation starts: its checkpoint (if any) comes back, the
--- log is replayed from it through feed (the route's stages, then add),
--- and checkpoints begin.
-- @local
function Engine:resume(name, feed)
  local bus = self.bus
  self.row = name
  local snap = bus:_state_get("window", name)
  local acked = bus:_position(name)
  if type(snap) == "table" then
    self.replay_now = snap.now
    self:restore(snap)
    local from = (self.last_id or 0) + 1
    if acked and acked >= from then
      local ok, err = pcall(bus.replay, bus, {
        types = self.sub.pattern, from = from, to = acked,
        handler = function(ev)
          if ev.ts and ev.ts > self.replay_now then
            self.replay_now = ev.ts
          end
          feed(ev)
        end })
      if not ok then
        bus:_report_error((errors.wrap("ESTORE", ("aggregation %s could not "
                                                  .. "replay the log from #%d")
                                                 :format(name, from), err))
                          .. "; its windows hold what the checkpoint kept, and "
                          .. "events from there on are not counted")
      end
    end
    self.replay_now = nil
  elseif acked then
    self.last_id = acked        -- a crash before the first checkpoint
  end                           -- replays from here
  self.is_dirty = true
  self:checkpoint()
  -- housekeeping: it re-arms for as long as the aggregation lives, and
  -- must not keep bus:run() going (timers.lua)
  self.tick = bus:_after(self.w.checkpoint, Engine.tick_checkpoint,
                         self):unref()
end


-- ------------------------------------------------------------ builder

local Agg = { __name = "buzz.aggregation" }
Agg.__index = Agg
Agg.__tostring = function() return "buzz.aggregation" end

local function check_self(self, method)
  if getmetatable(self) ~= Agg then
    error(("use agg:%s(...), not agg.%s(...)"):format(method, method), 3)
  end
end

local function with(self, k, v)
  local t = {}
  for key, x in pairs(self) do t[key] = x end
  t[k] = v
  return setmetatable(t, Agg)
end

--- A new aggregation over route's events (route:window calls this).
-- @local
function M.new(route, spec, level)
  return setmetatable({ route = route, w = window_spec(spec, level + 1) },
                      Agg)
end

--- Groups by the value at path (or fn(ev)); results carry it as group.
---@param path string|function "payload.host" or fn(ev) -> group
---@return table aggregation
function Agg:group_by(path)
  check_self(self, "group_by")
  return with(self, "group_of", getter(path, "group_by", 3))
end

--- What each window computes: a reducer or a table of named reducers.
---@param r table a reducer (buzz.agg.count()...) or { name = r, ... }
---@return table aggregation
function Agg:reduce(r)
  check_self(self, "reduce")
  return with(self, "red", as_reducer(r, 3))
end

local function start(self, emit, opts, level)
  if not self.red then
    fail(level, "an aggregation needs :reduce(...) before it publishes or "
         .. "handles, as in :reduce(buzz.agg.count())")
  end
  local route = self.route
  local engine = new_engine(route.bus, self.w,
                            self.group_of or function() return false end,
                            self.red, emit)
  local bus = route.bus
  local feed = route:compose(function(ev) engine:add(ev) end)
  if opts and opts.durable ~= nil and opts.retry == nil then
    -- The feed is the engine's, not a handler, and a durable aggregation
    -- keeps its own checkpoint: no dead letter by default (retry =
    -- false), unless a retry policy is asked for.
    local o = { retry = false }
    for k, v in pairs(opts) do o[k] = v end
    opts = o
  end
  local sub, err, code = bus:_subscribe(route.pattern, feed, opts, level)
  if not sub then return nil, err, code end
  engine.sub = sub
  sub._engine = engine
  if sub.durable and bus._store and not bus._readonly then
    local test = sub._test
    engine:resume(sub.durable, function(ev)
      if test == nil or test(ev) then feed(ev) end
    end)
  end
  return sub
end

--- Publishes each result as an event of type etype (payload: the result)
--- and returns the subscription that feeds the windows.
---@param etype string the results' event type
---@param opts table|nil subscribe's options (name, durable, ...)
---@return table|nil subscription, string|nil err, string|nil code
function Agg:publish(etype, opts)
  check_self(self, "publish")
  local bus = self.route.bus
  util.check_type_arg(etype, "metrics.cpu.avg", 2)
  local sub, err, code = start(self, function(result, engine)
    if bus._core then
      local dedup = engine.row and ("%s/%s/%d"):format(
        engine.row, core.json_encode(result.group), result.window_start)
      local id, perr = bus:publish(etype, result, dedup and { dedup = dedup })
      if not id then bus:_report_error(perr) end
    end
  end, opts, 3)
  return sub, err, code
end

--- Calls fn(result) for each result (a raise goes to on_error) and
--- returns the subscription that feeds the windows.
---@param fn function fn(result)
---@param opts table|nil subscribe's options (name, durable, ...)
---@return table|nil subscription, string|nil err, string|nil code
function Agg:handle(fn, opts)
  check_self(self, "handle")
  if type(fn) ~= "function" then
    fail(2, "bad handler: expected a function(result), got %s", quote(fn))
  end
  local bus = self.route.bus
  local sub, err, code = start(self, function(result)
    local ok, e = pcall(fn, result)
    if not ok then
      bus:_report_error((errors.wrap("ECALLBACK", "handle(result) raised", e)))
    end
  end, opts, 3)
  return sub, err, code
end

return M
