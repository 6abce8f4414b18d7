--- buzz.stream: optimistic concurrency (README, "State from events").
-- publish(type, payload, { stream = "order-17", expect = 4 }) appends
-- only if the stream is at version 4 ("none": it has no event yet;
-- "any", the default: whatever it is at), else returns nil,
-- "ECONFLICT: order-17 is at 5, expected 4", "ECONFLICT". The event gets
-- the next version (ev.stream, ev.stream_version; the first event of a
-- stream is version 1).
--
-- The check runs at publish, on the loop thread, against a map of the
-- streams' versions: with a store the map asks the log once per stream
-- (an index lookup, core:stream_version) and counts on from there, which
-- holds because the bus is the store's one writer (the writer lock); the
-- writer's unique index on (stream, stream_version) is the backstop. So
-- two appenders that read version 4 (two coroutines, two handlers) see
-- one publish succeed and the other fail with ECONFLICT, and group commit
-- still reports each append's own result. A commit that fails loses its
-- events and their versions with them: the stream's versions then have a
-- gap (as ids do), never a repeat.
-- @module buzz.stream
local errors = require "buzz.errors"
local is_integer = require("buzz.options").is_integer

local type, error, format = type, error, string.format

local M = {}

--- Checks stream and expect in publish options (the options' readers
--- pass over both): returns the stream and the expected version (an
--- integer >= 0, 0 for "none"; nil for "any"). Raises on misuse at level.
-- @local
function M.check(opts, level)
  local stream, expect = opts.stream, opts.expect
  if type(stream) ~= "string" or stream == "" then
    error(stream == nil
          and "bad expect: give the stream it is about (stream = \"order-17\")"
          or format("bad stream: expected a non-empty string such as "
                    .. "\"order-17\", got %s", type(stream) == "string"
                    and '""' or type(stream)), level + 1)
  end
  if expect == "none" then
    expect = 0
  elseif expect == "any" then
    expect = nil
  elseif expect ~= nil and not (is_integer(expect) and expect >= 0) then
    error(format('bad expect: expected a version (an integer >= 0), '
                 .. '"none" or "any", got %s', type(expect) == "string"
                 and format("%q", expect) or type(expect)), level + 1)
  end
  return stream, expect
end

-- The stream's version now (0: no event yet), or nil, err, code.
local function current(bus, c, stream)
  local map = bus._streams
  if not map then
    map = {}
    bus._streams = map
  end
  local v = map[stream]
  if v ~= nil then return v end
  if bus._store then
    local err, code
    v, err, code = c:stream_version(stream)
    if not v then return nil, err, code end
  else
    v = 0
  end
  map[stream] = v
  return v
end

--- Checks the expected version: the version the event gets, or nil,
--- "ECONFLICT: ...", "ECONFLICT" (or the store's failure).
-- @local
function M.next_version(bus, c, stream, expect)
  local v, err, code = current(bus, c, stream)
  if not v then return nil, err, code end
  if expect ~= nil and v ~= expect then
    local text = errors.text("ECONFLICT", format("%s is at %d, expected %s",
      stream, v, expect == 0 and "none (a new stream)"
                 or format("%d", expect)))
    return nil, text, "ECONFLICT"
  end
  return v + 1
end

--- Takes note of a published event's version (before its handlers run,
--- so that a handler appending to the stream counts from it).
-- @local
function M.appended(bus, stream, version)
  bus._streams[stream] = version
end

--- The version of a stream: how many events it holds (0: none yet, or
--- no such stream), as publish with expect compares it.
---@tparam string stream
---@return integer|nil version, string|nil err, string|nil code
-- @function Bus:stream_version
local function bus_stream_version_doc() end  -- (for the reference: the
local _ = bus_stream_version_doc             -- method is made by install)

--- Puts bus:stream_version on the bus class; check_bus is init.lua's.
-- @local
function M.install(Bus, check_bus)
  function Bus:stream_version(stream)
    local c = check_bus(self, "stream_version")
    if type(stream) ~= "string" or stream == "" then
      error("bad stream: expected a non-empty string such as \"order-17\"",
            2)
    end
    local v, err, code = current(self, c, stream)
    return v, err, code
  end
end

return M
