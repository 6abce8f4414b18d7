--- buzz.store: what a bus answers about its store (events, replay,
-- upcasters, consumers, store_info, flush) and the state rows the failure
-- machinery keeps there (retries, dead letters, delayed events). The
-- methods are the bus's (install puts them on it); they run in the
-- caller's frame as they did in init.lua, so error levels are unchanged.
-- @module buzz.store
local util = require "buzz.util"
local options = require "buzz.options"
local errors = require "buzz.errors"
local storable = require "buzz.storable"
local core = require "buzz.core"

local type, error, ipairs, pairs, tostring, xpcall, pcall, assert =
      type, error, ipairs, pairs, tostring, xpcall, pcall, assert
local traceback = debug.traceback
local floor, huge = math.floor, math.huge
local json_encode, json_decode = core.json_encode, core.json_decode

local check_options, is_callable = options.check_options, options.is_callable
local is_integer, check_positive = options.is_integer, options.check_positive
local check_key, RANGE = options.check_key, options.RANGE
local QUERY_OPTIONS, REPLAY_OPTIONS = options.QUERY_OPTIONS,
                                      options.REPLAY_OPTIONS
local STORE_INFO_OPTIONS = options.STORE_INFO_OPTIONS
local check_number, MAX_SECONDS = util.check_number, util.MAX_SECONDS
local check_subject_value = util.check_subject_value
local quote = util.quote

local M = {}
local Store = {}           -- the methods install puts on the bus

-- Stored events read per page by events() and replay(). Smaller pages
-- measured cheaper on Lua 5.4 (callgrind, replay, instructions per
-- event: 32 -> 10,766, 64 -> 10,672, 128 -> 11,099, 256 -> 11,073,
-- 1024 -> 11,684; LuaJIT within its spread): at 256 the profile's extra
-- is glibc's malloc_consolidate and the collector's marking, not the
-- crossings into C that a bigger page would save.
local PAGE = 64

-- init.lua's check_bus and refused (install sets them).
local check_bus, refused

--- Reports the store failures that belong to no delivery, which the core
--- keeps for this layer (task.lua's hold[fslot]: a failed commit that a
--- read, or a publish waiting for its own, came upon): called by drive,
--- close, and the publishes and reads of a bus with a store.
---@param t table the bus's task state (lua/buzz/task.lua)
-- @local
function M.failures(t)
  local hold, fslot = t.hold, t.fslot
  local f = hold[fslot]
  if not f then return end
  hold[fslot] = false
  for i = 1, #f do t.bus._report(f[i]) end
end
local failures = M.failures

-- The core's store_info with what only this layer knows.
-- store_info's counts of state rows: field -> kind.
local STATE_COUNTS = { retries = "retry", dead_letters = "dead",
                       delayed = "delay" }

local function store_info(self, c, with_types, with_events)
  local info, err, code = c:store_info(with_types, with_events)
  failures(self._task)                 -- a commit the read waited for
  if not info then return nil, err, code end
  info.path = self._store
  info.durability = self._durability
  info.readonly = self._readonly
  -- what failure handling keeps in the store's state rows
  for field, kind in pairs(STATE_COUNTS) do
    local n
    n, err, code = c:state_count(kind)
    if not n then return nil, err, code end
    info[field] = n
  end
  return info
end

-- The core of a bus with a store, raising for a memory bus.
local function check_store(self, method)
  local c = check_bus(self, method)
  if not self._store then
    error(("bus:%s() reads the store, and this bus has none: create it "
           .. "with buzz.new{ store = \"events.db\" }"):format(method), 3)
  end
  return c
end

-- One end of a range: an id, or { time = epoch seconds } / { id = n }.
local function range_end(v, name, level)
  if v == nil then return nil, nil end
  if is_integer(v) and v >= 0 then return v, nil end
  if type(v) == "table" then
    if is_integer(v.id) and v.id >= 0 and v.time == nil then
      return v.id, nil
    end
    if type(v.time) == "number" and v.time >= 0 and v.time <= MAX_SECONDS
       and v.id == nil then
      return nil, floor(v.time * 1000)
    end
  end
  local n = type(v) == "table" and (v.time or v.id) or v
  error(("bad %s: expected an event id or { time = epoch seconds }, got %s%s")
        :format(name, type(v) ~= "table" and quote(v)
                or v.time ~= nil and ("{ time = %s }"):format(quote(v.time))
                or v.id ~= nil and ("{ id = %s }"):format(quote(v.id))
                or quote(v),
                type(n) == "number" and n == n and n > 0 and (" (allowed: "
                .. "ids from 0 to 2^53, times from 0 to %g seconds)")
                :format(MAX_SECONDS) or ""), level + 1)
end

-- Turns events()/replay() filters into the core's query, the id to start
-- after and the most events to return.
local function query_filters(f, allowed, what, level)
  check_options(f, allowed, what, level + 1)
  f = f or {}
  local q = {}
  if f.types ~= nil then
    check_subject_value(f.types, "types", "order.*", true, level + 1)
    q.pattern = f.types
  end
  local from_id, from_ts = range_end(f.from, "from", level + 1)
  local to_id, to_ts = range_end(f.to, "to", level + 1)
  q.from_ts, q.to_ts, q.to_id = from_ts, to_ts, to_id
  if to_id == 0 then q.to_id = -1 end          -- nothing is at or below 0
  local key = f.key
  check_key(key, level + 1)
  q.key = key
  check_positive(f.limit, "limit", true, level + 1)
  return q, from_id and from_id - 1 or 0, f.limit or huge
end

-- Applies the upcaster chain of ev.type to a stored event, in place.
local function upcaster_runner(chains)
  return function(ev)
    local chain = chains[ev.type]
    if not chain then return end
    local v = ev.version or 1
    local f = chain[v]
    while f do
      ev.payload = f(ev.payload, ev)
      v = v + 1
      f = chain[v]
    end
    ev.version = v
  end
end

--- Upcasts evs[from..n] (from defaults to 1), stored events as the core
--- read them, in place with up (the bus's upcaster chains,
--- Store:upcaster); rows that do not decode are left as they are.
--- Returns nil, or at the first raise its index and the message
--- "upcasting event ID failed: ERROR" (the events after it are not
--- upcast).
---@return integer|nil i, string|nil err
-- @local
function M.upcast(up, evs, n, from)
  for i = from or 1, n do
    local ev = evs[i]
    if not ev.decode_error then
      local ok, e = pcall(up, ev)
      if not ok then
        return i, ("upcasting event %d failed: %s"):format(ev.id,
                                                          tostring(e))
      end
    end
  end
  return nil
end
local upcast = M.upcast

-- One page of the query q from the core c of the bus self, upcast; nil,
-- err, code if the store fails. An upcaster's raise is raised: the
-- caller is the reader, not a handler.
local function query(self, c, q, after, limit)
  local page, err, code = c:query(q, after, limit < PAGE and limit or PAGE)
  failures(self._task)                 -- a commit the read waited for
  if not page then return nil, err, code end
  local up = self._upcast
  if up then
    local i, e = upcast(up, page, #page)
    if i then error(e, 0) end
  end
  return page
end

-- Reads the next page or raises the store's failure.
local function page_of(self, c, q, after, limit)
  local page, err = query(self, c, q, after, limit)
  if not page then error(err, 3) end
  return page
end

-- The iterator of events() over the core c of the bus self: pages of the
-- query q after the id after, at most limit events; nil, err, code if
-- the first page fails.
local function stored_events(self, c, q, after, limit)
  local page, err, code = query(self, c, q, after, limit)
  if not page then return nil, err, code end
  local i, seen = 0, 0
  return function()
    if seen >= limit then return nil end
    i = i + 1
    local ev = page[i]
    if ev == nil then
      if #page < PAGE then return nil end
      page, i = page_of(self, c, q, after, limit - seen), 1
      ev = page[1]
      if ev == nil then return nil end
    end
    after, seen = ev.id, seen + 1
    return ev
  end
end

--- Stored events in id order, as an iterator: for ev in bus:events{...}.
--- Filters: types (a pattern), from and to (ids, or { time = seconds },
--- inclusive), key, limit. Old payloads come back upcast. A store that
--- fails while iterating raises; one that fails at once returns nil, err.
---@param filters table|nil
---@return function|nil iterator, string|nil err, string|nil code
-- @function Bus:events
function Store:events(filters)
  local c = check_store(self, "events")
  local q, after, limit = query_filters(filters, QUERY_OPTIONS, "events", 2)
  local iter, err, code = stored_events(self, c, q, after, limit)
  return iter, err, code
end

--- Feeds stored events through a handler without appending them again:
--- the same filters as events(), plus handler = fn or consumer = "name"
--- (the handler of that durable consumer, subscribed on this bus). Events
--- carry is_replay = true. A handler's raise goes to on_error and the
--- replay goes on. Returns the number of events replayed; a store that
--- fails at once returns nil, err, code, later raises (as events() does).
---@param opts table
---@return integer|nil count, string|nil err, string|nil code
-- @function Bus:replay
function Store:replay(opts)
  local c = check_store(self, "replay")
  if type(opts) ~= "table" then
    error("bad options to replay: expected a table with handler = fn or "
          .. "consumer = \"name\"", 2)
  end
  local q, after, limit = query_filters(opts, REPLAY_OPTIONS, "replay", 2)
  local handler, sub = opts.handler, nil
  if opts.consumer ~= nil then
    if handler ~= nil then
      error("give replay a handler or a consumer, not both", 2)
    end
    local subs = c:subs()
    for i = 1, #subs do
      if subs[i].durable == opts.consumer then sub = subs[i] end
    end
    if not sub then
      error(("no durable consumer %s is subscribed on this bus")
            :format(quote(opts.consumer)), 2)
    end
    handler = sub.handler
  elseif not is_callable(handler) then
    error(("bad handler: expected a function, got %s"):format(type(handler)),
          2)
  end
  local report, pattern = self._report, q.pattern or ">"
  local trace                 -- the failing handler's traceback
  local function on_raise(e)
    trace = traceback(type(e) == "string" and e
                      or "(error object is not a string)", 2)
    return e
  end
  local page, err, code = query(self, c, q, after, limit)   -- upcast
  if not page then return nil, err, code end
  -- One xpcall runs the handler on page[i + 1 .. m] (a pcall per event
  -- cost a tenth of a replay); it stops at a row that does not decode
  -- (reported outside it, as a raise of on_error must not be caught)
  -- and after a handler that closed the bus.
  local n, i, m, is_closed = 0, 0, #page, false
  local function run()
    while i < m do
      local ev = page[i + 1]
      if ev.decode_error then return end
      i = i + 1
      ev.is_replay = true
      n = n + 1
      handler(ev)
      if not self._core then
        is_closed = true
        return
      end
    end
  end
  while true do
    while i < m do
      local ok, e = xpcall(run, on_raise)
      local ev = page[i]
      if not ok then
        report(e, ev, sub or { pattern = pattern }, trace)
      elseif i < m and not is_closed then   -- a corrupt row: on_error
        i = i + 1
        ev = page[i]
        ev.is_replay = true
        report(ev.decode_error, ev, sub or { pattern = pattern })
      end
      if is_closed or not self._core then return n end
    end
    limit = limit - m
    if m < PAGE or limit <= 0 then return n end
    page, err = query(self, c, q, page[m].id, limit)
    if not page then error(err, 1) end    -- as events() raises, mid-way
    i, m = 0, #page
  end
end

--- Registers fn to rewrite payloads of etype stored at from_version into
--- from_version + 1, on read (events, replay, durable consumers). Chains
--- across versions; the stored row is never modified.
---@param etype string
---@param from_version integer
---@param fn function fn(payload, ev) -> new payload
-- @function Bus:upcaster
function Store:upcaster(etype, from_version, fn)
  local c = check_bus(self, "upcaster")
  check_subject_value(etype, "type", "order.created", false, 2)
  check_number(from_version, "from_version", RANGE.version, 2)
  if not is_callable(fn) then
    error(("bad upcaster: expected a function, got %s"):format(type(fn)), 2)
  end
  local chains = self._upcasters
  if not chains then
    chains = {}
    self._upcasters = chains
    self._upcast = upcaster_runner(chains)   -- read by task.lua too
    c:set_upcast(true)
  end
  local chain = chains[etype] or {}
  if chain[from_version] then
    error(("an upcaster for %s version %d is already registered")
          :format(etype, from_version), 2)
  end
  chain[from_version] = fn
  chains[etype] = chain
end

--- Commits everything published so far (batch durability commits in the
--- background); returns true, or nil, err, code if a commit failed.
---@return boolean|nil ok, string|nil err, string|nil code
-- @function Bus:flush
function Store:flush()
  local c = check_bus(self, "flush")
  return c:flush()
end

--- The durable consumers in the store: { name, pattern, acked, lag,
--- updated_ms }, by name.
---@return table|nil consumers, string|nil err, string|nil code
-- @function Bus:consumers
function Store:consumers()
  return check_store(self, "consumers"):consumers()
end

-- The position (acked id) of the durable consumer name once what is
-- queued is written, or nil when the store has no such consumer.
function Store:_position(name)
  assert(self:flush())
  for _, cons in ipairs(assert(self:consumers())) do
    if cons.name == name then return cons.acked end
  end
  return nil
end

--- Forgets a durable consumer (its position); retention stops holding
--- events back for it. Returns true if it existed.
---@param name string
---@return boolean|nil removed, string|nil err, string|nil code
-- @function Bus:remove_consumer
function Store:remove_consumer(name)
  local c = check_store(self, "remove_consumer")
  if type(name) ~= "string" then
    error(("bad name: expected a string, got %s"):format(type(name)), 2)
  end
  if self._readonly then
    error("this bus opened its store read-only: it cannot remove consumers",
          2)
  end
  local ok, err, code = c:remove_consumer(name)
  if ok == nil then
    local _, e, k = refused(err, code, 2)     -- not a tail call: levels
    return nil, e, k
  end
  return ok
end

--- What the store holds: events, first_id, last_id, size_bytes, the
--- writer's counters, held_back (events retention keeps for consumers),
--- and with types = true a count per type. events = false leaves the
--- count out (it is a pass over the log; the ids are not).
---@param opts table|nil types, events
---@return table|nil info, string|nil err, string|nil code
-- @function Bus:store_info
function Store:store_info(opts)
  local c = check_store(self, "store_info")
  check_options(opts, STORE_INFO_OPTIONS, "store_info", 2)
  local with_events = opts == nil or opts.events
  if with_events == nil then
    with_events = true
  elseif type(with_events) ~= "boolean" then
    error(("bad events: expected a boolean (false leaves the count out), "
           .. "got %s"):format(quote(with_events)), 2)
  end
  local info, err, code = store_info(self, c, opts and opts.types,
                                     with_events)
  return info, err, code
end

-- ------------------------------------------------------------ state rows

-- The kinds of state rows that record a failure. They must be written
-- even when what they hold cannot be encoded as it is (an event table a
-- handler changed to hold a function, say): then as storable.value
-- makes it, so the event stays inspectable and can be redriven.
local RECORDS = { retry = true, dead = true }

-- The core when the bus is open with a writable store, else nil.
local function store_core(bus)
  if bus._store and not bus._readonly then return bus._core or nil end
  return nil
end

-- Writes a state row when the bus has a writable store; a failure is
-- reported, never raised (the delivery it belongs to goes on).
function Store:_state_put(kind, name, value)
  local c = store_core(self)
  if not c then return end
  local text, err, code = json_encode(value)
  if not text and code == "EINVAL" and RECORDS[kind] then
    text, err = json_encode(storable.value(value))
  end
  local ok
  if text then ok, err = c:state_put(kind, name, text) end
  if not (text and ok) then
    self._report((errors.wrap("ESTORE", ("could not store %s %s")
                                        :format(kind, name), err)))
  end
end

-- The decoded value of the state row kind/name, or nil (none, or not
-- JSON): what _state_put wrote before a restart.
function Store:_state_get(kind, name)
  local c = self._core
  if not (c and self._store) then return nil end
  local row = assert(c:state_list(kind, name))[1]
  return row and json_decode(row.value) or nil
end

-- Removes a state row (writable store only); a failure is reported.
function Store:_state_del(kind, name)
  local c = store_core(self)
  if not c then return end
  local ok, err = c:state_del(kind, name)
  if not ok then
    self._report((errors.wrap("ESTORE", ("could not remove %s %s")
                                        :format(kind, tostring(name)),
                              err)))
  end
end

-- The rows of kind, each { name, value = decoded JSON (nil if not) },
-- in name order; raises if the store fails (the bus is opening).
function Store:_state_list(kind)
  local rows = assert(self._core:state_list(kind))
  for _, row in ipairs(rows) do row.value = json_decode(row.value) end
  return rows
end

M.info = store_info

--- Puts the store methods on the bus class; check_bus and refused are
--- init.lua's.
-- @local
function M.install(Bus, check_bus_fn, refused_fn)
  check_bus, refused = check_bus_fn, refused_fn
  for k, f in pairs(Store) do Bus[k] = f end
end

return M
