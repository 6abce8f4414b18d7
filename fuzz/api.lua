--- Random API sequences against buzz, checking invariants (issue 13).
--
--   lua5.4 fuzz/api.lua [seconds [seed]]      (make fuzz runs it)
--
-- Runs sessions until the time is up. Each session makes a bus (in
-- memory, or on a store in a fresh temporary directory, sometimes with a
-- small queue_limit) and makes random calls: subscribe, on, once,
-- unsubscribe, publish, publish_sync, step, drain, close, buzz.where{},
-- routes, with valid and invalid arguments. Handlers may raise, publish,
-- publish_sync or unsubscribe. A model of the live subscriptions checks:
--   - invalid arguments raise a string error; valid ones do not; a world
--     failure (EFULL) is the nil, "CODE: message", "CODE" triple;
--   - ids are unique and each exceeds every id returned before the call
--     began, also across a store's reopening;
--   - a handler runs only for an event whose type its pattern matches
--     (and whose payload its filter accepts), that was published after it
--     subscribed, while it is subscribed, at most once per event; a once
--     subscription runs once;
--   - each subscription receives the events of one priority in id order
--     (publish_sync aside);
--   - after drain (with a store: after flush), every subscription still
--     live has received every event of its audience.
-- Under make fuzz the core is the ASan + UBSan build, so a memory error
-- ends the run too. The seed is printed first; the same seed and the same
-- number of sessions replay the same calls.
local buzz = require "buzz"

local seconds = tonumber(arg[1] or os.getenv("FUZZ_SECONDS") or 60)
local seed = tonumber(arg[2] or os.getenv("FUZZ_SEED") or os.time())
math.randomseed(seed)
print(("api fuzz: seed %d, %d s (replay: lua5.4 fuzz/api.lua %d %d)")
      :format(seed, seconds, seconds, seed))

local random, fmt = math.random, string.format
local log = {}                     -- the last calls, shown on a failure

local function note(s)
  log[#log + 1] = s
  if #log > 40 then table.remove(log, 1) end
end

local function fail(why)
  io.stderr:write(("api fuzz: FAILED (seed %d): %s\nlast calls:\n  %s\n")
                  :format(seed, why, table.concat(log, "\n  ")))
  os.exit(1)
end

local function pick(t) return t[random(#t)] end

-- ------------------------------------------------------------ subjects

local TOKENS = { "a", "b", "c", "a*", "b>" }

local function rand_type()
  local t = {}
  for i = 1, random(3) do t[i] = pick(TOKENS) end
  return table.concat(t, ".")
end

local function rand_pattern()
  local t, n = {}, random(3)
  for i = 1, n do t[i] = random(4) == 1 and "*" or pick(TOKENS) end
  if random(4) == 1 then t[n] = ">" end
  return table.concat(t, ".")
end

local BAD_TYPES = { "", "a..b", "a.*", "a.>", ".a", "a.", "a b", "a\tb",
                    "$SYS.x", 42, true, {} }
local BAD_PATTERNS = { "", "a..b", ">.a", "a.>.b", ".a", "a b", "a\n", 7,
                       false }

local function split(s)
  local t = {}
  for tok in (s .. "."):gmatch("([^.]*)%.") do t[#t + 1] = tok end
  return t
end

-- DESIGN.md "Subjects": the reference matcher.
local function matches(pattern, etype)
  local p, t = split(pattern), split(etype)
  if etype:sub(1, 1) == "$" and (p[1] == "*" or p[1] == ">") then
    return false
  end
  if p[#p] == ">" then
    if #t < #p then return false end
  elseif #t ~= #p then
    return false
  end
  for i = 1, #p do
    if p[i] == ">" then return true end
    if p[i] ~= "*" and p[i] ~= t[i] then return false end
  end
  return true
end

-- ------------------------------------------------------------ the model

local S                 -- the session: bus, subs, events, ...
local count = { deliveries = 0, published = 0, misuse = 0, full = 0 }
local max_done = 0      -- highest id returned so far (per store path)
local violation         -- the first one seen inside a handler

local function violate(why)
  violation = violation or why
end

local function passes(m, payload)
  if not m.gt then return true end
  return type(payload) == "table" and type(payload.n) == "number"
         and payload.n > m.gt
end

-- The live subscriptions an event of etype and payload goes to now.
local function audience(etype, payload)
  local a = {}
  for _, m in ipairs(S.subs) do
    if m.is_live and matches(m.pattern, etype) and passes(m, payload) then
      a[m] = true
    end
  end
  return a
end

local PRIORITIES = { "critical", "high", "normal", "low" }

local function rand_payload()
  local r = random(6)
  if r == 1 then return nil end
  if r == 2 then return "text" end
  return { n = random(0, 9), s = "x" }
end

local act                            -- forward: one random call

-- Calls handlers make per bus at most: a handler's call may publish to
-- handlers that call again, and some seeds grow a session without bound
-- (seed 1796591430 reached 1,600 subscriptions and never ended).
local MAX_ACTS = 1000

local function handler_for(m)
  return function(ev)
    local e = S.events[ev.id]
    if not e then                    -- a publish_sync not returned yet
      e = S.pending[#S.pending]
      if not e or e.id or e.type ~= ev.type then
        violate(fmt("event %s (%s) delivered that nobody published",
                    tostring(ev.id), tostring(ev.type)))
        return
      end
      e.id = ev.id
      S.events[ev.id] = e
    end
    if not m.is_live then
      violate(fmt("%s ran after it was unsubscribed (event %d)", m.name,
                  ev.id))
    elseif not e.audience[m] then
      violate(fmt("%s received event %d (%s) outside its audience",
                  m.name, ev.id, ev.type))
    elseif m.got[ev.id] then
      violate(fmt("%s received event %d twice", m.name, ev.id))
    end
    m.got[ev.id] = true
    count.deliveries = count.deliveries + 1
    if not e.is_sync then
      local last = m.last[e.priority] or 0
      if ev.id < last then
        violate(fmt("%s received %s event %d after %d", m.name, e.priority,
                    ev.id, last))
      end
      m.last[e.priority] = ev.id
    end
    if m.is_once then m.is_live = false end
    -- what the handler does besides, decided when it subscribed
    local b = m.behaviour
    if b == "raise" then
      error("handler failure on purpose")
    elseif b == "act" and S.depth < 6          -- past 4 cursor levels
           and S.acts < MAX_ACTS then
      S.acts = S.acts + 1
      S.depth = S.depth + 1
      act(true)
      S.depth = S.depth - 1
    end
  end
end

-- pcall(fn, ...): raises in the model if a misuse did not raise a string.
local function expect_raise(what, fn, ...)
  note("misuse: " .. what)
  count.misuse = count.misuse + 1
  local ok, err = pcall(fn, ...)
  if ok then fail(what .. " did not raise") end
  if type(err) ~= "string" then
    fail(fmt("%s raised a %s, not a message", what, type(err)))
  end
end

local function check_triple(what, v, err, code)
  if v ~= nil or type(err) ~= "string" or type(code) ~= "string"
     or err:sub(1, #code + 2) ~= code .. ": " then
    fail(fmt("%s failed without nil, \"CODE: message\", \"CODE\": %s %s %s",
             what, tostring(v), tostring(err), tostring(code)))
  end
end

-- ------------------------------------------------------------ the calls

local function do_subscribe()
  local bus = S.bus
  if random(6) == 1 then
    local pat = pick(BAD_PATTERNS)
    expect_raise(fmt("subscribe(%q)", tostring(pat)),
                 bus.subscribe, bus, pat, function() end)
    return
  end
  if random(12) == 1 then
    expect_raise("subscribe with an unknown option", bus.subscribe, bus,
                 "a", function() end, { bogus = true })
    return
  end
  if random(20) == 1 then
    expect_raise("bus.subscribe", bus.subscribe, "a", function() end)
    return
  end
  local pattern = rand_pattern()
  S.nsubs = S.nsubs + 1
  local m = { name = "sub" .. S.nsubs, pattern = pattern, got = {},
              last = {}, is_live = true }
  local r = random(10)
  m.behaviour = r == 1 and "raise" or r <= 3 and "act" or "plain"
  local how = random(6)
  local opts
  if random(4) == 1 then
    m.gt = random(0, 8)
    opts = { filter = buzz.where{ ["payload.n"] = { gt = m.gt } } }
  end
  local sub, err, code
  if how == 1 then
    note(fmt("%s = on(%q)", m.name, pattern))
    sub, err, code = bus:on(pattern, opts)(handler_for(m))
  elseif how == 2 then
    m.is_once = true
    note(fmt("%s = once(%q)", m.name, pattern))
    sub, err, code = bus:once(pattern, opts)(handler_for(m))
  elseif how == 3 and not m.gt then
    m.gt = random(0, 8)
    note(fmt("%s = route(%q):where{n > %d}", m.name, pattern, m.gt))
    sub, err, code = bus:route(pattern)
      :where{ ["payload.n"] = { gt = m.gt } }:handle(handler_for(m))
  else
    m.is_once = random(5) == 1 or nil
    if m.is_once then opts = opts or {}; opts.once = true end
    note(fmt("%s = subscribe(%q%s)", m.name, pattern,
             m.is_once and ", once" or ""))
    sub, err, code = bus:subscribe(pattern, handler_for(m), opts)
  end
  if not sub then
    check_triple("subscribe", sub, err, code)
    return
  end
  m.sub = sub
  S.subs[#S.subs + 1] = m
end

local function do_unsubscribe()
  if #S.subs == 0 then return end
  local m = pick(S.subs)
  note("unsubscribe " .. m.name)
  local was = m.sub.is_active
  local r = m.sub:unsubscribe()
  if r ~= was then
    fail(fmt("unsubscribe of %s returned %s", m.name, tostring(r)))
  end
  m.is_live = false
  if m.sub:unsubscribe() ~= false then fail("unsubscribe twice: not false") end
end

local function do_publish(is_sync)
  local bus = S.bus
  local method = is_sync and "publish_sync" or "publish"
  local r = random(10)
  if r == 1 then
    local t = pick(BAD_TYPES)
    expect_raise(fmt("%s(%q)", method, tostring(t)), bus[method], bus, t)
    return
  elseif r == 2 then
    expect_raise(method .. " with a bad priority", bus[method], bus, "a",
                 nil, { priority = pick { "urgent", 1, true } })
    return
  elseif r == 3 and random(3) == 1 then
    expect_raise(method .. " with an unknown option", bus[method], bus, "a",
                 nil, { bogus = 1 })
    return
  end
  local etype, payload = rand_type(), rand_payload()
  local prio = random(3) == 1 and pick(PRIORITIES) or nil
  local e = { type = etype, payload = payload, is_sync = is_sync,
              priority = prio or "normal",
              audience = audience(etype, payload) }
  local floor = max_done
  note(fmt("%s(%q, n=%s, %s)", method, etype,
           tostring(type(payload) == "table" and payload.n),
           e.priority))
  if is_sync then S.pending[#S.pending + 1] = e end
  local id, err, code = bus[method](bus, etype, payload,
                                    prio and { priority = prio } or nil)
  if is_sync then table.remove(S.pending) end
  if not id then
    check_triple(method, id, err, code)
    if code ~= "EFULL" then fail(method .. " failed: " .. err) end
    count.full = count.full + 1
    return
  end
  if math.type(id) ~= "integer" then
    fail(method .. " gave a non-integer id")
  end
  if id <= floor then
    fail(fmt("%s gave id %d, not above %d returned before", method, id,
             floor))
  end
  if S.ids[id] then fail(fmt("id %d given twice", id)) end
  S.ids[id] = true
  if e.id and e.id ~= id then
    fail(fmt("publish_sync returned %d for event %d", id, e.id))
  end
  e.id = id
  S.events[id] = e
  count.published = count.published + 1
  if id > max_done then max_done = id end
  if is_sync then                  -- delivered before it returned
    for m in pairs(e.audience) do
      if m.is_live and not m.got[id] and not m.is_once then
        violate(fmt("publish_sync %d returned before %s had it", id, m.name))
      end
    end
  end
end

-- After a full drain, every live subscription has all of its audience.
local function check_complete()
  for id, e in pairs(S.events) do
    for m in pairs(e.audience) do
      if m.is_live and not m.got[id] then
        fail(fmt("%s never received event %d (%s) after drain", m.name, id,
                 e.type))
      end
    end
  end
end

local function do_drive()
  local bus, r = S.bus, random(4)
  if r == 1 then
    local max = random(0, 4)
    note(fmt("step(%d)", max))
    local n = bus:step(max)
    if math.type(n) ~= "integer" or n < 0 or n > max then
      fail(fmt("step(%d) returned %s", max, tostring(n)))
    end
  elseif r == 2 then
    local bad = pick { -1, 1.5, "2", {} }
    expect_raise("step(" .. tostring(bad) .. ")", bus.step, bus, bad)
  else
    if S.store then bus:flush() end
    note("drain()")
    local n = bus:drain()
    if math.type(n) ~= "integer" or n < 0 then fail("drain gave " .. n) end
    if S.store then             -- commits that the drain waited for
      bus:flush()
      bus:drain()
    end
    if violation then return end
    check_complete()
  end
end

local function do_where()
  local bad = pick {
    { ["payload.n"] = { bogus = 1 } },
    { [""] = 1 },
    { ["payload..n"] = 1 },
    { ["payload.n"] = { gt = {} } },
    { ["payload.n"] = { match = 5 } },
    "not a table",
  }
  expect_raise("where{...} that is wrong", buzz.where, bad)
end

act = function(in_handler)
  local r = random(in_handler and 6 or 12)
  if r <= 2 then do_publish(false)
  elseif r == 3 then do_publish(true)
  elseif r == 4 then do_unsubscribe()
  elseif r == 5 then do_subscribe()
  elseif r == 6 then
    if in_handler then do_publish(false) else do_subscribe() end
  elseif r <= 8 then do_drive()
  elseif r == 9 then do_where()
  elseif r == 10 then
    expect_raise("bus.publish", S.bus.publish, "a")
  else do_publish(false)
  end
end

-- ------------------------------------------------------------ sessions

local function tmpdir()
  local p = io.popen("env -u LD_PRELOAD mktemp -d")
  local dir = p:read("*l")
  p:close()
  return dir
end

local function open_bus(store, durability, limit)
  local bus, err, code = buzz.new{
    store = store, durability = store and durability or nil,
    queue_limit = limit,
    on_error = function(e)
      if type(e) ~= "string" then violate("on_error got a " .. type(e)) end
    end,
  }
  if not bus then fail("buzz.new failed: " .. tostring(err) .. " " ..
                       tostring(code)) end
  return bus
end

local function session()
  local dir, path
  local durability = pick { "batch", "sync", "none" }
  if random(3) == 1 then
    dir = tmpdir()
    path = dir .. "/events.db"
  end
  local limit = random(3) == 1 and random(2, 20) or nil
  max_done = 0
  for _ = 1, path and random(1, 3) or 1 do   -- reopen: ids go on rising
    S = { bus = open_bus(path, durability, limit), subs = {}, events = {},
          pending = {}, ids = {}, nsubs = 0, depth = 0, acts = 0,
          store = path }
    note(fmt("new{ store = %s, durability = %s, queue_limit = %s }",
             tostring(path), durability, tostring(limit)))
    for _ = 1, random(20, 200) do
      act(false)
      if violation then fail(violation) end
    end
    note("close()")
    local n = S.bus:close()
    if math.type(n) ~= "integer" or n < 0 then fail("close gave " .. n) end
    expect_raise("publish on a closed bus", S.bus.publish, S.bus, "a")
    expect_raise("drain on a closed bus", S.bus.drain, S.bus)
  end
  if dir then
    os.execute("env -u LD_PRELOAD rm -rf '" .. dir .. "'")
  end
end

local deadline, sessions = os.time() + seconds, 0
repeat
  session()
  sessions = sessions + 1
  collectgarbage()
until os.time() >= deadline
print(("api fuzz: %d sessions, %d events published, %d deliveries, "
       .. "%d misuses raised, %d EFULL; no invariant broken")
      :format(sessions, count.published, count.deliveries, count.misuse,
              count.full))
