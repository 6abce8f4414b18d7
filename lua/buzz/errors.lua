--- Error codes: the core's one map (csrc/buzz.h) and the "CODE: message"
-- text that on_error and every `nil, err, code` return carry.
-- Modules that report a failure of their own build the text here, so a
-- code the core does not know is a bug caught where it is made.
-- @module buzz.errors
local core = require "buzz.core"
local type, tostring, error, pairs, pcall = type, tostring, error, pairs, pcall
local match, format = string.match, string.format
local stderr = io.stderr
local readable = require("buzz.storable").describe

local M = {}

--- Every code the core knows, and its short meaning: { EFULL = "queue is
--- full", ... } (a copy: changing it changes nothing).
---@return table<string, string>
function M.codes()
  local t = {}
  for k, v in pairs(core.errors) do t[k] = v end
  return t
end

local CODES = core.errors

--- The code that err starts with ("EFULL: ..." -> "EFULL"), if err is a
--- string and the code one of the map's; else nil.
---@param err any
---@return string|nil
function M.code_of(err)
  if type(err) ~= "string" then return nil end
  local code = match(err, "^(E%u+): ")
  if code and CODES[code] then return code end
  return nil
end

--- "CODE: message". Raises if code is not in the map (a bug in buzz).
---@param code string
---@param message string
---@return string
function M.text(code, message)
  if not CODES[code] then
    error(format("buzz: unknown error code %q (not in core.errors)",
                 tostring(code)), 2)
  end
  return code .. ": " .. message
end

--- Reports a failure in context: "CODE: context: inner", where inner is
--- err without its own code, and CODE is err's code, or default when err
--- has none (a raised value, a message from elsewhere).
---@param default string the code when err carries none
---@param context string what was being done
---@param err any what failed
---@return string text, string code
function M.wrap(default, context, err)
  local code = M.code_of(err)
  local ok, inner = pcall(tostring, err)
  if not ok or type(inner) ~= "string" then
    inner = "(an error value that cannot be shown)"
  end
  if code then
    inner = inner:sub(#code + 3)
  else
    code = default
  end
  return M.text(code, context .. ": " .. inner), code
end


-- ------------------------------------------------------------ reporting

-- Where the default on_error writes: stderr, or inside Neovim (whose
-- screen stderr would scribble on) vim.notify, at the editor's next turn.
local function say(line)
  local vim = rawget(_G, "vim")
  if type(vim) == "table" and type(vim.notify) == "function"
     and type(vim.schedule) == "function" then
    vim.schedule(function()
      vim.notify(line, vim.log and vim.log.levels.ERROR or 4)
    end)
  else
    stderr:write(line, "\n")
  end
end

--- The on_error of a bus given none: one line on stderr (in Neovim,
--- vim.notify). An engine failure (no event) is "buzz: CODE: message";
--- a handler's names the subscription and the event (or batch) and gives
--- the traceback.
function M.default_on_error(err, ev, sub, trace)
  if not ev then                      -- the engine: err is "CODE: message"
    local text = readable(err)        -- never "buzz: buzz: ..."
    if text:sub(1, 6) == "buzz: " then text = text:sub(7) end
    say(("buzz: %s"):format(text))
    return
  end
  local what = ("%s #%s"):format(tostring(ev.type), tostring(ev.id))
  if ev.batch then                    -- bus:batch's handler: its events
    local first, last = ev.batch[1], ev.batch[#ev.batch]
    what = ("a batch of %d (#%s..#%s)"):format(#ev.batch,
                                               tostring(first and first.id),
                                               tostring(last and last.id))
  end
  say(("buzz: handler for %q failed on %s: %s")
      :format(sub and sub.pattern or "?", what, trace or readable(err)))
end

-- The core calls this for a failed delivery; on_error runs protected, and
-- an on_error that raises is reported on stderr, in words that cannot
-- raise in turn (an error whose __tostring raises), or failing that in
-- fixed ones: a report is never dropped silently.
local trace_failed = require("buzz.trace").failed

function M.reporter(on_error)
  return function(err, ev, sub, trace)
    if type(sub) == "table" then       -- a failed attempt
      local m = sub._m
      if m then m[2] = m[2] + 1 end    -- (buzz.metrics)
      local tr = sub.bus and sub.bus._trace
      if tr then trace_failed(tr, ev, sub, err) end  -- (buzz.trace)
    end
    local ok, e2 = pcall(on_error, err, ev, sub, trace)
    if not ok then
      local fine, line = pcall(format,
        "buzz: on_error raised while reporting %q: %s\n",
        readable(err), readable(e2))
      stderr:write(fine and line or "buzz: on_error raised while "
                   .. "reporting an error, and neither can be shown\n")
    end
  end
end

return M
