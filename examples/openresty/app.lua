--- buzz in OpenResty (examples/openresty/nginx.conf runs it).
--
-- Each worker has its own memory bus, driven by the worker's timers
-- (buzz.new{ loop = "ngx" }): a request publishes and its events are
-- delivered right after it, in a timer, where handlers may use cosockets
-- and ngx.sleep. All the workers share one store through
-- buzz.ngx.shared: worker 0 writes it and runs the durable consumer, the
-- other workers forward their events to it.
--
--   /greet?name=ann           a handler records which worker greeted ann
--   /fetch?tag=t&sleep=0.01   a handler sleeps, then asks /ping over a
--                             cosocket
--   /fetch_now?tag=t          the same, delivered within the request
--                             (buzz.ngx.drain), so the response can
--                             say what the handler got
--   /remind?tag=t&delay=0.3   a delayed event, on the worker's timers
--   /pay?tag=t&fail=1&n=4     a handler with retries asks /ping over a
--                             cosocket, and fails its first attempt
--   /ship?key=k&n=3           n events of one key to an ordered handler
--                             that sleeps less for each: they finish in
--                             order all the same
--   /slow?tag=t               a handler with a timeout that sleeps
--                             past it: timed out, retried, dead-lettered
--   /nap?tag=t                a handler that mixes buzz.sleep and
--                             ngx.sleep
--   /order?n=7                an event on the shared log; the durable
--                             consumer "audit" appends "7 <id>" to
--                             audit.log in the prefix
--   /seen?key=greet:ann       what the handlers recorded
--   /metrics                  the workers' metrics summed, as Prometheus
--                             text (each worker shares its bus's through
--                             the buzz_metrics dict)
--   /repos/ID/events          an SSE stream of repo.ID.> from the shared
--                             log (buzz.ngx.sse; resumes after
--                             Last-Event-ID); needs the token
--   /webhook/github           GitHub webhooks, checked against SECRET and
--                             published on the shared log once per
--                             X-GitHub-Delivery (buzz.ngx.ingest)
--   /events                   POST {"type":..,"payload":..} with the token
local buzz = require "buzz"
local bngx = require "buzz.ngx"

local M = {}

local bus, log            -- this worker's bus; the shared log
local seen = ngx.shared.buzz_seen

local function now()
  ngx.update_time()
  return ngx.now()
end

-- Asks this server for /ping over a cosocket; returns the status line.
local function ask_ping(port)
  local sock = ngx.socket.tcp()
  sock:settimeout(2000)
  assert(sock:connect("127.0.0.1", port))
  assert(sock:send("GET /ping HTTP/1.0\r\nHost: localhost\r\n\r\n"))
  local status = assert(sock:receive("*l"))
  sock:close()
  return status
end

-- The durable consumer, in the worker that owns the store.
local function audit(ev)
  local f = assert(io.open(ngx.config.prefix() .. "audit.log", "a"))
  f:write(("%d %d\n"):format(ev.payload.n, ev.id))
  f:close()
end

function M.init_worker()
  bus = buzz.new{
    loop = "ngx",
    on_error = function(err) ngx.log(ngx.ERR, "buzz: ", tostring(err)) end,
  }

  bus:subscribe("greet.*", function(ev)
    local p = ev.payload
    seen:set("greet:" .. p.name, ngx.worker.id())
    seen:set("greeted_at:" .. p.name, now())
    seen:set("greet_delay:" .. p.name, now() - p.published)
    seen:set("greet_cause:" .. p.name, require("buzz.ngx").cause(bus))
  end)

  -- A handler that yields: ngx.sleep, then a cosocket to this server.
  bus:subscribe("fetch.requested", function(ev)
    local p = ev.payload
    ngx.sleep(p.sleep)
    local status = ask_ping(p.port)
    seen:set("fetch:" .. p.tag, status)
    seen:set("fetched_at:" .. p.tag, now())
  end)

  bus:subscribe("remind.due", function(ev)
    seen:set("remind:" .. ev.payload.tag, now() - ev.payload.published)
  end)

  -- Failure policies and ngx yields: retries, order per key, timeouts.
  bus:subscribe("order.paid", function(ev)
    local p = ev.payload
    ngx.sleep(0.01)
    local status = ask_ping(p.port)
    seen:set(("pay:%s:%d"):format(p.tag, ev.attempt), status)
    if p.fail and ev.attempt == 1 then error("the payment service hung up") end
    seen:set("paid:" .. p.tag, ev.attempt)
  end, { retry = { max = 3, base = 0.05, jitter = 0 } })

  bus:subscribe("order.shipped", function(ev)
    local p = ev.payload
    ngx.sleep(p.sleep)
    local key, done = "ship:" .. ev.key, seen:get("ship:" .. ev.key)
    seen:set(key, done and done .. " " .. p.n or tostring(p.n))
  end, { ordered = true })

  bus:subscribe("job.slow", function(ev)
    local p = ev.payload
    seen:set(("slow:%s:%d"):format(p.tag, ev.attempt), "started")
    ngx.sleep(0.3)                                 -- past the timeout
    seen:set(("slow_done:%s:%d"):format(p.tag, ev.attempt), "finished")
  end, { timeout = 0.1, retry = { max = 2, base = 0.15, jitter = 0 } })

  bus:subscribe("$DLQ.job.slow", function(ev)
    local rec = ev.payload
    seen:set("slow_dead:" .. rec.event.payload.tag,
             ("%s after %d attempts"):format(rec.error, #rec.attempts))
  end)

  bus:subscribe("nap.taken", function(ev)
    local t0 = now()
    buzz.sleep(0.05)
    ngx.sleep(0.05)
    buzz.sleep(0.05)
    local status = ask_ping(ev.payload.port)
    seen:set("nap:" .. ev.payload.tag, ("%s after %.3f"):format(
      status, now() - t0))
  end)

  buzz.metrics.share(bus, ngx.shared.buzz_metrics, 0.2)

  log = bngx.shared{
    dict = "buzz",
    store = ngx.config.prefix() .. "events.db",
    setup = function(store_bus)
      store_bus:subscribe("order.*", audit, { durable = "audit" })
    end,
  }
end

function M.greet()
  local id = bus:publish("greet.hello", { name = ngx.var.arg_name,
                                          published = now() })
  ngx.say("published #", id, " in worker ", ngx.worker.id())
end

function M.fetch()
  bus:publish("fetch.requested", {
    tag = ngx.var.arg_tag, port = tonumber(ngx.var.server_port),
    sleep = tonumber(ngx.var.arg_sleep) or 0.01,
  })
  ngx.say("fetching in worker ", ngx.worker.id())
end

function M.fetch_now()
  local tag = ngx.var.arg_tag
  bus:publish("fetch.requested", {
    tag = tag, port = tonumber(ngx.var.server_port), sleep = 0.01 })
  bngx.drain(bus)
  ngx.say("fetched: ", seen:get("fetch:" .. tag))
end

function M.remind()
  bus:publish("remind.due", { tag = ngx.var.arg_tag, published = now() },
              { delay = tonumber(ngx.var.arg_delay) or 0.3 })
  ngx.say("reminding in worker ", ngx.worker.id())
end

-- n payments (default 1), tagged t, or t1 to tn.
function M.pay()
  local n, tag = tonumber(ngx.var.arg_n), ngx.var.arg_tag
  for i = 1, n or 1 do
    bus:publish("order.paid", { tag = n and tag .. i or tag,
                                port = tonumber(ngx.var.server_port),
                                fail = ngx.var.arg_fail == "1" })
  end
  ngx.say("paying in worker ", ngx.worker.id())
end

-- Event i of n sleeps (n - i) / 10 + 0.01 s: unordered, the last would
-- finish first.
function M.ship()
  local n = tonumber(ngx.var.arg_n) or 3
  for i = 1, n do
    bus:publish("order.shipped", { n = i, sleep = (n - i) / 10 + 0.01 },
                { key = ngx.var.arg_key })
  end
  ngx.say("shipping in worker ", ngx.worker.id())
end

function M.slow()
  bus:publish("job.slow", { tag = ngx.var.arg_tag })
  ngx.say("working in worker ", ngx.worker.id())
end

function M.nap()
  bus:publish("nap.taken", { tag = ngx.var.arg_tag,
                             port = tonumber(ngx.var.server_port) })
  ngx.say("napping in worker ", ngx.worker.id())
end

function M.order()
  local id, how = log:publish("order.created", {
    n = tonumber(ngx.var.arg_n), worker = ngx.worker.id() })
  ngx.say("worker ", ngx.worker.id(), " ", tostring(id), " ", tostring(how))
end

-- The gateway (buzz.ngx.sse, buzz.ngx.ingest): nginx serves, buzz
-- decides as bus:serve would.
M.TOKEN = "example-token"
M.SECRET = "It's a Secret to Everybody"

function M.stream()
  bngx.sse(bus, { subject = "repo.:id.>", token = M.TOKEN, heartbeat = 1,
                  store = ngx.config.prefix() .. "events.db", poll = 0.05 })
end

function M.webhook()
  bngx.ingest(log, { type_header = "X-GitHub-Event", prefix = "github",
                     secret = M.SECRET, dedup_header = "X-GitHub-Delivery" })
end

function M.events()
  bngx.ingest(log, { events = true, token = M.TOKEN })
end

function M.seen()
  local v = seen:get(ngx.var.arg_key)
  ngx.say(v == nil and "-" or tostring(v))
end

function M.metrics()
  ngx.header.content_type = buzz.metrics.CONTENT_TYPE
  ngx.print(buzz.metrics.shared_prometheus(ngx.shared.buzz_metrics,
                                           { job = "app" }))
end

return M
