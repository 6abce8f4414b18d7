--- buzz example: a live page of a bus's events, served by the bus itself.
--
--   lua5.4 examples/live.lua           then open the URL it prints
--
-- bus:serve puts an HTTP gateway on the bus's own loop: the dashboard at
-- /, an SSE stream per repository at /repos/ID/events, GitHub webhooks at
-- /webhook/github (signed with the token here) and /metrics. The events
-- are kept in live.db, so a browser that reconnects gets what it missed.
-- PORT (8080), BUZZ_TOKEN and LIVE_STORE change the defaults;
-- LIVE_SECONDS=N stops it after N seconds (the test suite sets 1).

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

local store = os.getenv("LIVE_STORE") or "live.db"
local token = os.getenv("BUZZ_TOKEN") or "change-this-token"
local port = tonumber(os.getenv("PORT") or 8080)
local seconds = tonumber(os.getenv("LIVE_SECONDS"))

-- the program the README shows
local bus = buzz.new{ store = store }
local srv = assert(bus:serve{ port = port, token = token,
  streams = { ["/repos/:id/events"] = "repo.:id.>" },
  ingest = { ["/webhook/github"] = { type_header = "X-GitHub-Event",
    prefix = "github", secret = token, dedup_header = "X-GitHub-Delivery" } } })
print(("open %s/?token=%s"):format(srv:url(), token))
bus:every(1, "repo.42.push", function() return { at = os.date("!%T") } end)
-- end of the program the README shows

if seconds then                  -- a run with an end (the test suite's)
  bus:subscribe("live.stop", function() bus:stop() end)
  bus:publish("live.stop", nil, { delay = seconds })
end
bus:run()
local pushes = 0
for _ in bus:events{ types = "repo.42.push" } do pushes = pushes + 1 end
print(("%d pushes published"):format(pushes))
bus:close()
