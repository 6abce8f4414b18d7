--- buzz.cliredis: the store tool's look at Redis Streams (bin/buzz),
-- read-only:
--
--   buzz redis streams                 streams, their length and groups
--   buzz redis groups STREAM           its groups: consumers, pending,
--                                      last delivered id, lag
--   buzz redis pending STREAM GROUP    pending entries: id, consumer,
--                                      idle (ms), deliveries
--   buzz redis dlq STREAM              the dead-letter stream's entries
--
-- with --url URL (else $BUZZ_REDIS, else redis://127.0.0.1:6379/0),
-- --limit N (100) and --json (one JSON object a line). It talks through
-- the same C connection as bus:redis, one command at a time.
-- @module buzz.cliredis
local buzz = require "buzz"
local redis = require "buzz.redis"
local text = require "buzz.clitext"

local ipairs, tostring, type = ipairs, tostring, type
local format = string.format
local stdout = io.stdout
local encode, fail, usage_error = text.encode, text.fail, text.usage_error

local M = {}

-- A flat [k1, v1, k2, v2, ...] reply as a table.
local function fields(list)
  local t = {}
  for i = 1, #list - 1, 2 do t[list[i]] = list[i + 1] end
  return t
end

-- A connection and call(...) -> the reply (an error reply, a connection
-- that fails or a reply that takes 5 s end the command: exit 1).
local function connect(opts, ctx)
  local url = opts.url or os.getenv("BUZZ_REDIS") or
              "redis://127.0.0.1:6379/0"
  local ok, host, port, db, user, password = pcall(redis.parse_url, url, 1)
  if not ok then usage_error(tostring(host), "redis") end
  local bus = buzz.new()
  ctx.buses[#ctx.buses + 1] = bus
  local c = bus._core
  local h = assert(c:redis(host, port, 2000))
  local function call(...)
    h:send(...)
    local deadline = bus:_now() + 5000
    while true do
      local got, v = h:next()
      if got == true then return v end
      if got == false then fail(format("redis %s: %s", url, v)) end
      local st, why = h:state()
      if st == "closed" then
        fail(format("cannot reach Redis at %s: %s", url, why))
      end
      if bus:_now() > deadline then
        fail(format("Redis at %s did not answer in 5 s", url))
      end
      c:arm(100)
      c:wait()
    end
  end
  if password then
    if user then call("AUTH", user, password) else call("AUTH", password) end
  end
  if db ~= 0 then call("SELECT", db) end
  return call
end

local function print_rows(opts, rows, line)
  for _, r in ipairs(rows) do
    stdout:write(opts.json and encode(r) or line(r), "\n")
  end
end

local function streams(call, opts)
  local rows, cursor = {}, "0"
  repeat
    local v = call("SCAN", cursor, "TYPE", "stream", "COUNT", 1000)
    cursor = v[1]
    for _, name in ipairs(v[2]) do
      rows[#rows + 1] = { stream = name, length = call("XLEN", name),
                          groups = #call("XINFO", "GROUPS", name) }
    end
  until cursor == "0" or #rows >= opts.limit
  table.sort(rows, function(a, b) return a.stream < b.stream end)
  print_rows(opts, rows, function(r)
    return format("%s  %d entries  %d groups", r.stream, r.length, r.groups)
  end)
end

local function groups(call, opts, stream)
  local rows = {}
  for _, g in ipairs(call("XINFO", "GROUPS", stream)) do
    local f = fields(g)
    rows[#rows + 1] = { group = f.name, consumers = f.consumers,
      pending = f.pending, last_delivered = f["last-delivered-id"],
      lag = type(f.lag) == "number" and f.lag or nil }
  end
  print_rows(opts, rows, function(r)
    return format("%s  %d consumers  %d pending  last %s  lag %s", r.group,
                  r.consumers, r.pending, r.last_delivered,
                  r.lag and tostring(r.lag) or "?")
  end)
end

local function pending(call, opts, stream, group)
  local rows = {}
  for _, p in ipairs(call("XPENDING", stream, group, "-", "+", opts.limit)) do
    rows[#rows + 1] = { id = p[1], consumer = p[2], idle_ms = p[3],
                        deliveries = p[4] }
  end
  print_rows(opts, rows, function(r)
    return format("%s  %s  idle %d ms  %d deliveries", r.id, r.consumer,
                  r.idle_ms, r.deliveries)
  end)
end

local function dlq(call, opts, stream)
  local rows = {}
  for _, e in ipairs(call("XRANGE", stream .. ":dlq", "-", "+", "COUNT",
                          opts.limit)) do
    local f = fields(e[2])
    f.dlq_id = e[1]
    rows[#rows + 1] = f
  end
  print_rows(opts, rows, function(r)
    return format("%s  %s  group %s  %s deliveries  %s  %s", r.dlq_id,
                  r.type or "?", r.group or "?", r.deliveries or "?",
                  r.error or "", r.payload or "")
  end)
end

local NEEDS = { streams = 0, groups = 1, pending = 2, dlq = 1 }

--- buzz redis streams | groups STREAM | pending STREAM GROUP | dlq STREAM
function M.redis(opts, ctx)
  local what = opts.words[1]
  local n = NEEDS[what]
  if not n then
    usage_error("say what: buzz redis streams | groups STREAM | pending "
                .. "STREAM GROUP | dlq STREAM", "redis")
  end
  if #opts.words ~= n + 1 then
    usage_error(format("redis %s takes %d name%s", what, n,
                       n == 1 and "" or "s"), "redis")
  end
  opts.limit = opts.limit or 100
  local call = connect(opts, ctx)
  local f = what == "streams" and streams or what == "groups" and groups
            or what == "pending" and pending or dlq
  f(call, opts, opts.words[2], opts.words[3])
  return 0
end

M.commands = { redis = M.redis }

return M
