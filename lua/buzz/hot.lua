--- The hot path of a memory bus: publish_sync without a trip through the
-- core's dispatch.
--
-- The core decides, Lua memoizes: the core keeps the trie and the
-- authoritative subscriptions and answers core:audience(type) with the
-- live subscriptions a publish_sync would reach, in subscription order.
-- This module keeps those arrays per type until the subscriptions change
-- (every subscribe and unsubscribe made through the bus starts a new
-- memo), builds the event table with one constructor, makes it the
-- current event (what publishes inside inherit from: task.lua's holder)
-- and runs the handlers in a worker: a thread of its own that loops, one
-- resume per event however many handlers it has, and yields DONE when the
-- event's handlers are through. The core is asked for the id and the
-- time only (core:sync_id), and counts the publish_sync levels open here
-- (U[dslot], kept here) with its own, so that events published through
-- either path agree on ids, inheritance and depth (EDEPTH).
--
-- The run itself (id, event table, worker, resume) is inlined in
-- Bus:publish_sync (lua/buzz/publish.lua), the hottest call of all; this
-- module holds what it calls: the memo, the workers, inherit and settle.
--
-- What the C dispatcher guarantees holds here too: an audience array is
-- never changed once made (the audience is fixed at publish), a
-- subscription is tested for is_active right before its handler runs (an
-- unsubscribe takes effect at once, even mid-delivery), a once
-- subscription ends as it is handed its event, a handler that raises goes
-- to the reporter and the others still run, and one that yields
-- (buzz.sleep, a host's I/O) is handed to the supervisor
-- (Supervisor:adopt), which owns its thread from then on: the worker then
-- ends when that handler returns, as any thread the supervisor resumes.
-- Prefilters are not consulted: they only ever reject what the
-- subscription's own where{} test rejects too.
--
-- Why a thread per event and not a plain call: a handler may yield (to
-- sleep, to await I/O), and only a thread can be handed over when it
-- does; a plain call from the caller's thread could not be resumed. That
-- resume, and the event table the API hands every handler, are most of
-- what this path costs (bench/instructions.sh, "dispatch").
--
-- Not here: stores (ids come from a durable reservation and events are
-- appended first), dedup keys, delays, middleware (it stamps headers);
-- lua/buzz/publish.lua sends those through core:publish_sync.
-- @module buzz.hot
local core = require "buzz.core"
local task = require "buzz.task"
local metrics = require "buzz.metrics"

local type, pcall, setmetatable, rawget = type, pcall, setmetatable, rawget
-- The raw coroutine functions (task.lua's: OpenResty's are for nginx).
local create, yield = task.create, task.co_yield
local close = coroutine.close          -- nil before Lua 5.4
local traceback = core.traceback
local SAMPLE, hist_age, hist_since = metrics.SAMPLE, metrics.hist_age,
                                     metrics.hist_since

local M = {}

-- On LuaJIT, core:sync_id through the FFI: a trace calls a C function
-- there, where a call through the Lua C API leaves the trace. The
-- function is the core's own (core:ffi_sync_id gives its address), and
-- answers 0 wherever core:sync_id would refuse: that then says why.
local ffi_ok, ffi = false, nil
if rawget(_G, "jit") then ffi_ok, ffi = pcall(require, "ffi") end
local SYNC_ID_T = ffi_ok and ffi.typeof("double (*)(void *, int, int, "
                                       .. "double *)")

-- The sync_id of core c for the hot path: core:sync_id, or on LuaJIT a
-- function with the same results over the FFI twin.
local function sync_id_of(c)
  local sync_id = c.sync_id
  if not SYNC_ID_T then return sync_id end
  local f, ts = ffi.cast(SYNC_ID_T, c:ffi_sync_id()), ffi.new("double[1]")
  return function(core_, hot, prio)
    local id = f(core_, hot, prio, ts)
    if id ~= 0 then return id, ts[0] end
    return sync_id(core_, hot, prio)   -- EDEPTH, or a closed bus: why
  end
end

-- Memoized audiences, in two generations of at most MEMO_MAX types each:
-- publish_sync looks in the young one (memo); a miss there looks in the
-- old one (old), and a type found there moves up. A full young memo
-- becomes the old one and a new one starts. So a rotation of types a
-- little longer than MEMO_MAX still mostly hits (the share falls off
-- gradually up to 2 * MEMO_MAX, where emptying one memo whole fell off a
-- cliff), and no key is ever deleted from a table (a Lua table with
-- deleted keys rehashes on almost every insert once full). A miss in
-- both costs one core:audience, the lookup the core's own path makes for
-- every event.
local MEMO_MAX = 4096
M.MEMO_MAX = MEMO_MAX

local WORKERS_MAX = 64  -- idle workers kept per bus
M.WORKERS_MAX = WORKERS_MAX

-- Nested publish_sync levels resumed with coroutine.resume, below this
-- many open. On Lua 5.4 that resume carries its caller's budget of C
-- calls (200, about 3 a level) over; deeper levels go through
-- core:resume, which starts a fresh budget, so that EDEPTH (SYNC_MAX, 100
-- levels) is what bounds the nesting, as on LuaJIT.
local FRESH_AT = 16
M.FRESH_AT = FRESH_AT

--- What a worker yields when its event's handlers are through.
local DONE = setmetatable({}, { __tostring = function() return "done" end })
M.DONE = DONE

--- The hot path's state for one bus: its core (c), core.sync_id and
--- core.publish (the methods, looked up once), its task state (task.lua)
--- and the holder of the current event it shares (hold[slot]; hold[dslot]
--- the publish_sync levels open here), its manual clock (or false), memo
--- (type -> audience, false for none), nmemo, old (the memo before),
--- its idle workers (spare, one at hand, and
--- workers[1..nworkers]) and the states of the threads it ran an
--- audience in (thread -> st; weak).
---@param bus table
---@return table
function M.new(bus)
  local c, t = bus._core, bus._task
  return { bus = bus, c = c, sync_id = sync_id_of(c), publish = c.publish,
           task = t, hold = t.hold, slot = t.slot, dslot = t.dslot,
           manual = bus._manual, memo = {}, nmemo = 0, old = {},
           workers = {}, nworkers = 0, spare = false,
           states = setmetatable({}, { __mode = "k" }) }
end

--- Subscriptions changed: forget every memoized audience.
function M.invalidate(h)
  h.memo, h.nmemo, h.old = {}, 0, {}
end

--- The audience of etype from the core, memoized: an array of one
--- subscription or more, or false when nobody listens or the core
--- refuses the type (the caller's slow path then publishes, or says
--- what is wrong, as publish_sync always has).
---@return table|false
function M.audience(h, etype)
  if type(etype) ~= "string" then return false end
  local aud = h.old[etype]
  if aud == nil then
    aud = h.c:audience(etype, false)
    if not aud then return false end  -- a type publish refuses: not kept
    if #aud == 0 then aud = false end
  end
  local n = h.nmemo
  if n >= MEMO_MAX then
    h.old, h.memo, n = h.memo, {}, 0
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
-- of task.lua's pool that settle started for the rest of an audience
-- (a worker runs the same loop inlined): st is the thread's state, st.i
-- the index of the subscription whose handler runs. A handler that
-- yields leaves the thread to the supervisor, which resumes it until the
-- handler returns: st.adopted then ends the run instead of going on with
-- the others. Tracebacks of the thread stop here (a worker's at its
-- body, st.stop), so they show the handler's frames only.
local function run_audience(ev, aud, st)
  for i = st.i, #aud do
    local sub = aud[i]
    if sub.is_active then
      st.i = i
      if sub._once then end_once(st.bus, sub) end
      local m = sub._m                 -- counted (lua/buzz/metrics.lua)
      if not m then                    -- (a core without metrics)
        sub._fn(ev)
      else
        local n = m[1] + 1
        m[1] = n
        if n % SAMPLE ~= 1 then
          sub._fn(ev)
        else                             -- timed
          local mc = st.bus._manual
          local t0 = hist_age(m.latency, ev.ts, mc and mc.ms)
          sub._fn(ev)
          if not st.adopted then hist_since(m.duration, t0) end
        end
      end
      if st.adopted then return end
    end
  end
end

-- The state of thread co for run_audience, made on its first use (a
-- thread of task.lua's pool, for the rest of an audience; a worker's
-- comes with it).
local function state(h, co)
  local st = { i = 1, adopted = false, bus = h.bus }
  h.states[co] = st
  return st
end

--- A new worker: a thread that runs an event's audience each time it is
--- resumed with (ev, aud) and yields DONE when through. A run the
--- supervisor adopted (a handler yielded) ends the thread instead when
--- that handler returns.
function M.worker(h)
  local st = { i = 1, adopted = false, bus = h.bus }
  local bus = h.bus
  local function body(ev, aud)
    while true do
      local last = #aud
      if last == 1 then                -- the usual audience: no loop, and
        local sub = aud[1]             -- no st.i (settle knows it is 1)
        if sub.is_active then
          if sub._once then end_once(bus, sub) end
          local m = sub._m
          if not m then                    -- (a core without metrics)
            sub._fn(ev)
          else
            local n = m[1] + 1
            m[1] = n
            if n % SAMPLE ~= 1 then
              sub._fn(ev)
            else
              local mc = bus._manual
              local t0 = hist_age(m.latency, ev.ts, mc and mc.ms)
              sub._fn(ev)
              if not st.adopted then hist_since(m.duration, t0) end
            end
          end
          if st.adopted then return end
        end
      else
        for i = 1, last do             -- run_audience, inlined
          local sub = aud[i]
          if sub.is_active then
            st.i = i
            if sub._once then end_once(bus, sub) end
            local m = sub._m
            if not m then                    -- (a core without metrics)
              sub._fn(ev)
            else
              local n = m[1] + 1
              m[1] = n
              if n % SAMPLE ~= 1 then
                sub._fn(ev)
              else
                local mc = bus._manual
                local t0 = hist_age(m.latency, ev.ts, mc and mc.ms)
                sub._fn(ev)
                if not st.adopted then hist_since(m.duration, t0) end
              end
            end
            if st.adopted then return end
          end
        end
      end
      ev, aud = yield(DONE)
    end
  end
  st.stop = body                       -- where its tracebacks stop
  local co = create(body)
  h.states[co] = st
  return co
end

--- An idle worker of h's pool, or a new one.
function M.take(h)
  local k = h.nworkers
  if k == 0 then return M.worker(h) end
  h.nworkers = k - 1
  return h.workers[k]
end

--- Gives worker co, idle again, back to h's pool (kept if there is room).
function M.give(h, co)
  local k = h.nworkers + 1
  if k <= WORKERS_MAX then h.workers[k], h.nworkers = co, k end
end

--- The run in co stopped short of its event's end: the handler of
--- aud[st.i] yielded (ok) or raised. Hands the thread to the supervisor
--- or reports the error, then runs the rest of the audience in threads of
--- the task pool.
local function settle(h, co, ev, aud, ok, what, arg)
  local bus, states, t = h.bus, h.states, h.task
  while true do
    local st = states[co]
    states[co] = nil                   -- it is not ours any more
    local i = #aud == 1 and 1 or st.i  -- (a worker sets st.i for more)
    local sub = aud[i]
    if ok then                         -- it yielded: the supervisor's now
      st.adopted = true
      local fine, err = pcall(bus._sup.adopt, bus._sup, co, sub, ev, what,
                              arg)
      if not fine then
        bus._report(err, ev, sub, traceback(co, type(err) == "string"
                    and err or "(error object is not a string)", 0,
                    st.stop or run_audience))
        if close then close(co) end
      end
    else                               -- it raised: report, go on
      bus._report(what, ev, sub, traceback(co, type(what) == "string"
                  and what or "(error object is not a string)", 0,
                  st.stop or run_audience))
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
M.settle = settle

--- ev is published inside a handler of cur (the current event): it takes
--- cur's id as its causation id, and its correlation id unless it has
--- one (as the core's publish does).
local function inherit(ev, cur)
  local cid = cur.id
  if type(cid) == "number" and cid > 0 then ev.causation_id = cid end
  if ev.correlation_id == nil then ev.correlation_id = cur.correlation_id end
end
M.inherit = inherit

return M
