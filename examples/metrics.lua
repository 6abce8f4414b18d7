--- buzz example: per-host CPU averages over a synthetic metrics stream.
--
--   lua5.4 examples/metrics.lua        (or luajit examples/metrics.lua)
--
-- Eight hosts report their CPU every second for three minutes on a manual
-- clock (so the example runs in an instant). A route keeps the web hosts,
-- averages each host's CPU per one-minute window and publishes the result
-- as "metrics.cpu.avg"; an alert fires when a window's p90 passes 80%. It
-- asserts what it prints, so it exits non-zero if buzz misbehaves.

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

local buzz = require "buzz"

local clock = buzz.manual_clock(1800000000)   -- a whole minute, in seconds
local bus = buzz.new{ clock = clock }

-- Web hosts only; one result per host and minute.
bus:route("metrics.cpu")
  :where{ ["payload.host"] = { match = "^web%-" } }
  :window{ tumbling = 60 }
  :group_by("payload.host")
  :reduce{ avg = buzz.agg.avg("payload.pct"),
           p90 = buzz.agg.percentile(90, "payload.pct"),
           samples = buzz.agg.count() }
  :publish("metrics.cpu.avg")

local averages, alerts = {}, {}
bus:subscribe("metrics.cpu.avg", function(ev)
  local r = ev.payload
  local minute = (r.window_start / 1000 - 1800000000) / 60
  averages[#averages + 1] = r
  print(("minute %d  %-6s avg %5.1f%%  p90 %5.1f%%  (%d samples)")
        :format(minute, r.group, r.value.avg, r.value.p90, r.value.samples))
end)
local hot = buzz.where{ ["payload.value.p90"] = { gt = 80 } }
bus:subscribe("metrics.cpu.avg", hot(function(ev)
  alerts[#alerts + 1] = ev.payload.group
end))

-- The stream: web-3 runs hot in the second minute; db hosts are ignored.
local hosts = { "web-1", "web-2", "web-3", "web-4", "db-1", "db-2", "db-3",
                "db-4" }
for second = 0, 179 do
  for i, host in ipairs(hosts) do
    local pct = 20 + (i * 7 + second) % 30            -- 20..49
    if host == "web-3" and second >= 60 and second < 120 then pct = 95 end
    bus:publish("metrics.cpu", { host = host, pct = pct })
  end
  bus:drain()
  clock:advance(1)
end

assert(#averages == 12, "three minutes of four web hosts: 12 averages")
for _, r in ipairs(averages) do
  assert(r.value.samples == 60 and r.group:match("^web%-"))
end
assert(#alerts == 1 and alerts[1] == "web-3")
print(("%d averages, alert for %s"):format(#averages, alerts[1]))
bus:close()
