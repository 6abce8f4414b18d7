--- buzz demo: a small shop's order pipeline on one in-memory bus.
--
--   make demo                 (or: lua5.4 examples/demo.lua, luajit ...)
--
-- Services subscribe to order events; each one that finishes its step
-- publishes the next event from inside its handler. Along the way the demo
-- shows wildcards ("order.*" vs "order.>"), the decorator form, once,
-- priorities, correlation and causation ids, a failing handler reported
-- through on_error, unsubscribe, back-pressure from queue_limit, run() and
-- close(). It asserts what it shows, so it exits non-zero if buzz misbehaves.

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

local function say(fmt, ...)
  print(fmt:format(...))
end

local function heading(title)
  print()
  print("== " .. title)
end

-- Everything on_error sees, so the end of the demo can check it.
local failures = {}

local bus = assert(buzz.new{
  queue_limit = 4,                 -- tiny, so the flash sale hits it
  on_error = function(err, ev, sub)
    failures[#failures + 1] = { err = err, ev = ev, sub = sub }
    say("  [on_error]  handler for %q failed on #%d (order %s): %s",
        sub.pattern, ev.id, ev.payload.order, tostring(err))
  end,
})

-- ------------------------------------------------------------ services

-- Audit: every order event, however deep ("order.>" also matches
-- "order.payment.captured"). It reports who caused what.
local seen = {}                    -- event id -> event, for the checks
local delivered = {}               -- event types in delivery order
local is_quiet = false
bus:subscribe("order.>", function(ev)
  seen[ev.id] = ev
  delivered[#delivered + 1] = ev.type
  if not is_quiet then
    say("  [audit]     #%d %-22s order %s  corr=%s cause=%s",
        ev.id, ev.type, ev.payload.order, tostring(ev.correlation_id),
        ev.causation_id and ("#" .. ev.causation_id) or "-")
  end
end)

-- Fraud control cancels orders at critical priority; inventory skips them.
local cancelled = {}
bus:on("order.cancelled")(function(ev)
  cancelled[ev.payload.order] = true
  say("  [fraud]     order %s cancelled: %s", ev.payload.order,
      ev.payload.reason)
end)

-- Inventory reserves stock, then hands over to payment.
bus:on("order.created")(function(ev)
  local order = ev.payload.order
  if cancelled[order] then
    say("  [inventory] order %s was cancelled; nothing to reserve", order)
    return
  end
  if not is_quiet then
    say("  [inventory] reserved stock for order %s", order)
  end
  -- No correlation_id given: it is inherited from ev, and the new event's
  -- causation_id is ev.id.
  assert(bus:publish("order.reserved",
                     { order = order, card = ev.payload.card }))
end)

-- Marketing: a welcome gift for the first order only.
local welcomed
bus:once("order.created")(function(ev)
  welcomed = ev.payload.order
  say("  [marketing] first order of the day is %s: gift voucher sent",
      ev.payload.order)
end)

-- Payment charges the card; a declined card raises, which is reported to
-- on_error while the subscriptions after this one still get the event.
bus:on("order.reserved")(function(ev)
  if ev.payload.card == "declined" then
    error("card declined", 0)
  end
  if not is_quiet then
    say("  [payment]   charged order %s", ev.payload.order)
  end
  assert(bus:publish("order.payment.captured", { order = ev.payload.order }))
end)

-- Shipping: paid orders go out.
local shipped = {}
bus:on("order.payment.captured")(function(ev)
  shipped[#shipped + 1] = ev.payload.order
  if not is_quiet then
    say("  [shipping]  order %s shipped", ev.payload.order)
  end
end)

-- Notifications: one text per status change. "order.*" matches exactly one
-- token after "order", so it does not see "order.payment.captured".
local texts = {}
local notifier = bus:on("order.*")(function(ev)
  texts[#texts + 1] = ev.payload.order .. " " .. ev.type
  say("  [sms]       order %s: %s", ev.payload.order, ev.type:sub(7))
end)

-- ------------------------------------------------------------ the flow

-- The storefront: one checkout request, one correlation id.
local function checkout(order, card)
  return bus:publish("order.created", { order = order, card = card },
                     { correlation_id = "req-" .. order })
end

heading("three orders arrive; fraud control flags C")
local a = assert(checkout("A", "ok"))
local b = assert(checkout("B", "declined"))
local c = assert(checkout("C", "ok"))
local x = assert(bus:publish("order.cancelled",
  { order = "C", reason = "stolen card" },
  { priority = "critical", correlation_id = "req-C" }))
say("published #%d #%d #%d (normal) and #%d (critical); draining", a, b, c, x)
local n = bus:drain()
say("drain() made %d deliveries", n)

-- The critical event overtook the three normal ones published before it.
assert(delivered[1] == "order.cancelled", "critical event was not first")
assert(welcomed == "A", "once handler did not see the first order")
-- Follow-ups inherit the correlation id and name their cause.
local reserved_a, captured_a
for _, ev in pairs(seen) do
  if ev.payload.order == "A" and ev.type == "order.reserved" then
    reserved_a = ev
  elseif ev.payload.order == "A" and ev.type == "order.payment.captured" then
    captured_a = ev
  end
end
assert(reserved_a.correlation_id == "req-A" and reserved_a.causation_id == a)
assert(captured_a.correlation_id == "req-A"
       and captured_a.causation_id == reserved_a.id)
-- B's payment failed, and only that handler; C never got past fraud.
assert(#failures == 1 and failures[1].ev.payload.order == "B"
       and failures[1].err == "card declined")
assert(#shipped == 1 and shipped[1] == "A")
assert(texts[#texts] == "B order.reserved", "a failure stopped the others")
say("order A: #%d created -> #%d reserved -> #%d captured, correlation_id %q",
    a, reserved_a.id, captured_a.id, captured_a.correlation_id)

heading("the SMS gateway goes offline: unsubscribe")
assert(notifier:unsubscribe() == true)
assert(notifier:unsubscribe() == false)      -- idempotent
say("notifier unsubscribed (%d texts sent so far)", #texts)
local texts_before = #texts

heading("flash sale: 6 orders against queue_limit = 4")
is_quiet = true
local refused = 0
for i = 1, 6 do
  local order = "F" .. i
  local id, err, code = checkout(order, "ok")
  if not id then
    -- Back-pressure: the world said no. Let the consumers catch up, retry.
    refused = refused + 1
    say("publish %s refused: nil, %q, %q", order, err, code)
    assert(code == "EFULL" and err:match("^EFULL: "))
    say("drain() to catch up: %d deliveries", bus:drain())
    id = assert(checkout(order, "ok"))
    -- A refused publish consumes no id: the retry gets the next one after
    -- the last event delivered (the audit sees every event on this bus).
    local max_seen = 0
    for seen_id in pairs(seen) do max_seen = math.max(max_seen, seen_id) end
    assert(id == max_seen + 1, "a refused publish consumed an id")
  end
  say("publish %s -> #%d", order, id)
end
assert(refused == 1, "expected exactly one refusal")
n = bus:run()                          -- returns once nothing is pending
say("run() returned when idle after %d deliveries", n)
assert(#shipped == 7, "every flash-sale order ships")
assert(#texts == texts_before, "an unsubscribed handler was called")
assert(#failures == 1, "unexpected handler failure")
say("%d orders shipped in all: %s", #shipped, table.concat(shipped, " "))

heading("closing time")
assert(bus:publish("order.reminder", { order = "A" }, { priority = "low" }))
local discarded = bus:close()
assert(discarded == 1 and bus:is_closed())
say("close() discarded %d pending event; bus closed", discarded)
