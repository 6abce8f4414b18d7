--- buzz.redisconn: one Redis connection of a link (lua/buzz/redis.lua)
-- over the C connection (core:redis, csrc/lredis.c) or, under OpenResty,
-- a cosocket's (redisngx.lua): link:dial picks. Made again when it is
-- lost. cmd(cb, ...) sends a command and keeps cb in a queue: Redis
-- answers in order, so pump() hands each reply to the next callback,
-- cb(ok, value, is_lost) (ok false: an error reply, or the connection
-- was lost before the reply came, is_lost true). on_ready(conn) runs at
-- each (re)connect, before anything else is sent on it; a lost
-- connection is tried again after a backoff (0.1 s doubling to 5 s),
-- and reported once per outage.
-- @module buzz.redisconn
local min = math.min
local setmetatable = setmetatable

local M = {}
local Conn = {}
Conn.__index = Conn

local BACKOFF_MIN, BACKOFF_MAX = 100, 5000   -- ms between reconnects

-- A connection that reconnects: cmd(cb, ...) sends a command and calls
-- cb(ok, value, is_lost) with its reply (ok false: an error reply, or
-- the connection was lost before it came, is_lost true); on_ready(conn)
-- runs at each (re)connect, before anything else is sent on it.
local function conn_new(link, name, on_ready, limit, owner)
  local self = setmetatable({ link = link, name = name, on_ready = on_ready,
    limit = limit, owner = owner, cbs = {}, data = {}, head = 1, tail = 0,
    backoff = BACKOFF_MIN,
    is_down = false, is_closed = false }, Conn)
  self:open()
  return self
end
M.new = conn_new

function Conn:open()
  local link = self.link
  local c = link.bus._core
  if self.is_closed or not c then return end
  local h, err = link:dial(c)
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

-- After a send: queues cb (and its data) for the command's reply; true,
-- or (nothing was sent: the connection is down) nil, err, code.
local function expect(self, is_sent, cb, data)
  if not is_sent then
    return nil, self.link:unavailable(self.why), "EUNAVAILABLE"
  end
  local t = self.tail + 1
  self.tail = t
  self.cbs[t] = cb or false
  if data ~= nil then self.data[t] = data end
  if not self.since then self.since = self.link.bus:_now() end
  return true
end

function Conn:cmd(cb, ...)
  local h = self.h
  return expect(self, h and h:send(...), cb, nil)
end

-- As cmd, with the command's arguments args[1..n] (publish's reused
-- table) and data given to cb as its fourth argument (a callback shared
-- by many commands, not a closure each).
function Conn:cmdv(cb, data, args, n)
  local h = self.h
  return expect(self, h and h:sendv(args, n), cb, data)
end

function Conn:pump()
  local h = self.h
  if not h then return 0 end
  local n, cbs = 0, self.cbs
  while true do
    local ok, v = h:next()
    if ok == nil then break end
    local i = self.head
    local cb, data = cbs[i], self.data[i]
    cbs[i] = nil
    if data ~= nil then self.data[i] = nil end
    self.head = i + 1
    self.since = self.head <= self.tail and self.link.bus:_now() or nil
    self.backoff, self.is_down = BACKOFF_MIN, false
    n = n + 1
    if cb then
      cb(ok, v, false, data)
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
  local cbs, data, i, j = self.cbs, self.data, self.head, self.tail
  self.cbs, self.data, self.head, self.tail = {}, {}, 1, 0
  local err = self.link:unavailable(why)
  for k = i, j do
    local cb = cbs[k]
    if cb then cb(false, err, true, data[k]) end
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

-- Reads again after ms (a refused read; a full queue).
local function later(conn, ms, fn)
  conn.link.bus:_after(ms, function()
    if conn.h and not conn.is_closed then fn(conn) end
  end)
end
M.later = later

return M
