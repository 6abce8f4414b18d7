-- Run by spec/nvim_spec.lua inside a real, headless Neovim: bus:serve on
-- a bus the editor's loop drives. A client on vim.loop opens a stream, a
-- deferred callback publishes, and the event must arrive over the socket;
-- then GET /metrics, then a handler fails on a bus without on_error.
-- Writes "stream: <type> <payload.from>", "metrics: <status>", "notify
-- <level>: <first line>" and "status: ok" (or why not) to
-- $BUZZ_DIR/out.txt and quits.
-- luacheck: globals vim
local root, build, dir = os.getenv("BUZZ_ROOT"), os.getenv("BUZZ_BUILD"),
                         os.getenv("BUZZ_DIR")
package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;"
               .. package.path
package.cpath = build .. "/?.so;" .. package.cpath

local uv = vim.loop
local lines = {}
local bus

local function finish(why)
  local out = assert(io.open(dir .. "/out.txt", "w"))
  for _, l in ipairs(lines) do out:write(l, "\n") end
  out:write("status: ", why or "ok", "\n")
  out:close()
  if bus then bus:close() end
  vim.cmd(why and "cquit 1" or "qa!")
end
vim.defer_fn(function() finish("timed out in the editor") end, 10000)

local buzz = require "buzz"
bus = assert(buzz.new{ loop = uv })
local srv = assert(bus:serve{ port = 0, token = "nvim-token-1",
                              streams = { ["/s"] = "editor.>" } })

local function get(path, on_data)
  local tcp = uv.new_tcp()
  local data = ""
  tcp:connect("127.0.0.1", srv.port, function(err)
    assert(not err, err)
    tcp:read_start(function(_, chunk)
      if chunk then
        data = data .. chunk
        on_data(data, tcp)
      elseif not tcp:is_closing() then
        tcp:close()
      end
    end)
    tcp:write("GET " .. path .. " HTTP/1.1\r\nHost: nvim\r\n"
              .. "Authorization: Bearer nvim-token-1\r\n\r\n")
  end)
end

local published = false
get("/s", vim.schedule_wrap(function(data, tcp)
  if data:find("retry: ", 1, true) and not published then
    published = true
    vim.defer_fn(function()
      bus:publish("editor.saved", { from = "nvim" })
    end, 10)
  end
  local etype, body = data:match("event: ([^\n]+)\ndata: ([^\n]+)\n\n")
  if etype and not tcp:is_closing() then
    tcp:close()
    local ev = vim.fn.json_decode(body)
    lines[#lines + 1] = "stream: " .. etype .. " " .. ev.payload.from
    get("/metrics", function(text, t2)
      local status = text:match("^HTTP/1%.1 (%d+)")
      if status and text:find("buzz_events_published_total", 1, true) then
        t2:close()
        vim.schedule(function()
          lines[#lines + 1] = "metrics: " .. status
          -- a bus without on_error says a failure with vim.notify, not
          -- on stderr, which would scribble on the editor's screen
          local notified = vim.notify
          vim.notify = function(msg, level)
            vim.notify = notified
            lines[#lines + 1] = ("notify %s: %s"):format(
              level == vim.log.levels.ERROR and "ERROR" or tostring(level),
              msg:match("^[^\n]*"))
            finish()
          end
          bus:subscribe("editor.broken", function() error("oops", 0) end)
          bus:publish("editor.broken", {})
        end)
      end
    end)
  end
end))
