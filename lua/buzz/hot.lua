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
local task = require "buzz.task"

local type, pcall, setmetatable = type, pcall, setmetatable
local close = coroutine.close          -- nil before Lua 5.4
local traceback = core.traceback

local M = {}

-- Memoized audiences: at most MEMO_MAX types per memo; a full memo is
-- started afresh (a miss costs one core:audience, the lookup the core's
-- own path makes for every event).
local MEMO_MAX = 4096

--- The hot path's state for one bus: its core (c), core.sync and
--- core.publish (the methods, looked up once), its task state (task.lua:
--- the pool of idle threads), its manual clock (or false), memo (type ->
--- audience, false for none), nmemo, and the states of the threads it
--- ran an audience in (thread -> st; weak).
---@param bus table
---@return table
function M.new(bus)
  local c = bus._core
  return { bus = bus, c = c, sync = c.sync, publish = c.publish,
           task = bus._task, manual = bus._manual, memo = {}, nmemo = 0,
           states = setmetatable({}, { __mode = "k" }) }
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

-- Runs the live handlers of ev's audience aud from st.i on, in a thread
-- of the bus's pool that core:sync (or core:resume) started: st is the
-- thread's state, st.i the index of the subscription whose handler runs.
-- A handler that yields leaves the thread to the supervisor, which
-- resumes it until the handler returns: st.adopted then ends the run
-- instead of going on with the others. Tracebacks of the thread stop
-- here, so they show the handler's frames only.
local function run_audience(ev, aud, st)
  for i = st.i, #aud do
    local sub = aud[i]
    if sub.is_active then
      st.i = i
      if sub._once then end_once(st.bus, sub) end
      sub._fn(ev)
      if st.adopted then return end
    end
  end
end
M.run_audience = run_audience

--- The state of thread co for run_audience, made on its first use.
function M.state(h, co)
  local st = { i = 1, adopted = false, bus = h.bus }
  h.states[co] = st
  return st
end
local state = M.state

-- The run in co stopped short of its event's end: the handler of
-- aud[st.i] yielded (ok) or raised. Hands the thread to the supervisor or
-- reports the error, then runs the rest of the audience in other threads.
local function settle(h, co, ev, aud, ok, what, arg)
  local bus, states, t = h.bus, h.states, h.task
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
                    run_audience))
        if close then close(co) end
      end
    else                               -- it raised: report, go on
      bus._report(what, ev, sub, traceback(co, type(what) == "string"
                  and what or "(error object is not a string)", 0,
                  run_audience))
      if close then close(co) end
    end
    local c = bus._core
    if not c or i >= #aud then return end  -- done, or the bus was closed
    co = task.idle(t)
    st = states[co] or state(h, co)
    st.i = i + 1
    local done
    ok, done, what, arg = task.resume(t, c, co, ev, run_audience, ev, aud,
                                      st)
    if ok and done then return task.give(t, co) end
    if not ok then what = done end
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
  local t, m = h.task, h.manual
  local co = task.idle(t)
  local st = h.states[co] or state(h, co)
  st.i = 1
  local d = t.depth
  t.depth = d + 1                      -- a handler runs (task.lua)
  local id, ok, done, what, arg = h.sync(h.c, co, ev, aud, m and m.ms,
                                         run_audience, st)
  t.depth = d
  if done == true and ok then          -- (EDEPTH: nil, message, code)
    task.give(t, co)
    return id
  end
  return M.finish(h, co, ev, aud, id, ok, done, what, arg)
end

--- The end of a hot publish_sync whose run in co (an idle thread of the
--- pool) did not return: EDEPTH (id nil), or a handler that yielded or
--- raised. Returns what publish_sync returns.
function M.finish(h, co, ev, aud, id, ok, done, what, arg)
  if not id then                       -- EDEPTH: nothing was published
    task.give(h.task, co)
    return nil, ok, done
  end
  if ok then
    settle(h, co, ev, aud, true, what, arg)
  else
    settle(h, co, ev, aud, false, done)
  end
  return id
end

return M
