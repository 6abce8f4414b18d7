--- buzz.metrics: what a bus counts, as one table (bus:metrics()) and as
-- Prometheus text (M.prometheus).
--
-- Always on and cheap. The core counts what it sees (events published
-- and queued by priority, the full queue's refusals, the store writer's
-- commits, backlog and commit latency: csrc/lmetrics.c); this module
-- counts what happens where handlers run, in Lua: per subscription name,
-- the events delivered, the attempts that failed, the retries and the
-- dead letters. Each delivery costs a counter in a small array
-- (stats[1]); the first delivery of each subscription name and one in
-- SAMPLE after it (the 1st, the 65th, ...) are also timed
-- (handler duration, and publish -> handler latency by the bus's clock),
-- so the histograms hold a sample, and their _count says how big.
-- Gauges (in flight, waiting in lanes, held by a breaker, timers, dead
-- letters, consumer lag) are read when asked, not kept.
--
-- Where the counting happens: lua/buzz/hot.lua (publish_sync's workers),
-- lua/buzz/task.lua (queued deliveries), lua/buzz/errors.lua's reporter
-- (failures), lua/buzz/runner.lua (retries, dead letters). They call
-- start and stop below around a sampled delivery.
-- @module buzz.metrics
local core = require "buzz.core"
local util = require "buzz.util"

local pairs, ipairs, type, tostring, tonumber, error, next, pcall =
      pairs, ipairs, type, tostring, tonumber, error, next, pcall
local floor, huge, format, concat, sort =
      math.floor, math.huge, string.format, table.concat, table.sort

local sorted_keys = util.sorted_keys

local M = {}

--- One delivery in SAMPLE per subscription name is timed (those whose
--- count n has n % SAMPLE == 1: the first one too). At 64 the timing
--- costs about a hundredth of a delivery on Lua 5.4 (bench/).
local SAMPLE = 64
M.SAMPLE = SAMPLE

--- False in a core built with -DBUZZ_NO_METRICS (bench/metrics_cost.sh):
--- the hot paths then count nothing, so the two builds side by side show
--- what counting costs.
M.COUNTED = core.metrics_built ~= false

--- Names kept at most per bus; deliveries of later names count under
--- "(other)" (patterns made per request must not grow memory forever).
local NAMES_MAX = 10000
M.NAMES_MAX = NAMES_MAX

-- Histogram bounds, in seconds: handler durations (most are well under a
-- millisecond), and publish -> handler latency (the bus's clock counts
-- milliseconds).
local DURATION_BOUNDS = { 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                          0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10 }
local LATENCY_BOUNDS = { 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                         0.25, 0.5, 1, 2.5, 5, 10, 30, 60 }

-- Histograms are the core's (fixed buckets in C: core.histogram).
local histogram = core.histogram

--- A bus's metrics state (bus._metrics).
function M.new()
  return { names = {}, nnames = 0, latency = histogram(LATENCY_BOUNDS) }
end

--- The name sub counts under and its counters (made on first use):
--- { delivered, failed, retried, dead_lettered, duration = histogram,
--- latency = the bus's histogram }.
--- Subscriptions of one name (its name, durable name or pattern) share
--- them. Sets sub._name and sub._m.
function M.attach(state, sub)
  local name = sub.name or sub.durable or sub.pattern
  if not state.names[name] and state.nnames >= NAMES_MAX then
    name = "(other)"
  end
  local st = state.names[name]
  if not st then
    st = { 0, 0, 0, 0, duration = histogram(DURATION_BOUNDS),
           latency = state.latency }
    state.names[name] = st
    state.nnames = state.nnames + 1
  end
  sub._name = name
  if M.COUNTED then sub._m = st end      -- nil: the hot paths count nothing
end

--- sub:stats(): what its engine says (a runner's in-flight, lanes and
--- breaker; a batch's buffer), and for every subscription what its name
--- counted: delivered, failed, retried, dead_lettered (0 in a core
--- built without metrics).
function M.sub_stats(sub, st)
  local m = sub._m
  st.delivered = m and m[1] or 0
  st.failed = m and m[2] or 0
  st.retried = m and m[3] or 0
  st.dead_lettered = m and m[4] or 0
  return st
end

-- A sampled delivery of ev to a subscription whose counters are m
-- (task.lua and hot.lua write it out, to spare a call):
--   local mc = bus._manual                  -- the bus's clock, if manual
--   local t0 = hist_age(m.latency, ev.ts, mc and mc.ms)
--   sub._fn(ev)
--   if it returned without yielding then hist_since(m.duration, t0) end
-- hist_age observes the latency since publish and returns the time;
-- a handler that raised or yielded is not timed.
M.hist_age, M.hist_since = core.hist_age, core.hist_since

local BREAKER_STATES = { "closed", "open", "half_open" }


--- bus:metrics(): see README, "Seeing inside".
function M.collect(bus, c)
  local m = c:metrics()
  local sup, state = bus._sup, bus._metrics
  m.timers = bus._timers:count()
  m.dead_letters = #sup.dead
  m.delayed = sup.delays
  m.latency = state.latency:read()
  local subs = {}
  for name, st in pairs(state.names) do
    subs[name] = { delivered = st[1], failed = st[2], retried = st[3],
                   dead_lettered = st[4], in_flight = 0, waiting = 0,
                   held = 0, retrying = 0,
                   duration = st.duration:read() }
  end
  local retrying = 0
  for sub in pairs(bus._subs) do    -- the gauges of the live ones
    local s = subs[sub._name]
    local r = sub._runner or sup.plain[sub]
    if s and r then
      local rs = r:stats()
      s.in_flight = s.in_flight + rs.inflight
      s.waiting = s.waiting + rs.waiting + rs.in_lanes
      s.held = s.held + rs.held
      s.retrying = s.retrying + rs.retrying
      retrying = retrying + rs.retrying
      if rs.breaker then s.breaker = rs.breaker end
    end
  end
  m.retrying = retrying
  m.subscriptions = subs
  if m.store then
    local lags = {}
    local list = bus:consumers()
    for _, cons in ipairs(list or {}) do lags[cons.name] = cons.lag end
    m.store.consumers = lags
  end
  return m
end

-- ------------------------------------------------------------ snapshots

-- A bus with a writable store and metrics_every = seconds writes its
-- counters into the store (state rows of kind "metrics", one per bus:
-- "<pid>.<n>"), at most once every that many seconds and only when they
-- changed (or every HEARTBEAT, so that a reader can tell a live bus from
-- one that died): what `buzz top` reads, in another process. Close
-- removes the row.
local HEARTBEAT = 30000
local nbuses = 0

-- The counters of m worth a reader's while: no histograms.
local function snapshot(m, now)
  local subs = {}
  for name, s in pairs(m.subscriptions) do
    subs[name] = { delivered = s.delivered, failed = s.failed,
                   retried = s.retried, dead_lettered = s.dead_lettered,
                   in_flight = s.in_flight, waiting = s.waiting,
                   held = s.held, breaker = s.breaker }
  end
  return { at = now, pid = core.pid(), published = m.published,
           queued = m.queued, dead_letters = m.dead_letters,
           delayed = m.delayed, retrying = m.retrying,
           subscriptions = subs }
end

M.snapshot = snapshot

-- What must change for a snapshot to be written again.
local function signature(snap)
  local parts = {}
  for _, p in ipairs { "critical", "high", "normal", "low" } do
    parts[#parts + 1] = snap.published[p]
    parts[#parts + 1] = snap.queued[p]
  end
  parts[#parts + 1] = snap.dead_letters
  parts[#parts + 1] = snap.delayed
  for _, name in ipairs(sorted_keys(snap.subscriptions)) do
    local s = snap.subscriptions[name]
    parts[#parts + 1] = name
    parts[#parts + 1] = concat({ s.delivered, s.failed, s.retried,
                                 s.dead_lettered, s.in_flight, s.waiting,
                                 s.held, s.breaker or "" }, ",")
  end
  return concat(parts, ";")
end

local function write_snapshot(bus)
  local state = bus._metrics
  state.timer = nil
  if bus:is_closed() then return end
  local now = bus:_now()
  local ok, m = pcall(M.collect, bus, bus._core)
  if ok then
    local snap = snapshot(m, now)
    local sig = signature(snap)
    if sig ~= state.signature or now - state.written >= HEARTBEAT then
      bus:_state_put("metrics", state.instance, snap)
      state.signature, state.written = sig, now
    end
  end
  state.timer = bus:_after(state.every_ms, write_snapshot, bus)
  state.timer:unref()
end

--- Starts a bus's snapshots, every seconds (buzz.new's metrics_every,
--- checked there: a writable store).
function M.start_snapshots(bus, every)
  local state = bus._metrics
  nbuses = nbuses + 1
  state.instance = ("%d.%d"):format(core.pid(), nbuses)
  state.written, state.every_ms = -HEARTBEAT, every * 1000
  state.timer = bus:_after(0, write_snapshot, bus)
  state.timer:unref()
end

--- The bus closes: its snapshot row goes.
function M.stop_snapshots(bus)
  local state = bus._metrics
  if not state.instance then return end
  if state.timer then state.timer:cancel() end
  state.timer = nil
  bus:_state_del("metrics", state.instance)
end

-- ------------------------------------------------------------ Prometheus

-- A label value as the text format writes it: \, " and newline escaped.
local function escape_label(v)
  return (tostring(v):gsub('[\\"\n]', { ["\\"] = "\\\\", ['"'] = '\\"',
                                         ["\n"] = "\\n" }))
end

local function number(v)
  if v == huge then return "+Inf" end
  if v == -huge then return "-Inf" end
  if v ~= v then return "NaN" end
  if v == floor(v) and v > -2 ^ 53 and v < 2 ^ 53 then
    return format("%d", v)
  end
  local s = format("%.15g", v)         -- the shortest that reads back
  return tonumber(s) == v and s or format("%.17g", v)
end

-- The text of labels (a list of name, value pairs), constant ones first.
local function label_text(base, extra)
  local parts = {}
  for i = 1, #base, 2 do
    parts[#parts + 1] = base[i] .. '="' .. escape_label(base[i + 1]) .. '"'
  end
  if extra then
    for i = 1, #extra, 2 do
      parts[#parts + 1] = extra[i] .. '="' .. escape_label(extra[i + 1])
                          .. '"'
    end
  end
  if #parts == 0 then return "" end
  return "{" .. concat(parts, ",") .. "}"
end

local function family(out, name, kind, help)
  out[#out + 1] = format("# HELP %s %s", name, help)
  out[#out + 1] = format("# TYPE %s %s", name, kind)
end

local function sample(out, name, base, extra, v)
  out[#out + 1] = name .. label_text(base, extra) .. " " .. number(v)
end

-- A histogram's series: cumulative buckets (le last among the labels),
-- the +Inf bucket, _sum and _count.
local function hist(out, name, base, extra, h)
  local le = {}
  for i, v in ipairs(extra or {}) do le[i] = v end
  local n = #le
  le[n + 1] = "le"
  for i, bound in ipairs(h.bounds) do
    le[n + 2] = number(bound)
    sample(out, name .. "_bucket", base, le, h.counts[i])
  end
  le[n + 2] = "+Inf"
  sample(out, name .. "_bucket", base, le, h.counts[#h.counts])
  sample(out, name .. "_sum", base, extra, h.sum)
  sample(out, name .. "_count", base, extra, h.count)
end

local PRIOS = { "critical", "high", "normal", "low" }

-- Checks labels (nil or a table of label name = string value) and makes
-- the pairs list, sorted by name.
local function base_labels(labels)
  if labels == nil then return {} end
  if type(labels) ~= "table" then
    error(("bad labels: expected a table of names and values, got %s")
          :format(type(labels)), 3)
  end
  local names = {}
  for k, v in pairs(labels) do
    if type(k) ~= "string" or not k:match("^[%a_][%w_]*$")
       or k:sub(1, 2) == "__" then
      error(("bad label name %s: expected a name such as \"instance\"")
            :format(tostring(k)), 3)
    end
    if type(v) ~= "string" and type(v) ~= "number" then
      error(("bad label %s: expected a string value, got %s")
            :format(k, type(v)), 3)
    end
    names[#names + 1] = k
  end
  sort(names)
  local base = {}
  for _, k in ipairs(names) do
    base[#base + 1] = k
    base[#base + 1] = tostring(labels[k])
  end
  return base
end


local render   -- below

--- The bus's metrics in the Prometheus text format (version 0.0.4), every
--- series with the constant labels given (a table of name = value).
---@param bus table
---@param labels table|nil
---@return string
function M.prometheus(bus, labels)
  local base = base_labels(labels)
  return render(bus:metrics(), base)
end

-- The text of metrics table m (bus:metrics()'s shape), every series with
-- the constant labels base (a sorted pairs list).
render = function(m, base)
  local out = {}
  family(out, "buzz_events_published_total", "counter",
         "Events published, by priority.")
  for _, p in ipairs(PRIOS) do
    sample(out, "buzz_events_published_total", base, { "priority", p },
           m.published[p])
  end
  family(out, "buzz_events_queued", "gauge",
         "Events queued for delivery now, by priority.")
  for _, p in ipairs(PRIOS) do
    sample(out, "buzz_events_queued", base, { "priority", p }, m.queued[p])
  end
  local per_bus = {           -- { name, field, kind, help }
    { "buzz_queue_full_refusals_total", "refused_full", "counter",
      "Publishes refused because the queue was full (EFULL)." },
    { "buzz_timers_armed", "timers", "gauge",
      "Timers armed: delays, retries, windows, breakers." },
    { "buzz_dead_letters", "dead_letters", "gauge", "Dead letters kept now." },
    { "buzz_delayed_events", "delayed", "gauge",
      "Events published with a delay, not yet due." },
    { "buzz_retries_pending", "retrying", "gauge",
      "Deliveries waiting for a retry." },
  }
  for _, f in ipairs(per_bus) do
    family(out, f[1], f[3], f[4])
    sample(out, f[1], base, nil, m[f[2]])
  end
  family(out, "buzz_publish_to_handler_seconds", "histogram",
         "Time from publish to the handler's start, by the bus's clock "
         .. "(sampled: the first delivery and one in " .. SAMPLE
         .. " per subscription).")
  hist(out, "buzz_publish_to_handler_seconds", base, nil, m.latency)
  local names = sorted_keys(m.subscriptions)
  -- per subscription name: { name, field, kind, help }
  local per_sub = {
    { "buzz_deliveries_total", "delivered", "counter",
      "Events delivered to a subscription's handler." },
    { "buzz_delivery_failures_total", "failed", "counter",
      "Delivery attempts whose handler raised or timed out." },
    { "buzz_delivery_retries_total", "retried", "counter",
      "Retries scheduled after a failed attempt." },
    { "buzz_dead_lettered_total", "dead_lettered", "counter",
      "Deliveries given up and kept as dead letters." },
    { "buzz_deliveries_in_flight", "in_flight", "gauge",
      "Supervised deliveries started and not finished (asleep included)." },
    { "buzz_deliveries_waiting", "waiting", "gauge",
      "Deliveries waiting for their key lane or a concurrency slot." },
    { "buzz_deliveries_held", "held", "gauge",
      "Deliveries held back by an open circuit breaker." },
  }
  for _, f in ipairs(per_sub) do
    family(out, f[1], f[3], f[4])
    for _, name in ipairs(names) do
      sample(out, f[1], base, { "subscription", name },
             m.subscriptions[name][f[2]])
    end
  end
  local with_breaker = {}
  for _, name in ipairs(names) do
    if m.subscriptions[name].breaker then
      with_breaker[#with_breaker + 1] = name
    end
  end
  if next(with_breaker) then
    family(out, "buzz_breaker_state", "gauge",
           "1 for the state a subscription's circuit breaker is in.")
    for _, name in ipairs(with_breaker) do
      for _, s in ipairs(BREAKER_STATES) do
        sample(out, "buzz_breaker_state", base,
               { "subscription", name, "state", s },
               m.subscriptions[name].breaker == s and 1 or 0)
      end
    end
  end
  family(out, "buzz_handler_duration_seconds", "histogram",
         "Handler run time of deliveries that returned without yielding "
         .. "(sampled: the first and one in " .. SAMPLE
         .. " per subscription).")
  for _, name in ipairs(names) do
    hist(out, "buzz_handler_duration_seconds", base,
         { "subscription", name }, m.subscriptions[name].duration)
  end
  local st = m.store
  if st then
    local store_fields = {       -- { name, field, kind, help }
      { "buzz_store_commits_total", "commits", "counter",
        "Transactions the store's writer committed with events." },
      { "buzz_store_events_committed_total", "committed", "counter",
        "Rows the store's writer committed." },
      { "buzz_store_events_failed_total", "failed", "counter",
        "Rows whose commit failed." },
      { "buzz_store_refused_total", "refused", "counter",
        "Appends refused because the writer's backlog was full." },
      { "buzz_store_checkpoints_total", "checkpoints", "counter",
        "WAL checkpoints run off the writer." },
      { "buzz_store_backlog_rows", "backlog_rows", "gauge",
        "Rows handed to the writer and not yet committed." },
      { "buzz_store_backlog_bytes", "backlog_bytes", "gauge",
        "Bytes of those rows." },
      { "buzz_store_wal_bytes", "wal_bytes", "gauge",
        "Size of the store's write-ahead log." },
    }
    for _, f in ipairs(store_fields) do
      if st[f[2]] then                 -- (wal_bytes: when it could be read)
        family(out, f[1], f[3], f[4])
        sample(out, f[1], base, nil, st[f[2]])
      end
    end
    family(out, "buzz_store_commit_seconds", "histogram",
           "Time the writer took per commit.")
    hist(out, "buzz_store_commit_seconds", base, nil, st.commit_latency)
    local consumers = sorted_keys(st.consumers)
    if #consumers > 0 then
      family(out, "buzz_consumer_lag_events", "gauge",
             "Events a durable consumer has not acknowledged yet.")
      for _, name in ipairs(consumers) do
        sample(out, "buzz_consumer_lag_events", base,
               { "consumer", name }, st.consumers[name])
      end
    end
  end
  out[#out + 1] = ""
  return concat(out, "\n")
end

-- ------------------------------------------------------------ workers

-- Several processes with a bus each (OpenResty's workers) share their
-- metrics through a shared dict: each writes its bus:metrics() there as
-- JSON under "buzz:metrics:<pid>.<n>", with an expiry, so that a worker
-- that died drops out; M.shared_prometheus sums what is there into one
-- text.
local PREFIX = "buzz:metrics:"

--- Writes bus:metrics() into dict (an ngx.shared dict, or anything with
--- its set(key, value, exptime)) every `every` seconds (default 1), on
--- the bus's timers (they do not keep run() busy). Returns a handle with
--- :cancel(), which also removes the entry.
function M.share(bus, dict, every)
  if type(dict) ~= "table" and type(dict) ~= "userdata" then
    error(("bad dict: expected a shared dict such as ngx.shared.metrics, "
           .. "got %s"):format(type(dict)), 2)
  end
  every = every or 1
  if type(every) ~= "number" or every <= 0 or every > 3600 then
    error(("bad every: expected seconds, more than 0 and at most 3600, "
           .. "got %s"):format(tostring(every)), 2)
  end
  nbuses = nbuses + 1
  local key = ("%s%d.%d"):format(PREFIX, core.pid(), nbuses)
  local handle = { timer = nil, is_cancelled = false }
  local function write()
    handle.timer = nil
    if handle.is_cancelled or bus:is_closed() then return end
    local ok, m = pcall(bus.metrics, bus)
    local text = ok and core.json_encode(m)
    if text then dict:set(key, text, every * 3 + 1) end
    handle.timer = bus:_after(every * 1000, write)
    handle.timer:unref()
  end
  function handle.cancel()
    handle.is_cancelled = true
    if handle.timer then handle.timer:cancel() end
    dict:delete(key)
  end
  handle.timer = bus:_after(0, write)
  handle.timer:unref()
  return handle
end

local SEVERITY = { closed = 1, half_open = 2, open = 3 }

-- Adds metrics table b into a: numbers add up, tables merge, histogram
-- bounds are kept, and of two breaker states the worse one stays.
local function add(a, b)
  for k, v in pairs(b) do
    local have = a[k]
    if k == "bounds" then
      if have == nil then a[k] = v end
    elseif type(v) == "number" then
      a[k] = (type(have) == "number" and have or 0) + v
    elseif type(v) == "table" then
      if type(have) ~= "table" then have = {}; a[k] = have end
      add(have, v)
    elseif type(v) == "string" then
      if have == nil or (SEVERITY[v] or 0) > (SEVERITY[have] or 0) then
        a[k] = v
      end
    end
  end
  return a
end

--- The sum of the metrics the buses sharing dict wrote (M.share), as
--- Prometheus text, every series with the constant labels given.
function M.shared_prometheus(dict, labels)
  local base = base_labels(labels)
  local sum = { published = {}, queued = {}, subscriptions = {},
                refused_full = 0, timers = 0, dead_letters = 0,
                delayed = 0, retrying = 0 }
  local keys = dict:get_keys(0)
  sort(keys)
  for _, key in ipairs(keys) do
    if key:sub(1, #PREFIX) == PREFIX then
      local text = dict:get(key)
      local m = text and core.json_decode(text)
      if type(m) == "table" then add(sum, m) end
    end
  end
  for _, p in ipairs(PRIOS) do
    sum.published[p] = sum.published[p] or 0
    sum.queued[p] = sum.queued[p] or 0
  end
  if not sum.latency then           -- nobody wrote: an empty histogram
    sum.latency = histogram(LATENCY_BOUNDS):read()
  end
  return render(sum, base)
end

--- The content type of M.prometheus's text, for an HTTP response.
M.CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

return M
