--- bus:redis under OpenResty, for real: Debian's nginx with its lua module
-- runs a worker whose bus (loop = "ngx") has a Redis link over cosockets
-- (lua/buzz/redisngx.lua, Debian's lua-nginx-redis): a request publishes
-- through it, and its group subscription handles what a plain Lua
-- process publishes. nginx loads the LuaJIT build of the core.
local buzz = require "buzz"
local S = require "spec.redis.server"

local CONF = [[
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
worker_processes 1;
error_log logs/error.log notice;
pid logs/nginx.pid;
events { worker_connections 64; }
http {
  access_log off;
  client_body_temp_path temp/body;
  proxy_temp_path temp/proxy;
  fastcgi_temp_path temp/fastcgi;
  uwsgi_temp_path temp/uwsgi;
  scgi_temp_path temp/scgi;
  lua_package_path "$prefix/lua/?.lua;$prefix/lua/?/init.lua;;";
  lua_package_cpath "$prefix/build/?.so;;";
  lua_shared_dict seen 1m;
  init_worker_by_lua_block {
    local buzz = require "buzz"
    bus = buzz.new{ loop = "ngx", on_error = function(e)
      ngx.log(ngx.ERR, "buzz: ", e)
    end }
    link = bus:redis{ url = "REDIS_URL", stream = "web", fanout = false,
                      block = 0.5, start = "all", consumer = "nginx" }
    link:subscribe("job.*", function(ev)
      ngx.sleep(0.001)                  -- a cosocket-era handler yields
      ngx.shared.seen:set(tostring(ev.payload), ev.group .. " " .. ev.attempt)
    end, { group = "web" })
  }
  server {
    listen 127.0.0.1:PORT;
    location = /ping { content_by_lua_block { ngx.say("pong") } }
    location = /publish {
      content_by_lua_block {
        local ok, err = link:publish("web.hit", tonumber(ngx.var.arg_n),
                                     { key = ngx.var.arg_key })
        ngx.say(ok and "ok" or err)
      }
    }
    location = /transport {
      content_by_lua_block {
        ngx.say(link.is_ngx and "cosocket" or "libuv")
      }
    }
    location = /seen {
      content_by_lua_block {
        ngx.say(ngx.shared.seen:get(ngx.var.arg_n) or "-")
      }
    }
  }
}
]]

local function sh(cmd)
  return H.sh(H.tool .. cmd)
end

describe("bus:redis under OpenResty #once #redis", function()
  local srv, prefix, base, master

  local function get(path)
    local status, out = sh(("curl -sS -m 10 %s 2>&1"):format(
      H.quote(base .. path)))
    assert(status == 0, out)
    return (out:gsub("%s+$", ""))
  end

  setup(function()
    srv = S.start()
    assert(H.slurp("build/luajit/buzz/core.so"),
           "build/luajit/buzz/core.so is missing: run make")
    prefix = H.mktemp_dir()
    local _, here = sh("pwd")
    here = here:gsub("%s+$", "")
    assert(sh(("mkdir %s/conf %s/logs %s/temp"):format(
      H.quote(prefix), H.quote(prefix), H.quote(prefix))) == 0)
    for link, target in pairs { lua = "lua", build = "build/luajit" } do
      assert(sh(("ln -s %s %s"):format(H.quote(here .. "/" .. target),
                                       H.quote(prefix .. "/" .. link))) == 0)
    end
    local _, uid = sh("id -u")
    local user = uid:match("^0%s") and "-g 'user root;' " or ""
    for _ = 1, 5 do
      local port = math.random(20000, 60000)
      H.spit(prefix .. "/conf/nginx.conf",
             (CONF:gsub("REDIS_URL", srv.url):gsub("PORT", port)))
      local status = sh(("nginx -p %s -c conf/nginx.conf %s2>&1")
                        :format(H.quote(prefix .. "/"), user))
      if status == 0 then base = "http://127.0.0.1:" .. port break end
    end
    assert(base, "nginx did not start: "
           .. (H.slurp(prefix .. "/logs/error.log") or ""))
    master = tonumber(H.eventually(function()
      return H.slurp(prefix .. "/logs/nginx.pid")
    end, 10, "nginx.pid"):match("%d+"))
    H.eventually(function()
      local status, body = sh(("curl -s -m 2 %s/ping"):format(base))
      return status == 0 and body == "pong\n"
    end, 10, "nginx to answer /ping")
  end)

  teardown(function()
    if master then
      sh(("kill -QUIT %d"):format(master))
      pcall(H.eventually, function()
        return sh(("kill -0 %d 2>/dev/null"):format(master)) ~= 0
      end, 10, "nginx to stop")
    end
    if prefix then H.remove_dir(prefix) end
    if srv then srv:remove() end
  end)

  it("publishes from a request through a cosocket", function()
    assert.equal("cosocket", get("/transport"))
    for n = 1, 5 do
      assert.equal("ok", get(("/publish?n=%d&key=k%d"):format(n, n % 2)))
    end
    H.eventually(function() return srv:cli("XLEN", "web") == "5" end, 10,
                 "five entries in the stream")
    local entries = srv:cli("XRANGE", "web", "-", "+")
    assert.matches("web%.hit", entries)
    assert.matches("key\n[k]1", entries)
  end)

  it("handles a group's events in a worker, acked", function()
    H.eventually(function()
      return srv:cli("XINFO", "CONSUMERS", "web", "web"):find("nginx")
    end, 10, "the worker to join the group")
    local bus = buzz.new()
    local r = bus:redis{ url = srv.url, stream = "web", fanout = false }
    for n = 101, 120 do assert(r:publish("job.run", n)) end
    assert(r:flush(5))
    bus:close()
    H.eventually(function() return get("/seen?n=120") ~= "-" end, 15,
                 "the worker to handle the events")
    for n = 101, 120 do
      assert.equal("web 1", get("/seen?n=" .. n))
    end
    H.eventually(function()
      return srv:cli("XPENDING", "web", "web"):match("^0")
    end, 10, "every entry acked")
    local log = H.slurp(prefix .. "/logs/error.log") or ""
    assert.is_nil(log:find("buzz: ", 1, true), log)
  end)
end)
