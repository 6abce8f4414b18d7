--- buzz.redis: the bus over Redis Streams, for more than one process
-- (README, "More than one process").
--
--   local r = bus:redis{ url = "redis://127.0.0.1:6379/0", stream = "buzz" }
--   r:publish(type, payload [, opts])  -- XADD: every process sees it
--   r:subscribe(pattern, fn, { group = "billing" })  -- one process of
--                                       -- the group handles each event
--   r:on(pattern, opts)(fn), r:flush(seconds), r:pending(), r:stats(),
--   r:leader(name, fn), r:every(seconds, type, fn), r:members() (in
--   redislead.lua), r:close()
--
-- The connections are C (csrc/redis.c writes commands in RESP, hiredis's
-- reader parses replies, the socket is buzz's, on the bus's loop);
-- redisconn.lua keeps a queue of reply callbacks per connection (Redis
-- answers in order) and reconnects with backoff; this module runs a
-- watchdog over silent ones.
-- Entries read without a group (fanout) are published on the bus under
-- their own type, so every subscription, route and window sees them; a
-- group's entries go to that group's one subscription (redisgroup.lua).
-- The bus pumps the link as it pumps its servers (drive.lua, serve.lua).
-- @module buzz.redis
local core = require "buzz.core"
local options = require "buzz.options"
local util = require "buzz.util"
local errors = require "buzz.errors"
local redisconn = require "buzz.redisconn"
local redisout = require "buzz.redisout"
local redispart = require "buzz.redispart"
local redistrim = require "buzz.redistrim"
local redisngx = require "buzz.redisngx"
local in_handler = require("buzz.task").in_handler

local type, tostring, tonumber, setmetatable, pairs, ipairs, pcall, error =
      type, tostring, tonumber, setmetatable, pairs, ipairs, pcall, error
local floor = math.floor
local unpack = table.unpack or unpack   -- luacheck: ignore 143
local fail, quote = util.fail, util.quote
local json_encode, json_decode = core.json_encode, core.json_decode
local PRIORITIES = options.PRIORITIES

local M = {}
local Link = {}
Link.__index = Link

local LINK_OPTIONS = options.option_set("url", "stream", "consumer",
  "block", "min_idle", "claim_every", "max_deliveries", "count",
  "connect_timeout", "dlq", "start", "fanout", "retain", "outbox",
  "partitions", "lease")
local PUBLISH_OPTIONS = options.option_set("key", "priority",
  "correlation_id", "causation_id", "headers")

local COMMAND_LIMIT = 10000                  -- ms a command may take
local MAX_PAYLOAD = 1048576                  -- the bus's default

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

-- ------------------------------------------------------------- the link

-- The text of an outage: "EUNAVAILABLE: redis 127.0.0.1:6379: why".
function Link:unavailable(why)
  return errors.text("EUNAVAILABLE", ("redis %s:%d: %s")
                     :format(self.host, self.port, why or "not connected"))
end


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

-- A new connection: the C one on the bus's loop, or under OpenResty (a
-- bus driven by nginx, whose loop is not libuv's) a cosocket's.
function Link:dial(c)
  if self.is_ngx then
    return redisngx.connect(self.bus, self.host, self.port,
                            self.connect_timeout, self.block + 5000)
  end
  return c:redis(self.host, self.port, self.connect_timeout)
end

-- The bus's publish of an event read from the stream: under its own type
-- (fanout), or the group's subject (prefix). Returns the local id, or nil
-- and the error (a full queue), or nil, the error and true (an entry that
-- is not a buzz event, or whose payload does not decode). With dedup (a
-- key: the inbox), an entry the bus already has returns its first id and
-- "duplicate".
function Link:inject(id, fields, prefix, dedup)
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
    env.causation_id, headers, dedup, nil, prefix ~= nil,
    tonumber(env.ts) or bus._clock.ms)
  if not ok or not lid then return nil, ok and e or lid end
  if e == "duplicate" then return lid, e end
  self.counts.received = self.counts.received + 1
  return lid
end

-- The fanout reader: from the stream's last entry when the link starts,
-- then on from the last entry read (a reconnect misses nothing the
-- stream still holds).
local fan_read
local function fan_start(conn)
  local link = conn.link
  local streams, last = link.part_streams, link.fan_last
  local missing = 0
  for _, st in ipairs(streams) do
    if not last[st] then
      missing = missing + 1
      conn:cmd(function(ok, v)
        if not ok then return end      -- lost: a reconnect starts again
        last[st] = type(v) == "table" and v[1] and v[1][1] or "0-0"
        missing = missing - 1
        if missing == 0 then fan_read(conn) end
      end, "XREVRANGE", st, "+", "-", "COUNT", 1)
    end
  end
  if missing == 0 then fan_read(conn) end
end

fan_read = function(conn)
  local link = conn.link
  local streams, last = link.part_streams, link.fan_last
  local args, n = { "XREAD", "COUNT", link.count, "BLOCK", link.block,
                    "STREAMS" }, #streams
  for i, st in ipairs(streams) do
    args[6 + i], args[6 + n + i] = st, last[st]
  end
  conn:cmd(function(ok, v, is_lost)
    if is_lost then return end
    if not ok then
      link:report(("redis fanout: %s"):format(v))
      return redisconn.later(conn, 1000, fan_read)
    end
    for _, st in ipairs(v or {}) do
      for _, e in ipairs(st[2]) do
        last[st[1]] = e[1]
        local lid, err = link:inject(e[1], e[2] or {})
        if not lid then
          link.counts.dropped = link.counts.dropped + 1
          link:report(("redis fanout: %s"):format(err))
        end
      end
    end
    if link:is_full() then return redisconn.later(conn, 50, fan_read) end
    fan_read(conn)
  end, unpack(args, 1, 6 + 2 * n))
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

-- The fields of publish's options after args[n]; returns the new n.
local function envelope(opts, args, n, level)
  local key, prio = opts.key, opts.priority
  options.check_key(key, level + 1)
  if key ~= nil then
    args[n + 1] = type(key) == "string" and "key" or "key_number"
    args[n + 2] = key
    n = n + 2
  end
  if prio ~= nil then
    if not PRIORITIES[prio] then
      fail(level, 'bad priority %s: expected "critical", "high", '
           .. '"normal" or "low"', quote(prio))
    end
    args[n + 1], args[n + 2] = "priority", prio
    n = n + 2
  end
  for _, k in ipairs { "correlation_id", "causation_id" } do
    local v = opts[k]
    if v ~= nil then
      if type(v) ~= "string" and type(v) ~= "number" then
        fail(level, "bad %s: expected a string, got %s", k, type(v))
      end
      args[n + 1], args[n + 2] = k, tostring(v)
      n = n + 2
    end
  end
  if opts.headers ~= nil then
    local h, e = json_encode(opts.headers)
    if type(opts.headers) ~= "table" or not h then
      fail(level, "bad headers: expected a table of strings%s",
           e and (": " .. e) or "")
    end
    args[n + 1], args[n + 2] = "headers", h
    n = n + 2
  end
  return n
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
  local types = self.types                    -- (checked before: memo)
  if not types[etype] then
    util.check_type_arg(etype, "order.placed", 2)
    if types.n >= 4096 then self.types = { n = 0 } types = self.types end
    types[etype], types.n = true, types.n + 1
  end
  local bus = self.bus
  local text, err = json_encode(payload, bus._max_payload or MAX_PAYLOAD)
  if not text then fail(2, "bad payload: %s", err) end
  local args, n = self.args, self.nhead       -- "XADD", stream
  if self.partitions then
    args[2] = redispart.stream_of(self, opts and opts.key)
  end
  args[n + 1], args[n + 2], args[n + 3] = "*", "type", etype
  args[n + 4], args[n + 5], args[n + 6] = "payload", text, "ts"
  args[n + 7] = self.bus:_now()
  n = n + 7
  if opts ~= nil then
    options.check_options(opts, PUBLISH_OPTIONS, "redis:publish", 2)
    n = envelope(opts, args, n, 2)
  end
  if (opts == nil or opts.correlation_id == nil) and in_handler(bus._task)
  then
    local _, corr = bus._core:current()       -- inside a handler
    if corr ~= nil then
      args[n + 1], args[n + 2] = "correlation_id", tostring(corr)
      n = n + 2
    end
  end
  if self.outbox_sub and in_handler(bus._task) then
    local ok, e, code = redisout.put(self, args, self.nhead + 2, n)
    return ok, e, code
  end
  local cmdc = self.cmdc
  if cmdc.is_down then
    return nil, self:unavailable(cmdc.why), "EUNAVAILABLE"
  end
  local ok, e, code = cmdc:cmdv(self.on_added, etype, args, n)
  if not ok then return nil, e, code end
  local counts = self.counts
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

--- Runs fn(l) on the one process that holds the lease name, each time
--- it becomes the leader (README, "More than one process"); opts: lease
--- (10 s), on_lost(l). Returns l: l:is_leader(), l:close().
function Link:leader(name, fn, opts)
  check(self, "leader")
  return require("buzz.redislead").leader(self, name, fn, opts, 2)
end

--- Publishes type to the stream every seconds, from one process only
--- (the leader of "every:" .. type); returns its leader handle.
function Link:every(seconds, etype, payload_fn)
  check(self, "every")
  return require("buzz.redislead").every(self, seconds, etype, payload_fn,
                                         2)
end

--- The consumers whose links were alive in the last 5 s, as last read.
function Link:members()
  check(self, "members")
  return require("buzz.redislead").members(self)
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
--- pending), claimed (taken over after min_idle), duplicates (entries
--- a group's inbox already held), trimmed, dropped (fanout
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
    local reading = g.from == ">"
    if g.owned then                    -- partitions: every owned one
      reading = true
      for _, child in pairs(g.owned) do
        reading = reading and (child.is_closed or child.from == ">")
      end
    end
    s.groups[name] = { reading = reading, inflight = g.ninflight,
                       partitions = g.owned and redispart.owned(g) }
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
  require("buzz.redislead").close(self)
  self.is_closed = true
  if self.dog then self.dog:cancel() end
  if self.trimmer then self.trimmer:cancel() end
  if self.outbox_sub then self.outbox_sub:unsubscribe() end
  for _, g in pairs(self.groups) do g:close() end
  for _, conn in ipairs(self.conns) do conn:close() end
  local list = self.bus._servers or {}
  for i = #list, 1, -1 do
    if list[i] == self then table.remove(list, i) end
  end
end
Link.__close = Link.close

-- Links made on each bus so far: a link's number on its bus, in its
-- groups' local subjects ($G.GROUP.N.type), so that two links of one bus
-- in groups of one name do not share their events. Stable across
-- restarts when a program makes its links in the same order (the inbox's
-- durable consumer reads the subjects it stored).
local serials = setmetatable({}, { __mode = "k" })
local function next_serial(bus)
  local n = (serials[bus] or 0) + 1
  serials[bus] = n
  return n
end

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
  if opts.outbox ~= nil and type(opts.outbox) ~= "boolean" then
    fail(level, "bad outbox: expected a boolean, got %s", quote(opts.outbox))
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
    retain = opts.retain and check_seconds(opts, "retain", nil, level),
    connect_timeout = check_seconds(opts, "connect_timeout", 2000, level),
    start_id = opts.start == "all" and "0" or "$",
    queue_limit = bus._core:stats().queue_limit,
    serial = next_serial(bus),
    is_ngx = type(ngx) == "table" and type(ngx.socket) == "table"
             and bus._driver ~= nil,    -- (ngx: OpenResty's global)
    partitions = opts.partitions and check_count(opts, "partitions", nil,
                                                 level),
    lease = check_seconds(opts, "lease", 10000, level), next_part = 0,
    fan_last = {},
    groups = {}, conns = {}, leaders = {}, types = { n = 0 },
    counts = { published = 0, failed = 0, received = 0, acked = 0,
               dead = 0, lost = 0, claimed = 0, dropped = 0, skipped = 0,
               trimmed = 0, duplicates = 0, outboxed = 0, resent = 0,
               sending = 0 },
  }, Link)
  self.part_streams = { stream }
  if self.partitions then
    for i = 0, self.partitions - 1 do
      self.part_streams[i + 1] = ("%s:%d"):format(stream, i)
    end
  end
  self.args = { "XADD", stream }    -- publish's, reused: send copies them
  self.nhead = 2
  local counts = self.counts
  function self.on_added(is_ok, v, _, etype)     -- an XADD's reply
    counts.sending = counts.sending - 1
    if is_ok then
      counts.published = counts.published + 1
    else
      counts.failed = counts.failed + 1
      self:report(("redis publish of %s: %s"):format(etype, v))
    end
  end
  self.cmdc = redisconn.new(self, "commands", nil, COMMAND_LIMIT)
  self.conns[1] = self.cmdc
  if opts.fanout ~= false then
    self.fanc = redisconn.new(self, "fanout", fan_start, block + 5000)
    self.conns[2] = self.fanc
  end
  self.dog = bus:_after(1000, watchdog, self):unref()
  if self.retain then
    self.trimmer = bus:_after(0, redistrim.trim, self)
  end
  if opts.outbox ~= false and bus:_has_store() and not bus._readonly then
    redisout.start(self)
  end
  require("buzz.redislead").members_tick(self)
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
--- (stream .. ":dlq"), retain (seconds entries are kept; nil: all),
--- outbox (true: on a store, publishes from handlers go through it),
--- partitions (per-key order across processes), lease (10 s),
--- connect_timeout (2 s).
---@tparam table opts
---@return a link (publish, subscribe, on, flush, pending, leader, every,
--- members, stats, close)
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
