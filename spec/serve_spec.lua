-- bus:serve: the HTTP gateway over real sockets. The clients are luv TCP
-- connections in this process; the bus is driven by drain() between
-- non-blocking turns of luv's loop (serve answers when the bus is driven).
local buzz = require "buzz"
local core = require "buzz.core"
local uv = require "luv"

local TOKEN = "s3cret-token"

-- Runs luv's loop and the bus until pred() holds (or fails after 5 s).
-- deliver = false: the server answers, nothing is delivered.
local function pump(bus, pred, deliver)
  local deadline = uv.hrtime() + 5e9
  while true do
    uv.run("nowait")
    if deliver == false then require("buzz.serve").pump(bus)
    else bus:drain() end
    uv.run("nowait")
    local v = pred()
    if v then return v end
    assert(uv.hrtime() < deadline, "timed out")
    uv.sleep(1)
  end
end

-- A raw connection: what arrives is appended to c.data.
local function connect(port, request)
  local c = { data = "", closed = false }
  local tcp = uv.new_tcp()
  c.tcp = tcp
  tcp:connect("127.0.0.1", port, function(err)
    if err then c.err, c.closed = err, true; return end
    c.connected = true
    tcp:read_start(function(rerr, chunk)
      if chunk then
        c.data = c.data .. chunk
      else
        c.closed = true
        if not tcp:is_closing() then tcp:close() end
      end
      if rerr then c.err = rerr end
    end)
    if request then tcp:write(request) end
  end)
  function c.send(s) tcp:write(s) end
  function c.close() if not tcp:is_closing() then tcp:close() end end
  return c
end

local function request(method, path, headers, body)
  local t = { method .. " " .. path .. " HTTP/1.1\r\nHost: test\r\n" }
  for k, v in pairs(headers or {}) do t[#t + 1] = k .. ": " .. v .. "\r\n" end
  if body then t[#t + 1] = "Content-Length: " .. #body .. "\r\n" end
  t[#t + 1] = "\r\n"
  t[#t + 1] = body or ""
  return table.concat(t)
end

-- Parses one whole response at the start of s: status, headers, body, rest.
local function response(s)
  local head, rest = s:match("^(.-)\r\n\r\n(.*)$")
  if not head then return nil end
  local status = tonumber(head:match("^HTTP/1%.1 (%d+)"))
  local h = {}
  for k, v in head:gmatch("\r\n([^:]+): ([^\r]*)") do h[k:lower()] = v end
  local n = tonumber(h["content-length"])
  if n then
    if #rest < n then return nil end
    return status, h, rest:sub(1, n), rest:sub(n + 1)
  end
  return status, h, rest, ""
end

-- One request on a new connection; its status, headers and body.
local function fetch(bus, port, method, path, headers, body, deliver)
  local c = connect(port, request(method, path, headers, body))
  pump(bus, function() return response(c.data) and true end, deliver)
  local status, h, b = response(c.data)
  c.close()
  return status, h, b
end

-- The SSE messages in s, as { id =, event =, data =, comment = } tables.
local function messages(s)
  local body = s:match("\r\n\r\n(.*)$") or ""
  local out = {}
  for block in body:gmatch("(.-)\n\n") do
    local m = {}
    for line in (block .. "\n"):gmatch("(.-)\n") do
      local k, v = line:match("^([^:]*): ?(.*)$")
      if k == "" then m.comment = v
      elseif k then m[k] = m[k] and m[k] .. "\n" .. v or v end
    end
    out[#out + 1] = m
  end
  return out
end

local function events_in(s)
  local out = {}
  for _, m in ipairs(messages(s)) do
    if m.id then out[#out + 1] = m end
  end
  return out
end

local function ids(s)
  local out = {}
  for _, m in ipairs(events_in(s)) do out[#out + 1] = tonumber(m.id) end
  return out
end

local AUTH = { Authorization = "Bearer " .. TOKEN }

describe("bus:serve", function()
  local bus, srv, port
  local stores = {}

  local function serve(opts, bus_opts)
    bus = H.bus(bus_opts)
    opts = opts or {}
    opts.port = opts.port or 0
    if opts.token == nil and not opts.public then opts.token = TOKEN end
    srv = assert(bus:serve(opts))
    port = srv.port
    return srv
  end

  after_each(function()
    if bus then bus:close() end
    uv.run("nowait")
    for _, p in ipairs(stores) do H.remove_store(p) end
    stores = {}
    bus = nil
  end)

  describe("configuration", function()
    it("is closed unless a token, authorize or public says otherwise",
       function()
      local b = H.bus()
      assert.has_error(function() b:serve{ port = 0 } end,
        "bus:serve: the gateway is closed to anyone without a token: give "
        .. "token = \"...\", authorize = function(req) ... end, or "
        .. "public = true")
      assert.has_error(function() b:serve{ port = 0, tokn = "x" } end)
      assert.has_error(function() b:serve{ port = 0, token = "short" } end,
        "bus:serve: token: expected a string of 8 or more characters, "
        .. "got \"short\"")
      assert.has_error(function()
        b:serve{ port = 0, public = true, streams = { ["/x"] = "a..b" } }
      end)
      assert.has_error(function()
        b:serve{ port = 0, public = true, ingest = { ["/w"] = {} } }
      end, "bus:serve: ingest[\"/w\"]: give type = \"...\" or type_header "
           .. "= \"...\"")
      local s = assert(b:serve{ port = 0, public = true })
      assert.matches("^http://127%.0%.0%.1:%d+$", s:url())
      b:close()
    end)

    it("returns EINVAL for a host that is not an IP address", function()
      local b = H.bus()
      local s, err, code = b:serve{ host = "localhost", port = 0,
                                    public = true }
      assert.is_nil(s)
      assert.equal("EINVAL", code)
      assert.equal("EINVAL: bus:serve: not an IP address: localhost", err)
    end)

    it("decides a resume by what the log still holds", function()
      local can = require("buzz.gateway").can_resume
      -- first, high, last -> resumable?
      for _, c in ipairs{
        { 1, 10, 0, true }, { 1, 10, 10, true }, { 1, 10, 5, true },
        { 5, 10, 4, true }, { 5, 10, 3, false },     -- 4 was pruned
        { 1, 10, 11, false },                         -- never given
        { nil, 10, 10, true }, { nil, 10, 9, false },  -- all pruned
      } do
        assert.equal(c[4], can(c[1], c[2], c[3]),
                     ("first %s, high %d, last %d"):format(tostring(c[1]),
                                                          c[2], c[3]))
      end
    end)

    it("returns ELOOP when the port is taken", function()
      serve()
      local b = H.bus()
      local s, err, code = b:serve{ port = port, token = TOKEN }
      assert.is_nil(s)
      assert.equal("ELOOP", code)
      assert.matches("cannot listen on 127.0.0.1:" .. port
                     .. ": address already in use", err, 1, true)
    end)
  end)

  describe("streams", function()
    it("sends the headers, a connected comment, a retry hint and the "
       .. "matching events", function()
      serve{ streams = { ["/repos/:id/events"] = "repo.:id.>" } }
      local c = connect(port, request("GET", "/repos/42/events", AUTH))
      pump(bus, function() return c.data:find("retry: 3000\n\n", 1, true) end)
      local status, h = response(c.data)
      assert.equal(200, status)
      assert.equal("text/event-stream; charset=utf-8", h["content-type"])
      assert.equal("no-cache", h["cache-control"])
      assert.equal("no", h["x-accel-buffering"])
      local ms = messages(c.data)
      assert.equal("connected", ms[1].comment)
      assert.equal("3000", ms[2].retry)
      bus:publish("repo.7.push", { n = 1 })             -- another repo
      local id = bus:publish("repo.42.push", { text = "line 1\nline 2\n" },
                             { correlation_id = "req-1" })
      pump(bus, function() return #events_in(c.data) == 1 end)
      local m = events_in(c.data)[1]
      assert.equal(tostring(id), m.id)
      assert.equal("repo.42.push", m.event)
      assert.is_nil(m.data:find("\n"))                  -- one data line
      local env = core.json_decode(m.data)
      assert.equal("line 1\nline 2\n", env.payload.text)
      assert.equal(id, env.id)
      assert.equal("req-1", env.correlation_id)
      assert.equal("repo.42.push", env.type)
      assert.is_number(env.ts)
    end)

    it("refuses without the token, takes it three ways, and asks "
       .. "authorize", function()
      local seen
      serve{ streams = { ["/repos/:id/events"] = "repo.:id.>" },
             authorize = function(req)
               seen = req
               return req.params.id ~= "13"
             end }
      assert.equal(401, (fetch(bus, port, "GET", "/repos/1/events")))
      assert.equal(401, (fetch(bus, port, "GET", "/repos/1/events",
                               { Authorization = "Bearer wrong-token" })))
      for _, way in ipairs{
        { "/repos/1/events", AUTH },
        { "/repos/1/events?token=" .. TOKEN, {} },
        { "/repos/1/events", { Cookie = "a=b; buzz_token=" .. TOKEN } },
      } do
        local c = connect(port, request("GET", way[1], way[2]))
        pump(bus, function() return c.data:find("connected", 1, true) end)
        assert.equal(200, (response(c.data)))
        c.close()
      end
      assert.equal("1", seen.params.id)
      assert.equal("GET", seen.method)
      local status, _, body = fetch(bus, port, "GET", "/repos/13/events",
                                    AUTH)
      assert.equal(403, status)
      assert.equal("not allowed", core.json_decode(body).error)
      assert.equal(400, (fetch(bus, port, "GET", "/repos/a.b/events",
                               AUTH)))
    end)

    it("sends a heartbeat comment every 15 s of the bus's clock",
       function()
      local clock = buzz.manual_clock(1800000000)
      serve({ streams = { ["/s"] = "a.>" } }, { clock = clock })
      local c = connect(port, request("GET", "/s", AUTH))
      pump(bus, function() return c.data:find("retry", 1, true) end)
      clock:advance(14)
      pump(bus, function() return true end)
      assert.is_nil(c.data:find("heartbeat", 1, true))
      clock:advance(1)
      pump(bus, function() return c.data:find(": heartbeat\n\n", 1, true) end)
      clock:advance(15)
      pump(bus, function()
        local _, n = c.data:gsub(": heartbeat\n\n", "")
        return n == 2
      end)
    end)

    it("resumes from the store after Last-Event-ID: the missed events "
       .. "in order, then live ones, no gap and no duplicate", function()
      local path = H.tmp_store()
      stores[#stores + 1] = path
      serve({ streams = { ["/s"] = "a.>" } }, { store = path })
      for i = 1, 6 do
        bus:publish(i % 2 == 0 and "a.x" or "b.x", { i = i })  -- ids 1..6
      end
      bus:drain()
      local c = connect(port, request("GET", "/s",
                                      { Authorization = AUTH.Authorization,
                                        ["Last-Event-ID"] = "2" }))
      pump(bus, function() return #ids(c.data) == 2 end)
      bus:publish("a.y", { i = 7 })
      bus:publish("b.y", { i = 8 })
      bus:publish("a.z", { i = 9 })
      pump(bus, function() return #ids(c.data) == 4 end)
      assert.same({ 4, 6, 7, 9 }, ids(c.data))
      -- the same from ?last_event_id= on a first connect
      local c2 = connect(port, request("GET", "/s?last_event_id=6", AUTH))
      pump(bus, function() return #ids(c2.data) == 2 end)
      assert.same({ 7, 9 }, ids(c2.data))
      -- an id the store never gave: reset, then live
      local c3 = connect(port, request("GET", "/s",
                                       { Authorization = AUTH.Authorization,
                                         ["Last-Event-ID"] = "500" }))
      pump(bus, function() return c3.data:find("event: reset", 1, true) end)
      bus:publish("a.w", {})
      pump(bus, function() return #ids(c3.data) == 1 end)
      assert.same({ 10 }, ids(c3.data))
    end)

    it("sends reset when the events it missed are gone from the store",
       function()
      local path = H.tmp_store()
      stores[#stores + 1] = path
      serve({ streams = { ["/s"] = "a.>" } },
            { store = path, max_events = 3 })
      for i = 1, 10 do bus:publish("a.x", { i = i }) end
      pump(bus, function()                    -- retention runs in the
        bus:publish("b.x", {})                -- background, after commits
        bus:flush()
        return bus:events{ limit = 1 }().id > 2
      end)
      local c = connect(port, request("GET", "/s",
                                      { Authorization = AUTH.Authorization,
                                        ["Last-Event-ID"] = "1" }))
      pump(bus, function() return c.data:find("event: reset", 1, true) end)
      assert.same({}, ids(c.data))
      assert.equal("1", tostring(core.json_decode(
        messages(c.data)[3].data).last_event_id))
    end)

    it("resumes from a ring without a store, and resets past it",
       function()
      serve{ streams = { ["/s"] = "a.>" }, ring = 4 }
      for i = 1, 6 do bus:publish("a.x", { i = i }) end
      bus:drain()                                -- the ring holds 3..6
      local c = connect(port, request("GET", "/s",
                                      { Authorization = AUTH.Authorization,
                                        ["Last-Event-ID"] = "3" }))
      pump(bus, function() return #ids(c.data) == 3 end)
      bus:publish("a.x", { i = 7 })
      pump(bus, function() return #ids(c.data) == 4 end)
      assert.same({ 4, 5, 6, 7 }, ids(c.data))
      local c2 = connect(port, request("GET", "/s",
                                       { Authorization = AUTH.Authorization,
                                         ["Last-Event-ID"] = "1" }))
      pump(bus, function() return c2.data:find("event: reset", 1, true) end)
      assert.same({}, ids(c2.data))
    end)

    it("disconnects a client that stops reading with a last overflow "
       .. "message, and the others go on", function()
      serve{ streams = { ["/s"] = "a.>" }, max_buffer = 65536 }
      local slow = connect(port, request("GET", "/s", AUTH))
      local fast = connect(port, request("GET", "/s", AUTH))
      pump(bus, function()
        return slow.data:find("retry", 1, true)
               and fast.data:find("retry", 1, true)
      end)
      slow.tcp:read_stop()
      local big = ("x"):rep(60000)
      local n = 0
      pump(bus, function()
        n = n + 1
        bus:publish("a.x", { n = n, big = big })
        return srv:stats().overflows == 1
      end)
      assert.equal(1, srv:stats().streams)
      pump(bus, function() return #ids(fast.data) == n end)
      slow.tcp:read_start(function(_, chunk)
        if chunk then slow.data = slow.data .. chunk else slow.closed = true end
      end)
      pump(bus, function() return slow.closed end)
      local ms = messages(slow.data)
      assert.equal("overflow", ms[#ms].event)
      assert.is_true(#ids(slow.data) < n)
    end)

    it("ends a stream when its client leaves", function()
      serve{ streams = { ["/s"] = "a.>" } }
      local before = #bus._core:subs()
      local c = connect(port, request("GET", "/s", AUTH))
      pump(bus, function() return srv:stats().streams == 1 end)
      assert.equal(before + 1, #bus._core:subs())
      c.close()
      pump(bus, function() return srv:stats().streams == 0 end)
      assert.equal(before, #bus._core:subs())
    end)

    it("filters a stream with where{}, in the resume too", function()
      local path = H.tmp_store()
      stores[#stores + 1] = path
      serve({ streams = { ["/big"] = { subject = "order.>",
                                       where = { ["payload.total"] =
                                                 { gte = 100 } } } } },
            { store = path })
      bus:publish("order.placed", { total = 5 })           -- 1
      bus:publish("order.placed", { total = 500 })         -- 2
      bus:drain()
      local c = connect(port, request("GET", "/big",
                                      { Authorization = AUTH.Authorization,
                                        ["Last-Event-ID"] = "0" }))
      pump(bus, function() return #ids(c.data) == 1 end)
      bus:publish("order.placed", { total = 7 })           -- 3
      bus:publish("order.placed", { total = 700 })         -- 4
      pump(bus, function() return #ids(c.data) == 2 end)
      assert.same({ 2, 4 }, ids(c.data))
    end)

    it("takes ad-hoc subjects only with subjects = true", function()
      serve{ subjects = true }
      local c = connect(port, request("GET", "/events?subject=repo.%2A.push",
                                      AUTH))
      pump(bus, function() return c.data:find("retry", 1, true) end)
      bus:publish("repo.1.push", {})
      bus:publish("repo.1.pull", {})
      pump(bus, function() return #ids(c.data) == 1 end)
      assert.equal(400, (fetch(bus, port, "GET", "/events?subject=a..b",
                               AUTH)))
      bus:close()
      serve{}
      assert.equal(404, (fetch(bus, port, "GET", "/events?subject=a", AUTH)))
    end)
  end)

  describe("ingest", function()
    -- GitHub's documented example of X-Hub-Signature-256.
    it("computes GitHub's test vector", function()
      assert.equal("757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f437"
                   .. "9c8b043e17",
                   core.hmac_sha256("It's a Secret to Everybody",
                                    "Hello, World!"))
      assert.is_true(core.equal_secret("abc", "abc"))
      assert.is_false(core.equal_secret("abc", "abd"))
      assert.is_false(core.equal_secret("abc", "abcd"))
    end)

    local SECRET = "It's a Secret to Everybody"
    local function github(body, event, delivery, secret)
      return { ["X-GitHub-Event"] = event, ["X-GitHub-Delivery"] = delivery,
               ["Content-Type"] = "application/json",
               ["X-Hub-Signature-256"] = "sha256="
                 .. core.hmac_sha256(secret or SECRET, body) }
    end

    it("publishes a signed webhook once, whatever the redeliveries",
       function()
      local path = H.tmp_store()
      stores[#stores + 1] = path
      serve({ ingest = { ["/webhook/github"] = {
        type_header = "X-GitHub-Event", prefix = "github", secret = SECRET,
        dedup_header = "X-GitHub-Delivery" } } }, { store = path })
      local got = {}
      bus:subscribe("github.>", function(ev) got[#got + 1] = ev end)
      local body = '{"ref":"refs/heads/main","repository":{"id":42}}'
      local status, h, b = fetch(bus, port, "POST", "/webhook/github",
                                 github(body, "push", "d-1"), body)
      assert.equal(202, status)
      assert.equal("application/json", h["content-type"])
      local id = core.json_decode(b).id
      local status2, _, b2 = fetch(bus, port, "POST", "/webhook/github",
                                   github(body, "push", "d-1"), body)
      assert.equal(202, status2)
      assert.equal(id, core.json_decode(b2).id)
      bus:drain()
      assert.equal(1, #got)
      assert.equal("github.push", got[1].type)
      assert.equal(42, got[1].payload.repository.id)
      assert.equal(id, got[1].id)
    end)

    it("answers 401, 400, 413, 405 and 404", function()
      serve{ ingest = { ["/webhook/github"] = {
        type_header = "X-GitHub-Event", prefix = "github", secret = SECRET } },
        max_payload = 1000 }
      local body = '{"a":1}'
      assert.equal(401, (fetch(bus, port, "POST", "/webhook/github",
                               github(body, "push", "d", "wrong"), body)))
      local h = github(body, "push", "d")
      h["X-Hub-Signature-256"] = nil
      assert.equal(401, (fetch(bus, port, "POST", "/webhook/github", h,
                               body)))
      local status, _, b = fetch(bus, port, "POST", "/webhook/github",
                                 github("{nope", "push", "d"), "{nope")
      assert.equal(400, status)
      assert.matches("not JSON", core.json_decode(b).error, 1, true)
      assert.equal(400, (fetch(bus, port, "POST", "/webhook/github",
                               github(body, "a.b", "d"), body)))
      local large = '{"a":"' .. ("x"):rep(2000) .. '"}'
      assert.equal(413, (fetch(bus, port, "POST", "/webhook/github",
                               github(large, "push", "d"), large)))
      assert.equal(405, (fetch(bus, port, "GET", "/webhook/github")))
      assert.equal(404, (fetch(bus, port, "GET", "/nothing", AUTH)))
    end)

    it("answers 429 with Retry-After when the queue is full", function()
      serve({}, { queue_limit = 1 })
      local n = 0
      bus:subscribe("t.>", function() n = n + 1 end)
      local body = '{"type":"t.x","payload":{}}'
      local auth = { Authorization = AUTH.Authorization }
      assert.equal(202, (fetch(bus, port, "POST", "/events", auth, body,
                               false)))
      local status, h = fetch(bus, port, "POST", "/events", auth, body, false)
      assert.equal(429, status)
      assert.equal("1", h["retry-after"])
      bus:drain()
      assert.equal(1, n)
    end)

    it("publishes POST /events with the token", function()
      serve{}
      local got
      bus:subscribe("order.>", function(ev) got = ev end)
      local body = '{"type":"order.placed","payload":{"n":3},"key":"c-1",'
                   .. '"correlation_id":"r-9"}'
      assert.equal(401, (fetch(bus, port, "POST", "/events", {}, body)))
      assert.equal(202, (fetch(bus, port, "POST", "/events", AUTH, body)))
      bus:drain()
      assert.equal(3, got.payload.n)
      assert.equal("c-1", got.key)
      assert.equal("r-9", got.correlation_id)
      assert.equal(400, (fetch(bus, port, "POST", "/events", AUTH,
                               '{"payload":1}')))
      assert.equal(400, (fetch(bus, port, "POST", "/events", AUTH,
                               '{"type":"a..b"}')))
    end)

    it("answers 503 to what arrives while it closes", function()
      serve{}
      local c = connect(port, request("POST", "/events", AUTH,
                                      '{"type":"a.b"}'))
      pump(bus, function() return c.connected end, false)
      uv.run("nowait")
      uv.sleep(20)
      srv:close()
      pump(bus, function() return c.closed end, false)
      assert.equal(503, (response(c.data)))
    end)
  end)

  describe("HTTP", function()
    it("keeps a connection alive across requests and pipelines",
       function()
      serve{}
      local c = connect(port, request("GET", "/metrics", AUTH)
                              .. request("GET", "/nothing", AUTH))
      pump(bus, function()
        local s1, _, _, rest = response(c.data)
        return s1 and response(rest)
      end)
      local s1, h1, b1, rest = response(c.data)
      assert.equal(200, s1)
      assert.equal("text/plain; version=0.0.4; charset=utf-8",
                   h1["content-type"])
      assert.matches("buzz_events_published_total", b1, 1, true)
      assert.equal(404, (response(rest)))
      assert.is_false(c.closed)
    end)

    it("hands authorize the headers by lower-case name: empty values "
       .. "kept, repeated ones joined", function()
      local seen
      serve{ public = true, authorize = function(req)
        seen = req.headers
        return true
      end }
      local c = connect(port, "GET /metrics?x=1 HTTP/1.1\r\nHost: t\r\n"
                              .. "X-Empty:\r\nX-A: 1\r\nx-a: 2\r\n"
                              .. "X-Last: z\r\n\r\n")
      pump(bus, function() return response(c.data) end)
      assert.equal(200, (response(c.data)))
      assert.equal("", seen["x-empty"])
      assert.equal("1, 2", seen["x-a"])
      assert.equal("z", seen["x-last"])
      assert.equal("t", seen.host)
    end)

    it("refuses oversized headers (431), slow requests (408) and "
       .. "upgrades (501)", function()
      serve{ timeout = 0.2 }
      local c = connect(port, "GET / HTTP/1.1\r\nX-Big: "
                              .. ("y"):rep(20000) .. "\r\n\r\n")
      pump(bus, function() return c.closed end)
      assert.equal(431, (response(c.data)))
      local slow = connect(port, "GET / HTTP/1.1\r\nHost: x\r\n")
      pump(bus, function() return slow.closed end)
      assert.equal(408, (response(slow.data)))
      local up = connect(port, "GET / HTTP/1.1\r\nHost: x\r\nConnection: "
                               .. "Upgrade\r\nUpgrade: websocket\r\n\r\n")
      pump(bus, function() return up.closed end)
      assert.equal(501, (response(up.data)))
      local bad = connect(port, "NOT HTTP\r\n\r\n")
      pump(bus, function() return bad.closed end)
      assert.equal(400, (response(bad.data)))
    end)

    it("survives garbage and requests cut at random points, then serves "
       .. "a good one", function()
      serve{ streams = { ["/s"] = "a.>" }, max_payload = 4096, timeout = 0.3 }
      math.randomseed(7)
      local pieces = { "GET ", "POST ", "/s", "/events", " HTTP/1.1\r\n",
        "Host: x\r\n", "Content-Length: 5\r\n", "Content-Length: 99999\r\n",
        "Transfer-Encoding: chunked\r\n", "\r\n", "5\r\nhello\r\n",
        "0\r\n\r\n", "Authorization: Bearer " .. TOKEN .. "\r\n", "\0",
        "\255\254", ("A"):rep(3000), "%zz", "?token=" .. TOKEN, ":", " " }
      local conns = {}
      for i = 1, 60 do
        local t = {}
        for k = 1, math.random(1, 12) do
          t[k] = pieces[math.random(#pieces)]
        end
        conns[i] = connect(port, table.concat(t))
      end
      pump(bus, function()
        for _, c in ipairs(conns) do
          if not (c.closed or c.data ~= "") then return false end
        end
        return true
      end)
      for _, c in ipairs(conns) do
        if c.data ~= "" then assert.matches("^HTTP/1%.1 %d%d%d ", c.data) end
        c.close()
      end
      assert.equal(200, (fetch(bus, port, "GET", "/metrics", AUTH)))
    end)

    it("serves the page at / and sets the token cookie from ?token=",
       function()
      serve{}
      local status, h, body = fetch(bus, port, "GET", "/?token=" .. TOKEN)
      assert.equal(200, status)
      assert.equal("text/html; charset=utf-8", h["content-type"])
      assert.matches("buzz_token=" .. TOKEN .. "; Path=/; HttpOnly",
                     h["set-cookie"], 1, true)
      assert.matches("<!doctype html>", body, 1, true)
      local _, h2 = fetch(bus, port, "GET", "/?token=wrong-token")
      assert.is_nil(h2["set-cookie"])
    end)

    it("serves on a luv host's loop: the loop wakes for the sockets",
       function()
      bus = H.bus{ loop = uv }
      srv = assert(bus:serve{ port = 0, token = TOKEN,
                              streams = { ["/s"] = "a.>" } })
      port = srv.port
      local c = connect(port, request("GET", "/s", AUTH))
      local deadline = uv.hrtime() + 5e9
      local function run_until(pred)
        while not pred() do
          assert(uv.hrtime() < deadline, "timed out")
          uv.run("once")
        end
      end
      run_until(function() return c.data:find("retry", 1, true) end)
      local timer = uv.new_timer()          -- a publish from the host's
      timer:start(10, 0, function()          -- own callback
        bus:publish("a.b", { from = "luv" })
        timer:close()
      end)
      run_until(function() return #events_in(c.data) == 1 end)
      assert.equal("luv", core.json_decode(events_in(c.data)[1].data)
                            .payload.from)
      local f = connect(port, request("GET", "/metrics", AUTH))
      run_until(function() return response(f.data) end)
      assert.equal(200, (response(f.data)))
      f.close()
      c.close()
    end)

    it("outlives a client that leaves mid-write: SIGPIPE is ignored "
       .. "once it serves", function()
      local ok, out = H.run([[
        local buzz = require "buzz"
        local core = require "buzz.core"
        local bus = assert(buzz.new())
        assert(bus:serve{ port = 0, public = true })
        os.execute("kill -PIPE " .. core.pid())
        print("alive")
        bus:close()
      ]])
      assert.is_true(ok, out)
      assert.matches("alive", out, 1, true)
    end)

    it("answers the dashboard's /api/stats and /api/trace/ID",
       function()
      serve({}, { trace = true, on_error = function() end })
      bus:subscribe("job.start", function(ev)
        if ev.payload.bad then error("no") end
        bus:publish("job.done", {})
      end, { name = "worker" })
      bus:subscribe("job.done", function() end, { name = "worker" })
      local id = bus:publish("job.start", {})
      bus:publish("job.start", { bad = true })
      bus:drain()
      local status, _, body = fetch(bus, port, "GET", "/api/stats", AUTH)
      assert.equal(200, status, body)
      local st = core.json_decode(body)
      assert.equal(3, st.subscriptions.worker.delivered)
      assert.equal(1, st.subscriptions.worker.failed)
      assert.equal(3, st.last_id)
      assert.equal(401, (fetch(bus, port, "GET", "/api/stats")))
      local status2, _, tbody = fetch(bus, port, "GET", "/api/trace/" .. id,
                                      AUTH)
      assert.equal(200, status2, tbody)
      local tree = core.json_decode(tbody)
      assert.equal(id, tree.id)
      assert.equal("job.done", tree.children[1].type)
      assert.equal(404, (fetch(bus, port, "GET", "/api/trace/999", AUTH)))
    end)

    it("stops serving when the bus closes", function()
      serve{ streams = { ["/s"] = "a.>" } }
      local c = connect(port, request("GET", "/s", AUTH))
      pump(bus, function() return c.data:find("retry", 1, true) end)
      bus:close()
      pump(H.bus(), function() uv.run("nowait") return c.closed end)
      assert.matches(": server closing\n\n$", c.data)
      bus = nil
    end)
  end)
end)
