--- buzz.redislead: leader election, singletons and membership over a
-- Redis link (lua/buzz/redis.lua).
--
--   local l = r:leader(name, fn [, { lease = 10 }])
--                           -- fn(l) runs on the one process that holds
--                           -- the lease, each time it becomes leader
--   l:is_leader(), l:close()
--   r:every(seconds, type, payload_fn)  -- a periodic publish to the
--                           -- stream, made by the leader of "every:type"
--   r:members()             -- the consumers whose link is alive
--
-- A lease is the key STREAM:leader:NAME, set with SET NX PX lease and
-- renewed every lease/3 by its holder (a script that extends it only if
-- the holder is still this consumer). A holder that could not renew for
-- 2/3 of the lease steps down on its own, before the key can expire and
-- another process take it: two processes never both believe they lead
-- (as long as their clocks run at the same speed). Membership: every
-- second each link adds itself to the sorted set STREAM:members with
-- the time as score, and reads those seen in the last 5 s.
-- @module buzz.redislead
local options = require "buzz.options"
local util = require "buzz.util"

local type, ipairs, pairs, setmetatable, pcall, tostring, floor =
      type, ipairs, pairs, setmetatable, pcall, tostring, math.floor
local fail, quote = util.fail, util.quote

local M = {}
local Leader = {}
Leader.__index = Leader

local RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then "
  .. "return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end"
local RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then "
  .. "return redis.call('DEL', KEYS[1]) else return 0 end"

M.RENEW, M.RELEASE = RENEW, RELEASE          -- (redispart.lua's too)

local MEMBER_EVERY, MEMBER_TTL = 1000, 5000   -- ms

--- True while this process holds the lease.
function Leader:is_leader()
  if self.is_leading and self.link.bus:_now() - self.renewed
                         >= floor(self.lease * 2 / 3) then
    self:step_down()                  -- could not renew in time
  end
  return self.is_leading
end

function Leader:step_down()
  if not self.is_leading then return end
  self.is_leading = false
  if self.on_lost then self.on_lost(self) end
end

local function elected(self)
  self.is_leading = true
  self.terms = self.terms + 1
  local ok, err = pcall(self.fn, self)
  if not ok then
    self.link:report(("ECALLBACK: leader %s: %s"):format(self.name,
                                                       tostring(err)))
  end
end

local function tick(self)
  self.timer = nil
  if self.is_closed then return end
  local link, bus = self.link, self.link.bus
  local sent = bus:_now()
  if self:is_leader() then
    link.cmdc:cmd(function(ok, v)
      if self.is_closed then return end
      if ok and v == 1 then
        if self.is_leading then self.renewed = sent end
      elseif ok or not v:match("^EUNAVAILABLE") then
        self:step_down()              -- another holds it now
      end
    end, "EVAL", RENEW, 1, self.key, link.consumer, self.lease)
  else
    link.cmdc:cmd(function(ok, v)
      if self.is_closed or not ok or v ~= "OK" then return end
      self.renewed = sent
      elected(self)
    end, "SET", self.key, link.consumer, "NX", "PX", self.lease)
  end
  self.timer = bus:_after(floor(self.lease / 3), tick, self)
end

--- Gives the lease up (if held) and stops competing for it.
function Leader:close()
  if self.is_closed then return end
  if self.timer then self.timer:cancel() end
  local was = self.is_leading
  self:step_down()
  self.is_closed = true
  local link = self.link
  link.leaders[self] = nil
  if was and not link.is_closed then
    link.cmdc:cmd(false, "EVAL", RELEASE, 1, self.key, link.consumer)
  end
end
Leader.__close = Leader.close

--- r:leader(name, fn [, opts]) -> a leader handle.
-- @local
function M.leader(link, name, fn, opts, level)
  if type(name) ~= "string" or not name:match("^[%w_%-%.:]+$") then
    fail(level, "bad name: expected letters, digits and _-.:, got %s",
         quote(name))
  end
  if not options.is_callable(fn) then
    fail(level, "bad fn: expected a function, got %s", type(fn))
  end
  options.check_options(opts, options.option_set("lease", "on_lost"),
                        "r:leader", level + 1)
  opts = opts or {}
  options.check_positive(opts.lease, "lease", false, level + 1)
  if opts.on_lost ~= nil and not options.is_callable(opts.on_lost) then
    fail(level, "bad on_lost: expected a function, got %s",
         type(opts.on_lost))
  end
  local self = setmetatable({ link = link, name = name, fn = fn,
    on_lost = opts.on_lost, key = link.stream .. ":leader:" .. name,
    lease = floor((opts.lease or 10) * 1000), renewed = 0, terms = 0,
    is_leading = false }, Leader)
  if self.lease < 30 then fail(level, "bad lease: at least 0.03 s") end
  link.leaders[self] = true
  self.timer = link.bus:_after(0, tick, self)
  return self
end

--- r:every(seconds, type, payload_fn): publishes to the stream every
--- seconds, from the one process that leads "every:type".
-- @local
function M.every(link, seconds, etype, payload_fn, level)
  options.check_positive(seconds, "seconds", false, level + 1)
  util.check_type_arg(etype, "report.tick", level + 1)
  if payload_fn ~= nil and not options.is_callable(payload_fn) then
    fail(level, "bad payload_fn: expected a function, got %s",
         type(payload_fn))
  end
  local ms = floor(seconds * 1000)
  local bus = link.bus
  local leader
  local function chain(term)     -- one chain of beats per term led
    local function beat()
      if leader.is_closed or leader.terms ~= term
         or not leader:is_leader() then
        return
      end
      local ok, payload = true, nil
      if payload_fn then ok, payload = pcall(payload_fn) end
      if ok then
        link:publish(etype, payload)
      else
        link:report(("ECALLBACK: every %s: %s"):format(etype,
                                                     tostring(payload)))
      end
      bus:_after(ms, beat)
    end
    return beat()
  end
  leader = M.leader(link, "every:" .. etype,
                    function(l) return chain(l.terms) end,
                    { lease = math.max(1, seconds) * 3 }, level + 1)
  return leader
end

-- Membership: adds this consumer, drops those gone, reads the rest.
local function members_tick(link)
  link.member_timer = nil
  if link.is_closed then return end
  local now, key = link.bus:_now(), link.stream .. ":members"
  local c = link.cmdc
  c:cmd(false, "ZADD", key, now, link.consumer)
  c:cmd(false, "ZREMRANGEBYSCORE", key, "-inf", now - MEMBER_TTL)
  c:cmd(function(ok, v)
    if ok then link.member_list = v end
  end, "ZRANGEBYSCORE", key, now - MEMBER_TTL, "+inf")
  c:cmd(false, "PEXPIRE", key, MEMBER_TTL * 4)
  link.member_timer = link.bus:_after(MEMBER_EVERY, members_tick, link)
                        :unref()
end
M.members_tick = members_tick

--- What r:close() does here: leases given up, membership left.
-- @local
function M.close(link)
  for l in pairs(link.leaders) do l:close() end
  if link.member_timer then link.member_timer:cancel() end
  link.cmdc:cmd(false, "ZREM", link.stream .. ":members", link.consumer)
end

--- The consumers whose links were alive in the last 5 s, as last read
--- (a copy).
function M.members(link)
  local out = {}
  for i, m in ipairs(link.member_list or {}) do out[i] = m end
  return out
end

return M
