--- buzz.saga: bus:saga(name, opts), a multi-step process started by an
-- event, whose completed steps are compensated in reverse order when a
-- later one fails for good (README, "Sagas").
--
-- A saga instance is a record in the store's state rows (kind "saga",
-- named "NAME:ID", so that buzz sagas lists every saga's): its status,
-- the next step, the data
-- its steps keep (ctx.data, JSON) and the event that started it. The
-- record is written when the saga starts, after each step and each undo,
-- and when it ends, so a crash resumes it where it was: the step that
-- was running runs again (steps are to be idempotent: ctx.id names the
-- saga), an undo under way runs again. A start event whose saga id has a
-- record already starts nothing (idempotency by saga id).
--
-- Steps run in the handler that took the start event, so they may wait:
-- ctx:request subscribes to the reply, publishes the request and waits
-- (buzz.await) for the reply or the timeout; buzz.sleep spaces the
-- attempts of a step (retry). The outcome is announced on
-- $SYS.saga.NAME: { name, id, status, step (the step that failed), error }.
-- @module buzz.saga
local errors = require "buzz.errors"
local options = require "buzz.options"
local policy = require "buzz.policy"
local failure = require "buzz.failure"

local type, error, ipairs, pairs, pcall, tostring, setmetatable,
      getmetatable = type, error, ipairs, pairs, pcall, tostring,
                     setmetatable, getmetatable
local format, sort = string.format, table.sort
local check_options, is_callable = options.check_options,
                                   options.is_callable

local M = {}
local Saga = {}
Saga.__index = Saga
local Ctx = {}
Ctx.__index = Ctx

local OPTIONS = options.option_set("on", "id", "steps", "retry", "timeout")
local STEP_OPTIONS = options.option_set("name", "run", "undo", "retry",
                                        "timeout")
local REQUEST_OPTIONS = options.option_set("reply", "timeout", "where",
                                           "priority", "key", "headers")
local LIST_OPTIONS = options.option_set("status")
local DEFAULT_TIMEOUT = 30     -- seconds a request waits for its reply
local ACTIVE = { running = true, compensating = true }

local function check_self(self, method)
  if getmetatable(self) ~= Saga then
    error(("use saga:%s(...), not saga.%s(...)"):format(method, method), 3)
  end
end

-- ------------------------------------------------------------ context

--- Publishes an event as part of the saga: its correlation id is the
--- saga's, so replies can be told apart.
---@return integer|nil id, string|nil err, string|nil code
function Ctx:publish(etype, payload, opts)
  local o = { correlation_id = self.correlation_id }
  for k, v in pairs(opts or {}) do o[k] = v end
  local id, err, code = self.bus:publish(etype, payload, o)
  return id, err, code
end

--- Publishes a request and waits for its reply: an event matching
--- opts.reply (a pattern) with the saga's correlation id (and for which
--- opts.where(ev), if given, is true), at most opts.timeout seconds
--- (default 30). Returns the reply event; raises ETIMEOUT (the step's
--- attempt fails) when none comes, and what publish refused.
---@param etype string
---@param payload any
---@param opts table reply, timeout, where, priority, key, headers
---@return table reply
function Ctx:request(etype, payload, opts)
  check_options(opts, REQUEST_OPTIONS, "ctx:request", 2)
  if type(opts) ~= "table" or type(opts.reply) ~= "string" then
    error("ctx:request needs reply = \"pattern\" (the reply's type)", 2)
  end
  local where = opts.where
  if where ~= nil and not is_callable(where) then
    error("bad where to ctx:request: expected a function(ev)", 2)
  end
  local bus, corr = self.bus, self.correlation_id
  local timeout = opts.timeout or self.timeout
  local sub, timer, got
  local reply, err = failure.await(function(done)
    sub = bus:subscribe(opts.reply, function(ev)
      if got or ev.correlation_id ~= corr then return end
      if where and not where(ev) then return end
      got = true
      sub:unsubscribe()
      if timer then timer:cancel() end
      done(ev)
    end)
    timer = bus:_after(timeout * 1000, function()
      if got then return end
      got = true
      sub:unsubscribe()
      done(nil, errors.text("ETIMEOUT", format(
        "no %s reply to %s within %g s", opts.reply, etype, timeout)))
    end)
    local id, perr = bus:publish(etype, payload, {
      correlation_id = corr, priority = opts.priority, key = opts.key,
      headers = opts.headers })
    if not id then
      got = true
      sub:unsubscribe()
      timer:cancel()
      done(nil, perr)
    end
  end)
  if not reply then error(err, 0) end
  return reply
end

-- ------------------------------------------------------------ records

-- Writes the record (with a store); a memory bus keeps every record in
-- live, a store only those under way.
local function save(self, rec)
  local bus = self.bus
  rec.updated = bus:_now()
  bus:_state_put("saga", self.prefix .. rec.id, rec)
  if ACTIVE[rec.status] or not bus:_has_store() then
    self.live[rec.id] = rec
  else
    self.live[rec.id] = nil
  end
end

local function announce(self, rec)
  self.bus:_announce("$SYS.saga." .. self.name, {
    name = self.name, id = rec.id, status = rec.status,
    step = rec.failed_step, error = rec.error })
end

local function context(self, rec, step, attempt)
  return setmetatable({
    bus = self.bus, name = self.name, id = rec.id, data = rec.data,
    event = rec.event, step = step.name, attempt = attempt,
    correlation_id = "saga:" .. self.name .. ":" .. rec.id,
    timeout = step.timeout or self.timeout,
  }, Ctx)
end

-- Runs fn(ctx) up to the step's attempts, sleeping between them; true,
-- or false, the last error.
local function attempts(self, rec, step, fn)
  local p = step.retry or self.retry
  local err
  for attempt = 1, p.max do
    local ok, e = pcall(fn, context(self, rec, step, attempt))
    if ok then return true end
    err = errors.wrap("ECALLBACK", format("saga %s %s: step %s (attempt "
                                          .. "%d of %d)", self.name, rec.id,
                                          step.name, attempt, p.max), e)
    self.bus:_report_error(err)
    if attempt < p.max then failure.sleep(policy.backoff(p, attempt) / 1000) end
  end
  return false, err
end

-- Drives a saga from where its record says, to its end.
local function drive(self, rec)
  local steps = self.steps
  while rec.status == "running" and rec.step <= #steps do
    local step = steps[rec.step]
    local ok, err = attempts(self, rec, step, step.run)
    if ok then
      rec.step = rec.step + 1
    else
      rec.status, rec.error, rec.failed_step = "compensating", err, step.name
      rec.undo = rec.step - 1          -- the last completed step
    end
    save(self, rec)
  end
  if rec.status == "running" then
    rec.status = "completed"
    save(self, rec)
    return announce(self, rec)
  end
  while rec.status == "compensating" and rec.undo >= 1 do
    local step = steps[rec.undo]
    if step.undo then
      local ok, err = attempts(self, rec, step, step.undo)
      if not ok then
        rec.status, rec.error = "failed", err   -- a human must look
        save(self, rec)
        return announce(self, rec)
      end
    end
    rec.undo = rec.undo - 1
    save(self, rec)
  end
  rec.status = "compensated"
  save(self, rec)
  announce(self, rec)
end

-- The handler of the start events.
local function on_start(self, ev)
  if self.closed then return end
  local id = ev.id
  if self.id_of then
    local ok, v = pcall(self.id_of, ev)
    if not ok or (type(v) ~= "string" and type(v) ~= "number") then
      self.bus:_report_error(errors.text("ECALLBACK", format(
        "saga %s: id(ev) %s for event %d; no saga started", self.name,
        ok and "gave a " .. type(v) or "raised: " .. tostring(v), ev.id)),
        ev)
      return
    end
    id = v
  end
  id = tostring(id)
  if self.live[id] or self.bus:_state_get("saga", self.prefix .. id) then
    self.duplicates = self.duplicates + 1
    return                             -- one saga per id
  end
  local rec = {
    saga = self.name, id = id, status = "running", step = 1, data = {},
    event = { id = ev.id, type = ev.type, payload = ev.payload,
              key = ev.key, correlation_id = ev.correlation_id },
    started = self.bus:_now(),
  }
  save(self, rec)
  drive(self, rec)
end

-- ------------------------------------------------------------ the saga

--- The stored records of the sagas named name (every saga's when name
--- is nil), in name then id order (buzz sagas reads them so).
-- @local
function M.records(bus, name)
  local out = {}
  for _, row in ipairs(bus:_state_list("saga")) do
    local rec = row.value
    if type(rec) == "table" and type(rec.id) == "string"
       and (name == nil or rec.saga == name) then
      out[#out + 1] = rec
    end
  end
  return out
end

--- Makes a saga (bus:saga). Raises on misuse.
-- @local
function M.new(bus, name, opts, level)
  if type(name) ~= "string" or not name:match("^[%w_%-]+$") then
    error("bad name to saga: expected letters, digits, _ or - (it names "
          .. "$SYS.saga.NAME)", level + 1)
  end
  if type(opts) ~= "table" then
    error("bad options to saga: expected a table with on = \"pattern\" and "
          .. "steps = { { run = fn, undo = fn }, ... }", level + 1)
  end
  check_options(opts, OPTIONS, "saga", level + 1)
  if type(opts.on) ~= "string" then
    error("saga needs on = \"pattern\": the event that starts one",
          level + 1)
  end
  if opts.id ~= nil and not is_callable(opts.id) then
    error("bad id to saga: expected a function(ev) giving the saga's id",
          level + 1)
  end
  if type(opts.steps) ~= "table" or #opts.steps == 0 then
    error("saga needs steps = { { run = fn, undo = fn }, ... } (one at "
          .. "least)", level + 1)
  end
  local steps = {}
  for i, s in ipairs(opts.steps) do
    local what = format("saga step %d", i)
    check_options(s, STEP_OPTIONS, what, level + 1)
    if type(s) ~= "table" or not is_callable(s.run) then
      error(what .. " needs run = function(ctx)", level + 1)
    end
    if s.undo ~= nil and not is_callable(s.undo) then
      error(what .. ": bad undo: expected a function(ctx)", level + 1)
    end
    steps[i] = { name = s.name or tostring(i), run = s.run, undo = s.undo,
                 retry = s.retry ~= nil and policy.retry(s.retry, level + 1)
                         or nil, timeout = s.timeout }
  end
  local list = bus._sagas or {}
  if list[name] and not list[name].closed then
    error(("saga %q exists already on this bus"):format(name), level + 1)
  end
  local self = setmetatable({
    bus = bus, name = name, prefix = name .. ":", steps = steps,
    id_of = opts.id, live = {}, duplicates = 0, closed = false,
    retry = policy.retry(opts.retry == nil and 1 or opts.retry, level + 1),
    timeout = opts.timeout or DEFAULT_TIMEOUT,
  }, Saga)
  local sub, err, code = bus:_subscribe(opts.on, function(ev)
    on_start(self, ev)
  end, { name = "saga:" .. name, retry = false }, level + 1)
  if not sub then return nil, err, code end
  self.sub = sub
  -- sagas a crash (or a close) left under way go on, each in a handler
  -- of its own: $SYS.saga_resume.NAME
  self.resume_sub = bus:_subscribe("$SYS.saga_resume." .. name, function(ev)
    local rec = self.live[ev.payload.id]
    if rec and ACTIVE[rec.status] and not self.closed then drive(self, rec) end
  end, { name = "saga:" .. name, retry = false }, level + 1)
  list[name] = self
  bus._sagas = list
  if bus:_has_store() then
    for _, rec in ipairs(self:list()) do
      if ACTIVE[rec.status] then
        self.live[rec.id] = rec
        bus:_announce("$SYS.saga_resume." .. name, { id = rec.id })
      end
    end
  end
  return self
end

--- A saga's record: { id, status ("running", "compensating",
--- "completed", "compensated" or "failed"), step (the next), data,
--- event, error, failed_step, started, updated }; nil if unknown.
---@param id string
---@return table|nil
function Saga:get(id)
  check_self(self, "get")
  id = tostring(id)
  return self.live[id] or self.bus:_state_get("saga", self.prefix .. id)
end

--- The records, by id; with { status = "failed" } only those.
---@param opts table|nil status
---@return table
function Saga:list(opts)
  check_self(self, "list")
  check_options(opts, LIST_OPTIONS, "saga:list", 2)
  local byid = {}
  if self.bus:_has_store() then
    for _, rec in ipairs(M.records(self.bus, self.name)) do
      byid[rec.id] = rec
    end
  end
  for id, rec in pairs(self.live) do byid[id] = rec end
  local out = {}
  for _, rec in pairs(byid) do
    if not (opts and opts.status) or rec.status == opts.status then
      out[#out + 1] = rec
    end
  end
  sort(out, function(a, b) return a.id < b.id end)
  return out
end

--- Stops starting and resuming sagas of this name (those under way stay
--- recorded and go on when a bus makes the saga again). Idempotent.
function Saga:close()
  check_self(self, "close")
  if self.closed then return end
  self.closed = true
  self.sub:unsubscribe()
  self.resume_sub:unsubscribe()
  local list = self.bus._sagas
  if list and list[self.name] == self then list[self.name] = nil end
end

--- A multi-step process with compensation (README, "Sagas"): opts on (the
--- pattern of the events that start one), steps = { { name, run =
--- function(ctx), undo = function(ctx), retry, timeout }, ... }, id =
--- function(ev) (the saga's id; default the event's id), retry (each
--- step's attempts, default 1), timeout (seconds a ctx:request waits,
--- default 30). Returns the saga (get, list, close).
---@tparam string name
---@tparam table opts
---@return the saga
-- @function Bus:saga
local function bus_saga_doc() end      -- (for the reference: the method
local _ = bus_saga_doc                  -- is made by install)

--- Puts bus:saga on the bus class; check_bus is init.lua's.
-- @local
function M.install(Bus, check_bus)
  function Bus:saga(name, opts)
    check_bus(self, "saga")
    local s, err, code = M.new(self, name, opts, 2)
    return s, err, code        -- not a tail call: error levels count frames
  end
end

return M
