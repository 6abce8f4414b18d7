--- buzz.gateway: what the HTTP gateway decides, whoever carries the bytes
-- (bus:serve's own server, lua/buzz/serve.lua, or nginx,
-- lua/buzz/ngxgate.lua): auth, webhook ingress, POST /events, the
-- Last-Event-ID. A request is a table { method, path, query, headers (by
-- lower-case name), body, params, peer }; an answer is a status, a table
-- for the JSON body, and extra header lines or nil.
-- @module buzz.gateway
local core = require "buzz.core"

local type, ipairs, tostring, tonumber, pcall, next =
      type, ipairs, tostring, tonumber, pcall, next
local floor = math.floor
local json_decode = core.json_decode
local equal_secret = core.equal_secret

local M = {}

M.REASONS = { [200] = "OK", [202] = "Accepted", [204] = "No Content",
  [400] = "Bad Request", [401] = "Unauthorized", [403] = "Forbidden",
  [404] = "Not Found", [405] = "Method Not Allowed",
  [413] = "Payload Too Large", [429] = "Too Many Requests",
  [500] = "Internal Server Error", [503] = "Service Unavailable" }

function M.unescape(s)
  s = s:gsub("+", " ")
  return (s:gsub("%%(%x%x)", function(h)
    return string.char(tonumber(h, 16))
  end))
end

function M.parse_query(q)
  local t = {}
  for pair in q:gmatch("[^&]+") do
    local k, v = pair:match("^([^=]*)=?(.*)$")
    t[M.unescape(k)] = M.unescape(v)
  end
  return t
end

local function cookie(header, name)
  if type(header) ~= "string" then return nil end
  for k, v in header:gmatch("([^=;%s]+)=([^;]*)") do
    if k == name then return v end
  end
  return nil
end

--- A path parameter or header value usable as one subject token: no dot,
--- no wildcard, no space.
function M.is_token(s)
  return type(s) == "string" and s ~= "" and not s:find("[%.%*>%s]")
end

--- nil when req may go on, else the status (401, 403) and a message.
--- conf: token (compared in constant time; from Authorization: Bearer,
--- ?token= or the buzz_token cookie), authorize(req), report(err) for an
--- authorize that raised.
function M.refuse(conf, req)
  local token = conf.token
  if token then
    local got
    local auth = req.headers.authorization
    if type(auth) == "string" then got = auth:match("^[Bb]earer%s+(.+)$") end
    got = got or req.query.token or cookie(req.headers.cookie, "buzz_token")
    if type(got) ~= "string" or not equal_secret(got, token) then
      return 401, "a token is needed: Authorization: Bearer <token>, "
                  .. "?token= or the buzz_token cookie"
    end
  end
  local authorize = conf.authorize
  if authorize then
    local ok, yes = pcall(authorize, req)
    if not ok then
      if conf.report then
        conf.report("ECALLBACK: the gateway's authorize raised: "
                    .. tostring(yes))
      end
      return 403, "not allowed"
    end
    if not yes then return 403, "not allowed" end
  end
  return nil
end

--- Whether a client that last saw event `last` can resume from a log
--- whose events are first..high (first nil: the log is empty): true,
--- false (send reset: those events are gone, or it names an id the log
--- never held).
function M.can_resume(first, high, last)
  if last > high then return false end          -- an id it never gave
  if last == high then return true end          -- nothing missed
  return first ~= nil and first <= last + 1     -- else pruned
end

--- The Last-Event-ID of req (the header, or ?last_event_id=), or nil.
function M.last_event_id(req)
  local v = req.headers["last-event-id"] or req.query.last_event_id
  v = tonumber(v)
  if v and v >= 0 and v % 1 == 0 and v < 2 ^ 53 then return floor(v) end
  return nil
end

-- Publishes on publisher (a bus, or buzz.ngx.shared's log) and says how
-- it went: 202 with the id (or forwarded = true), 400 for what publish
-- raises (a bad type, a payload JSON cannot hold), 429 on EFULL, 413 on
-- ETOOBIG, 503 once closed.
local function publish(conf, publisher, etype, payload, opts)
  if conf.is_closing then return 503, { error = "closing" } end
  local ok, id, err, code = pcall(publisher.publish, publisher, etype,
                                  payload, opts)
  if not ok then return 400, { error = tostring(id) } end
  if id == true then return 202, { forwarded = true } end
  if id then return 202, { id = id } end
  if code == "EFULL" then
    return 429, { error = err }, "Retry-After: 1\r\n"
  elseif code == "ETOOBIG" then
    return 413, { error = err }
  elseif code == "ECLOSED" then
    return 503, { error = err }
  end
  return 500, { error = err }
end

local function decode(body)
  local ok, v, err = pcall(json_decode, body)
  if not ok or (v == nil and err ~= nil) then
    return nil, "the body is not JSON: " .. tostring(err or v)
  end
  return v
end

--- A webhook: spec = { type | type_header [, prefix], secret,
--- dedup_header, key_header } (bus:serve's ingest). A secret checks
--- GitHub's X-Hub-Signature-256 (HMAC-SHA256 of the body) instead of the
--- token.
function M.ingest(conf, publisher, req, spec)
  if spec.secret then
    local sig = req.headers["x-hub-signature-256"]
    local want = "sha256=" .. core.hmac_sha256(spec.secret, req.body)
    if type(sig) ~= "string" or not equal_secret(sig, want) then
      return 401, { error = "bad or missing X-Hub-Signature-256" }
    end
  else
    local status, why = M.refuse(conf, req)
    if status then return status, { error = why } end
  end
  local etype = spec.type
  if spec.type_header then
    local v = req.headers[spec.type_header:lower()]
    if not M.is_token(v) then
      return 400, { error = "missing or bad " .. spec.type_header }
    end
    etype = spec.prefix and spec.prefix .. "." .. v or v
  end
  local payload, err = decode(req.body)
  if err then return 400, { error = err } end
  local opts = {}
  if spec.dedup_header then
    local d = req.headers[spec.dedup_header:lower()]
    if type(d) == "string" and d ~= "" then opts.dedup = d end
  end
  if spec.key_header then
    local k = req.headers[spec.key_header:lower()]
    if type(k) == "string" and k ~= "" then opts.key = k end
  end
  return publish(conf, publisher, etype, payload, next(opts) and opts or nil)
end

--- POST /events: {"type": ..., "payload": ..., "key", "correlation_id",
--- "dedup", "priority"}.
function M.post_events(conf, publisher, req)
  local status, why = M.refuse(conf, req)
  if status then return status, { error = why } end
  local body, err = decode(req.body)
  if err then return 400, { error = err } end
  if type(body) ~= "table" or type(body.type) ~= "string" then
    return 400, { error = "expected {\"type\": \"...\", \"payload\": ...}" }
  end
  local opts = {}
  for _, k in ipairs{ "key", "correlation_id", "dedup", "priority" } do
    if body[k] ~= nil then opts[k] = body[k] end
  end
  return publish(conf, publisher, body.type, body.payload,
                 next(opts) and opts or nil)
end

local INGEST_OPTIONS = { type = true, type_header = true, prefix = true,
                         secret = true, dedup_header = true,
                         key_header = true,
  "dedup_header, key_header, prefix, secret, type, type_header" }
M.INGEST_OPTIONS = INGEST_OPTIONS

return M
