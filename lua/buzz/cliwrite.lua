--- buzz.cliwrite: the store tool's commands that write (bin/buzz):
--
--   buzz redrive ID | --subscription NAME [--types PAT] [--limit N]
--   buzz discard ID | --subscription NAME [--types PAT] [--limit N] | --all
--   buzz remove-consumer NAME
--   buzz replay [filters] --publish TYPE    (bin/buzz hands it here)
--
-- They open the store as its writer, so they are refused while another
-- process is the writer (the message names its pid: stop it, or make the
-- change from inside it with bus:redrive, bus:discard,
-- bus:remove_consumer). A redrive from here has no handler to run: each
-- dead letter becomes a retry of its subscription from attempt 1, due
-- now, which the application picks up when it next opens the store and
-- subscribes that name (as it picks up its own stored retries); discard
-- and remove-consumer are what the bus methods do.
-- @module buzz.cliwrite
local buzz = require "buzz"
local text = require "buzz.clitext"
local util = require "buzz.util"

local type, tostring, tonumber, ipairs, pairs, assert =
      type, tostring, tonumber, ipairs, pairs, assert
local format = string.format
local usage_error, fail = text.usage_error, text.fail

local M = {}

-- The store named by --store, $BUZZ_STORE or ./events.db, as its writer.
local function open_writer(ctx, opts, cmd)
  local env = os.getenv("BUZZ_STORE")
  local path = opts.store or (env ~= "" and env) or "events.db"
  local f = io.open(path)
  if not f then fail(("no store at %s"):format(path)) end
  f:close()
  local bus, err, code = buzz.new{ store = path }
  if not bus then
    if code == "ELOCKED" then
      local hint = cmd == "remove-consumer" and "call bus:remove_consumer"
                   or cmd == "replay" and "publish them again"
                   or "call bus:" .. cmd
      fail(("cannot %s: %s; stop that process, or %s from inside it")
           :format(cmd, tostring(err), hint))
    end
    fail(("cannot open the store to write it: %s"):format(tostring(err)))
  end
  ctx.buses[#ctx.buses + 1] = bus
  return bus, path
end

-- The dead letters a command names: one id, or a filter.
local function selection(opts, cmd)
  local word = opts.words[1]
  if word then
    local id = #word <= 15 and word:match("^%d+$") and tonumber(word)
    if not id or id == 0 then
      usage_error(("bad dead letter id %s: expected a positive integer")
                  :format(text.encode(word)), cmd)
    end
    if opts.subscription or opts.types or opts.all then
      usage_error("give an id or a filter, not both", cmd)
    end
    return id
  end
  if not (opts.subscription or opts.types or opts.all) then
    usage_error("name the dead letters: an ID, --subscription NAME, "
                .. "--types PAT" .. (cmd == "discard" and " or --all" or ""),
                cmd)
  end
  return { subscription = opts.subscription, types = opts.types,
           limit = opts.limit }
end

local function letters(bus, sel, path)
  local list = bus:dead_letters(sel)
  if type(sel) == "number" and #list == 0 then
    fail(("no dead letter %d in %s"):format(sel, path))
  end
  return list
end

function M.redrive(opts, ctx)
  local sel = selection(opts, "redrive")
  local bus, path = open_writer(ctx, opts, "redrive")
  local list = letters(bus, sel, path)
  local now = bus:_now()
  for _, d in ipairs(list) do
    local name = format("%s/%016d", d.subscription, d.event.id or 0)
    bus:_state_put("retry", name, {
      subscription = d.subscription, attempt = 1, due = now,
      event = d.event, history = d.attempts,
      redrives = (d.redrives or 0) + 1 })
  end
  local n = #list > 0 and bus:discard(sel) or 0
  assert(bus:flush())
  io.stdout:write(("%d dead letter%s to be delivered again by %s\n")
                  :format(n, n == 1 and "" or "s",
                          "its subscription when the application opens "
                          .. path))
  return 0
end

function M.discard(opts, ctx)
  local sel = selection(opts, "discard")
  local bus, path = open_writer(ctx, opts, "discard")
  letters(bus, sel, path)
  local n = bus:discard(sel)
  assert(bus:flush())
  io.stdout:write(("%d dead letter%s discarded\n")
                  :format(n, n == 1 and "" or "s"))
  return 0
end

M["remove-consumer"] = function(opts, ctx)
  local name = opts.words[1]
  if not name then
    usage_error("name the durable consumer to remove", "remove-consumer")
  end
  local bus, path = open_writer(ctx, opts, "remove-consumer")
  local ok, err = bus:remove_consumer(name)
  if ok == nil then fail(tostring(err)) end
  if not ok then fail(("no durable consumer %s in %s"):format(name, path)) end
  assert(bus:flush())
  io.stdout:write(("consumer %s removed\n"):format(name))
  return 0
end

--- buzz replay [filters] --publish TYPE: appends each matching event again
--- as a new event of type TYPE (payload, key, priority, correlation id,
--- version and headers, plus headers.replay_of = its id), up to the last
--- id stored when it started (so that TYPE matching the filter cannot
--- feed itself). matching is bin/buzz's M.matching (keys "7" and 7).
function M.replay(opts, ctx, matching)
  local etype = opts.publish
  if opts.handler then
    usage_error("give --handler or --publish, not both", "replay")
  end
  local ok, e = pcall(util.check_type_arg, etype, "order.replayed", 1)
  if not ok then usage_error(tostring(e), "replay") end
  local bus = open_writer(ctx, opts, "replay")
  local f = { types = opts.types, from = opts.from, to = opts.to,
              key = opts.key, limit = opts.limit }
  local last = bus:stats().last_id
  if not f.to or f.to > last then f.to = last end
  local n, first, final = 0, nil, nil
  for ev in matching(bus, f) do
    local headers = {}
    for k, v in pairs(ev.headers or {}) do headers[k] = v end
    headers.replay_of = tostring(ev.id)
    local id, err = bus:publish(etype, ev.payload, {
      key = ev.key, priority = ev.priority, version = ev.version,
      correlation_id = ev.correlation_id, headers = headers })
    if not id then
      if n > 0 then assert(bus:flush()) end
      fail(("cannot publish %s: %s (%d published before it)")
           :format(text.encode(etype), tostring(err), n))
    end
    n, first, final = n + 1, first or id, id
  end
  assert(bus:flush())
  if opts.json then
    io.stdout:write(format('{"count":%d,"first":%s,"last":%s}\n', n,
                           tostring(first or "null"),
                           tostring(final or "null")))
  elseif n == 0 then
    io.stdout:write("no matching events: nothing published\n")
  else
    io.stdout:write(("published %d event%s as %s, #%d to #%d\n")
                    :format(n, n == 1 and "" or "s", etype, first, final))
  end
  return 0
end

M.commands = { redrive = M.redrive, discard = M.discard,
               ["remove-consumer"] = M["remove-consumer"] }

return M
