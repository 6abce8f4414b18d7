--- buzz.redisgroup: a subscription in a Redis consumer group
-- (r:subscribe(pattern, fn, { group = "billing" }), lua/buzz/redis.lua).
--
-- Each group has its own connection for blocking reads. At each
-- (re)connect it creates the group (XGROUP CREATE ... MKSTREAM; BUSYGROUP
-- is success), reads this consumer's own pending entries (XREADGROUP
-- ... 0) and then new ones (">", BLOCK at most 5 s). It reads no more
-- while `count` entries it read wait for their handlers (they would sit
-- idle here, and be claimed by another consumer after min_idle); the
-- handlers resume the reads when half of them are done. An entry is published
-- on the bus under "$G.<group>.<type>", which only the group's local
-- subscription matches; its handler gets a copy of the event with the
-- real type, and the entry is acked (XACK) once the handler returned.
-- A handler that raises leaves the entry pending: every claim_every, the
-- group takes over entries idle for min_idle (XAUTOCLAIM, to cursor 0-0;
-- its own failures and those of consumers that died), and delivers them
-- again with ev.attempt = Redis's delivery count. Past max_deliveries an
-- entry goes to the dead-letter stream and is acked. Entries deleted
-- while pending are acked and counted as lost. Consumers with nothing
-- pending and idle for 10 min_idle are removed from the group.
-- On a bus with a store (the inbox, unless inbox = false) each entry is
-- published with the dedup key redis:STREAM:GROUP:ID and the local
-- subscription is the durable consumer redis.GROUP: the entry is acked
-- when its first delivery starts (committed by then), the store owns it
-- from there, and a redelivery of an entry the store holds is a
-- duplicate, only acked.
-- @module buzz.redisgroup
local core = require "buzz.core"
local options = require "buzz.options"
local filter = require "buzz.filter"
local util = require "buzz.util"
local redisconn = require "buzz.redisconn"

local type, pairs, ipairs, setmetatable, error, pcall, tostring, tonumber =
      type, pairs, ipairs, setmetatable, error, pcall, tostring, tonumber
local unpack = table.unpack or unpack   -- luacheck: ignore 143
local fail, quote = util.fail, util.quote

local M = {}
local Group = {}
Group.__index = Group

-- Subscription options a group refuses, and why.
local REFUSED = {
  retry = "Redis redelivers what fails: give bus:redis{ max_deliveries = "
          .. "... } (and min_idle) instead",
  once = "a group subscription lasts until unsubscribe",
  durable = "the group is the durable consumer: its position is in Redis",
  start = "where a new group starts is bus:redis{ start = ... }",
}

function Group:report(what)
  self.link:report(("redis group %s: %s"):format(self.name, what))
end

function Group:ack(rid)
  local link = self.link
  link.cmdc:cmd(function(ok, v)
    if ok then link.counts.acked = link.counts.acked + v end
  end, "XACK", self.stream, self.name, rid)
end

-- The bus's dead letter of an entry no handler of its ran to the end
-- (bus:dead_letters{}, a $DLQ event), as a runner's are.
function Group:bury(rid, fields, why)
  local env = {}
  for i = 1, #fields - 1, 2 do env[fields[i]] = fields[i + 1] end
  local payload = env.payload and core.json_decode(env.payload)
  local sup = self.link.bus._sup
  if not sup then return end                       -- (a closed bus)
  sup:bury_event(self.sub and self.sub.name or self.name, self.pattern, {
    type = type(env.type) == "string" and core.check_subject(env.type)
           and env.type or "redis.invalid",
    payload = payload, key = env.key, ts = tonumber(env.ts),
    correlation_id = env.correlation_id,
    headers = { ["redis-id"] = rid } }, "exhausted", why)
end

-- To the dead-letter stream with why, then acked; with is_buried, the
-- bus's dead letters have it too.
function Group:dead(rid, fields, deliveries, why, is_buried)
  local link = self.link
  if is_buried then self:bury(rid, fields, why) end
  local args = { "XADD", link.dlq, "*" }
  for i = 1, #fields do args[#args + 1] = fields[i] end
  for _, v in ipairs { "redis_id", rid, "group", self.name, "deliveries",
                       deliveries, "error", why } do
    args[#args + 1] = v
  end
  link.cmdc:cmd(function(ok, v, is_lost)
    if ok then
      link.counts.dead = link.counts.dead + 1
      self:ack(rid)
    elseif not is_lost then
      self:report(("cannot dead-letter %s: %s"):format(rid, v))
    end
  end, unpack(args))
end

-- Delivers entry rid (fields false: deleted while pending) for the
-- attempt-th time.
function Group:deliver(rid, fields, attempt)
  local link = self.link
  if not fields then
    link.counts.lost = link.counts.lost + 1
    return self:ack(rid)
  end
  if self.inflight[rid] then return end      -- ours, still queued here
  local etype
  for i = 1, #fields - 1, 2 do
    if fields[i] == "type" then etype = fields[i + 1] break end
  end
  if etype and core.check_subject(etype)
     and not core.match(self.pattern, etype) then
    link.counts.skipped = link.counts.skipped + 1
    return self:ack(rid)                     -- not for this group
  end
  if attempt > link.max_deliveries then
    return self:dead(rid, fields, attempt - 1,
                     ("not handled in %d deliveries"):format(attempt - 1),
                     true)
  end
  local lid, err, is_bad = link:inject(rid, fields, self.prefix,
    self.inbox and ("redis:%s:%s:%s"):format(self.stream, self.name, rid)
    or nil)
  if not lid then
    if is_bad then return self:dead(rid, fields, attempt, err, true) end
    return self:report(("%s stays pending: %s"):format(rid, err))
  end
  if err == "duplicate" then                 -- in the inbox already
    link.counts.duplicates = link.counts.duplicates + 1
    return self:ack(rid)
  end
  self.inflight[rid] = lid
  self.ninflight = self.ninflight + 1
  self.unsettled = self.unsettled + 1
  self.by_lid[lid] = { rid = rid, attempt = attempt, g = self }
end

-- Delivers the batches read so far, in the order they were read, while
-- the one at the head has what it waits for (its delivery counts).
function Group:flush_batches()
  local q = self.batches
  while q[q.first] and q[q.first].counts do
    local b = q[q.first]
    q[q.first], q.first = nil, q.first + 1
    if not b.is_dropped and not self.is_closed then
      for _, e in ipairs(b.entries) do
        self:deliver(e[1], e[2], b.counts[e[1]] or 1)
      end
    end
  end
end

-- Delivers entries in read order: new ones (">") at once unless an
-- earlier batch still waits; entries this consumer was given again with
-- Redis's delivery count of each (XPENDING over their range) once it
-- comes. (A new entry delivered before an older batch's counts came back
-- would break a key's order.)
function Group:deliver_batch(entries, is_new)
  local q = self.batches
  local b = { entries = entries, counts = is_new and {} or nil }
  q[q.last + 1], q.last = b, q.last + 1
  if not is_new then
    local first, last = entries[1][1], entries[#entries][1]
    local ok = self.link.cmdc:cmd(function(is_ok, v)
      b.counts, b.is_dropped = {}, not is_ok    -- dropped: still pending
      if is_ok then
        for _, p in ipairs(v) do b.counts[p[1]] = p[4] end
      end
      self:flush_batches()
    end, "XPENDING", self.stream, self.name, first, last,
    #entries * 4 + 100, self.link.consumer)
    if not ok then b.counts, b.is_dropped = {}, true end
  end
  self:flush_batches()
end

local function create(conn, start)
  local g = conn.owner
  conn:cmd(function(ok, v, is_lost)
    if not ok and not is_lost and not v:match("^BUSYGROUP") then
      g:report(v)
    end
  end, "XGROUP", "CREATE", g.stream, g.name, start, "MKSTREAM")
end

local function read(conn)
  local g = conn.owner
  local link = g.link
  local from = g.from
  local function got(ok, v, is_lost)
    g.reads_out = g.reads_out - 1
    if is_lost or g.is_closed then return end
    if not ok then
      -- NOGROUP: the stream was deleted, or Redis restarted empty; a
      -- deleted stream also unblocks its readers with an error
      g:report(v)
      g.from = "0"
      create(conn, "0")
      return redisconn.later(conn, 100, read)
    end
    local entries = type(v) == "table" and v[1] and v[1][2] or {}
    if from ~= ">" then                -- this consumer's pending entries
      if #entries == 0 then
        g.from = ">"
      else
        g.from = entries[#entries][1]
        g:deliver_batch(entries, false)
      end
    else
      if entries[1] then g:deliver_batch(entries, true) end
    end
    if link:is_full() then return redisconn.later(conn, 50, read) end
    if g.ninflight >= link.count then
      g.is_parked = true               -- the handlers resume the reads
      return
    end
    read(conn)
  end
  local ok
  if from == ">" then
    ok = conn:cmd(got, "XREADGROUP", "GROUP", g.name, link.consumer,
                  "COUNT", link.count, "BLOCK", link.block, "STREAMS",
                  g.stream, ">")
  else
    ok = conn:cmd(got, "XREADGROUP", "GROUP", g.name, link.consumer,
                  "COUNT", link.count, "STREAMS", g.stream, from)
  end
  if ok then g.reads_out = g.reads_out + 1 end   -- (down: the reconnect
end                                              -- reads again)

local function start(conn)
  local g = conn.owner
  create(conn, g.link.start_id)
  g.from, g.is_parked = "0", false
  read(conn)
end

-- Takes over entries idle for min_idle, from cursor on.
function Group:claim(cursor)
  local link = self.link
  link.cmdc:cmd(function(ok, v, is_lost)
    if self.is_closed then return end
    if not ok then
      if not is_lost and not v:match("^NOGROUP") then self:report(v) end
      return
    end
    local entries, deleted = v[2] or {}, v[3] or {}
    link.counts.lost = link.counts.lost + #deleted
    local fresh = {}
    for _, e in ipairs(entries) do
      if not e[2] then
        link.counts.lost = link.counts.lost + 1
        self:ack(e[1])
      elseif not self.inflight[e[1]] then
        fresh[#fresh + 1] = e
      end
    end
    link.counts.claimed = link.counts.claimed + #fresh
    if fresh[1] then self:deliver_batch(fresh, false) end
    if v[1] ~= "0-0" then self:claim(v[1]) end
  end, "XAUTOCLAIM", self.stream, self.name, link.consumer, link.min_idle,
  cursor, "COUNT", link.count)
end

-- Removes consumers that left: nothing pending, idle 10 min_idle.
function Group:sweep()
  local link = self.link
  link.cmdc:cmd(function(ok, v)
    if not ok or self.is_closed then return end
    for _, info in ipairs(v) do
      local f = {}
      for i = 1, #info - 1, 2 do f[info[i]] = info[i + 1] end
      if f.name ~= link.consumer and f.pending == 0
         and f.idle > 10 * link.min_idle then
        link.cmdc:cmd(false, "XGROUP", "DELCONSUMER", self.stream, self.name,
                      f.name)
      end
    end
  end, "XINFO", "CONSUMERS", self.stream, self.name)
end

local function tick(self)
  self.timer = nil
  if self.is_closed then return end
  self:claim("0-0")
  self:sweep()
  self.timer = self.link.bus:_after(self.link.claim_every, tick, self)
                 :unref()
end

-- The first delivery of an entry the reader g injected has started: it
-- no longer waits here (reads resume when half of those did).
local function started(g, info)
  if info.is_started then return end
  info.is_started = true
  g.inflight[info.rid] = nil
  local k = g.ninflight - 1
  g.ninflight = k
  if g.is_parked and k * 2 <= g.link.count and g.reads_out == 0
     and not g.is_closed then
    g.is_parked = false
    read(g.conn)
  end
end

-- The entry is done with (acked, or dead-lettered).
local function settled(self, ev, info)
  if not info then return end
  self.by_lid[ev.id] = nil
  info.g.unsettled = info.g.unsettled - 1
  if info.g.on_settled then info.g:on_settled() end
end

-- The copy of ev a handler gets: the real type, the group, the attempt.
local function copy(self, ev, info)
  return { id = ev.id, type = ev.type:sub(#self.prefix + 1),
    payload = ev.payload, ts = ev.ts, priority = ev.priority,
    key = ev.key, attempt = info and not self.inbox and not self.retries
                            and info.attempt or ev.attempt,
    correlation_id = ev.correlation_id, causation_id = ev.causation_id,
    headers = ev.headers, group = self.name }
end

-- What the local subscription calls: a copy of the event with the real
-- type, the handler, then the ack. With retries (partitions), a failure
-- is retried here (the key's lane waits) and the last one dead-letters.
local function wrap(self, handler, test)
  return function(ev)
    local info = self.by_lid[ev.id]
    local g = info and info.g or self     -- the reader that read it
    local rid = info and info.rid or (ev.headers or {})["redis-id"]
    if self.inbox and rid and not self.is_closed then
      g:ack(rid)                -- committed to the store: the inbox has it
    end
    if info then started(g, info) end
    local e = copy(self, ev, info)
    if self.retries then
      local ok, err = true, nil
      if not test or test(e) then ok, err = pcall(handler, e) end
      if not ok then
        if ev.attempt >= self.retries then  -- the last: the bus buries it
          if rid then g:dead_event(rid, e, ev.attempt, err) end  -- (its
          settled(self, ev, info)           -- dead letters), Redis's too
        end
        error(err, 0)
      end
    elseif not test or test(e) then
      handler(e)
    end
    if rid and not self.inbox and not self.is_closed then g:ack(rid) end
    settled(self, ev, info)
  end
end

-- The dead letter of an event that failed here (its entry rebuilt).
function Group:dead_event(rid, e, attempts, err)
  local f = { "type", e.type, "payload", core.json_encode(e.payload) or
              "null", "ts", e.ts }
  if e.key ~= nil then f[#f + 1], f[#f + 2] = "key", tostring(e.key) end
  self:dead(rid, f, attempts, tostring(err))
end

--- Ends the subscription: this process reads no more of the group
--- (what it holds pending is claimed by the others). Idempotent.
function Group:unsubscribe()
  if self.is_closed then return end
  self.is_closed = true
  if self.owned then
    require("buzz.redispart").close(self)
  else
    if self.timer then self.timer:cancel() end
    self.conn:close()
    for i, conn in ipairs(self.link.conns) do
      if conn == self.conn then table.remove(self.link.conns, i) break end
    end
  end
  self.link.groups[self.name] = nil
  self.sub:unsubscribe()
end
Group.close = Group.unsubscribe
Group.__close = Group.unsubscribe

--- A reader of group name on stream (the group itself, or one partition
--- of it: redispart.lua), with fields.
-- @local
function M.reader(link, name, stream, fields)
  local self = setmetatable(fields, Group)
  self.link, self.name, self.stream = link, name, stream
  self.inflight, self.ninflight, self.unsettled = {}, 0, 0
  self.is_parked, self.reads_out = false, 0
  self.batches = { first = 1, last = 0 }
  return self
end
M.read, M.create = read, create

--- r:subscribe(pattern, handler, opts) with opts.group.
-- @local
function M.subscribe(link, pattern, handler, opts, level)
  local name = opts.group
  if type(name) ~= "string" or not name:match("^[%w_%-]+$") then
    fail(level, "bad group: expected a name of letters, digits, _ and -, "
         .. "got %s", quote(name))
  end
  if link.groups[name] then
    fail(level, "this link already has a subscription in group %q: a "
         .. "group is one handler per process", name)
  end
  local inbox = link.bus:_has_store() and opts.inbox ~= false
  if opts.inbox ~= nil and type(opts.inbox) ~= "boolean" then
    fail(level, "bad inbox: expected a boolean, got %s", quote(opts.inbox))
  end
  local lopts = {}
  for k, v in pairs(opts) do
    if REFUSED[k] and not (inbox and k == "retry") then
      fail(level, "option %s does not go with group: %s", k, REFUSED[k])
    end
    if k ~= "group" and k ~= "filter" and k ~= "inbox" then lopts[k] = v end
  end
  if inbox then lopts.durable = "redis." .. name end
  lopts.name = opts.name or ("%s (redis group %s, %s)"):format(pattern,
    name, link.consumer)                 -- in on_error, metrics, retries
  if link.partitions then              -- in order, retried here
    lopts.ordered = true
    lopts.retry = { max = link.max_deliveries, base = 0.1, max_delay = 5 }
  end
  local test = opts.filter ~= nil and filter.predicate(opts.filter, level + 1)
  if not options.is_callable(handler) then
    fail(level, "bad handler: expected a function, got %s", type(handler))
  end
  local self = M.reader(link, name, link.stream, {
    pattern = pattern, inbox = inbox,
    prefix = ("$G.%s.%s."):format(name, link.serial),  -- (one per link)
    by_lid = {}, retries = link.partitions and link.max_deliveries })
  util.check_subject_arg(pattern, "pattern", "order.*", level + 1)
  self.sub = link.bus:_subscribe(self.prefix .. pattern,
                                 wrap(self, handler, test), lopts, level + 1)
  if not self.sub then error("bus:redis: cannot subscribe", level + 1) end
  link.groups[name] = self
  if link.partitions then
    require("buzz.redispart").start(link, self)
    return self
  end
  self.conn = redisconn.new(link, "group " .. name, start,
                             link.block + 5000, self)
  link.conns[#link.conns + 1] = self.conn
  self.timer = link.bus:_after(link.claim_every, tick, self):unref()
  return self
end

return M
