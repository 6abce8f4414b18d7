--- buzz.ngxgate: the HTTP gateway under OpenResty, where nginx is the
-- server: buzz.ngx.sse(bus, opts), buzz.ngx.ingest(publisher, opts) and
-- buzz.ngx.metrics(bus [, opts]) for content_by_lua*. Same protocol and
-- answers as bus:serve (lua/buzz/gateway.lua decides, lua/buzz/sse.lua
-- formats).
--
-- A stream has two sources:
--   * store = "events.db" (the log buzz.ngx.shared writes): every worker
--     reads it (a read-only bus per worker), so a stream sees the events
--     of all workers, and resume and live come from one place, in id
--     order: the events after Last-Event-ID, then each new commit, read
--     every `poll` seconds (0.1). An id older than the log's first is
--     answered with `event: reset`.
--   * otherwise the worker's own bus (buzz.new{ loop = "ngx" }): a
--     subscription queues the worker's events for the request, at most
--     `max_queue` (1000); a client that falls that far behind gets
--     `event: overflow` and is let go. Without a log there is nothing to
--     resume from: a Last-Event-ID gets `event: reset`.
-- Either way the request ends when the client leaves (a failed flush, or
-- ngx.on_abort with lua_check_client_abort on) or the worker exits, and
-- a comment goes out every `heartbeat` seconds (15).
-- @module buzz.ngxgate
local core = require "buzz.core"
local gateway = require "buzz.gateway"
local sse = require "buzz.sse"
local options = require "buzz.options"
local util = require "buzz.util"

local type, pairs, tostring, error, pcall, concat =
      type, pairs, tostring, error, pcall, table.concat
local json_encode = core.json_encode
local quote = util.quote

local M = {}

local SSE_OPTIONS = { subject = true, where = true, token = true,
  authorize = true, public = true, heartbeat = true, retry = true,
  store = true, poll = true, max_queue = true,
  "authorize, heartbeat, max_queue, poll, public, retry, store, subject, "
  .. "token, where" }
local INGEST_OPTIONS = { token = true, authorize = true, public = true,
                         events = true }
for k in pairs(gateway.INGEST_OPTIONS) do
  if type(k) == "string" then INGEST_OPTIONS[k] = true end
end
INGEST_OPTIONS[1] = "authorize, dedup_header, events, key_header, prefix, "
  .. "public, secret, token, type, type_header"

-- A header or argument nginx gives as a table (repeated): one string.
local function flat(t)
  local out = {}
  for k, v in pairs(t) do
    if type(v) == "table" then v = concat(v, ", ") end
    if type(v) == "string" then out[k:lower()] = v end
  end
  return out
end

local function request(params, body)
  local ngx = ngx
  local query = {}
  for k, v in pairs(ngx.req.get_uri_args(100)) do
    if type(v) == "table" then v = v[1] end
    if type(v) == "string" then query[k] = v end
  end
  return { method = ngx.req.get_method(), path = ngx.var.uri,
           query = query, headers = flat(ngx.req.get_headers(100)),
           params = params or {}, body = body,
           peer = tostring(ngx.var.remote_addr) .. ":"
                  .. tostring(ngx.var.remote_port) }
end

local function answer(status, body, extra)
  local ngx = ngx
  ngx.status = status
  ngx.header["Content-Type"] = "application/json"
  ngx.header["Cache-Control"] = "no-store"
  if extra then
    local k, v = extra:match("^([^:]+): ([^\r]+)")
    if k then ngx.header[k] = v end
  end
  ngx.print(json_encode(body))
  return ngx.exit(ngx.HTTP_OK)
end

local function check_conf(opts, allowed, what)
  options.check_options(opts, allowed, what, 3)
  if opts.token ~= nil and (type(opts.token) ~= "string"
                            or #opts.token < 8) then
    error(what .. ": token: expected a string of 8 or more characters, got "
          .. quote(opts.token), 3)
  end
  if not opts.token and not opts.authorize and not opts.public
     and not opts.secret then
    error(what .. ": closed to anyone without a token: give token = "
          .. "\"...\", authorize = function(req) ... end, or public = true",
          3)
  end
end

-- ------------------------------------------------------------- streams

-- The read-only bus of each store path, per worker.
local readers = {}

local function reader(path)
  local r = readers[path]
  if r and not r:is_closed() then return r end
  local buzz = require "buzz"
  local bus, err = buzz.new{ store = path, readonly = true }
  if not bus then return nil, err end
  readers[path] = bus
  return bus
end

-- Writes and flushes; false once the client is gone.
local function put(text)
  local ok = ngx.print(text)
  if not ok then return false end
  return (ngx.flush(true)) and true or false
end

local function tail(opts, pattern, test, last, is_gone)
  local log, err = reader(opts.store)
  if not log then
    put("event: error\ndata: " .. json_encode{ error = tostring(err) }
        .. "\n\n")
    return
  end
  local info = log:store_info{ events = false }
  local pos = info.last_id or 0
  if last then
    if gateway.can_resume(info.first_id, pos, last) then
      pos = last
    elseif not put("event: reset\ndata: {\"last_event_id\":" .. last
                   .. "}\n\n") then
      return
    end
  end
  local poll = opts.poll or 0.1
  local beat = (opts.heartbeat or 15)
  local quiet = 0
  while not is_gone() and not ngx.worker.exiting() do
    local parts = {}
    for ev in log:events{ types = pattern, from = pos + 1, limit = 256 } do
      pos = ev.id
      if not test or test(ev) then parts[#parts + 1] = sse.message(ev) end
    end
    if parts[1] then
      if not put(concat(parts)) then return end
      quiet = 0
    else
      quiet = quiet + poll
      if quiet >= beat then
        if not put(": heartbeat\n\n") then return end
        quiet = 0
      end
      ngx.sleep(poll)
    end
  end
end

local function live(bus, opts, pattern, cond, last, is_gone)
  if last then
    if not put("event: reset\ndata: {\"last_event_id\":" .. last
               .. "}\n\n") then return end
  end
  local sema = require("ngx.semaphore").new()
  local queue, n, max = {}, 0, opts.max_queue or 1000
  local overflow = false
  local sub = bus:subscribe(pattern, function(ev)
    if overflow then return end
    if n >= max then overflow = true
    else
      n = n + 1
      queue[n] = sse.message(ev)
    end
    sema:post(1)
  end, { name = "buzz.ngx.stream", filter = cond })
  local beat = opts.heartbeat or 15
  while not is_gone() and not ngx.worker.exiting() do
    local ok = sema:wait(beat)
    if overflow then
      put("event: overflow\ndata: {\"reason\":\"the client did not keep "
          .. "up\"}\n\n")
      break
    end
    local text
    if n > 0 then
      text = concat(queue, "", 1, n)
      queue, n = {}, 0
    elseif not ok then
      text = ": heartbeat\n\n"
    end
    if text and not put(text) then break end
  end
  sub:unsubscribe()
end

--- content_by_lua: an SSE stream of opts.subject (a pattern whose
--- ":name" parts are filled from ngx.var, e.g. a named capture of the
--- location).
function M.sse(bus, opts)
  check_conf(opts, SSE_OPTIONS, "buzz.ngx.sse")
  if type(opts.subject) ~= "string" then
    error("buzz.ngx.sse: subject: expected a pattern such as "
          .. "\"repo.:id.>\", got " .. quote(opts.subject), 2)
  end
  local params = {}
  local bad
  local pattern = opts.subject:gsub(":([%w_]+)", function(name)
    local v = ngx.var[name]
    if not gateway.is_token(v) then bad = name return "x" end
    params[name] = v
    return v
  end)
  if bad then return answer(400, { error = "bad " .. bad }) end
  if not core.check_subject(pattern, true) then
    return answer(400, { error = "bad subject " .. pattern })
  end
  local req = request(params)
  local status, why = gateway.refuse(opts, req)
  if status then return answer(status, { error = why }) end
  local cond = opts.where
  local test = cond and require("buzz.filter").predicate(cond, 2) or nil
  local gone = false
  pcall(ngx.on_abort, function() gone = true end)
  local function is_gone() return gone end
  ngx.status = 200
  ngx.header["Content-Type"] = "text/event-stream; charset=utf-8"
  ngx.header["Cache-Control"] = "no-cache"
  ngx.header["X-Accel-Buffering"] = "no"
  if not put(": connected\n\nretry: " .. (opts.retry or 3000) .. "\n\n") then
    return
  end
  local last = gateway.last_event_id(req)
  if opts.store then
    tail(opts, pattern, test, last, is_gone)
  else
    live(bus, opts, pattern, cond, last, is_gone)
  end
end

--- content_by_lua: a webhook that publishes on publisher (a bus, or
--- buzz.ngx.shared's log); opts as bus:serve's ingest routes, plus token,
--- authorize, public; events = true makes it POST /events instead.
function M.ingest(publisher, opts)
  check_conf(opts, INGEST_OPTIONS, "buzz.ngx.ingest")
  if not opts.events and not opts.type and not opts.type_header then
    error("buzz.ngx.ingest: give type = \"...\", type_header = \"...\" or "
          .. "events = true", 2)
  end
  if ngx.req.get_method() ~= "POST" then
    ngx.header["Allow"] = "POST"
    return answer(405, { error = "POST only" })
  end
  ngx.req.read_body()
  local body = ngx.req.get_body_data()
  if not body then
    local file = ngx.req.get_body_file()
    if file then
      local f = io.open(file, "rb")
      if f then body = f:read("*a") f:close() end
    end
  end
  local req = request(nil, body or "")
  if opts.events then
    return answer(gateway.post_events(opts, publisher, req))
  end
  return answer(gateway.ingest(opts, publisher, req, opts))
end

--- content_by_lua: the Prometheus text of bus (this worker's), or with
--- { dict = "name" } the sum of every worker's shared by
--- buzz.metrics.share.
function M.metrics(bus, opts)
  local metrics = require "buzz.metrics"
  ngx.header["Content-Type"] = metrics.CONTENT_TYPE
  if opts and opts.dict then
    ngx.print(metrics.shared_prometheus(ngx.shared[opts.dict], opts.labels))
  else
    ngx.print(metrics.prometheus(bus, opts and opts.labels))
  end
end

return M
