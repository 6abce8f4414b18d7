--- buzz_demo: a tiny Neovim plugin on buzz (examples/nvim/).
-- Editor events become bus events, and the handlers keep a log buffer
-- with vim.api, on the editor's own loop: buzz.new{ loop = vim.uv or
-- vim.loop } runs every handler through vim.schedule, where the API is
-- allowed. Load it with the runtime path (set rtp+=examples/nvim) and
-- buzz on package.path / package.cpath (a LuaJIT build: Neovim is LuaJIT).
--
--   require("buzz_demo").setup(opts)  starts it; opts.on_error as buzz.new
--   :BuzzDemoLog                      shows the log buffer
--   :BuzzDemoRemind {seconds} {text}  a reminder later (a delayed event)
--   :doautocmd User BuzzDemo...       any User BuzzDemo* event is logged
-- @module buzz_demo
-- luacheck: read globals vim
local buzz = require "buzz"

local M = {}

-- Appends a line to the log buffer (the API call a fast callback could
-- not make: E5560).
local function log(line)
  local buf = M.buf
  local n = vim.api.nvim_buf_line_count(buf)
  if n == 1 and vim.api.nvim_buf_get_lines(buf, 0, 1, false)[1] == "" then
    vim.api.nvim_buf_set_lines(buf, 0, 1, false, { line })  -- a new buffer
  else
    vim.api.nvim_buf_set_lines(buf, n, n, false, { line })
  end
end

local function notify_error(err)
  vim.notify("buzz_demo: " .. tostring(err), vim.log.levels.ERROR)
end

--- Starts the plugin once: the bus, the log buffer, the autocommands.
---@param opts table|nil on_error = function(err, ev, sub)
---@return table the module, with bus and buf
function M.setup(opts)
  if M.bus then return M end
  opts = opts or {}
  local bus = assert(buzz.new{ loop = vim.uv or vim.loop,
                               on_error = opts.on_error or notify_error })
  M.bus = bus
  M.buf = vim.api.nvim_create_buf(false, true)    -- unlisted scratch
  vim.api.nvim_buf_set_name(M.buf, "buzz-demo://log")

  bus:subscribe("editor.written", function(ev)
    log(("written %s (%d lines)"):format(ev.payload.name, ev.payload.lines))
  end)
  bus:subscribe("editor.user", function(ev) log("user " .. ev.payload) end)
  bus:subscribe("editor.reminder", function(ev)
    log("reminder: " .. ev.payload)
  end)

  local group = vim.api.nvim_create_augroup("buzz_demo", { clear = true })
  vim.api.nvim_create_autocmd("BufWritePost", {
    group = group,
    callback = function(a)
      bus:publish("editor.written", {
        name = vim.fn.fnamemodify(a.file, ":t"),
        lines = vim.api.nvim_buf_line_count(a.buf),
      })
    end,
  })
  vim.api.nvim_create_autocmd("User", {
    group = group, pattern = "BuzzDemo*",
    callback = function(a) bus:publish("editor.user", a.match) end,
  })
  vim.api.nvim_create_autocmd("VimLeavePre", {
    group = group,
    callback = function() bus:close() end,     -- releases its handles
  })
  return M
end

--- Publishes a reminder after seconds: a delayed event, fired by a timer
--- on the editor's loop.
---@param seconds number
---@param text string
function M.remind(seconds, text)
  M.setup()
  M.bus:publish("editor.reminder", text, { delay = seconds })
end

--- Shows the log buffer in a split.
function M.show()
  M.setup()
  vim.cmd("sbuffer " .. M.buf)
end

return M
