--- buzz and a luv TCP server on one loop.
-- A tiny order service: clients send "order <n>" lines; the server
-- publishes each as an event, a handler charges a flaky payment gateway
-- (it fails at first and is retried with backoff, on the loop's timers),
-- a confirmation is delayed a little, and a handler writes the reply to
-- the client's socket. Nothing calls bus:run(): uv.run() drives it all,
-- and returns once the server, the clients and the bus are closed.
--
--   lua5.4 examples/luv_tcp.lua   (or luajit; lua-luv installed)

-- Run from a checkout, prefer its build (build/<flavour>, or $BUZZ_BUILD);
-- otherwise fall through to an installed buzz (luarocks).
do
  local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
  local build = os.getenv("BUZZ_BUILD")
                or (dir .. "../build/" .. (jit and "luajit" or "lua5.4"))
  local so = io.open(build .. "/buzz/core.so")
  if so then
    so:close()
    package.path = ("%s../lua/?.lua;%s../lua/?/init.lua;%s")
                   :format(dir, dir, package.path)
    package.cpath = build .. "/?.so;" .. package.cpath
  end
end

local uv = require "luv"
local buzz = require "buzz"

local failures = 0
local bus = assert(buzz.new{
  loop = uv,
  on_error = function() failures = failures + 1 end,
})

local conns, next_conn = {}, 0      -- open connections by number

-- The server: one event per line a client sends.
local server = uv.new_tcp()
assert(server:bind("127.0.0.1", 0))
local port = server:getsockname().port
assert(server:listen(16, function(err)
  assert(not err, err)
  local conn = uv.new_tcp()
  server:accept(conn)
  next_conn = next_conn + 1
  local id = next_conn
  conns[id] = conn
  conn:read_start(function(rerr, data)
    assert(not rerr, rerr)
    if not data then              -- the client hung up
      conns[id] = nil
      conn:close()
      return
    end
    for n in data:gmatch("order (%d+)\n") do
      bus:publish("order.placed", { conn = id, order = tonumber(n) },
                  { key = "conn-" .. id })
    end
  end)
end))

-- The payment gateway fails each order's first attempt.
local attempts = {}
bus:subscribe("order.placed", function(ev)
  local n = ev.payload.order
  attempts[n] = ev.attempt
  if ev.attempt == 1 then error("gateway timeout") end
  bus:publish("order.paid", ev.payload, { delay = 0.01 })
end, { name = "payments", retry = { max = 3, base = 0.01, jitter = 0 } })

-- The reply goes out on the socket the order came in on.
bus:subscribe("order.paid", function(ev)
  local conn = conns[ev.payload.conn]
  if conn then conn:write(("confirmed %d\n"):format(ev.payload.order)) end
end)

-- Should anything hang, fail instead (an error in a luv callback ends
-- the process); unreferenced, the guard keeps nothing alive.
local guard = uv.new_timer()
guard:start(10000, 0, function() error("luv_tcp.lua: timed out") end)
guard:unref()

-- Two clients, two orders each; each hangs up after its confirmations.
local replies, clients_done = {}, 0
local function client(orders)
  local sock = uv.new_tcp()
  local got, want = {}, #orders
  sock:connect("127.0.0.1", port, function(err)
    assert(not err, err)
    for _, n in ipairs(orders) do sock:write(("order %d\n"):format(n)) end
    sock:read_start(function(rerr, data)
      assert(not rerr, rerr)
      if not data then return end
      for line in data:gmatch("([^\n]+)\n") do got[#got + 1] = line end
      if #got == want then
        sock:close()
        for _, line in ipairs(got) do replies[#replies + 1] = line end
        clients_done = clients_done + 1
        if clients_done == 2 then  -- all answered: close what is left
          server:close()
          guard:close()
          bus:close()            -- closes the bus's handles on the loop
        end
      end
    end)
  end)
end
client { 1, 2 }
client { 3, 4 }

uv.run()                          -- returns once nothing is left open

table.sort(replies)
assert(table.concat(replies, ", ")
       == "confirmed 1, confirmed 2, confirmed 3, confirmed 4",
       table.concat(replies, ", "))
for n = 1, 4 do assert(attempts[n] == 2, "order " .. n .. " not retried") end
assert(failures == 4)             -- one failed attempt per order
assert(bus:is_closed())
print(("4 orders over TCP on port %d, each paid on its 2nd attempt; "
       .. "uv.run() returned"):format(port))
