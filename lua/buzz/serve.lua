--- buzz.serve: bus:serve{...}, an HTTP/1.1 gateway on the bus's own loop.
-- The server is C (csrc/http.c: libuv and Debian's http_parser); it
-- queues whole requests and this module answers them when the bus is
-- driven (run(), a host's turn, step, drain), so it works wherever the
-- bus does: plain Lua, luv, Neovim. What it serves:
--
--   GET  <stream path>       an SSE stream of a subject (lua/buzz/sse.lua)
--   GET  /events?subject=P   an ad-hoc stream, with subjects = true
--   POST <ingest path>       webhooks that publish (GitHub's signature)
--   POST /events             {"type":..,"payload":..} publishes
--   GET  /metrics            the Prometheus text of bus:metrics()
--   GET  /                   the live dashboard (lua/buzz/page.lua)
--   GET  /api/stats, /api/trace/ID   what the dashboard reads
--
-- Everything but the page needs the token (Authorization: Bearer, a
-- ?token= or the buzz_token cookie the page sets) unless public = true,
-- and then authorize(req) when given; ingest routes with a secret check
-- the signature instead. Answers: 202 {"id":..} published, 400 bad JSON
-- or type, 401 no or bad token or signature, 403 authorize said no, 404,
-- 405, 413 over max_payload, 429 with Retry-After on EFULL, 503 while
-- closing.
-- @module buzz.serve
local core = require "buzz.core"
local options = require "buzz.options"
local util = require "buzz.util"
local sse = require "buzz.sse"
local metrics = require "buzz.metrics"
local gateway = require "buzz.gateway"

local type, pairs, ipairs, tostring, tonumber, pcall, error, setmetatable =
      type, pairs, ipairs, tostring, tonumber, pcall, error, setmetatable
local concat = table.concat
local floor = math.floor
local json_encode = core.json_encode
local check_options, is_callable = options.check_options,
                                   options.is_callable
local quote = util.quote

local M = {}
local Server = {}
Server.__index = Server

local SERVE_OPTIONS = {}
for _, k in ipairs{ "host", "port", "token", "authorize", "public",
                    "streams", "subjects", "ingest", "post_events",
                    "page", "heartbeat", "retry", "ring", "max_buffer",
                    "max_payload", "timeout", "max_conns" } do
  SERVE_OPTIONS[k] = true
end
SERVE_OPTIONS[1] = "authorize, heartbeat, host, ingest, max_buffer, "
  .. "max_conns, max_payload, page, port, post_events, public, retry, "
  .. "ring, streams, subjects, timeout, token"
local INGEST_OPTIONS = gateway.INGEST_OPTIONS

local REASONS = gateway.REASONS

-- Requests answered per pump, so deliveries are not starved.
local PUMP_MAX = 64

-- ------------------------------------------------------------ responses

-- Writes a whole response; the connection is kept when the client asked.
local function respond(self, req, status, body, ctype, extra)
  body = body or ""
  local keep = req.keep_alive and not self.is_closing
  local head = { "HTTP/1.1 ", status, " ", REASONS[status] or "Status",
                 "\r\nContent-Type: ", ctype or "application/json",
                 "\r\nContent-Length: ", #body,
                 "\r\nCache-Control: no-store\r\n" }
  if extra then head[#head + 1] = extra end
  if not keep then head[#head + 1] = "Connection: close\r\n" end
  head[#head + 1] = "\r\n"
  if req.method ~= "HEAD" then head[#head + 1] = body end
  self.srv:write(req.conn, concat(head), keep and "e" or "ec")
end

local function fail(self, req, status, message, extra)
  respond(self, req, status, json_encode{ error = message }, nil, extra)
end

-- A path template ("/repos/:id/events") as a Lua pattern and its names.
local function template(path)
  local names = {}
  local pat = path:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0")
    :gsub("/:([%w_]+)", function(name)
      names[#names + 1] = name
      return "/([^/]+)"
    end)
  return "^" .. pat .. "$", names
end

-- Answers req with what a gateway function decided.
local function answer(self, req, status, body, extra)
  if status == 202 then self.ingested = self.ingested + 1 end
  respond(self, req, status, json_encode(body), nil, extra)
end

local function stream(self, req, pattern, cond, plain)
  local status, why = gateway.refuse(self, req)
  if status then return fail(self, req, status, why) end
  if self.is_closing then return fail(self, req, 503, "closing") end
  sse.open(self, req.conn, pattern, cond, gateway.last_event_id(req), plain)
end

-- ------------------------------------------------------------ the router

local function api(self, req)
  local status, why = gateway.refuse(self, req)
  if status then return fail(self, req, status, why) end
  local path = req.path
  if path == "/metrics" then
    return respond(self, req, 200, metrics.prometheus(self.bus),
                   "text/plain; version=0.0.4; charset=utf-8")
  elseif path == "/api/stats" then
    local bus = self.bus
    local st = bus:stats()
    local m = bus:metrics()
    local out = metrics.snapshot(m, bus:_now())
    out.pending, out.last_id, out.streams = st.pending, st.last_id,
                                            self.nstreams
    out.consumers = m.store and m.store.consumers or nil
    local okd, dead = pcall(bus.dead_letters, bus, { limit = 20 })
    if okd then
      out.dead = {}
      for i, d in ipairs(dead) do
        out.dead[i] = { id = d.id, type = d.type, reason = d.reason,
                        subscription = d.subscription,
                        failed_at = d.failed_at,
                        error = d.error }
      end
    end
    local ok, text = pcall(json_encode, out)
    if not ok then return fail(self, req, 500, tostring(text)) end
    return respond(self, req, 200, text)
  end
  local id = path:match("^/api/trace/(.+)$")
  local what = tonumber(id) or id
  local ok, tree = pcall(self.bus.trace, self.bus, what)
  if not ok or tree == nil then
    return fail(self, req, 404, "no trace of " .. tostring(id))
  end
  return respond(self, req, 200, json_encode(tree))
end

local function route(self, req)
  local path, method = req.path, req.method
  local is_get = method == "GET" or method == "HEAD"
  if path == "/" and self.page then
    if not is_get then return fail(self, req, 405, "GET only",
                                   "Allow: GET, HEAD\r\n") end
    local extra
    local t = req.query.token
    if t and self.token and core.equal_secret(t, self.token) then
      extra = "Set-Cookie: buzz_token=" .. t
              .. "; Path=/; HttpOnly; SameSite=Strict\r\n"
    end
    return respond(self, req, 200, require("buzz.page").html,
                   "text/html; charset=utf-8", extra)
  end
  local spec = self.ingest[path]
  if spec then
    if method ~= "POST" then
      return fail(self, req, 405, "POST only", "Allow: POST\r\n")
    end
    return answer(self, req, gateway.ingest(self, self.bus, req, spec))
  end
  if path == "/api/events" and self.page and is_get then
    return stream(self, req, ">", nil, true)   -- the dashboard's
  end
  if path == "/events" then
    if method == "POST" and self.post_events then
      return answer(self, req, gateway.post_events(self, self.bus, req))
    end
    if is_get and self.subjects then
      local s = req.query.subject
      if not s or not core.check_subject(s, true) then
        return fail(self, req, 400, "?subject= must be a subject "
                    .. "pattern such as repo.42.>")
      end
      return stream(self, req, s)
    end
  end
  for _, r in ipairs(self.routes) do
    local caps = { path:match(r.pat) }
    if caps[1] or (path:match(r.pat) and #r.names == 0) then
      if not is_get then
        return fail(self, req, 405, "GET only", "Allow: GET\r\n")
      end
      local subject = r.subject
      req.params = {}
      for i, name in ipairs(r.names) do
        local v = gateway.unescape(caps[i])
        if not gateway.is_token(v) then
          return fail(self, req, 400, ("bad %s: %s"):format(name, quote(v)))
        end
        req.params[name] = v
        subject = subject:gsub(":" .. name, function() return v end)
      end
      return stream(self, req, subject, r.cond)
    end
  end
  if is_get and (path == "/metrics" or path:find("^/api/")) then
    return api(self, req)
  end
  return fail(self, req, 404, "no route for " .. method .. " " .. path)
end

-- ------------------------------------------------------------ the server

--- Answers what the server has queued (the bus calls it when driven).
-- @local
function Server:pump()
  local srv = self.srv
  if not srv then return 0 end
  local n = 0
  while n < PUMP_MAX do
    local kind, conn, method, url, headers, body, keep, peer = srv:next()
    if not kind then break end
    n = n + 1
    if kind == "closed" then
      sse.closed(self, conn)
    else
      local path, q = url:match("^([^?#]*)%??([^#]*)")
      local req = { conn = conn, method = method, url = url, path = path,
                    query = gateway.parse_query(q or ""), headers = headers,
                    body = body, keep_alive = keep, peer = peer }
      local ok, err = pcall(route, self, req)
      if not ok then
        self.bus:_report_error("ECALLBACK: bus:serve: " .. tostring(err))
        pcall(fail, self, req, 500, "internal error")
      end
    end
  end
  return n
end

--- "http://host:port"
function Server:url()
  local host = self.host
  if host:find(":", 1, true) then host = "[" .. host .. "]" end
  return "http://" .. host .. ":" .. self.port
end

--- Connections open now.
function Server:count()
  return self.srv and self.srv:count() or 0
end

--- Counters: streams open, stream clients dropped for overflow,
--- requests published.
function Server:stats()
  return { connections = self:count(), streams = self.nstreams,
           overflows = self.overflows, ingested = self.ingested }
end

--- Stops serving: queued requests get 503, streams a last comment, and
--- every connection closes. Idempotent; bus:close() calls it.
function Server:close()
  local srv = self.srv
  if not srv then return end
  self.is_closing = true
  while true do                         -- what arrived: 503
    local kind, conn, method, url, headers = srv:next()
    if not kind then break end
    if kind == "request" then
      local req = { conn = conn, method = method, url = url,
                    headers = headers, keep_alive = false }
      fail(self, req, 503, "closing")
    end
  end
  sse.close_all(self)
  if self.beat then self.beat:cancel() end
  srv:close()
  self.srv = nil
  local list = self.bus._servers
  for i = #list, 1, -1 do
    if list[i] == self then table.remove(list, i) end
  end
end
Server.__close = Server.close

-- The heartbeat, every `heartbeat` seconds on the bus's clock.
local function beat(self)
  if not self.srv then return end
  sse.heartbeat(self)
  self.beat = self.bus:_after(self.heartbeat_ms, beat, self):unref()
end

-- ------------------------------------------------------------ bus:serve

local function check(opts, level)
  check_options(opts, SERVE_OPTIONS, "serve", level + 1)
  local function bad(fmt, ...)
    error("bus:serve: " .. fmt:format(...), level + 1)
  end
  if opts.token ~= nil and (type(opts.token) ~= "string"
                            or #opts.token < 8) then
    bad("token: expected a string of 8 or more characters, got %s",
        quote(opts.token))
  end
  if opts.authorize ~= nil and not is_callable(opts.authorize) then
    bad("authorize: expected a function(req), got %s", quote(opts.authorize))
  end
  if not opts.token and not opts.authorize and not opts.public then
    bad("the gateway is closed to anyone without a token: give token = "
        .. "\"...\", authorize = function(req) ... end, or public = true")
  end
  for _, k in ipairs{ "port", "ring", "max_buffer", "max_payload",
                      "max_conns", "retry" } do
    local v = opts[k]
    if v ~= nil and (type(v) ~= "number" or v < 0 or v % 1 ~= 0
                     or (k == "port" and v > 65535)) then
      bad("%s: expected a non-negative integer, got %s", k, quote(v))
    end
  end
  for _, k in ipairs{ "heartbeat", "timeout" } do
    local v = opts[k]
    if v ~= nil and (type(v) ~= "number" or v <= 0 or v > 86400) then
      bad("%s: expected seconds (a positive number), got %s", k, quote(v))
    end
  end
  local routes = {}
  for path, v in pairs(opts.streams or {}) do
    local subject, cond = v, nil
    if type(v) == "table" then
      subject, cond = v.subject, v.where or v.filter
    end
    if type(path) ~= "string" or path:sub(1, 1) ~= "/" then
      bad("streams: a path must start with /, got %s", quote(path))
    end
    local probe = type(subject) == "string"
                  and subject:gsub(":[%w_]+", "x") or nil
    if not probe or not core.check_subject(probe, true) then
      bad("streams[%q]: expected a subject pattern such as \"repo.:id.>\""
          .. ", got %s", path, quote(subject))
    end
    local pat, names = template(path)
    routes[#routes + 1] = { pat = pat, names = names, subject = subject,
                            cond = cond, path = path }
  end
  table.sort(routes, function(a, b) return #a.path > #b.path end)
  for path, spec in pairs(opts.ingest or {}) do
    if type(path) ~= "string" or path:sub(1, 1) ~= "/" then
      bad("ingest: a path must start with /, got %s", quote(path))
    end
    check_options(spec, INGEST_OPTIONS, "ingest[" .. ("%q"):format(path)
                  .. "]", level + 1)
    if type(spec) ~= "table" or (not spec.type and not spec.type_header) then
      bad("ingest[%q]: give type = \"...\" or type_header = \"...\"", path)
    end
  end
  return routes
end

--- bus:serve{ host, port, token, ... } -> server | nil, err, code.
-- @local
function M.serve(bus, opts, level)
  opts = opts or {}
  local routes = check(opts, level + 1)
  local c = bus._core
  local max_payload = opts.max_payload or bus._max_payload or 1048576
  local srv, err, code = c:serve(opts.host or "127.0.0.1", opts.port or 8080,
    { max_body = max_payload, max_buffer = opts.max_buffer,
      timeout_ms = floor((opts.timeout or 10) * 1000),
      max_conns = opts.max_conns })
  if not srv then return nil, err, code end
  local self = setmetatable({
    bus = bus, srv = srv, host = opts.host or "127.0.0.1",
    port = srv:port(), token = opts.token, authorize = opts.authorize,
    routes = routes, ingest = opts.ingest or {},
    subjects = opts.subjects == true, post_events = opts.post_events ~= false,
    page = opts.page ~= false, retry_ms = opts.retry or 3000,
    heartbeat_ms = floor((opts.heartbeat or 15) * 1000),
    report = function(e) bus:_report_error(e) end,
    streams = {}, nstreams = 0, overflows = 0, ingested = 0,
  }, Server)
  if (#routes > 0 or self.subjects or self.page) and not bus:_has_store() then
    sse.start_ring(self, opts.ring or 1000, bus:stats().last_id)
  end
  self.beat = bus:_after(self.heartbeat_ms, beat, self):unref()
  local list = bus._servers or {}
  bus._servers = list
  list[#list + 1] = self
  return self
end

--- Answers every server of bus (drive.lua calls it on each turn).
-- @local
function M.pump(bus)
  local list = bus._servers
  local n = 0
  for i = #list, 1, -1 do
    local s = list[i]
    if s then n = n + s:pump() end
  end
  return n
end

--- Closes every server of bus (bus:close()).
-- @local
function M.close_all(bus)
  local list = bus._servers
  if not list then return end
  for i = #list, 1, -1 do
    if list[i] then list[i]:close() end
  end
end

--- Starts an HTTP/1.1 gateway on the bus's loop: SSE streams, webhook
--- ingress, POST /events, /metrics and the dashboard (README, "Serving").
--- Options: host ("127.0.0.1"), port (8080; 0: any), token, authorize,
--- public, streams, subjects, ingest, post_events, page, heartbeat (15 s),
--- retry (3000 ms), ring (1000), max_buffer, max_payload, timeout (10 s),
--- max_conns.
---@tparam table opts
---@return a server (url, stats, count, close) | nil, err, code
-- @function Bus:serve
local function bus_serve_doc() end   -- (for the reference: the method
local _ = bus_serve_doc               -- is made by install, below)

--- Puts serve on the bus class; check_bus is init.lua's.
-- @local
function M.install(Bus, check_bus)
  function Bus:serve(opts)
    check_bus(self, "serve")
    local srv, err, code = M.serve(self, opts, 2)
    return srv, err, code     -- not a tail call: error levels count frames
  end
end

return M
