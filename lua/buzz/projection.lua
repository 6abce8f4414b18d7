--- buzz.projection: bus:projection(name, opts), state folded from the
-- events of the log, with versioned snapshots (README, "State from
-- events", shows one).
--
-- With a store the fold follows the log in id order: the projection reads
-- what the log holds when it is made, then, each time a matching event is
-- delivered, whatever the log has gained since (so priorities never
-- reorder it, and the state is the same as a fold of the log from
-- scratch). Every snapshot_every events it writes a snapshot through the
-- store's writer: a row per key changed since the last one (its state,
-- its hash and the position it holds), then a row with the position and
-- the code version. A restart loads them and folds only the events after
-- the position (a key whose row is newer, when a crash cut a snapshot
-- short, skips the events its row already holds); a changed version, or a
-- row that fails its hash, rebuilds. A memory bus folds deliveries.
-- A state's version is the first 8 hex digits of the SHA-256 of its
-- canonical JSON (keys sorted, in C: core.json_canonical), the same on
-- Lua 5.4 and LuaJIT and on every replica that folded the same events.
-- @module buzz.projection
local core = require "buzz.core"
local errors = require "buzz.errors"
local options = require "buzz.options"

local type, error, pairs, ipairs, pcall, tostring, setmetatable,
      getmetatable, next =
      type, error, pairs, ipairs, pcall, tostring, setmetatable,
      getmetatable, next
local format, sort, concat = string.format, table.sort, table.concat
local json_canonical, sha256 = core.json_canonical, core.sha256
local check_options, is_callable, is_integer =
      options.check_options, options.is_callable, options.is_integer

local M = {}
local Proj = {}
Proj.__index = Proj

local OPTIONS = options.option_set("types", "init", "apply", "by",
                                   "version", "snapshot_every")
local CHECK_OPTIONS = options.option_set("repair")
local SNAPSHOT_EVERY = 1000    -- events between snapshots, by default
local META = "@"               -- the row that holds the position

local function default_init() return {} end

--- The version hash of a value: the first 8 hex digits of the SHA-256 of
--- its canonical JSON; nil, err if JSON cannot hold it.
---@param value any
---@return string|nil hash, string|nil err
function M.hash(value)
  local text, err = json_canonical(value)
  if not text then return nil, err end
  return sha256(text):sub(1, 8)
end
local hash = M.hash

local function check_self(self, method)
  if getmetatable(self) ~= Proj then
    error(("use proj:%s(...), not proj.%s(...)"):format(method, method), 3)
  end
end

-- The tag of a key in this projection's tables and row names: "s:" and
-- the string, "i:" and the integer; "" for a projection without by.
local function tag_of(key)
  if type(key) == "string" then return "s:" .. key end
  return format("i:%d", key)
end

-- The tag of the key a caller names (get, version, at), or raises.
local function caller_tag(self, key, method)
  if not self.by then
    if key ~= nil then
      error(("projection %q has one state (no by): call proj:%s() "
             .. "without a key"):format(self.name, method), 3)
    end
    return ""
  end
  if type(key) ~= "string" and not is_integer(key) then
    error(("bad key to proj:%s: expected a string or an integer, got %s")
          :format(method, type(key)), 3)
  end
  return tag_of(key)
end

-- The tag of ev's key, or nil (the event is not for this projection),
-- or false after reporting a by(ev) that raised or returned a bad key.
local function event_tag(self, ev)
  local by = self.by
  if not by then return "" end
  local key
  if by == "key" or by == "stream" then
    key = ev[by]
  else
    local ok, k = pcall(by, ev)
    if not ok then
      self.bus:_report_error((errors.wrap("ECALLBACK", format(
        "projection %s: by(ev) raised on event %d", self.name, ev.id), k)),
        ev)
      return false
    end
    key = k
  end
  if key == nil then return nil end
  if type(key) ~= "string" and not is_integer(key) then
    self.bus:_report_error(errors.text("ECALLBACK", format(
      "projection %s: by(ev) gave a %s for event %d; a key is a string or "
      .. "an integer", self.name, type(key), ev.id)), ev)
    return false
  end
  return tag_of(key), key
end

-- Folds one event into its key's state: from the log (id order; an id
-- at or below the position is done already), or with is_live as
-- delivered on a memory bus (delivery order; the position is the
-- highest id folded).
local function fold(self, ev, is_live)
  local id = ev.id
  if id > self.pos then
    self.pos = id
  elseif not is_live then
    return
  end
  local tag, key = event_tag(self, ev)
  if not tag then return end
  local held = self.held
  if held and held[tag] and id <= held[tag] then return end
  local states = self.states
  local state = states[tag]
  if state == nil then
    local ok, s = pcall(self.init, key)
    if not ok then
      return self.bus:_report_error((errors.wrap("ECALLBACK", format(
        "projection %s: init raised", self.name), s)), ev)
    end
    state = s
  end
  local ok, new = pcall(self.apply, state, ev)
  if not ok then
    self.bus:_report_error((errors.wrap("ECALLBACK", format(
      "projection %s: apply raised on event %d (skipped)", self.name, id),
      new)), ev)
  elseif new ~= nil then
    state = new
  end
  states[tag], self.key_of[tag] = state, key
  self.hashes[tag], self.dirty[tag] = nil, true
  self.since = self.since + 1
  local watchers = self.watchers
  for i = 1, #watchers do
    local wok, err = pcall(watchers[i], state, ev, key)
    if not wok then
      self.bus:_report_error((errors.wrap("ECALLBACK", format(
        "projection %s: on_change raised", self.name), err)), ev)
    end
  end
end

-- Folds the stored events after upto ... (the whole log when to is nil)
-- with fold_fn; raises if the store fails.
local function read_log(self, after, to, fold_fn, target)
  local iter, err = self.bus:events{ types = self.types, from = after + 1,
                                     to = to }
  if not iter then error(err, 0) end
  for ev in iter do fold_fn(target, ev) end
end

-- Writes a snapshot: the rows of the keys changed since the last one,
-- then the position. Only on a bus with a writable store.
-- A state JSON cannot hold is reported and no snapshot is written.
local function snapshot(self)
  local bus, kind = self.bus, self.kind
  for tag in pairs(self.dirty) do
    local ok, err = pcall(self._hash_of, self, tag)
    if not ok then
      bus:_report_error((errors.wrap("EINVAL", format(
        "projection %s: no snapshot written", self.name), err)))
      return false
    end
  end
  for tag in pairs(self.dirty) do
    bus:_state_put(kind, "k:" .. tag, {
      key = self.key_of[tag], position = self.pos,
      state = self.states[tag], hash = self:_hash_of(tag) })
  end
  self.dirty = {}
  bus:_state_put(kind, META, { version = self.code_version,
                               position = self.pos })
  self.since = 0
  self.snapshots = self.snapshots + 1
  return true
end

local function maybe_snapshot(self)
  local every = self.every
  if every and self.since >= every and self.is_writable then
    snapshot(self)
  end
end

-- Loads the last snapshot if it is of this code version and whole; true
-- when it did.
local function load_snapshot(self)
  local rows = self.bus:_state_list(self.kind)
  if #rows == 0 then return false end
  local meta
  for _, row in ipairs(rows) do
    if row.name == META then meta = row.value end
  end
  if type(meta) == "table" and meta.version == self.code_version
     and is_integer(meta.position) then
    local states, keys, held = {}, {}, {}
    local is_whole = true
    for _, row in ipairs(rows) do
      local v = row.value
      if row.name ~= META then
        local tag = row.name:sub(3)
        if type(v) ~= "table" or hash(v.state) ~= v.hash
           or not is_integer(v.position) then
          is_whole = false
          break
        end
        states[tag], keys[tag] = v.state, v.key
        if v.position > meta.position then held[tag] = v.position end
      end
    end
    if is_whole then
      self.states, self.key_of, self.pos = states, keys, meta.position
      self.held = next(held) and held or nil
      return true
    end
  end
  -- another version's snapshot, or a damaged one: rebuild from the log
  if self.is_writable then self.bus:_state_del(self.kind, nil) end
  self.rebuilt = true
  return false
end

-- Catches up with the log (store) after a delivery of ev.
local function on_event(self, ev)
  if self.closed then return end
  if self.has_store then
    if ev.id <= self.pos then return end
    read_log(self, self.pos, nil, fold, self)
    if self.pos < ev.id then          -- not committed yet ("none")
      self.bus:flush()
      read_log(self, self.pos, nil, fold, self)
    end
  else
    fold(self, ev, true)
  end
  maybe_snapshot(self)
end

--- Makes a projection (bus:projection). Raises on misuse; nil, err,
--- code when the store fails while it reads the log.
-- @local
function M.new(bus, name, opts, level)
  if type(name) ~= "string" or name == "" then
    error("bad name to projection: expected a non-empty string", level + 1)
  end
  if type(opts) ~= "table" then
    error("bad options to projection: expected a table with apply = "
          .. "function(state, ev)", level + 1)
  end
  check_options(opts, OPTIONS, "projection", level + 1)
  if not is_callable(opts.apply) then
    error("projection needs apply = function(state, ev) (returns the new "
          .. "state, or nil when it changed state in place)", level + 1)
  end
  if opts.init ~= nil and not is_callable(opts.init) then
    error("bad init to projection: expected a function(key) returning the "
          .. "initial state", level + 1)
  end
  local by = opts.by
  if by ~= nil and by ~= "key" and by ~= "stream" and not is_callable(by)
  then
    error('bad by to projection: expected "key", "stream" or a function(ev) '
          .. "returning the key", level + 1)
  end
  local version = opts.version == nil and "1" or opts.version
  if type(version) ~= "string" and not is_integer(version) then
    error("bad version to projection: expected a string or an integer",
          level + 1)
  end
  local every = opts.snapshot_every
  if every == nil then
    every = SNAPSHOT_EVERY
  elseif every ~= false and not (is_integer(every) and every > 0) then
    error("bad snapshot_every to projection: expected a positive integer "
          .. "(events) or false", level + 1)
  end
  local list = bus._projections or {}
  if list[name] and not list[name].closed then
    error(("projection %q exists already on this bus (close it first)")
          :format(name), level + 1)
  end
  local has_store = bus:_has_store()
  local self = setmetatable({
    bus = bus, name = name, kind = "projection:" .. name,
    types = opts.types or ">", init = opts.init or default_init,
    apply = opts.apply, by = by, code_version = tostring(version),
    every = every, has_store = has_store,
    is_writable = has_store and not bus._readonly,
    states = {}, key_of = {}, hashes = {}, dirty = {}, held = nil,
    pos = 0, since = 0, snapshots = 0, watchers = {}, closed = false,
    rebuilt = false,
  }, Proj)
  -- the subscription first: a pattern it refuses is refused before any
  -- read of the log
  local sub, err, code = bus:_subscribe(self.types, function(ev)
    on_event(self, ev)
  end, { name = "projection:" .. name, retry = false }, level + 1)
  if not sub then return nil, err, code end
  self.sub = sub
  if has_store then
    local ok, e = pcall(function()
      self.is_loaded = load_snapshot(self)
      read_log(self, self.pos, nil, fold, self)
    end)
    if not ok then
      sub:unsubscribe()
      local text, c = errors.wrap("ESTORE", format(
        "projection %s could not read the log", name), e)
      return nil, text, c
    end
    if self.since > 0 then maybe_snapshot(self) end
  end
  list[name] = self
  bus._projections = list
  return self
end

-- The hash of one key's state, cached until the key changes.
function Proj:_hash_of(tag)
  local h = self.hashes[tag]
  if h == nil then
    local err
    h, err = hash(self.states[tag])
    if not h then
      error(errors.text("EINVAL", format("projection %s: the state cannot "
                                         .. "be hashed: %s", self.name,
                                         (err:gsub("^EINVAL: ", "")))), 0)
    end
    self.hashes[tag] = h
  end
  return h
end

-- The whole projection's hash: one state's, or, by key, that of the keys'
-- tags and hashes in tag order.
local function whole_hash(self, states, hash_of)
  if not self.by then return hash_of("") end
  local tags = {}
  for tag in pairs(states) do tags[#tags + 1] = tag end
  sort(tags)
  for i, tag in ipairs(tags) do tags[i] = tag .. "\t" .. hash_of(tag) end
  return sha256(concat(tags, "\n")):sub(1, 8)
end

--- The state (of key, with by): the live table, to be read, not changed.
--- With by, nil for a key no event has touched; without, the initial
--- state until the first event.
---@param key string|integer|nil
---@return any
function Proj:get(key)
  check_self(self, "get")
  local tag = caller_tag(self, key, "get")
  local state = self.states[tag]
  if state == nil and tag == "" then
    state = self.init()
    self.states[""], self.hashes[""] = state, nil
  end
  return state
end

--- The version of the state (of key): 8 hex digits of the SHA-256 of its
--- canonical JSON; nil for a key no event has touched.
---@param key string|integer|nil
---@return string|nil
function Proj:version(key)
  check_self(self, "version")
  local tag = caller_tag(self, key, "version")
  if tag == "" then self:get() end
  if self.states[tag] == nil then return nil end
  return self:_hash_of(tag)
end

--- The id of the last event folded (0 before any).
---@return integer
function Proj:position()
  check_self(self, "position")
  return self.pos
end

--- position and the whole projection's hash, for replicas to compare.
---@return integer position, string hash
function Proj:hash()
  check_self(self, "hash")
  if not self.by then self:get() end
  return self.pos, whole_hash(self, self.states, function(tag)
    return self:_hash_of(tag)
  end)
end

-- Integers first, in numeric order, then strings, bytewise.
local function key_before(a, b)
  local ta, tb = type(a), type(b)
  if ta ~= tb then return ta == "number" end
  return a < b
end

--- The keys with a state: integers in order, then strings in byte order.
---@return table
function Proj:keys()
  check_self(self, "keys")
  local keys = {}
  for tag in pairs(self.states) do keys[#keys + 1] = self.key_of[tag] end
  sort(keys, key_before)
  return keys
end

-- A fresh fold of the log up to position: { states, keys } (store only).
local function refold(self, position)
  local shadow = setmetatable({
    bus = self.bus, name = self.name, init = self.init, apply = self.apply,
    by = self.by, states = {}, key_of = {}, hashes = {}, dirty = {},
    pos = 0, since = 0, watchers = {},
  }, Proj)
  read_log(self, 0, position, fold, shadow)
  return shadow
end

local function need_store(self, method)
  if not self.has_store then
    error(("proj:%s needs a store: a memory bus keeps no log to fold "
           .. "again"):format(method), 3)
  end
end

--- The state (of key) as it was after the event with id position: a fold
--- of the log from its start (store only).
---@param position integer
---@param key string|integer|nil
---@return any
function Proj:at(position, key)
  check_self(self, "at")
  if not is_integer(position) or position < 0 then
    error("bad position to proj:at: expected an event id (an integer >= 0)",
          2)
  end
  local tag = caller_tag(self, key, "at")
  need_store(self, "at")
  local shadow = refold(self, position)
  local state = shadow.states[tag]
  if state == nil and tag == "" then state = self.init() end
  return state
end

--- Calls fn(state, ev, key) after each event folded (key nil without by).
--- Returns the projection.
---@param fn function
---@return table
function Proj:on_change(fn)
  check_self(self, "on_change")
  if not is_callable(fn) then
    error("bad argument to proj:on_change: expected a function(state, ev, "
          .. "key)", 2)
  end
  self.watchers[#self.watchers + 1] = fn
  return self
end

--- Folds the log again from its start up to the position and compares:
--- true, report when every key's state has the same hash, else false,
--- report; report = { position, hash, expected, diverged = { keys } }
--- (expected: the fresh fold's hash). With repair = true a divergent
--- projection takes the fresh fold's states and writes a snapshot
--- (report.repaired = true). Store only.
---@param opts table|nil repair
---@return boolean ok, table report
function Proj:check(opts)
  check_self(self, "check")
  check_options(opts, CHECK_OPTIONS, "proj:check", 2)
  need_store(self, "check")
  if not self.by then self:get() end
  self.hashes = {}            -- hashed again: a state changed by hand too
  local fresh = refold(self, self.pos)
  if not self.by and fresh.states[""] == nil then
    fresh.states[""] = self.init()
  end
  local diverged, seen = {}, {}
  for tag in pairs(self.states) do seen[tag] = true end
  for tag in pairs(fresh.states) do seen[tag] = true end
  local tags = {}
  for tag in pairs(seen) do tags[#tags + 1] = tag end
  sort(tags)
  for _, tag in ipairs(tags) do
    local mine = self.states[tag] ~= nil and self:_hash_of(tag) or nil
    local theirs = fresh.states[tag] ~= nil and fresh:_hash_of(tag) or nil
    if mine ~= theirs then
      diverged[#diverged + 1] = self.key_of[tag] or fresh.key_of[tag] or tag
    end
  end
  local _, mine = self:hash()
  local report = {
    position = self.pos, hash = mine, diverged = diverged,
    expected = whole_hash(fresh, fresh.states, function(tag)
      return fresh:_hash_of(tag)
    end),
  }
  local ok = #diverged == 0
  if not ok and opts and opts.repair then
    self.states, self.key_of, self.hashes = fresh.states, fresh.key_of, {}
    self.dirty = {}
    for tag in pairs(self.states) do self.dirty[tag] = true end
    if self.is_writable then
      self.bus:_state_del(self.kind, nil)
      snapshot(self)
    end
    report.repaired, report.hash = true, report.expected
  end
  return ok, report
end

--- Figures: position, keys, snapshots written, events since the last,
--- and whether it started from a snapshot (loaded) or rebuilt the log
--- because the code version changed (rebuilt).
---@return table
function Proj:stats()
  check_self(self, "stats")
  local n = 0
  for _ in pairs(self.states) do n = n + 1 end
  return { position = self.pos, keys = n, snapshots = self.snapshots,
           since_snapshot = self.since, loaded = self.is_loaded or false,
           rebuilt = self.rebuilt, version = self.code_version }
end

--- Writes a snapshot now (a store that can be written; else false).
---@return boolean
function Proj:snapshot()
  check_self(self, "snapshot")
  if not self.is_writable or self.bus._core == false then return false end
  return snapshot(self)
end

--- Stops folding: unsubscribes and, with a store (and snapshot_every not
--- false), writes a snapshot of what changed since the last. Idempotent;
--- bus:close() closes them.
function Proj:close()
  check_self(self, "close")
  if self.closed then return end
  self.closed = true
  self.sub:unsubscribe()
  if self.is_writable and self.every and self.since > 0 and self.bus._core
  then
    snapshot(self)
  end
  local list = self.bus._projections
  if list and list[self.name] == self then list[self.name] = nil end
end

--- Closes every projection of bus (Bus:close, while the store is open).
-- @local
function M.close_all(bus)
  local list = bus._projections
  if not list then return end
  local names = {}
  for name in pairs(list) do names[#names + 1] = name end
  sort(names)
  for _, name in ipairs(names) do list[name]:close() end
end

--- State folded from the events of the log (README, "State from
--- events"): opts types (a pattern, default ">"), apply = function(state,
--- ev) (returns the new state, or nil having changed it in place), init =
--- function(key) (the initial state, default {}), by ("key", "stream" or
--- a function(ev) giving the key; without it one state), version (of the
--- code: a change rebuilds from the log), snapshot_every (events, default
--- 1000; false: never). Returns the projection (get, version, position,
--- hash, keys, at, on_change, check, stats, snapshot, close); nil, err,
--- code when the store fails reading the log.
---@tparam string name
---@tparam table opts
---@return the projection
-- @function Bus:projection
local function bus_projection_doc() end   -- (for the reference: the
local _ = bus_projection_doc              -- method is made by install)

--- Puts bus:projection on the bus class; check_bus is init.lua's.
-- @local
function M.install(Bus, check_bus)
  function Bus:projection(name, opts)
    check_bus(self, "projection")
    local p, err, code = M.new(self, name, opts, 2)
    return p, err, code        -- not a tail call: error levels count frames
  end
end

return M
