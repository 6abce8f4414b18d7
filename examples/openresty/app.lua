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
--   /order?n=7                an event on the shared log; the durable
--                             consumer "audit" appends "7 <id>" to
--                             audit.log in the prefix
--   /seen?key=greet:ann       what the handlers recorded
local buzz = require "buzz"
local bngx = require "buzz.ngx"

local M = {}

local bus, log            -- this worker's bus; the shared log
local seen = ngx.shared.buzz_seen

local function now()
  ngx.update_time()
  return ngx.now()
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
  end)

  -- A handler that yields: ngx.sleep, then a cosocket to this server.
  bus:subscribe("fetch.requested", function(ev)
    local p = ev.payload
    ngx.sleep(p.sleep)
    local sock = ngx.socket.tcp()
    sock:settimeout(2000)
    assert(sock:connect("127.0.0.1", p.port))
    assert(sock:send("GET /ping HTTP/1.0\r\nHost: localhost\r\n\r\n"))
    local status = assert(sock:receive("*l"))
    sock:close()
    seen:set("fetch:" .. p.tag, status)
    seen:set("fetched_at:" .. p.tag, now())
  end)

  bus:subscribe("remind.due", function(ev)
    seen:set("remind:" .. ev.payload.tag, now() - ev.payload.published)
  end)

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

function M.order()
  local id, how = log:publish("order.created", {
    n = tonumber(ngx.var.arg_n), worker = ngx.worker.id() })
  ngx.say("worker ", ngx.worker.id(), " ", tostring(id), " ", tostring(how))
end

function M.seen()
  local v = seen:get(ngx.var.arg_key)
  ngx.say(v == nil and "-" or tostring(v))
end

return M
