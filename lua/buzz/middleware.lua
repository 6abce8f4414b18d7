--- Middleware: functions that run around every delivery of a bus, in the
-- order they were added (the first added is outermost).
--
--   bus:use(function(ev, next, ctx) ... return next(ev) end)
--
-- A middleware may stop a delivery (by not calling next), replace the
-- event (next(other)), or work before and after it. ctx is the delivery's
-- context: subscription, correlation_id, causation_id, and trace_id and
-- parent_id read from a W3C traceparent header ("00-<trace>-<span>-<flags>")
-- when the event has one. A middleware may set ctx.trace_id: events
-- published while the handler runs then carry a traceparent with that
-- trace and a new span, unless they give their own. A raise in a
-- middleware fails the delivery as a raise in the handler does (on_error,
-- retries, dead letters).
--
-- The chain is composed once per subscription when it is made or when
-- middleware is added, so a delivery allocates only its ctx.
-- @module buzz.middleware
local type, error, setmetatable, format = type, error, setmetatable,
                                          string.format
local running = coroutine.running
local random = math.random

local M = {}

--- The traceparent parts of headers: trace id and parent (span) id, or nil.
---@param headers table|nil an event's headers
---@return string|nil trace_id, string|nil parent_id
function M.parse_traceparent(headers)
  local tp = type(headers) == "table" and headers.traceparent
  if type(tp) ~= "string" then return nil end
  local trace, span = tp:match("^%x%x%-(%x+)%-(%x+)%-%x%x$")
  if not trace or #trace ~= 32 or #span ~= 16
     or trace == ("0"):rep(32) or span == ("0"):rep(16) then
    return nil
  end
  return trace:lower(), span:lower()
end

--- A new span id: 16 hex digits, never all zero.
---@return string span_id
function M.span_id()
  return format("%08x%08x", random(0, 0x7fffffff), random(1, 0x7fffffff))
end

--- The middleware state of a bus: its list and the contexts of the
--- deliveries running, by thread (weak: a thread that is dropped takes
--- its context along).
-- @local
function M.new(freeze)
  return { list = {}, n = 0, freeze = freeze or false,
           by_thread = setmetatable({}, { __mode = "k" }) }
end

--- Adds fn, raising for what is not a function.
-- @local
function M.add(state, fn, level)
  if type(fn) ~= "function" then
    error(("bad middleware: expected a function(ev, next, ctx), got %s")
          :format(type(fn)), level + 1)
  end
  state.n = state.n + 1
  state.list[state.n] = fn
end

local function link(mw, nxt, ctx_of)
  return function(ev)
    return mw(ev, nxt, ctx_of())
  end
end

--- handler with the middleware of state around it, for sub; the same
--- handler when there is none.
-- @local
function M.wrap(state, sub, handler)
  if state.freeze then handler = M.frozen(sub.bus, handler, sub.name) end
  if state.n == 0 then return handler end
  local by = state.by_thread
  local function ctx_of() return by[running()] end
  local fn = handler
  for i = state.n, 1, -1 do fn = link(state.list[i], fn, ctx_of) end
  local chain = fn
  return function(ev)
    local co = running()
    local trace, parent = M.parse_traceparent(ev.headers)
    local ctx = { subscription = sub, correlation_id = ev.correlation_id,
                  causation_id = ev.causation_id, trace_id = trace,
                  parent_id = parent }
    local outer = by[co]
    by[co] = ctx
    local a, b = chain(ev)
    by[co] = outer
    return a, b
  end
end

--- handler, failing with EFROZEN when it changes the event it is given
--- (buzz.new{ freeze = true }, lua/buzz/freeze.lua).
-- @local
function M.frozen(bus, handler, name)
  return require("buzz.freeze").wrap(handler, name, function(err)
    bus:_report_error(err)
  end)
end

--- The traceparent a publish made now should carry, or nil: one with the
--- running delivery's trace id and a new span.
-- @local
function M.traceparent(state)
  local ctx = state.by_thread[running()]
  local trace = ctx and ctx.trace_id
  if type(trace) ~= "string" then return nil end
  return format("00-%s-%s-01", trace, M.span_id())
end

return M
