--- buzz.clistate: the store tool's commands over state from events
-- (bin/buzz), read-only like the rest:
--
--   buzz state NAME [KEY] [--json]    a projection's last snapshot
--   buzz sagas [NAME] [--failed | --status S] [--json]
--
-- A projection's state lives in the process that folds it; what the
-- store holds is its last snapshot (every snapshot_every events and at
-- close), so `buzz state` says at which event id the snapshot was taken.
-- @module buzz.clistate
local text = require "buzz.clitext"
local saga = require "buzz.saga"

local ipairs, tostring, type = ipairs, tostring, type
local format, sort = string.format, table.sort
local stdout = io.stdout
local encode, fail, iso_time = text.encode, text.fail, text.iso_time

local M = {}

-- The snapshot rows of projection name: meta ("@"), and the key rows.
local function snapshot(bus, name)
  local meta, keys = nil, {}
  for _, row in ipairs(bus:_state_list("projection:" .. name)) do
    if row.name == "@" then
      meta = row.value
    elseif type(row.value) == "table" then
      keys[#keys + 1] = row.value
    end
  end
  return meta, keys
end

-- A key as the command line names it (KEY), to find it.
local function raw_key(k)
  return type(k) == "string" and k or format("%d", k)
end

--- buzz state NAME [KEY] [--json]
function M.state(opts, ctx)
  local name, key = opts.words[1], opts.words[2]
  if not name then
    text.usage_error("name the projection: buzz state NAME [KEY]", "state")
  end
  local bus = ctx.open_store(ctx, opts)
  local meta, rows = snapshot(bus, name)
  if type(meta) ~= "table" then
    fail(format("no snapshot of projection %s in the store (a projection "
                .. "writes one every snapshot_every events and at close)",
                encode(name)))
  end
  if key then
    for _, r in ipairs(rows) do
      if r.key ~= nil and raw_key(r.key) == key then rows = { r } break end
    end
    if #rows ~= 1 or raw_key(rows[1].key or "") ~= key then
      fail(format("projection %s has no key %s in its snapshot",
                  encode(name), encode(key)))
    end
  end
  sort(rows, function(a, b)
    return tostring(a.key or "") < tostring(b.key or "")
  end)
  if opts.json then
    for _, r in ipairs(rows) do
      stdout:write(encode{ projection = name, key = r.key, hash = r.hash,
                           position = r.position, state = r.state }, "\n")
    end
    return 0
  end
  stdout:write(format("projection %s, version %s, snapshot at event #%d\n",
                      name, tostring(meta.version), meta.position or 0))
  for _, r in ipairs(rows) do
    local head = r.key ~= nil and text.key_text(r.key) .. "  " or ""
    if key then
      stdout:write(head, r.hash, "\n", encode(r.state, "  "), "\n")
    else
      stdout:write(head, r.hash, "  ", encode(r.state), "\n")
    end
  end
  return 0
end

--- buzz sagas [NAME] [--failed | --status S] [--json]
function M.sagas(opts, ctx)
  local status = opts.status or (opts.failed and "failed")
  if opts.failed and opts.status then
    text.usage_error("give --failed or --status, not both", "sagas")
  end
  local bus = ctx.open_store(ctx, opts)
  local n = 0
  for _, rec in ipairs(saga.records(bus, opts.words[1])) do
    if not status or rec.status == status then
      n = n + 1
      if opts.json then
        stdout:write(encode{ saga = rec.saga, id = rec.id,
                             status = rec.status, step = rec.step,
                             failed_step = rec.failed_step,
                             error = rec.error, data = rec.data,
                             started = rec.started, updated = rec.updated },
                     "\n")
      else
        stdout:write(format("%s  %s  %-12s %s  %s%s\n", rec.saga, rec.id,
                            rec.status, iso_time(rec.updated or 0),
                            rec.failed_step and "step " .. rec.failed_step
                            or "step " .. tostring(rec.step),
                            rec.error and "  " .. rec.error or ""))
      end
    end
  end
  if n == 0 and not opts.json then
    stdout:write(status and format("no %s sagas\n", status) or "no sagas\n")
  end
  return 0
end

M.commands = { state = M.state, sagas = M.sagas }

return M
