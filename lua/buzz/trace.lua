--- buzz.trace: event-chain tracing (buzz.new{ trace = true | ratio }).
--
-- Every delivery of a traced event is a span: the subscription's name,
-- the attempt, when it started (the bus's clock, ms), how long it ran
-- (µs), its outcome ("ok", "failed" with the error, "running" while it
-- runs or sleeps) and, for the attempt after which a subscription gave
-- the event up, fate = "dead_lettered". Each span has a span id of its
-- own (16 hex digits); an event's W3C traceparent gives its trace id and
-- parent span id, and tracestate is left as it is.
--
-- Events are linked by causation_id into trees: bus:trace(id) is the tree
-- under event id, bus:trace(correlation_id) the trees of a correlation.
-- With a ratio, the root of a chain (an event with no cause) is traced
-- with that probability and its descendants follow it.
--
-- Where it is kept: in memory (the last MAX events traced), and with a
-- writable store in its state rows, through the bus's writer: "trace"
-- (event id -> the event and its spans), "trace_child" (event id -> the
-- ids it caused) and "trace_corr" (correlation id -> its events'
-- ids), so that `buzz trace` reads them from another process.
--
-- Hooks: init.lua's bind wraps each handler (trace.wrap: every attempt,
-- a retry's too); errors.lua's reporter closes a span that raised or
-- timed out (trace.failed); runner.lua's bury marks the last attempt
-- (trace.buried).
-- @module buzz.trace
local core = require "buzz.core"

local type, ipairs, tostring, setmetatable = type, ipairs, tostring,
                                            setmetatable
local random, floor, format, sort, concat = math.random, math.floor,
                                            string.format, table.sort,
                                            table.concat
local hrtime = core.hrtime

local M = {}

--- Events kept in memory at most; the oldest go first.
local MAX = 10000
M.MAX = MAX
local LIST_MAX = 1000       -- ids kept per parent or correlation

local function pad(id)
  return format("%016d", id)
end

--- A bus's tracing state; ratio: 1 traces everything.
function M.new(bus, ratio)
  return {
    bus = bus, ratio = ratio,
    events = {}, order = {}, head = 1, n = 0,   -- id -> record; a ring
    children = {}, corr = {},                   -- id/corr -> { ids }
    chosen = {}, dorder = {}, dhead = 1, dn = 0,  -- id -> traced? (ratio)
    open = setmetatable({}, { __mode = "k" }),  -- ev -> sub -> span
    writes = bus._store ~= nil and not bus._readonly,
  }
end

-- Remembers whether event id is traced (the last MAX * 4 decisions).
local function decide(tr, id, pick)
  tr.chosen[id] = pick
  tr.dorder[tr.dhead + tr.dn] = id
  tr.dn = tr.dn + 1
  if tr.dn > MAX * 4 then
    local old = tr.dorder[tr.dhead]
    tr.dorder[tr.dhead] = nil
    tr.dhead, tr.dn = tr.dhead + 1, tr.dn - 1
    tr.chosen[old] = nil
  end
end

-- Is ev traced? A root (no cause) by the ratio; others as their cause.
-- Decided once per event id: every delivery and attempt agrees.
local function is_traced(tr, ev)
  if tr.ratio >= 1 then return true end
  local id = ev.id
  local pick = tr.chosen[id]
  if pick ~= nil then return pick end
  local cause = ev.causation_id
  if cause ~= nil then
    pick = tr.chosen[cause] == true
  else
    pick = random() < tr.ratio
  end
  decide(tr, id, pick)
  return pick
end

local function store_list(tr, kind, name, list)
  if tr.writes then tr.bus:_state_put(kind, name, list) end
end

local function add_id(tr, map, kind, name, id)
  local list = map[name]
  if not list then
    list = tr.writes and tr.bus:_state_get(kind, name) or {}
    map[name] = list
  end
  if #list < LIST_MAX then
    list[#list + 1] = id
    store_list(tr, kind, name, list)
  end
end

-- Forgets the oldest event record once MAX are kept (memory only: the
-- store keeps its rows).
local function evict(tr)
  local id = tr.order[tr.head]
  tr.order[tr.head] = nil
  tr.head = tr.head + 1
  tr.n = tr.n - 1
  local rec = tr.events[id]
  tr.events[id] = nil
  if rec then tr.children[id] = nil end
end

-- The record of ev, made (and linked to its cause and correlation) on its
-- first span.
local function record_of(tr, ev)
  local id = ev.id
  local rec = tr.events[id]
  if rec then return rec end
  rec = { id = id, type = ev.type, ts = ev.ts,
          causation_id = ev.causation_id, correlation_id = ev.correlation_id,
          spans = {} }
  if tr.writes then                    -- spans from before a restart
    local old = tr.bus:_state_get("trace", pad(id))
    if type(old) == "table" and type(old.spans) == "table" then
      rec.spans = old.spans
    end
  end
  tr.events[id] = rec
  tr.order[tr.head + tr.n] = id
  tr.n = tr.n + 1
  if tr.n > MAX then evict(tr) end
  if rec.causation_id then
    add_id(tr, tr.children, "trace_child", pad(rec.causation_id), id)
  end
  if rec.correlation_id then
    add_id(tr, tr.corr, "trace_corr", rec.correlation_id, id)
  end
  return rec
end

local function save(tr, rec)
  if tr.writes then
    tr.bus:_state_put("trace", pad(rec.id), rec)
  end
end

-- A span id: 16 hex digits (LuaJIT's random starts from one seed in
-- every process, so the clock is mixed in).
local function span_id()
  return format("%08x%08x", random(0, 0x7fffffff),
                floor(hrtime() / 1000) % 0x7fffffff)
end

-- The trace id and parent span id of ev's traceparent, if it has one.
local function parent_of(ev)
  local h = ev.headers
  local tp = type(h) == "table" and h.traceparent
  if type(tp) ~= "string" then return nil, nil end
  return tp:match("^%x%x%-(%x+)%-(%x+)%-%x%x$")
end

local function start(tr, sub, ev)
  local rec = record_of(tr, ev)
  local trace_id, parent = parent_of(ev)
  local sp = { span_id = span_id(), subscription = sub._name,
               attempt = ev.attempt or 1, start = tr.bus:_now(),
               duration_us = 0, outcome = "running",
               trace_id = trace_id, parent_span_id = parent }
  rec.spans[#rec.spans + 1] = sp
  save(tr, rec)
  local o = { rec = rec, sp = sp, t0 = hrtime() }
  local by_sub = tr.open[ev]
  if not by_sub then
    by_sub = {}
    tr.open[ev] = by_sub
  end
  by_sub[sub] = o
  return o
end

local function finish(tr, o, outcome, err)
  local sp = o.sp
  sp.duration_us = floor((hrtime() - o.t0) / 1000)
  sp.outcome, sp.error = outcome, err
  save(tr, o.rec)
end

--- The handler fn of sub, traced: each call is a span.
function M.wrap(tr, sub, fn)
  return function(ev)
    if type(ev) ~= "table" or type(ev.id) ~= "number"
       or not is_traced(tr, ev) then
      return fn(ev)
    end
    local o = start(tr, sub, ev)
    fn(ev)
    local by_sub = tr.open[ev]
    if by_sub and by_sub[sub] == o then by_sub[sub] = nil end
    finish(tr, o, "ok")
  end
end

--- The delivery of ev to sub raised or timed out (the reporter): its span
--- ends as failed.
function M.failed(tr, ev, sub, err)
  local by_sub = type(ev) == "table" and tr.open[ev]
  local o = by_sub and by_sub[sub]
  if not o then return end
  by_sub[sub] = nil
  finish(tr, o, "failed", tostring(err))
end

--- sub gave ev up (a dead letter): its last span says so.
function M.buried(tr, ev, sub)
  local rec = type(ev) == "table" and tr.events[ev.id]
  if not rec then return end
  for i = #rec.spans, 1, -1 do
    local sp = rec.spans[i]
    if sp.subscription == sub._name then
      sp.fate = "dead_lettered"
      save(tr, rec)
      return
    end
  end
end

-- ------------------------------------------------------------ reading

-- Where records and links come from: the bus's memory, else its store.
local function reader(bus)
  local tr = bus._trace
  local has_store = bus._store ~= nil
  local function record(id)
    local rec = tr and tr.events[id]
    if rec then return rec end
    if has_store then return bus:_state_get("trace", pad(id)) end
    return nil
  end
  local function list(map, kind, name)
    local l = tr and tr[map][name]
    if l then return l end
    if has_store then return bus:_state_get(kind, name) or {} end
    return {}
  end
  return record, list
end

local function copy_spans(spans)
  local out = {}
  for i, sp in ipairs(spans or {}) do
    out[i] = { span_id = sp.span_id, subscription = sp.subscription,
               attempt = sp.attempt, start = sp.start,
               duration_us = sp.duration_us, outcome = sp.outcome,
               error = sp.error, fate = sp.fate, trace_id = sp.trace_id,
               parent_span_id = sp.parent_span_id }
  end
  return out
end

local function node(record, list, id, depth, seen)
  local rec = record(id)
  if not rec or seen[id] or depth > 64 then return nil end
  seen[id] = true
  local n = { id = id, type = rec.type, ts = rec.ts,
              causation_id = rec.causation_id,
              correlation_id = rec.correlation_id,
              spans = copy_spans(rec.spans), children = {} }
  local kids = {}
  for _, k in ipairs(list("children", "trace_child", pad(id))) do
    kids[#kids + 1] = k
  end
  sort(kids)
  for _, k in ipairs(kids) do
    local child = node(record, list, k, depth + 1, seen)
    if child then n.children[#n.children + 1] = child end
  end
  return n
end

--- bus:trace(id | correlation_id): the tree under event id (nil if it
--- was not traced), or the trees of a correlation id (a list, roots in id
--- order: its events whose cause is not in it).
function M.tree(bus, what)
  local record, list = reader(bus)
  if type(what) == "number" then
    return node(record, list, what, 1, {})
  end
  local ids = list("corr", "trace_corr", what)
  local in_it = {}
  for _, id in ipairs(ids) do in_it[id] = true end
  local roots, seen = {}, {}
  local sorted_ids = {}
  for _, id in ipairs(ids) do sorted_ids[#sorted_ids + 1] = id end
  sort(sorted_ids)
  for _, id in ipairs(sorted_ids) do
    local rec = record(id)
    if rec and not (rec.causation_id and in_it[rec.causation_id]) then
      local n = node(record, list, id, 1, seen)
      if n then roots[#roots + 1] = n end
    end
  end
  return roots
end

-- ------------------------------------------------------------ showing

local function span_text(sp)
  local t = format("%s attempt %d %s %.3f ms", sp.subscription,
                   sp.attempt or 1, sp.outcome,
                   (sp.duration_us or 0) / 1000)
  if sp.error then t = t .. ": " .. sp.error:gsub("\n.*", "") end
  if sp.fate then t = t .. " (" .. sp.fate .. ")" end
  return t
end

--- The trees (a list of nodes) as indented text, a line per event and
--- per delivery.
function M.text(roots)
  local out = {}
  local function walk(n, indent)
    out[#out + 1] = format("%s#%d %s%s", indent, n.id, n.type,
                           n.correlation_id and ("  [" .. n.correlation_id
                                                 .. "]") or "")
    for _, sp in ipairs(n.spans) do
      out[#out + 1] = indent .. "  - " .. span_text(sp)
    end
    for _, c in ipairs(n.children) do walk(c, indent .. "  ") end
  end
  for _, r in ipairs(roots) do walk(r, "") end
  out[#out + 1] = ""
  return concat(out, "\n")
end

local function mermaid_label(s)
  return (s:gsub('"', "'"))
end

--- The trees as a Mermaid flowchart: a box per event, an arrow per cause,
--- labelled with the deliveries' outcomes.
function M.mermaid(roots)
  local out = { "flowchart TD" }
  local function outcomes(n)
    local parts = {}
    for _, sp in ipairs(n.spans) do
      parts[#parts + 1] = format("%s #%d %s", sp.subscription, sp.attempt or 1,
                                 sp.outcome)
    end
    return concat(parts, "<br/>")
  end
  local function walk(n)
    local label = format("#%d %s", n.id, n.type)
    local o = outcomes(n)
    if o ~= "" then label = label .. "<br/>" .. o end
    out[#out + 1] = format('  e%d["%s"]', n.id, mermaid_label(label))
    for _, c in ipairs(n.children) do
      out[#out + 1] = format("  e%d --> e%d", n.id, c.id)
      walk(c)
    end
  end
  for _, r in ipairs(roots) do walk(r) end
  out[#out + 1] = ""
  return concat(out, "\n")
end

return M
