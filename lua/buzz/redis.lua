--- buzz.redis: the bus over Redis Streams, for more than one process
-- (README, "More than one process").
--
--   local r = bus:redis{ url = "redis://127.0.0.1:6379/0", stream = "buzz" }
--   r:publish(type, payload [, opts])  -- XADD: every process sees it
--   r:subscribe(pattern, fn, { group = "billing" })  -- one process of
--                                       -- the group handles each event
--   r:on(pattern, opts)(fn), r:flush(seconds), r:pending(), r:stats(),
--   r:close()
--
-- The connections are C (csrc/redis.c: hiredis formats commands and parses
-- replies, the socket is buzz's, on the bus's loop); this module keeps a
-- queue of reply callbacks per connection (Redis answers in order),
-- reconnects with backoff, and runs a watchdog over silent connections.
-- Entries read without a group (fanout) are published on the bus under
-- their own type, so every subscription, route and window sees them; a
-- group's entries go to that group's one subscription (redisgroup.lua).
-- The bus pumps the link as it pumps its servers (drive.lua, serve.lua).
-- @module buzz.redis
local core = require "buzz.core"
local options = require "buzz.options"
local util = require "buzz.util"
local errors = require "buzz.errors"

local type, tostring, tonumber, setmetatable, pairs, ipairs, pcall, error =
      type, tostring, tonumber, setmetatable, pairs, ipairs, pcall, error
local floor, min = math.floor, math.min
local unpack = table.unpack or unpack   -- luacheck: ignore 143
local fail, quote = util.fail, util.quote
local json_encode, json_decode = core.json_encode, core.json_decode
local PRIORITIES = options.PRIORITIES

local M = {}
local Conn = {}
Conn.__index = Conn
local Link = {}
Link.__index = Link
M.Link = Link

local LINK_OPTIONS = options.option_set("url", "stream", "consumer",
  "block", "min_idle", "claim_every", "max_deliveries", "count",
  "connect_timeout", "dlq", "start", "fanout", "maxlen")
local PUBLISH_OPTIONS = options.option_set("key", "priority",
  "correlation_id", "causation_id", "headers")

local BACKOFF_MIN, BACKOFF_MAX = 100, 5000   -- ms between reconnects
local COMMAND_LIMIT = 10000                  -- ms a command may take

-- ------------------------------------------------------------ the url

-- "redis://[[user]:password@]host[:port][/db]" -> host, port, db, user,
-- password.
local function parse_url(url, level)
  local rest = type(url) == "string" and url:match("^redis://(.*)$")
  if not rest then
    fail(level, 'bad url: expected "redis://host:port/db", got %s',
         quote(url))
  end
  local auth, hostport = rest:match("^(.*)@([^@]*)$")
  if not auth then hostport = rest end
  local hp, db = hostport:match("^([^/]*)/?(%d*)$")
  if not hp then fail(level, "bad url %s: the database is a number", url) end
  local host, port = hp:match("^%[(.+)%]:?(%d*)$")
  if not host then host, port = hp:match("^([^:]*):?(%d*)$") end
  if not host then fail(level, "bad url %s", url) end
  local user, password
  if auth then
    user, password = auth:match("^([^:]*):(.*)$")
    if not user then password = auth end
    if user == "" then user = nil end
  end
  return host ~= "" and host or "127.0.0.1", tonumber(port) or 6379,
         tonumber(db) or 0, user, password
end
M.parse_url = parse_url

-- ------------------------------------------------------ a connection

-- A connection that reconnects: cmd(cb, ...) sends a command and calls
-- cb(ok, value, is_lost) with its reply (ok false: an error reply, or
-- the connection was lost before it came, is_lost true); on_ready(conn)
-- runs at each (re)connect, before anything else is sent on it.
local function conn_new(link, name, on_ready, limit, owner)
  local self = setmetatable({ link = link, name = name, on_ready = on_ready,
    limit = limit, owner = owner, cbs = {}, head = 1, tail = 0,
    backoff = BACKOFF_MIN,
    is_down = false, is_closed = false }, Conn)
  self:open()
  return self
end
M.conn_new = conn_new

function Conn:open()
  local link = self.link
  local c = link.bus._core
  if self.is_closed or not c then return end
  local h, err = c:redis(link.host, link.port, link.connect_timeout)
  if not h then
    self:lost(err:gsub("^%u+: bus:redis: ", ""))
    return
  end
  self.h = h
  if link.password then
    if link.user then
      self:cmd(false, "AUTH", link.user, link.password)
    else
      self:cmd(false, "AUTH", link.password)
    end
  end
  if link.db ~= 0 then self:cmd(false, "SELECT", link.db) end
  if self.on_ready then self.on_ready(self) end
end

-- The text of an outage: "EUNAVAILABLE: redis 127.0.0.1:6379: why".
function Link:unavailable(why)
  return errors.text("EUNAVAILABLE", ("redis %s:%d: %s")
                     :format(self.host, self.port, why or "not connected"))
end

function Conn:cmd(cb, ...)
  local h = self.h
  if not h then return nil, self.link:unavailable(self.why), "EUNAVAILABLE" end
  local ok = h:send(...)
  if not ok then return nil, self.link:unavailable(self.why), "EUNAVAILABLE" end
  local t = self.tail + 1
  self.tail = t
  self.cbs[t] = cb or false
  if not self.since then self.since = self.link.bus:_now() end
  return true
end

-- Commands sent and not answered yet.
function Conn:waiting()
  return self.tail - self.head + 1
end

function Conn:pump()
  local h = self.h
  if not h then return 0 end
  local n, cbs = 0, self.cbs
  while true do
    local ok, v = h:next()
    if ok == nil then break end
    local i = self.head
    local cb = cbs[i]
    cbs[i] = nil
    self.head = i + 1
    self.since = self.head <= self.tail and self.link.bus:_now() or nil
    self.backoff, self.is_down = BACKOFF_MIN, false
    n = n + 1
    if cb then
      cb(ok, v, false)
    elseif not ok then
      self.link:report(("redis %s: %s"):format(self.name, v))
    end
    if self.h ~= h then return n end   -- a callback closed or reopened it
  end
  local st, why = h:state()
  if st == "ready" then
    self.is_down = false
  elseif st == "closed" then
    self:lost(why)
  end
  return n
end

-- The connection is gone: every callback waiting learns it, and a new
-- connection is tried after a backoff.
function Conn:lost(why)
  local h = self.h
  self.h, self.why, self.since = nil, why, nil
  if h then h:close() end
  local was_down = self.is_down
  self.is_down = true
  local cbs, i, j = self.cbs, self.head, self.tail
  self.cbs, self.head, self.tail = {}, 1, 0
  local err = self.link:unavailable(why)
  for k = i, j do
    local cb = cbs[k]
    if cb then cb(false, err, true) end
  end
  if self.is_closed then return end
  if not was_down then self.link:report(err) end
  if not self.timer then
    local d = self.backoff
    self.backoff = min(d * 2, BACKOFF_MAX)
    self.timer = self.link.bus:_after(d, function()
      self.timer = nil
      if not self.h then self:open() end
    end)
  end
end

function Conn:close()
  self.is_closed = true
  if self.timer then self.timer:cancel() end
  self.timer = nil
  if self.h then self:lost("closed") end
end

-- ------------------------------------------------------------- the link

function Link:report(err)
  self.bus:_report_error(err:match("^%u+: ") and err
                         or errors.text("EUNAVAILABLE", err))
end

local function check(self, method)
  if getmetatable(self) ~= Link then
    error(("use r:%s(...), not r.%s(...)"):format(method, method), 3)
  end
  if self.is_closed then
    error(("r:%s: this Redis link is closed"):format(method), 3)
  end
end
Link.check = check

-- The bus's publish of an event read from the stream: under its own type
-- (fanout), or the group's subject (prefix). Returns the local id, or nil
-- and the error (a full queue), or nil, the error and true (an entry that
-- is not a buzz event, or whose payload does not decode).
function Link:inject(id, fields, prefix)
  local env = {}
  for i = 1, #fields - 1, 2 do env[fields[i]] = fields[i + 1] end
  local etype = env.type
  if type(etype) ~= "string" or not core.check_subject(etype)
     or etype:sub(1, 1) == "$" then
    return nil, ("entry %s has no valid type"):format(id), true
  end
  local payload, err = json_decode(env.payload or "null")
  if err then
    return nil, ("entry %s: bad payload: %s"):format(id, err), true
  end
  local headers = env.headers and json_decode(env.headers)
  if type(headers) ~= "table" then headers = {} end
  headers["redis-id"] = id
  local key = env.key
  if key == nil and env.key_number then key = tonumber(env.key_number) end
  local bus = self.bus
  local c = bus._core
  if not c then return nil, "the bus is closed" end
  local ok, lid, e = pcall(c.publish, c, (prefix or "") .. etype, payload,
    PRIORITIES[env.priority] or 2, key, env.correlation_id,
    env.causation_id, headers, nil, nil, prefix ~= nil,
    tonumber(env.ts) or bus._clock.ms)
  if not ok or not lid then return nil, ok and e or lid end
  self.counts.received = self.counts.received + 1
  return lid
end

-- The fanout reader: from the stream's last entry when the link starts,
-- then on from the last entry read (a reconnect misses nothing the
-- stream still holds).
local fan_read
local function fan_start(conn)
  local link = conn.link
  if link.fan_last then return fan_read(conn) end
  conn:cmd(function(ok, v)
    if not ok then return end          -- lost: a reconnect starts again
    link.fan_last = type(v) == "table" and v[1] and v[1][1] or "0-0"
    fan_read(conn)
  end, "XREVRANGE", link.stream, "+", "-", "COUNT", 1)
end

-- Reads again after ms (a refused read; a full queue).
local function later(conn, ms, fn)
  conn.link.bus:_after(ms, function()
    if conn.h and not conn.is_closed then fn(conn) end
  end)
end
M.later = later

fan_read = function(conn)
  local link = conn.link
  conn:cmd(function(ok, v, is_lost)
    if is_lost then return end
    if not ok then
      link:report(("redis fanout: %s"):format(v))
      return later(conn, 1000, fan_read)
    end
    for _, st in ipairs(v or {}) do
      for _, e in ipairs(st[2]) do
        link.fan_last = e[1]
        local lid, err = link:inject(e[1], e[2] or {})
        if not lid then
          link.counts.dropped = link.counts.dropped + 1
          link:report(("redis fanout: %s"):format(err))
        end
      end
    end
    if link:is_full() then return later(conn, 50, fan_read) end
    fan_read(conn)
  end, "XREAD", "COUNT", link.count, "BLOCK", link.block, "STREAMS",
  link.stream, link.fan_last)
end

-- True while the bus has more than half its queue_limit pending: reads
-- wait rather than fill the queue.
function Link:is_full()
  local c = self.bus._core
  return c ~= nil and c:pending() * 2 > self.queue_limit
end

local function watchdog(self)
  self.dog = nil
  if self.is_closed then return end
  local now = self.bus:_now()
  for _, conn in ipairs(self.conns) do
    if conn.since and now - conn.since > conn.limit then
      conn:lost(("no reply in %d ms"):format(conn.limit))
    end
  end
  self.dog = self.bus:_after(1000, watchdog, self):unref()
end

--- Appends an event to the stream (XADD): every process's fanout and
--- every group sees it. Returns true once it is queued on the
--- connection (r:pending() counts those Redis has not confirmed), or
--- nil, "EUNAVAILABLE: ...", "EUNAVAILABLE" while Redis is down.
---@param etype string a concrete subject
---@param payload any JSON-representable
---@param opts table|nil key, priority, correlation_id, causation_id,
---  headers
function Link:publish(etype, payload, opts)
  check(self, "publish")
  util.check_type_arg(etype, "order.placed", 2)
  options.check_options(opts, PUBLISH_OPTIONS, "redis:publish", 2)
  opts = opts or {}
  options.check_key(opts.key, 2)
  if opts.priority ~= nil and not PRIORITIES[opts.priority] then
    fail(2, 'bad priority %s: expected "critical", "high", "normal" or '
         .. '"low"', quote(opts.priority))
  end
  local text, err = json_encode(payload)
  if not text then fail(2, "bad payload: %s", err) end
  local args = { "XADD", self.stream }
  if self.maxlen then
    args[3], args[4], args[5] = "MAXLEN", "~", self.maxlen
  end
  local n = #args
  local function add(k, v)
    args[n + 1], args[n + 2] = k, v
    n = n + 2
  end
  args[n + 1] = "*"
  n = n + 1
  add("type", etype)
  add("payload", text)
  add("ts", self.bus:_now())
  if type(opts.key) == "string" then add("key", opts.key)
  elseif opts.key ~= nil then add("key_number", opts.key) end
  if opts.priority then add("priority", opts.priority) end
  for _, k in ipairs { "correlation_id", "causation_id" } do
    local v = opts[k]
    if v ~= nil then
      if type(v) ~= "string" and type(v) ~= "number" then
        fail(2, "bad %s: expected a string, got %s", k, type(v))
      end
      add(k, tostring(v))
    end
  end
  if opts.headers ~= nil then
    local h, e = json_encode(opts.headers)
    if type(opts.headers) ~= "table" or not h then
      fail(2, "bad headers: expected a table of strings%s",
           e and (": " .. e) or "")
    end
    add("headers", h)
  end
  local cmdc = self.cmdc
  if cmdc.is_down then
    return nil, self:unavailable(cmdc.why), "EUNAVAILABLE"
  end
  local counts = self.counts
  local ok, e, code = cmdc:cmd(function(is_ok, v)
    counts.sending = counts.sending - 1
    if is_ok then
      counts.published = counts.published + 1
    else
      counts.failed = counts.failed + 1
      self:report(("redis publish of %s: %s"):format(etype, v))
    end
  end, unpack(args, 1, n))
  if not ok then return nil, e, code end
  counts.sending = counts.sending + 1
  return true
end

--- Publishes Redis has not confirmed yet.
function Link:pending()
  return self.counts.sending
end

--- Runs the bus (bus:run(), so not from a handler nor on a bus a host's
--- loop drives) until Redis has confirmed every publish, or seconds
--- (10) have passed: true, or nil, "ETIMEOUT: ...", "ETIMEOUT".
---@param seconds number|nil
function Link:flush(seconds)
  check(self, "flush")
  options.check_positive(seconds, "seconds", false, 2)
  local bus, counts = self.bus, self.counts
  local deadline = bus:_now() + floor((seconds or 10) * 1000)
  local function poll()
    if counts.sending == 0 or bus:_now() >= deadline then
      return bus:stop()
    end
    bus:_after(5, poll)
  end
  if counts.sending > 0 then
    bus:_after(0, poll)
    bus:run()
  end
  if counts.sending == 0 then return true end
  return nil, errors.text("ETIMEOUT", ("redis: %d publishes not confirmed "
                          .. "in %g s"):format(counts.sending, seconds or 10)),
         "ETIMEOUT"
end


--- Subscribes handler: with opts.group, to that consumer group (one
--- process of the group handles each event, acked once it returns);
--- without, as bus:subscribe (the fanout brings every event).
function Link:subscribe(pattern, handler, opts)
  check(self, "subscribe")
  if opts == nil or type(opts) ~= "table" or opts.group == nil then
    return self.bus:_subscribe(pattern, handler, opts, 2)
  end
  return require("buzz.redisgroup").subscribe(self, pattern, handler, opts,
                                              2)
end

--- The decorator form of subscribe.
function Link:on(pattern, opts)
  check(self, "on")
  return function(handler)
    return self:subscribe(pattern, handler, opts)
  end
end

--- Counts: published, failed (publishes Redis refused), received,
--- acked, dead (to the dead-letter stream), lost (entries deleted while
--- pending), claimed (taken over after min_idle), dropped (fanout
--- entries the bus refused), skipped (a group's entries its pattern does
--- not match), pending (publishes not confirmed yet); per
--- group { reading (its own pending entries are done), inflight }; and
--- the state of each connection.
function Link:stats()
  local s = {}
  for k, v in pairs(self.counts) do s[k] = v end
  s.pending = s.sending
  s.sending = nil
  s.groups = {}
  for name, g in pairs(self.groups) do
    s.groups[name] = { reading = g.from == ">", inflight = g.ninflight }
  end
  s.connections = {}
  for _, conn in ipairs(self.conns) do
    s.connections[conn.name] = conn.h and (conn.is_down and "connecting"
                                           or conn.h:state()) or "down"
  end
  return s
end

-- Pumps every connection (serve.lua's pump, on each turn of the bus).
function Link:pump()
  local n = 0
  local conns = self.conns
  for i = #conns, 1, -1 do
    local conn = conns[i]
    if conn then n = n + conn:pump() end
  end
  return n
end

--- Closes the connections and the group subscriptions; idempotent
--- (bus:close() closes it too).
function Link:close()
  if self.is_closed then return end
  self.is_closed = true
  if self.dog then self.dog:cancel() end
  for _, g in pairs(self.groups) do g:close() end
  for _, conn in ipairs(self.conns) do conn:close() end
  local list = self.bus._servers or {}
  for i = #list, 1, -1 do
    if list[i] == self then table.remove(list, i) end
  end
end
Link.__close = Link.close

local function check_count(opts, k, dflt, level)
  local v = opts[k]
  if v == nil then return dflt end
  options.check_positive(v, k, true, level + 1)
  return v
end

local function check_seconds(opts, k, dflt, level)
  local v = opts[k]
  if v == nil then return dflt end
  options.check_positive(v, k, false, level + 1)
  return floor(v * 1000)
end

--- bus:redis(opts) -> a link.
-- @local
function M.new(bus, opts, level)
  options.check_options(opts, LINK_OPTIONS, "bus:redis", level + 1)
  opts = opts or {}
  local host, port, db, user, password =
    parse_url(opts.url or "redis://127.0.0.1:6379/0", level + 1)
  local stream = opts.stream or "buzz"
  if type(stream) ~= "string" or stream == "" then
    fail(level, "bad stream: expected a non-empty string, got %s",
         quote(stream))
  end
  local consumer = opts.consumer
  if consumer == nil then
    consumer = ("%s-%d-%d"):format(os.getenv("HOSTNAME") or "buzz",
                                   core.pid(), floor(bus:_now() % 1e6))
  elseif type(consumer) ~= "string" or consumer == "" then
    fail(level, "bad consumer: expected a non-empty string, got %s",
         quote(consumer))
  end
  if opts.start ~= nil and opts.start ~= "new" and opts.start ~= "all" then
    fail(level, 'bad start: expected "new" or "all", got %s',
         quote(opts.start))
  end
  local block = check_seconds(opts, "block", 2000, level)
  if block > 5000 then fail(level, "bad block: at most 5 seconds") end
  local min_idle = check_seconds(opts, "min_idle", 30000, level)
  local self = setmetatable({
    bus = bus, host = host, port = port, db = db, user = user,
    password = password, stream = stream, consumer = consumer,
    dlq = opts.dlq or (stream .. ":dlq"), block = block,
    min_idle = min_idle,
    claim_every = check_seconds(opts, "claim_every",
                                floor(min_idle / 2), level),
    max_deliveries = check_count(opts, "max_deliveries", 5, level),
    count = check_count(opts, "count", 100, level),
    maxlen = opts.maxlen and check_count(opts, "maxlen", nil, level),
    connect_timeout = check_seconds(opts, "connect_timeout", 2000, level),
    start_id = opts.start == "all" and "0" or "$",
    queue_limit = bus._core:stats().queue_limit,
    groups = {}, conns = {},
    counts = { published = 0, failed = 0, received = 0, acked = 0,
               dead = 0, lost = 0, claimed = 0, dropped = 0, skipped = 0,
               sending = 0 },
  }, Link)
  self.cmdc = conn_new(self, "commands", nil, COMMAND_LIMIT)
  self.conns[1] = self.cmdc
  if opts.fanout ~= false then
    self.fanc = conn_new(self, "fanout", fan_start, block + 5000)
    self.conns[2] = self.fanc
  end
  self.dog = bus:_after(1000, watchdog, self):unref()
  local list = bus._servers or {}
  bus._servers = list
  list[#list + 1] = self
  return self
end

--- Connects the bus to Redis Streams (README, "More than one process").
--- Options: url ("redis://127.0.0.1:6379/0"), stream ("buzz"), consumer
--- (this process's name in its groups), fanout (true), start ("new" |
--- "all", where a new group starts), block (2 s), min_idle (30 s),
--- claim_every (min_idle / 2), max_deliveries (5), count (100), dlq
--- (stream .. ":dlq"), maxlen, connect_timeout (2 s).
---@tparam table opts
---@return a link (publish, subscribe, on, flush, pending, stats, close)
-- @function Bus:redis
local function bus_redis_doc() end   -- (for the reference: the method
local _ = bus_redis_doc               -- is made by install, below)

--- Puts redis on the bus class; check_bus is init.lua's.
-- @local
function M.install(Bus, check_bus)
  function Bus:redis(opts)
    check_bus(self, "redis")
    local link = M.new(self, opts, 2)
    return link               -- not a tail call: error levels count frames
  end
end

return M
