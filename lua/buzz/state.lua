--- buzz.state: bus:state(name, opts), a keyed document state written by
-- more than one writer, whose concurrent writes are resolved per field
-- (README, "State from events").
--
-- Each write is an event of type "state.NAME.set": { key, fields = { f =
-- v, ... }, seen = { f = { stamp, ... } }, stamp, node, priority }. Its
-- stamp is the writer's hybrid logical clock (milliseconds, a counter)
-- and node id, as fixed-width text, so stamps sort as they compare; seen
-- holds, per field written, the stamps of the values the writer saw.
-- A write supersedes the values it saw; a field's values that nothing
-- supersedes are its frontier: one value, or several written
-- concurrently, which the strategy resolves:
--   "timestamp"  the latest stamp wins (then the node id)
--   "priority"   the highest writer priority wins (then the stamp)
--   fn           fn(field, candidates, key) returns the value
--   "manual"     the latest stamp stands in, the conflict is kept (and
--                announced on $SYS.conflict) until a write supersedes it:
--                st:resolve(key, field, value)
-- The frontier is a function of the set of writes, not of their order,
-- so every replica that has the same writes has the same document and
-- the same version hash. The fold is a projection (lua/buzz/
-- projection.lua): log order, snapshots and restarts come with it.
-- @module buzz.state
local core = require "buzz.core"
local options = require "buzz.options"
local projection = require "buzz.projection"

local type, error, pairs, ipairs, tostring, tonumber, next, setmetatable,
      getmetatable = type, error, pairs, ipairs, tostring, tonumber, next,
                     setmetatable, getmetatable
local format, sort, concat = string.format, table.sort, table.concat
local check_options, is_callable, is_integer =
      options.check_options, options.is_callable, options.is_integer

local M = {}
local State = {}
State.__index = State

local OPTIONS = options.option_set("resolve", "node", "priority",
                                   "snapshot_every")
local STRATEGIES = { timestamp = true, priority = true, manual = true }

local function check_self(self, method)
  if getmetatable(self) ~= State then
    error(("use st:%s(...), not st.%s(...)"):format(method, method), 3)
  end
end

local function check_key(key, method)
  if type(key) ~= "string" and not is_integer(key) then
    error(("bad key to st:%s: expected a string or an integer, got %s")
          :format(method, type(key)), 3)
  end
end

-- A stamp as text that sorts as it compares: 15 digits of milliseconds,
-- 6 of counter, the node.
local function stamp_text(ms, n, node)
  return format("%015d.%06d.%s", ms, n, node)
end

-- ------------------------------------------------------------ the fold

-- Orders candidates: by stamp, or by priority then stamp.
local function by_stamp(a, b) return a.stamp < b.stamp end
local function by_priority(a, b)
  if a.priority ~= b.priority then return a.priority < b.priority end
  return a.stamp < b.stamp
end

-- Folds one write into a key's state: { fields = { f = { frontier =
-- { candidate, ... }, gone = { stamp = true } } }, applied = { stamp =
-- true } }. Order-independent: a write that something superseded (gone)
-- never enters; a write removes what it saw from the frontier.
local function apply(s, ev)
  local p = ev.payload
  if type(p) ~= "table" or type(p.stamp) ~= "string"
     or type(p.fields) ~= "table" then
    return                             -- not a write of this state
  end
  if s.applied[p.stamp] then return end
  s.applied[p.stamp] = true
  local seen = type(p.seen) == "table" and p.seen or {}
  for f, v in pairs(p.fields) do
    local fs = s.fields[f]
    if not fs then
      fs = { frontier = {}, gone = {} }
      s.fields[f] = fs
    end
    local saw = type(seen[f]) == "table" and seen[f] or {}
    for _, st in ipairs(saw) do fs.gone[st] = true end
    local keep = {}
    for _, c in ipairs(fs.frontier) do
      if not fs.gone[c.stamp] then keep[#keep + 1] = c end
    end
    if not fs.gone[p.stamp] then
      keep[#keep + 1] = { value = v, stamp = p.stamp,
                          node = tostring(p.node),
                          priority = tonumber(p.priority) or 0 }
    end
    sort(keep, by_stamp)
    fs.frontier = keep
  end
end

-- ------------------------------------------------------------ the state

--- Makes a state (bus:state). Raises on misuse.
-- @local
function M.new(bus, name, opts, level)
  if type(name) ~= "string" or not name:match("^[%w_%-]+$") then
    error("bad name to state: expected letters, digits, _ or - (it names "
          .. "the events state.NAME.set)", level + 1)
  end
  check_options(opts, OPTIONS, "state", level + 1)
  opts = opts or {}
  local resolve = opts.resolve == nil and "timestamp" or opts.resolve
  if not STRATEGIES[resolve] and not is_callable(resolve) then
    error('bad resolve to state: expected "timestamp", "priority", '
          .. '"manual" or a function(field, candidates, key)', level + 1)
  end
  local node = opts.node
  if node == nil then
    node = core.sha256(tostring({}) .. core.hrtime()):sub(1, 12)
  elseif type(node) ~= "string" or node == "" or node:find("%s") then
    error("bad node to state: expected a non-empty string without spaces "
          .. "(this writer's id)", level + 1)
  end
  local prio = opts.priority or 0
  if not is_integer(prio) then
    error("bad priority to state: expected an integer (this writer's "
          .. "priority)", level + 1)
  end
  local self = setmetatable({
    bus = bus, name = name, etype = "state." .. name .. ".set",
    resolve_with = resolve, node = node, priority = prio,
    hlc_ms = 0, hlc_n = 0, conflicts_seen = {},
  }, State)
  local p, err, code = projection.new(bus, "state:" .. name, {
    types = self.etype, by = function(ev)
      local pl = ev.payload
      return type(pl) == "table" and pl.key or nil
    end,
    init = function() return { fields = {}, applied = {} } end,
    apply = function(s, ev)
      self:_observe(ev.payload)
      apply(s, ev)
    end,
    snapshot_every = opts.snapshot_every,
  }, level + 1)
  if not p then return nil, err, code end
  self.proj = p
  p:on_change(function(s, ev, key) self:_announce_conflicts(key, s, ev) end)
  return self
end

-- Keeps the clock ahead of every stamp seen (the hybrid logical clock's
-- receive rule).
function State:_observe(p)
  local st = type(p) == "table" and p.stamp
  if type(st) ~= "string" then return end
  local ms, n = st:match("^(%d+)%.(%d+)%.")
  ms, n = tonumber(ms), tonumber(n)
  if not ms then return end
  if ms > self.hlc_ms or (ms == self.hlc_ms and n > self.hlc_n) then
    self.hlc_ms, self.hlc_n = ms, n
  end
end

-- The next stamp of this writer (the clock's send rule).
function State:_tick()
  local now = self.bus:_now()
  if now > self.hlc_ms then
    self.hlc_ms, self.hlc_n = now, 0
  else
    self.hlc_n = self.hlc_n + 1
  end
  return stamp_text(self.hlc_ms, self.hlc_n, self.node)
end

-- The value of a field's frontier under the strategy, and whether it is
-- an open conflict (manual).
function State:_value(fs, field, key)
  local front = fs.frontier
  if #front == 1 then return front[1].value, false end
  if #front == 0 then return nil, false end
  local r = self.resolve_with
  if r == "priority" then
    local c = {}
    for i, v in ipairs(front) do c[i] = v end
    sort(c, by_priority)
    return c[#c].value, false
  elseif r == "timestamp" or r == "manual" then
    return front[#front].value, r == "manual"
  end
  local cands = {}
  for i, v in ipairs(front) do
    cands[i] = { value = v.value, node = v.node, priority = v.priority,
                 stamp = v.stamp }
  end
  return r(field, cands, key), false
end

function State:_announce_conflicts(key, s, ev)
  if self.resolve_with ~= "manual" then return end
  local fields = ev.payload and ev.payload.fields
  if type(fields) ~= "table" then return end
  for f in pairs(fields) do
    local fs = s.fields[f]
    if fs and #fs.frontier > 1 then
      local values = {}
      for i, c in ipairs(fs.frontier) do
        values[i] = { value = c.value, node = c.node, stamp = c.stamp }
      end
      self.bus:_announce("$SYS.conflict", { state = self.name, key = key,
                                            field = f, values = values })
    end
  end
end

--- Writes fields of a key's document (a partial update: other fields
--- stay): one event, stamped with this writer's clock, that supersedes
--- the values of those fields this replica has now, delivered at once
--- (publish_sync: get sees it on return). Returns the event's id, or
--- nil, err, code as publish does.
---@param key string|integer
---@param fields table field = value (JSON values)
---@return integer|nil id, string|nil err, string|nil code
function State:set(key, fields)
  check_self(self, "set")
  check_key(key, "set")
  if type(fields) ~= "table" or next(fields) == nil then
    error("bad fields to st:set: expected a table of field = value", 2)
  end
  local s = self.proj:get(key)
  local seen = {}
  for f in pairs(fields) do
    if type(f) ~= "string" then
      error("bad fields to st:set: field names are strings", 2)
    end
    local list = {}
    local fs = s and s.fields[f]
    if fs then
      for i, c in ipairs(fs.frontier) do list[i] = c.stamp end
    end
    seen[f] = list
  end
  local id, err, code = self.bus:publish_sync(self.etype, {
    key = key, fields = fields, seen = seen, stamp = self:_tick(),
    node = self.node, priority = self.priority }, { key = key })
  return id, err, code
end

--- Resolves a field by hand: writes value over every value it has now.
---@param key string|integer
---@param field string
---@param value any
---@return integer|nil id, string|nil err, string|nil code
function State:resolve(key, field, value)
  check_self(self, "resolve")
  check_key(key, "resolve")
  if type(field) ~= "string" then
    error("bad field to st:resolve: expected a string", 2)
  end
  local id, err, code = self:set(key, { [field] = value })
  return id, err, code
end

--- The document of key as resolved (a fresh table), or nil if nothing
--- was written to it.
---@param key string|integer
---@return table|nil
function State:get(key)
  check_self(self, "get")
  check_key(key, "get")
  local s = self.proj:get(key)
  if not s then return nil end
  local doc = {}
  for f, fs in pairs(s.fields) do doc[f] = (self:_value(fs, f, key)) end
  return doc
end

--- The version of key's document: 8 hex digits of the SHA-256 of its
--- canonical JSON; nil if nothing was written to it.
---@param key string|integer
---@return string|nil
function State:version(key)
  check_self(self, "version")
  check_key(key, "version")
  local doc = self:get(key)
  return doc and projection.hash(doc) or nil
end

--- The open conflicts (resolve = "manual"), of key or of every key: a
--- list of { key, field, values = { { value, node, stamp }, ... } }, by
--- key then field.
---@param key string|integer|nil
---@return table
function State:conflicts(key)
  check_self(self, "conflicts")
  local keys = key ~= nil and { key } or self.proj:keys()
  local out = {}
  if self.resolve_with ~= "manual" then return out end
  for _, k in ipairs(keys) do
    local s = self.proj:get(k)
    local names = {}
    for f, fs in pairs(s and s.fields or {}) do
      if #fs.frontier > 1 then names[#names + 1] = f end
    end
    sort(names)
    for _, f in ipairs(names) do
      local values = {}
      for i, c in ipairs(s.fields[f].frontier) do
        values[i] = { value = c.value, node = c.node, stamp = c.stamp }
      end
      out[#out + 1] = { key = k, field = f, values = values }
    end
  end
  return out
end

--- The keys written, and the position and hash of the whole state (for
--- replicas to compare: equal writes, equal hash).
---@return integer position, string hash
function State:hash()
  check_self(self, "hash")
  local parts = {}
  for _, k in ipairs(self.proj:keys()) do
    parts[#parts + 1] = tostring(k) .. "\t" .. self:version(k)
  end
  return self.proj:position(), core.sha256(concat(parts, "\n")):sub(1, 8)
end

--- The keys with a document (integers first, then strings).
---@return table
function State:keys()
  check_self(self, "keys")
  return self.proj:keys()
end

--- Copies into this bus's log the writes of this state that the store at
--- path holds and this one has not (another replica's, made offline):
--- they fold as if written here. Returns how many were copied, or nil,
--- err, code when the other store cannot be read.
---@param path string
---@return integer|nil copied, string|nil err, string|nil code
function State:merge(path)
  check_self(self, "merge")
  if type(path) ~= "string" then
    error("bad path to st:merge: expected the path of a store", 2)
  end
  local other, err, code = require("buzz").new{ store = path,
                                                readonly = true }
  if not other then return nil, err, code end
  local applied = {}
  for _, k in ipairs(self.proj:keys()) do
    for st in pairs(self.proj:get(k).applied) do applied[st] = true end
  end
  local n = 0
  local iter, ierr, icode = other:events{ types = self.etype }
  if not iter then
    other:close()
    return nil, ierr, icode
  end
  for ev in iter do
    local p = ev.payload
    if type(p) == "table" and type(p.stamp) == "string"
       and not applied[p.stamp] then
      applied[p.stamp] = true
      local id, perr, pcode = self.bus:publish(self.etype, p,
                                               { key = p.key })
      if not id then
        other:close()
        return nil, perr, pcode
      end
      n = n + 1
    end
  end
  other:close()
  return n
end

--- This writer's node id.
---@return string
function State:node_id()
  check_self(self, "node_id")
  return self.node
end

--- Stops folding (the projection closes; bus:close() does it too).
function State:close()
  check_self(self, "close")
  self.proj:close()
end

--- A keyed document state written by more than one writer (README,
--- "State from events"): opts resolve ("timestamp", the default,
--- "priority", "manual" or a function(field, candidates, key)), node
--- (this writer's id; default a random one), priority (this writer's,
--- for "priority"), snapshot_every. Returns the state (set, get, version,
--- conflicts, resolve, hash, keys, merge, node_id, close).
---@tparam string name
---@tparam[opt] table opts
---@return the state
-- @function Bus:state
local function bus_state_doc() end    -- (for the reference: the method
local _ = bus_state_doc               -- is made by install)

--- Puts bus:state on the bus class; check_bus is init.lua's.
-- @local
function M.install(Bus, check_bus)
  function Bus:state(name, opts)
    check_bus(self, "state")
    local s, err, code = M.new(self, name, opts, 2)
    return s, err, code        -- not a tail call: error levels count frames
  end
end

return M
