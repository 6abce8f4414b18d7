--- The hot path of a memory bus: publish_sync in one call into the core.
--
-- The core decides, Lua memoizes: the core keeps the trie and the
-- authoritative subscriptions and answers core:audience(type) with the
-- live subscriptions a publish_sync would reach, in subscription order.
-- This module keeps those arrays per type until the subscriptions change
-- (every subscribe and unsubscribe made through the bus starts a new
-- memo), builds the event table with one constructor, and runs the
-- handlers in a pooled thread of its own: one resume per event however
-- many handlers it has. One call, core:sync, hands out the id, stamps the
-- time, sets what the event inherits from the current one (correlation
-- and causation), and resumes the thread while the event is current and
-- counts as a publish_sync level (EDEPTH), so that events published
-- through either path agree on ids, inheritance and depth.
--
-- What the C dispatcher guarantees holds here too: an audience array is
-- never changed once made (the audience is fixed at publish), a
-- subscription is tested for is_active right before its handler runs (an
-- unsubscribe takes effect at once, even mid-delivery), a once
-- subscription ends as it is handed its event, a handler that raises goes
-- to the reporter and the others still run, and one that yields
-- (buzz.sleep, a host's I/O) is handed to the supervisor
-- (Supervisor:adopt), which owns its thread from then on. Prefilters are
-- not consulted: they only ever reject what the subscription's own
-- where{} test rejects too.
--
-- Why a thread per event and not a plain call: a handler may yield (to
-- sleep, to await I/O), and only a thread can be handed over when it
-- does; a plain call from the caller's thread could not be resumed. That
-- resume, and the event table the API hands every handler, are most of
-- what this path costs (bench/instructions.sh, "dispatch").
--
-- Not here: stores (ids come from a durable reservation and events are
-- appended first), dedup keys, delays, middleware (it stamps headers);
-- lua/buzz/init.lua sends those through core:publish_sync.
-- @module buzz.hot
local core = require "buzz.core"
local task_resume = require("buzz.task").resume

local rawget, type, pcall, setmetatable = rawget, type, pcall, setmetatable
local co_lib = coroutine
-- The raw coroutine functions, as lua/buzz/failure.lua takes them: inside
-- OpenResty coroutine.* serve the threads nginx schedules.
local create = rawget(co_lib, "_create") or co_lib.create
local resume = rawget(co_lib, "_resume") or co_lib.resume
local yield = rawget(co_lib, "_yield") or co_lib.yield
local close = co_lib.close             -- nil before Lua 5.4
local traceback = core.traceback

local M = {}

-- Memoized audiences: at most MEMO_MAX types per memo; a full memo is
-- started afresh (a miss costs one core:audience, the lookup the core's
-- own path makes for every event).
local MEMO_MAX = 4096

-- What a worker yields when it waits for work.
local DONE = setmetatable({}, { __tostring = function() return "done" end })

--- The hot path's state for one bus: its core (c), core.sync and
--- core.publish (the methods, looked up once), its manual clock (or
--- false), memo (type -> audience, false for none), nmemo, the pool of
--- idle worker threads (pool[1..npool]) and their states (thread -> st).
---@param bus table
---@return table
function M.new(bus)
  local c = bus._core
  return { bus = bus, c = c, sync = c.sync, publish = c.publish,
           task = bus._task,
           manual = bus._manual,
           memo = {}, nmemo = 0, pool = {}, states = {}, npool = 0 }
end

--- Subscriptions changed: forget every memoized audience.
function M.invalidate(h)
  h.memo, h.nmemo = {}, 0
end

--- The audience of etype from the core, memoized: an array of one
--- subscription or more, or false when nobody listens or the core
--- refuses the type (the caller's slow path then publishes, or says
--- what is wrong, as publish_sync always has).
---@return table|false
function M.audience(h, etype)
  if type(etype) ~= "string" then return false end
  local aud = h.c:audience(etype, false)
  if not aud then return false end    -- a type publish refuses: not kept
  if #aud == 0 then aud = false end
  local n = h.nmemo
  if n >= MEMO_MAX then
    h.memo, n = {}, 0
  end
  h.memo[etype], h.nmemo = aud, n + 1
  return aud
end

-- Ends a once subscription as it is handed its event (the core's
-- dispatcher does the same in buzz__bus_next and once_ended).
local function end_once(bus, sub)
  sub.is_active = false
  local c, id = bus._core, sub._id
  if c and id then c:unsubscribe(id, sub) end
end

-- A worker thread and its state: st.i is the index of the subscription
-- whose handler runs; a traceback of the thread stops at st.body, so it
-- shows the handler's frames only, as the core's own threads do. It
-- waits in a yield (the core resumes only suspended threads) for an
-- event and its audience, runs every live handler of it, and waits
-- again. A handler that yields leaves the
-- thread to the supervisor, which resumes it until the handler returns:
-- st.adopted then ends the thread instead of going on with the others.
local function new_worker(h, first)
  local bus = h.bus
  local st = { i = first, adopted = false, body = false }
  local function body()
    local ev, aud = yield(DONE)
    while true do
      for i = st.i, #aud do
        local sub = aud[i]
        if sub.is_active then
          st.i = i
          if sub._once then end_once(bus, sub) end
          sub._fn(ev)
          if st.adopted then return end
        end
      end
      st.i = 1
      ev, aud = yield(DONE)
    end
  end
  st.body = body                       -- where its tracebacks stop
  local co = create(body)
  resume(co)                           -- to its first yield
  h.states[co] = st
  return co
end

-- Gives a worker that finished its event back to the pool (idle
-- workers: pool[1..npool]). The pool never holds more workers than
-- publish_sync levels were ever nested at once (at most 100, EDEPTH).
local function give(h, co)
  local k = h.npool + 1
  h.pool[k], h.npool = co, k
end

-- Takes an idle worker, or makes one.
local function take(h)
  local k = h.npool
  if k == 0 then return new_worker(h, 1) end
  h.npool = k - 1
  return h.pool[k]
end

-- The worker co stopped short of its event's end: the handler of aud[st.i]
-- yielded (ok) or raised. Hands the thread to the supervisor or reports
-- the error, then runs the rest of the audience in other workers.
local function settle(h, co, ev, aud, ok, what, arg)
  local bus, states = h.bus, h.states
  while true do
    local st = states[co]
    states[co] = nil                   -- it is not the pool's any more
    local i = st.i
    local sub = aud[i]
    if ok then                         -- it yielded: the supervisor's now
      st.adopted = true
      local fine, err = pcall(bus._sup.adopt, bus._sup, co, sub, ev, what,
                              arg)
      if not fine then
        bus._report(err, ev, sub, traceback(co, type(err) == "string"
                    and err or "(error object is not a string)", 0,
                    st.body))
        if close then close(co) end
      end
    else                               -- it raised: report, go on
      bus._report(what, ev, sub, traceback(co, type(what) == "string"
                  and what or "(error object is not a string)", 0, st.body))
      if close then close(co) end
    end
    local c = bus._core
    if not c or i >= #aud then return end  -- done, or the bus was closed
    co = new_worker(h, i + 1)
    ok, what, arg = task_resume(h.task, c, co, ev, ev, aud)
    if ok and what == DONE then return give(h, co) end
  end
end

--- publish_sync on the hot path, for an audience aud from the memo:
--- returns the id, or nil, err, code (EDEPTH). prio is the priority's
--- name, or nil when no options were given. lua/buzz/init.lua inlines
--- the case without options (Bus:publish_sync), which M.finish ends.
function M.publish_sync(h, aud, etype, payload, prio, key, corr, headers,
                        version)
  -- One constructor (one NEWTABLE); core:sync sets id and ts, and
  -- correlation_id and causation_id when ev inherits them (6 or 7 fields
  -- take 8 slots, so that mostly fits without a rehash).
  -- A field set to nil in a constructor costs a slow store, so the
  -- options name only the fields they have.
  local ev = { id = 0, type = etype, payload = payload, ts = 0,
               priority = prio or "normal", attempt = 1, key = key }
  if corr ~= nil then ev.correlation_id = corr end
  if headers ~= nil then ev.headers = headers end
  if version ~= nil then ev.version = version end
  local co, m, t = take(h), h.manual, h.task
  local d = t.depth
  t.depth = d + 1                      -- a handler runs (task.lua)
  local id, ok, what, arg = h.sync(h.c, co, ev, aud, m and m.ms)
  t.depth = d
  if what == DONE then
    give(h, co)
    return id
  end
  return M.finish(h, co, ev, aud, id, ok, what, arg)
end

--- The end of a hot publish_sync whose worker co (taken from the pool)
--- did not come back DONE: EDEPTH (id nil), or a handler that yielded
--- or raised. Returns what publish_sync returns.
function M.finish(h, co, ev, aud, id, ok, what, arg)
  if not id then                       -- EDEPTH: nothing was published
    give(h, co)
    return nil, ok, what
  end
  settle(h, co, ev, aud, ok, what, arg)
  return id
end

M.take = take
M.DONE = DONE
return M
