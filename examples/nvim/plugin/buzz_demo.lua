-- buzz_demo's commands; the plugin starts on first use (or setup()).
-- luacheck: globals vim
if vim.g.loaded_buzz_demo then return end
vim.g.loaded_buzz_demo = true

vim.api.nvim_create_user_command("BuzzDemoLog", function()
  require("buzz_demo").show()
end, { desc = "buzz_demo: show the log buffer" })

vim.api.nvim_create_user_command("BuzzDemoRemind", function(c)
  local seconds, text = c.args:match("^(%S+)%s*(.*)$")
  seconds = tonumber(seconds)
  if not seconds then
    vim.notify("usage: :BuzzDemoRemind {seconds} {text}",
               vim.log.levels.ERROR)
    return
  end
  require("buzz_demo").remind(seconds, text ~= "" and text or "ping")
end, { nargs = "+", desc = "buzz_demo: a reminder after {seconds}" })
