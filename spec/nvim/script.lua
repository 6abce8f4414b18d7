-- Run by spec/nvim_spec.lua inside a real, headless Neovim:
--   nvim --headless --clean +"luafile spec/nvim/script.lua"
-- with BUZZ_ROOT (the checkout), BUZZ_BUILD (a LuaJIT build directory) and
-- BUZZ_DIR (a scratch directory). It loads examples/nvim as a plugin,
-- writes a file (BufWritePost publishes), fires a User autocommand, asks
-- for a reminder (a delayed event), and once the reminder's handlers have
-- run writes what it saw to $BUZZ_DIR/out.txt and quits: "log: " lines
-- (the plugin's log buffer), "handler: " lines (type, and whether it ran
-- in a fast callback), a "metrics: " line (what bus:metrics() counted for
-- the ">" subscription), "error: " lines (on_error), and a last
-- "status: ".
-- luacheck: read globals vim
local root, build, dir = os.getenv("BUZZ_ROOT"), os.getenv("BUZZ_BUILD"),
                         os.getenv("BUZZ_DIR")
package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;"
               .. package.path
package.cpath = build .. "/?.so;" .. package.cpath

local seen, errors, demo = {}, {}, nil

local function finish(status, why)
  local out = assert(io.open(dir .. "/out.txt", "w"))
  if demo then
    for _, l in ipairs(vim.api.nvim_buf_get_lines(demo.buf, 0, -1, false)) do
      out:write("log: ", l, "\n")
    end
  end
  for _, l in ipairs(seen) do out:write("handler: ", l, "\n") end
  if demo and not demo.bus:is_closed() then   -- counted on the editor's loop
    out:write("metrics: delivered ",
              demo.bus:metrics().subscriptions[">"].delivered, "\n")
  end
  for _, l in ipairs(errors) do out:write("error: ", l, "\n") end
  out:write("status: ", why or "ok", "\n")
  out:close()
  vim.cmd(status == 0 and "qa!" or ("cquit " .. status))
end

-- A hang is a failure with a reason, before the spec's own timeout.
vim.defer_fn(function() finish(3, "timed out in the editor") end, 10000)

local ok, err = xpcall(function()
  vim.opt.runtimepath:prepend(root .. "/examples/nvim")
  vim.cmd("runtime! plugin/buzz_demo.lua")
  demo = require("buzz_demo").setup{
    on_error = function(e) errors[#errors + 1] = tostring(e) end,
  }
  local bus = demo.bus
  bus:subscribe(">", function(ev)
    seen[#seen + 1] = ("%s fast=%s"):format(ev.type,
                                            tostring(vim.in_fast_event()))
  end)
  bus:subscribe("editor.reminder", function()
    vim.schedule(function() finish(0) end)   -- after this delivery
  end)
  vim.cmd("edit " .. vim.fn.fnameescape(dir .. "/notes.txt"))
  vim.api.nvim_buf_set_lines(0, 0, -1, false, { "one", "two", "three" })
  vim.cmd("write")
  vim.cmd("doautocmd User BuzzDemoPing")
  vim.cmd("BuzzDemoRemind 0.03 stretch")
end, debug.traceback)
if not ok then
  errors[#errors + 1] = tostring(err)
  finish(2, "the script raised")
end
