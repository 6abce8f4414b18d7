--- A real redis-server for the Redis specs: started on 127.0.0.1 on a
-- free port in a temporary directory (append-only file on), stopped by
-- its pid. Needs Debian's redis-server (tools/deps.sh installs it).
--   local S = require "spec.redis.server"
--   local srv = S.start()      -- srv.port, srv.dir, srv.url
--   S.start(password)          -- one that asks for it (requirepass)
--   srv:cli("XLEN", "s")       -- what redis-cli prints, trimmed
--   srv:stop(); srv:restart(); srv:remove()
-- and S.until_(bus, fn, seconds): runs the bus until fn() is true.
local S = {}
local Server = {}
Server.__index = Server

local function sh(cmd)
  return H.sh(H.tool .. cmd)
end

function Server:launch()
  local _, out = sh(("redis-server --bind 127.0.0.1 --port %d --dir %s "
    .. "--appendonly yes --save '' --daemonize yes --pidfile %s/pid "
    .. "--logfile %s/log %s 2>&1"):format(self.port, self.dir, self.dir,
                                          self.dir, self.extra or ""))
  local ok = pcall(H.eventually, function()
    return self:cli("PING") == "PONG"
  end, 5, "redis-server on port " .. self.port)
  return ok, out
end

function S.start(password)
  local dir = H.mktemp_dir()
  math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)"), 16))
  for _ = 1, 20 do
    local port = math.random(20000, 45000)
    local srv = setmetatable({ dir = dir, port = port, password = password,
      extra = password and "--requirepass " .. password,
      url = ("redis://127.0.0.1:%d/0"):format(port) }, Server)
    if srv:launch() and srv:pid() then return srv end
  end
  error("could not start redis-server (is it installed? make deps)")
end

function Server:cli(...)
  local args = {}
  for i, a in ipairs { ... } do args[i] = H.quote(tostring(a)) end
  local _, out = sh(("redis-cli -p %d %s%s 2>&1"):format(self.port,
    self.password and "--no-auth-warning -a " .. self.password .. " " or "",
    table.concat(args, " ")))
  return (out:gsub("%s+$", ""))
end

function Server:pid()
  local p = H.slurp(self.dir .. "/pid")
  return p and tonumber(p:match("%d+"))
end

-- Stops the server (SIGTERM: the append-only file is complete).
function Server:stop()
  local pid = self:pid()
  if not pid then return end
  sh("kill " .. pid)
  H.eventually(function()
    return sh("kill -0 " .. pid .. " 2>/dev/null") ~= 0
  end, 10, "redis-server to stop")
  os.remove(self.dir .. "/pid")
end

function Server:restart()
  self:stop()
  assert(self:launch(), "redis-server did not start again")
end

function Server:remove()
  self:stop()
  H.remove_dir(self.dir)
end

--- Runs bus until fn() returns true (checked every 10 ms); fails after
-- seconds (default 10).
function S.until_(bus, fn, seconds, what)
  local deadline = bus:_now() + (seconds or 10) * 1000
  local timed_out = false
  local function check()
    if fn() then return bus:stop() end
    if bus:_now() > deadline then
      timed_out = true
      return bus:stop()
    end
    bus:_after(10, check)
  end
  bus:_after(0, check)
  bus:run()
  if timed_out then
    error(("timed out waiting for %s"):format(what or "a condition"), 2)
  end
end

return S
