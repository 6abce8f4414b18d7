--- buzz.clitop: `buzz top`, a live view of a store another process may be
-- writing: events per second by type (read from the log), deliveries and
-- failures per second by subscription name with what is in flight,
-- waiting or held and the breakers' states (from the metrics rows that
-- buses opened with metrics_every write: lua/buzz/metrics.lua), durable
-- consumers' lag, dead letters, pending retries and delayed events.
--
-- Each frame compares two samples taken `interval` seconds apart. Live,
-- it redraws the terminal each interval and quits on q (the terminal is
-- put in non-canonical mode with stty meanwhile, so a key needs no
-- Enter, and set back after); --once prints one frame (--json: as one
-- JSON object) and exits.
--
-- Only bin/buzz uses it; it is not part of the library's API.
-- @module buzz.clitop
local text = require "buzz.clitext"

local pairs, ipairs, type, tonumber, pcall, error =
      pairs, ipairs, type, tonumber, pcall, error
local format, concat, floor = string.format, table.concat, math.floor
local stdout = io.stdout
local checked, print_table, iso_time, encode = text.checked,
                                               text.print_table,
                                               text.iso_time, text.encode

local M = {}

-- A metrics row older than this is a bus that stopped without closing.
local STALE_MS = 60000

local sorted = require("buzz.util").sorted_keys

-- One sample of the store: what is stored, and the buses' counters
-- summed by subscription name (prev: the sample before, whose last id
-- the new events start after).
local function sample(bus, prev, now_s, matching)
  local info = checked(bus:store_info{ events = false })
  local s = { at = now_s, last_id = info.last_id, types = {},
              retries = info.retries, dead_letters = info.dead_letters,
              delayed = info.delayed, consumers = {}, subs = {},
              buses = 0, stale = 0 }
  if prev then
    for ev in matching(bus, { from = prev.last_id + 1, to = info.last_id })
    do
      s.types[ev.type] = (s.types[ev.type] or 0) + 1
    end
  end
  for _, c in ipairs(checked(bus:consumers())) do
    s.consumers[#s.consumers + 1] = c
  end
  local newest = 0
  local rows = bus:_state_list("metrics")
  for _, row in ipairs(rows) do
    local m = row.value
    if type(m) == "table" and type(m.at) == "number" then
      if m.at > newest then newest = m.at end
    end
  end
  for _, row in ipairs(rows) do
    local m = row.value
    if type(m) == "table" and type(m.subscriptions) == "table" then
      if newest - (m.at or 0) > STALE_MS then
        s.stale = s.stale + 1
      else
        s.buses = s.buses + 1
        for name, c in pairs(m.subscriptions) do
          local t = s.subs[name] or { delivered = 0, failed = 0,
                                      in_flight = 0, waiting = 0, held = 0 }
          for _, k in ipairs { "delivered", "failed", "in_flight", "waiting",
                               "held" } do
            t[k] = t[k] + (tonumber(c[k]) or 0)
          end
          if c.breaker and c.breaker ~= "closed" then t.breaker = c.breaker
          elseif c.breaker then t.breaker = t.breaker or c.breaker end
          s.subs[name] = t
        end
      end
    end
  end
  return s
end

-- The frame comparing samples a and b: a table that --json prints whole.
local function frame(path, a, b, now_ms)
  local dt = b.at - a.at
  if dt <= 0 then dt = 1e-9 end
  local f = { store = path, at = now_ms, seconds = dt,
              last_id = b.last_id, events_per_s = 0, types = {},
              subscriptions = {}, consumers = {},
              dead_letters = b.dead_letters, retries = b.retries,
              delayed = b.delayed, buses = b.buses, stale = b.stale }
  local total = 0
  for _, t in ipairs(sorted(b.types)) do
    total = total + b.types[t]
    f.types[#f.types + 1] = { type = t, per_s = b.types[t] / dt }
  end
  f.events_per_s = total / dt
  for _, name in ipairs(sorted(b.subs)) do
    local now, before = b.subs[name], a.subs[name] or {}
    f.subscriptions[#f.subscriptions + 1] = {
      name = name,
      delivered_per_s = (now.delivered - (before.delivered or 0)) / dt,
      failed_per_s = (now.failed - (before.failed or 0)) / dt,
      in_flight = now.in_flight, waiting = now.waiting, held = now.held,
      breaker = now.breaker,
    }
  end
  for _, c in ipairs(b.consumers) do
    f.consumers[#f.consumers + 1] = { name = c.name, pattern = c.pattern,
                                      acked = c.acked, lag = c.lag }
  end
  return f
end

local function rate(v)
  return format("%.1f", v)
end

-- The frame as text.
local function show(f, interval, live)
  local out = {}
  local function line(s) out[#out + 1] = s end
  line(format("buzz top  %s  %s  (every %g s%s)", f.store, iso_time(f.at),
              interval, live and ", q quits" or ""))
  line("")
  line(format("events  last id %d  %s/s", f.last_id, rate(f.events_per_s)))
  stdout:write(concat(out, "\n"), "\n")
  if #f.types > 0 then
    local rows = { { "type", "per s" } }
    for _, t in ipairs(f.types) do
      rows[#rows + 1] = { t.type, rate(t.per_s) }
    end
    print_table(rows, "  ")
  end
  stdout:write("\n")
  if #f.subscriptions > 0 then
    local rows = { { "subscription", "delivered/s", "failed/s", "in flight",
                     "waiting", "held", "breaker" } }
    for _, s in ipairs(f.subscriptions) do
      rows[#rows + 1] = { s.name, rate(s.delivered_per_s),
                          rate(s.failed_per_s), format("%d", s.in_flight),
                          format("%d", s.waiting), format("%d", s.held),
                          s.breaker or "-" }
    end
    print_table(rows, "")
  else
    stdout:write("subscriptions: no bus shares its metrics (open it with "
                 .. "buzz.new{ store = ..., metrics_every = 1 })\n")
  end
  if #f.consumers > 0 then
    stdout:write("\n")
    local rows = { { "consumer", "pattern", "acked", "lag" } }
    for _, c in ipairs(f.consumers) do
      rows[#rows + 1] = { c.name, c.pattern, format("%d", c.acked),
                          c.lag and format("%d", c.lag) or "?" }
    end
    print_table(rows, "")
  end
  stdout:write(format("\ndead letters %d  retries %d  delayed %d  "
                      .. "buses %d%s\n", f.dead_letters, f.retries,
                      f.delayed, f.buses,
                      f.stale > 0 and format(" (%d stale)", f.stale) or ""))
end

--- `buzz top`: h holds bin/buzz's helpers (open_store, matching, now,
--- sleep, sh, is_terminal).
function M.run(opts, ctx, h)
  local bus = h.open_store(ctx, opts)
  local path = checked(bus:store_info{ events = false }).path
  local interval = opts.interval or 1
  local prev = sample(bus, nil, h.now(), h.matching)
  if opts.once then
    h.sleep(interval)
    local s = sample(bus, prev, h.now(), h.matching)
    local f = frame(path, prev, s, bus:_now())
    if opts.json then
      stdout:write(encode(f), "\n")
    else
      show(f, interval, false)
    end
    return 0
  end
  local tty = h.is_terminal(0)
  local saved
  if tty then                          -- a key without Enter, no echo
    local p = io.popen("stty -g < /dev/tty")
    saved = p and p:read("*l")
    if p then p:close() end
    h.sh(format("stty -icanon -echo min 0 time %d < /dev/tty",
                floor(interval * 10 + 0.5)))
  end
  local ok, err = pcall(function()
    while true do
      local key
      if tty then
        key = io.stdin:read(1)         -- waits at most the interval
      else
        h.sleep(interval)
      end
      if key == "q" or key == "Q" then return end
      local s = sample(bus, prev, h.now(), h.matching)
      local f = frame(path, prev, s, bus:_now())
      stdout:write("\27[H\27[2J")      -- home, clear
      show(f, interval, tty)
      stdout:flush()
      prev = s
    end
  end)
  if saved then h.sh(format("stty %s < /dev/tty", saved)) end
  if not ok then error(err, 0) end
  return 0
end

return M
