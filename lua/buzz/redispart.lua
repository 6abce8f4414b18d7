--- buzz.redispart: a Redis link's partitions (bus:redis{ partitions = N }):
-- per-key order across processes.
--
-- r:publish puts an event with a key on the stream STREAM:I, I the key's
-- hash modulo N (events without a key go round the partitions). A group
-- subscription reads each partition from one process at a time: the one
-- rendezvous hashing picks among the live members (r:members()), which
-- takes the lease STREAM:I:owner:GROUP (SET NX PX, renewed every lease/3
-- by its holder; a holder that could not renew for 2/3 of it stops
-- reading). A process that owns a partition takes over what is pending
-- in it (XAUTOCLAIM ... 0 JUSTID: the previous owner is gone or gave it
-- up), reads it in order, and delivers on the key's ordered lane; a
-- failure is retried here, holding the lane, and the last attempt
-- (max_deliveries) dead-letters. When the members change, a process that
-- no longer should own a partition stops reading it, lets what it read
-- finish, then gives the lease up, and the new owner takes it.
-- @module buzz.redispart
local redisgroup -- (required when a group starts: it requires this module)
local redisconn = require "buzz.redisconn"
local sha256 = require("buzz.core").sha256

local type, ipairs, pairs, tonumber, floor =
      type, ipairs, pairs, tonumber, math.floor

local M = {}

local redislead = require "buzz.redislead"  -- (its lease scripts)
local RENEW, RELEASE = redislead.RENEW, redislead.RELEASE

--- A string's hash (djb2 modulo 2^32: the same on Lua 5.4 and LuaJIT,
--- and in every process).
function M.hash(s)
  local h = 5381
  for i = 1, #s do h = (h * 33 + s:byte(i)) % 4294967296 end
  return h
end

--- The stream of the partition an event of key goes to.
function M.stream_of(link, key)
  local i
  if key == nil then
    i = link.next_part
    link.next_part = (i + 1) % link.partitions
  else
    i = M.hash(type(key) == "string" and key or ("%d"):format(key))
        % link.partitions
  end
  return link.part_streams[i + 1]
end

-- The member rendezvous hashing gives partition i (SHA-256's first 32
-- bits: djb2 mixes short names too little, "b#i" beats "a#i" for all i).
local function winner(members, i)
  local best, score
  for _, m in ipairs(members) do
    local s = tonumber(sha256(m .. "#" .. i):sub(1, 8), 16)
    if not score or s > score or (s == score and m > best) then
      best, score = m, s
    end
  end
  return best
end

-- A partition's reader, at each (re)connect: the group, what is pending
-- (taken over), then its own pending entries and new ones, in order.
local function start(conn)
  local g = conn.owner
  redisgroup.create(conn, g.link.start_id)
  conn:cmd(false, "XAUTOCLAIM", g.stream, g.name, g.link.consumer, 0,
           "0-0", "COUNT", 1000000, "JUSTID")
  g.from, g.is_parked = "0", false
  redisgroup.read(conn)
end

-- Stops reading partition i; the lease goes once what was read is done.
local function stop(pg, child)
  if child.is_closed then return end
  child.is_closed = true
  child.conn:close()
  local conns = pg.link.conns
  for k, conn in ipairs(conns) do
    if conn == child.conn then table.remove(conns, k) break end
  end
  child:on_settled()
end

local function owner_key(pg, i)
  return pg.link.part_streams[i + 1] .. ":owner:" .. pg.name
end

local function settle(child)
  local pg = child.parent
  if not child.is_closed or child.unsettled > 0 or child.is_released then
    return
  end
  child.is_released = true
  local link = pg.link
  if pg.owned[child.part] == child then pg.owned[child.part] = nil end
  if not link.is_closed then
    link.cmdc:cmd(false, "EVAL", RELEASE, 1, owner_key(pg, child.part),
                  link.consumer)
  end
end

local function take(pg, i, sent)
  local link = pg.link
  local child = redisgroup.reader(link, pg.name, link.part_streams[i + 1], {
    pattern = pg.pattern, prefix = pg.prefix, by_lid = pg.by_lid,
    parent = pg, part = i, renewed = sent, on_settled = settle })
  pg.owned[i] = child
  child.conn = redisconn.new(link, ("group %s:%d"):format(pg.name, i),
                             start, link.block + 5000, child)
  link.conns[#link.conns + 1] = child.conn
end

-- Every lease/3: takes the partitions this process should own, renews
-- those it holds, and gives up those it should no longer own.
local function tick(pg)
  pg.timer = nil
  if pg.is_closed then return end
  local link, bus = pg.link, pg.link.bus
  local members = link:members()
  local me = link.consumer
  local found = false
  for _, m in ipairs(members) do if m == me then found = true end end
  if not found then members[#members + 1] = me end
  local now, lease = bus:_now(), link.lease
  for i = 0, link.partitions - 1 do
    local want = winner(members, i) == me
    local child = pg.owned[i]
    if not child and want and not pg.taking[i] then
      pg.taking[i] = true
      link.cmdc:cmd(function(ok, v)
        pg.taking[i] = nil
        if ok and v == "OK" and not pg.is_closed and not pg.owned[i] then
          take(pg, i, now)
        end
      end, "SET", owner_key(pg, i), me, "NX", "PX", lease)
    elseif child and not child.is_closed then
      if not want or now - child.renewed >= floor(lease * 2 / 3) then
        stop(pg, child)
      else
        link.cmdc:cmd(function(ok, v)
          if ok and v == 1 then
            child.renewed = now
          elseif ok then
            stop(pg, child)        -- another holds it: not ours now
          end
        end, "EVAL", RENEW, 1, owner_key(pg, i), me, lease)
      end
    end
  end
  pg.timer = bus:_after(floor(lease / 3), tick, pg)
end

--- Starts the partitions of group subscription pg.
-- @local
function M.start(link, pg)
  redisgroup = require "buzz.redisgroup"
  pg.owned, pg.taking = {}, {}
  pg.timer = link.bus:_after(0, tick, pg)
end

--- Stops them (unsubscribe): readers stop, leases are given up.
-- @local
function M.close(pg)
  if pg.timer then pg.timer:cancel() end
  for _, child in pairs(pg.owned) do
    stop(pg, child)
    child.unsettled = 0
    settle(child)
  end
end

--- The partitions this process reads now (0-based), for r:stats().
-- @local
function M.owned(pg)
  local t = {}
  for i, child in pairs(pg.owned) do
    if not child.is_closed then t[#t + 1] = i end
  end
  table.sort(t)
  return t
end

return M
