--- buzz.sse: the event streams of bus:serve (WHATWG Server-Sent Events).
-- A stream is a subscription of the bus whose handler writes each event
-- to one client as an SSE message: `id:` the event id, `event:` its type,
-- `data:` the JSON envelope (id, type, ts, payload, key, correlation_id,
-- causation_id). It starts with a `: connected` comment and a `retry:`
-- hint; a heartbeat comment goes to every client each `heartbeat`
-- seconds (on the bus's clock, so a manual clock drives it too).
--
-- Resume: a client that sends Last-Event-ID (or ?last_event_id=) first
-- gets what it missed that its subject matches, in id order, then the
-- live events, with no gap and no duplicate: with a store from the log
-- (after a flush, so every event published so far is there), without one
-- from a ring of the last `ring` events the server saw. What is older
-- than either (pruned by retention, before the ring or before the server
-- started, or an id this bus never gave) gets `event: reset`: the page
-- reloads its state, then the stream goes live.
--
-- A client that does not read fills its buffer (max_buffer bytes unsent):
-- it gets a last `event: overflow` message and is disconnected; nothing
-- else waits for it. EventSource reconnects with the last id it saw and
-- resumes from there.
-- @module buzz.sse
local core = require "buzz.core"
local filter = require "buzz.filter"
local can_resume = require("buzz.gateway").can_resume

local json_encode = core.json_encode
local match = core.match
local tostring, pairs, pcall = tostring, pairs, pcall
local floor = math.floor

local M = {}

local HEADERS = "HTTP/1.1 200 OK\r\n"
  .. "Content-Type: text/event-stream; charset=utf-8\r\n"
  .. "Cache-Control: no-cache\r\n"
  .. "X-Accel-Buffering: no\r\n"
  .. "Connection: keep-alive\r\n\r\n"

--- The envelope of ev as the JSON of an SSE data line (JSON escapes
--- every newline, so it is always one line).
function M.envelope(ev)
  return json_encode{ id = ev.id, type = ev.type, ts = ev.ts,
                      payload = ev.payload, key = ev.key,
                      correlation_id = ev.correlation_id,
                      causation_id = ev.causation_id }
end

-- The message of ev (one encoding per event, however many clients get
-- it: the streams of a server share the last one made). plain: without
-- the `event:` line, so that a page's onmessage gets every type (the
-- dashboard's stream; the type is in the data).
local last_ev, last_msg, last_plain
local function message(ev, plain)
  if ev ~= last_ev or not last_msg then
    local ok, data = pcall(M.envelope, ev)
    if not ok then                      -- a payload JSON cannot carry
      data = json_encode{ id = ev.id, type = ev.type, ts = ev.ts,
                          error = tostring(data) }
    end
    last_ev = ev
    last_msg = "id: " .. ev.id .. "\nevent: " .. ev.type .. "\ndata: "
               .. data .. "\n\n"
    last_plain = "id: " .. ev.id .. "\ndata: " .. data .. "\n\n"
  end
  return plain and last_plain or last_msg
end
M.message = message

-- Ends client cl's stream: a last message, then the connection closes.
local function finish(self, cl, last)
  if cl.is_done then return end
  cl.is_done = true
  if cl.sub then cl.sub:unsubscribe() end
  self.streams[cl.conn] = nil
  self.nstreams = self.nstreams - 1
  if last then self.srv:write(cl.conn, last, "fc") end
end
M.finish = finish

-- Writes text to cl; a client whose buffer is full is sent away.
local function send(self, cl, text)
  if cl.is_done then return false end
  local ok, code = self.srv:write(cl.conn, text)
  if ok then return true end
  if code == "EFULL" then
    self.overflows = self.overflows + 1
    finish(self, cl, "event: overflow\ndata: {\"reason\":\"the client "
           .. "did not keep up\"}\n\n")
  else
    finish(self, cl)                    -- gone already
  end
  return false
end

-- Sends ev to cl unless the resume already did (ids up to cl.seen).
local function deliver(self, cl, ev)
  if cl.seen and ev.id <= cl.seen then return end
  if cl.test and not cl.test(ev) then return end
  send(self, cl, message(ev, cl.plain))
end

-- The ring a memory bus resumes from: the last n events the server saw.
local function ring_add(self, ev)
  local r = self.ring
  local i = r.next
  local old = r[i]
  if old then r.floor = old.id end      -- falls out: resume past it only
  r[i] = { id = ev.id, type = ev.type, ev = ev }
  r.next = i % r.size + 1
  r.high = ev.id
end

--- Starts the ring (a memory bus with streams): a subscription to every
--- event, kept by the server.
function M.start_ring(self, size, last_id)
  self.ring = { size = size, next = 1, floor = last_id, high = last_id }
  self.ring_sub = self.bus:_subscribe(">", function(ev)
    ring_add(self, ev)
  end, { name = "buzz.serve.ring" }, 2)
end

-- Replays the ring to cl after id last; false when it cannot (reset).
local function resume_ring(self, cl, last)
  local r = self.ring                   -- it holds what came after floor
  if not can_resume(r.floor + 1, r.high, last) then return false end
  local n = r.size
  for k = 0, n - 1 do
    local e = r[(r.next - 1 + k) % n + 1]
    if e and e.id > last and match(cl.pattern, e.type)
       and (not cl.test or cl.test(e.ev)) then
      if not send(self, cl, message(e.ev, cl.plain)) then return true end
    end
  end
  cl.seen = r.high
  return true
end

-- Replays the store to cl after id last; false when it cannot (reset).
local function resume_store(self, cl, last)
  local bus = self.bus
  bus:flush()                           -- every event so far is stored
  local info = bus:store_info{ events = false }
  local high = info.last_id or 0
  if not can_resume(info.first_id, high, last) then return false end
  cl.seen = high
  for ev in bus:events{ types = cl.pattern, from = last + 1, to = high } do
    if not cl.test or cl.test(ev) then
      if not send(self, cl, message(ev, cl.plain)) then return true end
    end
  end
  return true
end

--- Opens a stream on connection conn: pattern (a subject pattern), cond
--- (a filter condition or nil), last (the Last-Event-ID as an integer, or
--- nil), plain (no `event:` lines). The connection is the client's until
--- it closes.
function M.open(self, conn, pattern, cond, last, plain)
  local cl = { conn = conn, pattern = pattern, plain = plain,
               test = cond and filter.predicate(cond, 2) or nil }
  self.streams[conn] = cl
  self.nstreams = self.nstreams + 1
  local hello = HEADERS .. ": connected\n\nretry: " .. self.retry_ms
                .. "\n\n"
  if not send(self, cl, hello) then return end
  if last then
    local ok
    if self.bus:_has_store() then ok = resume_store(self, cl, last)
    else ok = resume_ring(self, cl, last) end
    if cl.is_done then return end
    if not ok then
      cl.seen = nil
      if not send(self, cl, "event: reset\ndata: {\"last_event_id\":"
                  .. floor(last) .. "}\n\n") then return end
    end
  end
  cl.sub = self.bus:_subscribe(pattern, function(ev)
    deliver(self, cl, ev)
  end, { name = "buzz.serve.stream", filter = cond }, 2)
end

--- A comment to every stream, so proxies and clients see it is alive.
function M.heartbeat(self)
  local n = 0
  for _, cl in pairs(self.streams) do
    if send(self, cl, ": heartbeat\n\n") then n = n + 1 end
  end
  return n
end

--- The connection conn closed: its stream ends.
function M.closed(self, conn)
  local cl = self.streams[conn]
  if cl then finish(self, cl) end
end

--- Ends every stream (the server closes): each gets a last comment.
function M.close_all(self)
  for _, cl in pairs(self.streams) do
    finish(self, cl, ": server closing\n\n")
  end
  if self.ring_sub then self.ring_sub:unsubscribe() end
end

return M
