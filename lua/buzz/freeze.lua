--- buzz.freeze: read-only events, for careful users and test suites
-- (buzz.new{ freeze = true }).
--
-- Every handler of a bus gets the same event table, so a handler that
-- writes `ev.payload.x = 1` or `ev.type = ...` changes what later
-- handlers, retries and the publisher see. With freeze, a handler that
-- changes the event it was given fails: its delivery raises
--   EFROZEN: a handler of "billing" changed ev.payload.total (the bus
--   was made with freeze = true: events are read-only; copy what you
--   change)
-- when it returns, the event is put back as it was first, and the failure
-- goes where any raise goes (on_error, retry, dead letter).
--
-- Why not a proxy raising at the write: LuaJIT (as Debian builds it) has
-- no __pairs and no __len for tables, so pairs(ev.payload) and
-- #ev.payload.items would silently see nothing through one; and a proxy
-- handed back to publish would encode as {}. The check works instead on
-- the real tables: before the handler runs it records, for every table
-- the event reaches, its keys and values (raw, by identity for tables);
-- after, it compares. It costs two walks of the event per delivery: an
-- opt-in for tests, not for production.
--
-- A handler that raises is not checked as it unwinds (catching the raise
-- would cost it its traceback); what it changed is found by the next
-- handler of the same event, put back, and reported to on_error.
-- @module buzz.freeze
-- @local

local next, type, rawequal, rawset = next, type, rawequal, rawset
local setmetatable, tostring, format = setmetatable, tostring, string.format

local M = {}

-- A key as a path step: .name for identifiers, [k] for the rest.
local function step(k)
  if type(k) == "string" and k:match("^[%a_][%w_]*$") then return "." .. k end
  if type(k) == "string" then return format("[%q]", k) end
  return "[" .. tostring(k) .. "]"
end

-- { [t] = { copy of t's entries }, paths = { [t] = "ev.payload" } } for
-- every table root reaches (iteratively: no recursion depth limit).
local function snapshot(root)
  local rec, paths = {}, {}
  local stack, n = { root }, 1
  paths[root] = "ev"
  while n > 0 do
    local t = stack[n]
    stack[n] = nil
    n = n - 1
    local copy = {}
    rec[t] = copy
    for k, v in next, t do
      copy[k] = v
      if type(v) == "table" and not rec[v] and not paths[v] then
        paths[v] = paths[t] .. step(k)
        n = n + 1
        stack[n] = v
      end
    end
  end
  return { rec = rec, paths = paths }
end

-- The path of the first difference between the tables and what snap
-- recorded of them, or nil.
local function changed(snap)
  local paths = snap.paths
  for t, copy in next, snap.rec do
    for k, v in next, t do
      if not rawequal(copy[k], v) then return paths[t] .. step(k) end
    end
    for k in next, copy do
      if t[k] == nil then return paths[t] .. step(k) end
    end
  end
  return nil
end

-- Puts every table back as snap recorded it.
local function restore(snap)
  for t, copy in next, snap.rec do
    for k in next, t do
      if copy[k] == nil then rawset(t, k, nil) end
    end
    for k, v in next, copy do rawset(t, k, v) end
  end
end

local function message(who, path)
  return format("EFROZEN: %s changed %s (the bus was made with freeze = "
                .. "true: events are read-only; copy what you change)",
                who, path)
end

-- The snapshot of each event some handler is running with (weak: an
-- event that is dropped takes its snapshot along).
local running = setmetatable({}, { __mode = "k" })

--- handler, checked: it fails with EFROZEN if it changes its first
--- argument (an event, or a batch's array of events). sub names it in
--- messages; report(err) gets what an earlier handler that raised left.
---@param handler function
---@param name string|nil the subscription's name, for messages
---@param report function report(err), the bus's on_error
---@return function
function M.wrap(handler, name, report)
  local who = name and format("a handler of %q", name) or "a handler"
  return function(ev, ...)
    if type(ev) ~= "table" then return handler(ev, ...) end
    local before = running[ev]
    if before then
      local path = changed(before.snap)
      if path then
        restore(before.snap)
        report(message(before.who .. " (which raised or is waiting)", path))
      end
    end
    local snap = snapshot(ev)
    local mine = { snap = snap, who = who }
    running[ev] = mine
    local a, b = handler(ev, ...)
    if running[ev] == mine then running[ev] = before end
    local path = changed(snap)
    if path then
      restore(snap)
      error(message(who, path), 0)
    end
    return a, b
  end
end

return M
