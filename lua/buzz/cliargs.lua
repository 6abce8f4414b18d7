--- buzz.cliargs: bin/buzz's command line: its usage text, its commands
-- with their options, and the parser that turns argv into a command's
-- name and options, raising usage errors (buzz.clitext) that name the
-- option and the command.
--
-- Only bin/buzz uses it; it is not part of the library's API.
local core = require "buzz.core"
local text = require "buzz.clitext"

local pairs, tonumber = pairs, tonumber
local usage_error, encode, parse_time = text.usage_error, text.encode,
                                        text.parse_time

local M = {}

M.USAGE = [[
usage: buzz [--store FILE] COMMAND [options]

Reads a buzz store, read-only (but redrive, discard and remove-consumer):
FILE, else $BUZZ_STORE, else ./events.db.

commands:
  ls      [--types PAT] [--from ID] [--to ID] [--key K] [--limit N] [--json]
          stored events, one a line: id, time (UTC), type, key, payload
  tail    [-n N] [-f] [--types PAT] [--json] [--count N]
          the last N events (10); -f follows new ones as they are stored;
          --count N exits after printing N events in all
  show    ID [--json]
          the full envelope of one event
  stats   [--json]
          events, ids, size, counts per type, durable consumers and lag,
          pending retries, dead letters, delayed events
  replay  [--types PAT] [--from ID] [--to ID] [--key K] [--limit N]
          --handler FILE.lua | --publish TYPE [--json]
          feeds every matching event to the function FILE.lua returns
          (appends nothing; exits 1 if the handler raised), or with
          --publish appends each again as a new event of type TYPE (its
          payload, key, priority, correlation id and headers, with
          headers.replay_of its id), for the application's subscribers
          to TYPE (writes)
  trace   ID|CORRELATION [--json] [--mermaid]
          the events an event caused (or a correlation id's), as a tree,
          each with its deliveries: subscription, attempt, outcome, time
          (from a bus opened with trace = true)
  top     [--interval S] [--once] [--json]
          a live view: events/s by type, deliveries and failures/s by
          subscription (from buses opened with metrics_every), consumers'
          lag, dead letters, retries, delayed; q quits; --once prints one
          frame, over one interval (--json: as one JSON object)
  dlq     [ID] [--subscription NAME] [--types PAT] [--limit N] [--json]
          dead letters, one a line: id, time failed (UTC), subscription,
          reason, event, last error; with ID one in full, with every
          attempt's error and traceback (redrive them with bus:redrive)
  redrive ID | --subscription NAME [--types PAT] [--limit N]
          makes dead letters retries of their subscription, from attempt
          1, due now: the application runs them when it next opens the
          store (writes: refused while another process is the writer)
  discard ID | --subscription NAME [--types PAT] [--limit N] | --all
          removes dead letters for good (writes)
  remove-consumer NAME
          forgets a durable consumer's position (writes)
  state   NAME [KEY] [--json]
          a projection's last snapshot (bus:projection): its version and
          position, then each key's hash and state (KEY: one, in full)
  sagas   [NAME] [--failed | --status S] [--json]
          sagas (bus:saga), one a line: name, id, status, last update
          (UTC), the step, and the error of one that failed
  redis   streams | groups STREAM | pending STREAM GROUP | dlq STREAM
          [--url URL] [--limit N] [--json]
          Redis Streams (bus:redis): streams with their length; a
          stream's groups, pending and lag; a group's pending entries
          (consumer, idle, deliveries); the dead-letter stream. URL:
          else $BUZZ_REDIS, else redis://127.0.0.1:6379/0
  version the version of buzz (also --version)
  help    this text

PAT is a subject pattern (order.*, order.>). --from and --to are inclusive
and take an event id or a UTC time (2024-05-01, 2024-05-01T12:30:00Z).
--key 7 matches the string key "7" and the integer key 7 alike.
--json prints one JSON object a line.
Exit status: 0 ok, 1 the store or a handler failed, 2 a usage error.
]]

-- Option kinds: how a value is read (see read_value).
local FILTERS = {
  types = "pattern", from = "range", to = "range", key = "string",
  limit = "count",
}

local function with_filters(t)
  for k, v in pairs(FILTERS) do t[k] = v end
  return t
end

--- Each command: its usage line, its options (name -> kind) and the
--- number of words it takes.
M.COMMANDS = {
  ls = {
    usage = "buzz ls [--types PAT] [--from ID] [--to ID] [--key K] "
            .. "[--limit N] [--json]",
    options = with_filters { json = "flag" },
  },
  tail = {
    usage = "buzz tail [-n N] [-f] [--types PAT] [--json] [--count N]",
    options = { n = "count0", f = "flag", follow = "flag",
                types = "pattern", json = "flag", count = "count" },
  },
  show = {
    usage = "buzz show ID [--json]",
    options = { json = "flag" },
    words = 1,
  },
  stats = {
    usage = "buzz stats [--json]",
    options = { json = "flag" },
  },
  replay = {
    usage = "buzz replay [--types PAT] [--from ID] [--to ID] [--key K] "
            .. "[--limit N] --handler FILE.lua | --publish TYPE [--json]",
    options = with_filters { handler = "string", publish = "string",
                             json = "flag" },
  },
  dlq = {
    usage = "buzz dlq [ID] [--subscription NAME] [--types PAT] [--limit N] "
            .. "[--json]",
    options = { subscription = "string", types = "pattern", limit = "count",
                json = "flag" },
    words = 1,
  },
  trace = {
    usage = "buzz trace ID|CORRELATION [--json] [--mermaid]",
    options = { json = "flag", mermaid = "flag" },
    words = 1,
  },
  top = {
    usage = "buzz top [--interval S] [--once] [--json]",
    options = { interval = "seconds", once = "flag", json = "flag" },
  },
  help = { usage = "buzz help", options = {}, words = 1 },
  version = { usage = "buzz version", options = {} },
  redrive = {
    usage = "buzz redrive ID | --subscription NAME [--types PAT] "
            .. "[--limit N]",
    options = { subscription = "string", types = "pattern",
                limit = "count" },
    words = 1,
  },
  discard = {
    usage = "buzz discard ID | --subscription NAME [--types PAT] "
            .. "[--limit N] | --all",
    options = { subscription = "string", types = "pattern",
                limit = "count", all = "flag" },
    words = 1,
  },
  ["remove-consumer"] = { usage = "buzz remove-consumer NAME",
                          options = {}, words = 1 },
  state = { usage = "buzz state NAME [KEY] [--json]",
            options = { json = "flag" }, words = 2 },
  sagas = { usage = "buzz sagas [NAME] [--failed | --status S] [--json]",
            options = { failed = "flag", status = "string", json = "flag" },
            words = 1 },
  redis = { usage = "buzz redis streams | groups STREAM | pending STREAM "
                    .. "GROUP | dlq STREAM [--url URL] [--limit N] [--json]",
            options = { url = "string", limit = "count", json = "flag" },
            words = 3 },
}

-- Options every command takes.
local GLOBAL = { store = "string", help = "flag", h = "flag",
                 version = "flag" }


-- ------------------------------------------------------------ arguments

-- Reads one option value by kind; raises a usage error naming the option.
local function read_value(kind, name, v, cmd)
  local flag = (#name == 1 and "-" or "--") .. name
  if kind == "string" then
    if v == "" then usage_error(("%s needs a value"):format(flag), cmd) end
    return v
  end
  if kind == "pattern" then
    local ok, why = core.check_subject(v, true)
    if not ok then
      usage_error(("%s: %s"):format(flag, why), cmd)
    end
    return v
  end
  if kind == "seconds" then
    local secs = v:match("^%d*%.?%d+$") and tonumber(v)
    if not secs or secs <= 0 or secs > 3600 then
      usage_error(("bad %s %s: expected seconds, more than 0 and at most "
                   .. "3600"):format(flag, encode(v)), cmd)
    end
    return secs
  end
  local n = #v <= 15 and v:match("^%d+$") and tonumber(v)
  if kind == "count" or kind == "count0" then
    if not n or (kind == "count" and n == 0) then
      usage_error(("bad %s %s: expected a %s integer"):format(flag,
                  encode(v), kind == "count" and "positive" or "whole"), cmd)
    end
    return n
  end
  -- kind == "range": an id, or a UTC time
  if n then return n end
  local t = parse_time(v)
  if not t then
    usage_error(("bad %s %s: expected an event id or a UTC time such "
                 .. "as 2024-05-01T12:30:00Z"):format(flag, encode(v)), cmd)
  end
  return { time = t }
end

-- The command word: the first argument that is neither an option nor the
-- value of --store.
local function find_command(argv)
  local i = 1
  while i <= #argv do
    local a = argv[i]
    if a == "--store" then
      i = i + 1
    elseif a:sub(1, 1) ~= "-" or a == "-" then
      return a, i
    end
    i = i + 1
  end
  return nil
end

--- Parses the command line: the command's name and its options (words in
--- opts.words). Raises usage errors.
---@param argv string[]
---@return string name, table opts
function M.parse(argv)
  local name, at = find_command(argv)
  local cmd = M.COMMANDS[name or "help"]
  if not cmd then
    usage_error(("unknown command %s"):format(encode(name)))
  end
  local words, i = {}, 1
  local opts = { words = words }
  while i <= #argv do
    local a = argv[i]
    if i == at then
      i = i + 1
    elseif a:sub(1, 1) ~= "-" or a == "-" then
      words[#words + 1] = a
      i = i + 1
    else
      local key, value = a:match("^%-%-([^=]+)=(.*)$")
      if not key then
        key = a:match("^%-%-(.+)$")
        if not key then key, value = a:sub(2, 2), a:sub(3) end
        if value == "" then value = nil end
      end
      local kind = cmd.options[key] or GLOBAL[key]
      if not kind or (#key == 1) ~= (a:sub(2, 2) ~= "-") then
        usage_error(("unknown option %s"):format(a), name)
      end
      if kind == "flag" then
        if value then
          usage_error(("--%s takes no value"):format(key), name)
        end
        opts[key] = true
      else
        if not value then
          i = i + 1
          value = argv[i]
          if value == nil then
            usage_error(("%s needs a value"):format(a), name)
          end
        end
        opts[key] = read_value(kind, key, value, name)
      end
      i = i + 1
    end
  end
  if opts.version then return "version", opts end
  if opts.h or opts.help or not name then return "help", opts end
  if #words > (cmd.words or 0) then
    usage_error(("unexpected argument %s"):format(encode(words[#words])),
                name)
  end
  return name, opts
end

return M
