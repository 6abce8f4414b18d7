--- Benchmark: the HTTP gateway (bus:serve), issue 16's figures.
-- `lua5.4 bench/serve.lua` (or luajit) from the root; BENCH_QUICK=1 runs
-- it small and short (a smoke run: the figures are then not the issue's).
--
-- 1. Fan-out: CLIENTS SSE clients (1,000) on loopback, each on its own
--    stream /s/<i> (subject bench.<i>), in this process on luv; a server
--    process publishes RATE events a second in total (10k) to random
--    streams, each carrying the monotonic time of its publish (uv_hrtime:
--    one clock for both processes). Printed: what the clients received,
--    the publish -> received latency (p50, p99, max), and the server's CPU
--    per delivered message (/proc/<pid>/stat, user + system, over the
--    measured window). Target: p99 < 50 ms.
-- 2. Ingress: CONNS keep-alive connections POST /events as fast as the
--    answers come, against a server with a store (durability "batch");
--    beside it, the same publishes made in-process on a store of the
--    same kind. Printed: requests/s, publishes/s, and their ratio.
-- The server is a child process (this script with --server) so that its
-- CPU is its own; there is no peer to run side by side (no other Lua
-- gateway ships in Debian), so the figures are absolute.
-- @module bench.serve
local root = (arg and arg[0] or ""):match("^(.-)bench/serve%.lua$") or ""
local flavour = type(jit) == "table" and "luajit" or "lua5.4"
package.path = root .. "lua/?.lua;" .. root .. "lua/?/init.lua;"
               .. package.path
package.cpath = root .. "build/" .. flavour .. "/?.so;" .. package.cpath

local buzz = require "buzz"
local core = require "buzz.core"

io.stdout:setvbuf("line")
local QUICK = os.getenv("BENCH_QUICK") ~= nil
local CLIENTS = QUICK and 100 or 1000
local RATE = QUICK and 2000 or 10000
local WARMUP, SECONDS = QUICK and 0.5 or 1, QUICK and 1 or 5
local CONNS = 16
local TOKEN = "bench-token-123"

-- ------------------------------------------------------------ the server

if arg[1] == "--server" then
  local mode, port_file, store = arg[2], arg[3], arg[4]
  local bus = assert(buzz.new{ store = store ~= "-" and store or nil })
  local srv = assert(bus:serve{ port = 0, token = TOKEN, page = false,
                                max_buffer = 1048576,
                                streams = { ["/s/:id"] = "bench.:id" } })
  local f = assert(io.open(port_file, "w"))
  f:write(srv.port, "\n")
  f:close()
  if mode == "fanout" then
    local hrtime, random = core.hrtime, math.random
    local per_tick = math.floor(RATE / 100)   -- every 10 ms
    bus:every(0.01, "bench.tick", function() return {} end)
    bus:subscribe("bench.tick", function()
      for _ = 1, per_tick do
        bus:publish("bench." .. random(1, CLIENTS), { t = hrtime() })
      end
    end)
  end
  bus:subscribe("bench.stop", function() bus:stop() end)
  bus:run()
  bus:close()
  return
end

-- ------------------------------------------------------------ the client

local uv = require "luv"
local hrtime = uv.hrtime
-- a write to a connection the server closed must not end this process
local sigpipe = uv.new_signal()
sigpipe:start("sigpipe", function() end)
sigpipe:unref()

local function server(mode, store)
  local port_file = os.tmpname()
  os.remove(port_file)
  local lua = arg[-1] or flavour
  local child = assert(io.popen(("exec %s %s --server %s %s %s & echo $!")
                                :format(lua, arg[0], mode, port_file,
                                        store or "-")))
  local pid = tonumber(child:read("*l"))
  child:close()
  local port
  for _ = 1, 500 do
    local f = io.open(port_file)
    if f then port = tonumber(f:read("*l")) f:close() end
    if port then break end
    uv.sleep(10)
  end
  os.remove(port_file)
  assert(port, "the server did not start")
  return pid, port
end

local function cpu_seconds(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return 0 end
  local s = f:read("*a")
  f:close()
  local fields = {}
  for x in s:match("%) (.*)$"):gmatch("%S+") do fields[#fields + 1] = x end
  return (tonumber(fields[12]) + tonumber(fields[13])) / 100  -- ticks
end

local function post(body)
  return ("POST /events HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer %s"
          .. "\r\nContent-Length: %d\r\n\r\n%s"):format(TOKEN, #body, body)
end

local function stop(port, pid)
  local tcp = uv.new_tcp()
  tcp:connect("127.0.0.1", port, function()
    tcp:write(post('{"type":"bench.stop"}'))
  end)
  for _ = 1, 200 do
    uv.run("nowait")
    if os.execute("kill -0 " .. pid .. " 2>/dev/null") ~= true then break end
    uv.sleep(10)
  end
  os.execute("kill " .. pid .. " 2>/dev/null")
  tcp:close()
  uv.run("nowait")
end

local function percentile(sorted, p)
  if #sorted == 0 then return 0 end
  return sorted[math.max(1, math.ceil(#sorted * p))]
end

local function fanout()
  local pid, port = server("fanout")
  local latencies, received, measuring = {}, 0, false
  local conns = {}
  for i = 1, CLIENTS do
    local tcp = uv.new_tcp()
    local buf = ""
    conns[i] = tcp
    tcp:connect("127.0.0.1", port, function(err)
      assert(not err, err)
      tcp:read_start(function(_, chunk)
        if not chunk then return end
        buf = buf .. chunk
        local now = hrtime()
        for t in buf:gmatch('"t":(%d+)') do
          if measuring then
            received = received + 1
            latencies[#latencies + 1] = (now - tonumber(t)) / 1e6
          end
        end
        buf = buf:match(".*\n\n(.*)$") or buf
      end)
      tcp:write(("GET /s/%d HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer "
                 .. "%s\r\n\r\n"):format(i, TOKEN))
    end)
  end
  local t_end = hrtime() + WARMUP * 1e9
  while hrtime() < t_end do uv.run("once") end
  measuring = true
  local cpu0, t0 = cpu_seconds(pid), hrtime()
  t_end = t0 + SECONDS * 1e9
  while hrtime() < t_end do uv.run("once") end
  local wall = (hrtime() - t0) / 1e9
  measuring = false
  local cpu = cpu_seconds(pid) - cpu0
  for _, tcp in ipairs(conns) do tcp:close() end
  stop(port, pid)
  table.sort(latencies)
  print(("fan-out: %d SSE clients, %d ev/s offered; %d received in %.1f s "
         .. "(%.0f/s)"):format(CLIENTS, RATE, received, wall,
                               received / wall))
  local p99 = percentile(latencies, 0.99)
  print(("  publish -> received: p50 %.2f ms, p99 %.2f ms, max %.2f ms "
         .. "(target p99 < 50 ms: %s)")
        :format(percentile(latencies, 0.5), p99, latencies[#latencies] or 0,
                p99 < 50 and "met" or "MISS"))
  print(("  server CPU: %.2f s for %.1f s, %.1f us per delivered message")
        :format(cpu, wall, received > 0 and cpu / received * 1e6 or 0))
end

local function ingress()
  local dir = os.tmpname()
  os.remove(dir)
  local store = dir .. "-serve.db"
  local pid, port = server("ingress", store)
  local body = post('{"type":"order.placed","payload":{"n":1,'
                          .. '"sku":"A-1","qty":2}}')
  local done, measuring = 0, false
  local conns = {}
  for i = 1, CONNS do
    local tcp = uv.new_tcp()
    conns[i] = tcp
    local buf = ""
    tcp:connect("127.0.0.1", port, function(err)
      assert(not err, err)
      tcp:read_start(function(_, chunk)
        if not chunk then return end
        buf = buf .. chunk
        while true do
          local s, e = buf:find("\r\n\r\n%b{}")
          if not s then break end
          if buf:sub(1, 12) ~= "HTTP/1.1 202" then
            error("ingress: " .. buf:sub(1, 200))
          end
          buf = buf:sub(e + 1)
          if measuring then done = done + 1 end
          tcp:write(body)
        end
      end)
      tcp:write(body)
    end)
  end
  local t_end = hrtime() + WARMUP * 1e9
  while hrtime() < t_end do uv.run("once") end
  measuring = true
  local t0 = hrtime()
  t_end = t0 + SECONDS * 1e9
  while hrtime() < t_end do uv.run("once") end
  local wall = (hrtime() - t0) / 1e9
  measuring = false
  for _, tcp in ipairs(conns) do tcp:close() end
  stop(port, pid)
  for _, suffix in ipairs{ "", "-wal", "-shm", "-lock" } do
    os.remove(store .. suffix)
  end
  -- the same publishes in-process
  local local_store = dir .. "-local.db"
  local bus = assert(buzz.new{ store = local_store })
  local n, t1 = 0, hrtime()
  local payload = { n = 1, sku = "A-1", qty = 2 }
  while hrtime() - t1 < SECONDS * 1e9 do
    for _ = 1, 1000 do bus:publish("order.placed", payload) end
    n = n + 1000
    bus:drain()
  end
  bus:flush()
  local wall2 = (hrtime() - t1) / 1e9
  bus:close()
  for _, suffix in ipairs{ "", "-wal", "-shm", "-lock" } do
    os.remove(local_store .. suffix)
  end
  local http_rate, local_rate = done / wall, n / wall2
  print(("ingress: POST /events over %d keep-alive connections, store "
         .. "\"batch\": %.0f requests/s"):format(CONNS, http_rate))
  print(("  in-process publish on the same kind of store: %.0f/s; "
         .. "HTTP / in-process = %.3f"):format(local_rate,
                                               http_rate / local_rate))
end

print(("bench/serve.lua on %s%s"):format(flavour,
                                         QUICK and " (BENCH_QUICK)" or ""))
fanout()
ingress()
