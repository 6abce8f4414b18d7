--- buzz.publish: Bus:publish and Bus:publish_sync. An open memory bus
-- without middleware (HOT) takes the hot path (lua/buzz/hot.lua) for a
-- type somebody listens to; everything else goes through the core's path
-- (publisher): options checked (options.lua), a traceparent stamped by
-- middleware, delay/at handed to schedule.lua, then one core call, and
-- for publish_sync the level it queued run at once (task.lua).
-- @module buzz.publish
local hot_path = require "buzz.hot"
local middleware = require "buzz.middleware"
local options = require "buzz.options"
local schedule = require "buzz.schedule"
local streams = require "buzz.stream"
local task = require "buzz.task"

local type, error, pairs, setmetatable =
      type, error, pairs, setmetatable
local publish_options = options.publish_options
local scan_options = options.scan_publish_options
local check_options = options.check_publish_options
local run_level = task.run_level
local failures = require("buzz.store").failures

local M = {}
local Pub = {}             -- the bus's methods (M.install)

--- Open memory buses without middleware -> their hot path's state
--- (lua/buzz/hot.lua): publish_sync finds it in one lookup, which also
--- tells a bus from anything else. init.lua sets and clears entries.
local HOT = setmetatable({}, { __mode = "k" })
M.HOT = HOT

-- init.lua's check_bus and refused (install sets them).
local check_bus, refused

-- The shared front half of publish and publish_sync. Inside a handler the
-- core inherits the correlation id and sets the causation id itself.

-- publish with delay or at: lua/buzz/schedule.lua.
local publish_later = schedule.publish_later

-- Makes the core's path of Bus:publish and Bus:publish_sync, which
-- differ only in the core method they call; made once, at load, not per
-- bus. The methods call it (one frame): misuse is raised at level 3, the
-- method's caller.
local function publisher(method)
  return function(self, etype, payload, opts)
    local c = check_bus(self, method, 4)
    if self._readonly then
      error("this bus opened its store read-only (readonly = true): it "
            .. "cannot publish", 3)
    end
    local prio, key, corr, headers, dedup, version, is_later = 2
    local stream, expect, sver
    if opts ~= nil then                -- else the core checks the types
      if opts.stream ~= nil or opts.expect ~= nil then  -- (stream.lua)
        stream, expect = streams.check(opts, 3)
      end
      prio, key, corr, headers, dedup, version, is_later =
        publish_options(opts, 3)
    end
    if self._mw.n > 0 and not (headers and headers.traceparent) then
      local tp = middleware.traceparent(self._mw)
      if tp then
        local h = { traceparent = tp }
        if headers then for k, v in pairs(headers) do h[k] = v end end
        headers = h
      end
    end
    if is_later and stream then
      error("stream cannot be combined with delay or at: its version is "
            .. "checked and taken when publish is called", 3)
    end
    if is_later then
      local id, e, k = publish_later(self, c, method, etype, payload, opts, {
        prio = prio, key = key, corr = corr, headers = headers,
        dedup = dedup, version = version }, 4)
      return id, e, k
    end
    local id, err, code
    local manual = self._manual
    if stream then                 -- the expected version (stream.lua)
      local conflict
      sver, err, code = streams.next_version(self, c, stream, expect)
      if not sver then             -- a conflict; with a dedup key the core
        if code ~= "ECONFLICT" or dedup == nil then  -- says "duplicate"
          return nil, err, code    -- first if the event got in before
        end
        conflict, sver = err, 1
      end
      id, err, code = c[method](c, etype, payload, prio, key, corr, nil,
                                headers, dedup, version, nil,
                                manual and manual.ms or nil, stream, sver,
                                conflict)
      if id and err ~= "duplicate" then
        streams.appended(self, stream, sver)
      end
    elseif manual then             -- stamp the event with the clock's time
      id, err, code = c[method](c, etype, payload, prio, key, corr, nil,
                                headers, dedup, version, nil, manual.ms)
    else
      id, err, code = c[method](c, etype, payload, prio, key, corr, nil,
                                headers, dedup, version)
    end
    local t = self._task
    if t.hold[t.fslot] then failures(t) end   -- a store's (task.lua)
    if not id then
      local _, e, k = refused(err, code, 3)   -- not a tail call: levels
      return nil, e, k
    end
    if type(err) == "number" then    -- publish_sync's level: run it now
      run_level(self._task, c, err)
      return id
    end
    if err then return id, err end   -- "duplicate": a repeated dedup key
    return id
  end
end

local PRIORITY_NAMES = { [0] = "critical", "high", "normal", "low" }

local publish_sync_core = publisher("publish_sync")
local hot_audience = hot_path.audience
local hot_inherit, hot_settle = hot_path.inherit, hot_path.settle
local hot_take, hot_give = hot_path.take, hot_path.give
local DONE, FRESH_AT = hot_path.DONE, hot_path.FRESH_AT
local co_resume = task.co_resume

--- Delivers an event to its handlers before returning, even in a handler.
--- An open memory bus without middleware takes the hot path
--- (lua/buzz/hot.lua; HOT holds it) for a type somebody listens to,
--- unless a dedup key or a delay is given; the core's own path does the
--- rest, and says what is wrong with a bad call.
---@param etype string
---@param payload any
---@param opts table|nil as for publish
---@return integer|nil id, string|nil err, string|nil code
-- @function Bus:publish_sync
function Pub:publish_sync(etype, payload, opts)
  local h = HOT[self]                  -- nil unless self is such a bus
  if h and opts == nil then
    -- the hottest call of all: no options, a memoized audience, not deep
    -- (the general hot path below, less what it need not check; written
    -- out again on purpose: a shared function's call costs about 3%)
    local aud = h.memo[etype]
    local hold, dslot = h.hold, h.dslot
    local hd = hold[dslot]
    if aud and hd < FRESH_AT then
      local id, ts, code = h.sync_id(h.c, hd, 2)
      if not id then return nil, ts, code end   -- EDEPTH
      local m = h.manual
      if m then ts = m.ms end
      local ev = { id = id, type = etype, payload = payload, ts = ts,
                   priority = "normal", attempt = 1 }
      local slot = h.slot
      local cur = hold[slot]
      if cur then hot_inherit(ev, cur) end      -- inside a handler
      local co = h.spare                -- an idle worker kept at hand
      if co then
        h.spare = false
      else
        co = hot_take(h)
      end
      hold[slot], hold[dslot] = ev, hd + 1   -- (task.in_handler)
      local ok, what, arg = co_resume(co, ev, aud)
      hold[slot], hold[dslot] = cur, hd
      if what == DONE and ok then
        if h.spare then hot_give(h, co) else h.spare = co end
        return id
      end
      hot_settle(h, co, ev, aud, ok, what, arg)
      return id
    end
  end
  if h then
    local aud = h.memo[etype]
    if aud == nil then aud = hot_audience(h, etype) end
    local prio, key, corr, headers, dedup, version, is_later
    if aud and opts ~= nil and (opts.stream ~= nil or opts.expect ~= nil)
    then
      aud = false                      -- a stream's check: the core's path
    end
    if aud and opts ~= nil then
      if scan_options then             -- Lua 5.4: C's reading first
        prio, key, corr, headers, dedup, version = scan_options(opts)
      end
      if not prio then                 -- (not the scan again)
        prio, key, corr, headers, dedup, version, is_later =
          check_options(opts, 2)
      end
      if dedup ~= nil or is_later then aud = false end  -- the core's
    end
    if aud then
      -- the hot path (lua/buzz/hot.lua): the hottest call of all
      local hold, slot, dslot = h.hold, h.slot, h.dslot
      local hd = hold[dslot]
      local id, ts, code = h.sync_id(h.c, hd, prio or 2)
      if not id then return nil, ts, code end   -- EDEPTH
      local m = h.manual
      if m then ts = m.ms end
      local ev
      if opts == nil then              -- one constructor (one NEWTABLE)
        ev = { id = id, type = etype, payload = payload, ts = ts,
               priority = "normal", attempt = 1 }
      else
        ev = { id = id, type = etype, payload = payload, ts = ts,
               priority = PRIORITY_NAMES[prio], attempt = 1, key = key }
        -- (a nil in a constructor costs a slow store: only what is given)
        if corr ~= nil then ev.correlation_id = corr end
        if headers ~= nil then ev.headers = headers end
        if version ~= nil then ev.version = version end
      end
      local cur = hold[slot]
      if cur then hot_inherit(ev, cur) end      -- inside a handler
      local co = hot_take(h)
      hold[slot], hold[dslot] = ev, hd + 1   -- (task.in_handler)
      local ok, what, arg
      if hd < FRESH_AT then
        ok, what, arg = co_resume(co, ev, aud)
      else
        ok, what, arg = h.c:resume(co, ev, ev, aud)
      end
      hold[slot], hold[dslot] = cur, hd
      if what == DONE and ok then
        hot_give(h, co)
        return id
      end
      hot_settle(h, co, ev, aud, ok, what, arg)
      return id
    end
  end
  local id, err, code = publish_sync_core(self, etype, payload, opts)
  return id, err, code        -- not a tail call: error levels count frames
end

local publish_core = publisher("publish")

--- Queues an event; handlers run when the bus is driven.
--- Without options, an open memory bus without middleware (HOT) goes
--- straight to the core: nothing here to check or to add.
---@param etype string a concrete subject, "task.start"
---@param payload any
---@param opts table|nil priority, key, correlation_id, headers, dedup,
---  version
---@return integer|nil id, string|nil err, string|nil code
-- @function Bus:publish
function Pub:publish(etype, payload, opts)
  local h = HOT[self]
  if h and opts == nil then
    local m = h.manual
    local id, err, code = h.publish(h.c, etype, payload, 2, nil, nil, nil,
                                    nil, nil, nil, nil, m and m.ms or nil)
    if id then return id end
    local _, e, k = refused(err, code, 2)   -- not a tail call: levels
    return nil, e, k
  end
  local id, err, code = publish_core(self, etype, payload, opts)
  return id, err, code        -- not a tail call: error levels count frames
end

--- Puts publish and publish_sync on the bus class; check_bus and refused
--- are init.lua's.
-- @local
function M.install(Bus, check_bus_fn, refused_fn)
  check_bus, refused = check_bus_fn, refused_fn
  for k, f in pairs(Pub) do Bus[k] = f end
end

return M
