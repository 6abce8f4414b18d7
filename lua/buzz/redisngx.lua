--- buzz.redisngx: a Redis connection over an nginx cosocket, for a link
-- on a bus that OpenResty drives (buzz.new{ loop = "ngx" }; redis.lua
-- dials this instead of the C connection, whose socket would sit on a
-- libuv loop nginx never runs). It has the C connection's methods
-- (send, next, state, waiting, close), so redisconn.lua works over
-- either. Each connection is one light thread (ngx.timer.at) that owns
-- a cosocket through Debian's lua-nginx-redis (require "nginx.redis",
-- lua-resty-redis): it waits on a semaphore for commands, sends what
-- has queued as one pipeline, queues the replies in order, and wakes the
-- bus's driver, whose turn pumps them to their callbacks.
-- @module buzz.redisngx
local type, select, setmetatable, ipairs, tostring =
      type, select, setmetatable, ipairs, tostring
local unpack = table.unpack or unpack   -- luacheck: ignore 143

local M = {}
local H = {}
H.__index = H

-- resty.redis's values as the C connection gives them: ngx.null is false,
-- an error inside an array is { err = message }.
local function convert(v)
  if v == ngx.null then return false end
  if type(v) ~= "table" then return v end
  local t = {}
  for i = 1, #v do
    local e = v[i]
    if type(e) == "table" and e[1] == false and type(e[2]) == "string"
       and #e == 2 then
      t[i] = { err = e[2] }
    else
      t[i] = convert(e)
    end
  end
  return t
end

local function closed(self, why)
  if self.st ~= "closed" then
    self.st, self.why = "closed", why
  end
  local d = self.bus._driver
  if d then d:wake() end
end

-- The light thread of one connection.
local function worker(premature, self)
  if premature then return closed(self, "nginx is exiting") end
  local redis = require "nginx.redis"
  local red = redis:new()
  red:set_timeouts(self.connect_ms, self.io_ms, self.io_ms)
  local ok, err = red:connect(self.host, self.port)
  if not ok then return closed(self, "cannot connect: " .. tostring(err)) end
  if self.st == "connecting" then self.st = "ready" end
  while self.st == "ready" and not ngx.worker.exiting() do
    if self.out[1] == nil then
      self.sema:wait(1)                -- a send, or a look at exiting
    else
      local batch = self.out
      self.out = {}
      red:init_pipeline(#batch)
      for _, cmd in ipairs(batch) do
        red[cmd[1]:lower()](red, unpack(cmd, 2, cmd.n))
      end
      local res, e = red:commit_pipeline()
      if not res then
        red:close()
        return closed(self, e == "closed" and
                      "the server closed the connection" or tostring(e))
      end
      local q, t = self.replies, self.tail
      for i = 1, #batch do
        local v = res[i]
        t = t + 1
        if type(v) == "table" and v[1] == false and #v == 2 then
          q[t] = { false, v[2] }
        else
          q[t] = { true, convert(v) }
        end
      end
      self.tail = t
      self.bus._driver:wake()
    end
  end
  red:close()
  closed(self, self.why or "closed")
end

--- A connection to host:port (a handle as core:redis makes), or nil,
--- err, code.
-- @local
function M.connect(bus, host, port, connect_ms, io_ms)
  local self = setmetatable({ bus = bus, host = host, port = port,
    connect_ms = connect_ms, io_ms = io_ms, out = {}, replies = {},
    head = 1, tail = 0, nwaiting = 0, st = "connecting",
    sema = require("ngx.semaphore").new() }, H)
  local ok, err = ngx.timer.at(0, worker, self)
  if not ok then
    return nil, "ELOOP: bus:redis: cannot start a connection: "
                .. tostring(err), "ELOOP"
  end
  return self
end

function H:send(...)
  if self.st == "closed" then
    return nil, "ECLOSED: the connection is closed", "ECLOSED"
  end
  self.out[#self.out + 1] = { n = select("#", ...), ... }
  self.nwaiting = self.nwaiting + 1
  if self.sema:count() <= 0 then self.sema:post(1) end
  return true
end

function H:sendv(t, n)
  return self:send(unpack(t, 1, n))
end

function H:next()
  local q, i = self.replies, self.head
  local r = q[i]
  if r == nil then return nil end
  q[i] = nil
  self.head = i + 1
  self.nwaiting = self.nwaiting - 1
  return r[1], r[2]
end

function H:state()
  if self.st == "closed" and self.replies[self.head] == nil then
    return "closed", self.why
  end
  return self.st == "closed" and "ready" or self.st
end

function H:waiting()
  return self.nwaiting
end

function H:close()
  if self.st ~= "closed" then
    self.st, self.why = "closed", "closed"
    self.sema:post(1)
  end
end

return M
