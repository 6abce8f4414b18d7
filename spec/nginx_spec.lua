--- The OpenResty host, for real: Debian's nginx with its lua module runs
-- examples/openresty/nginx.conf (two workers, on a free port, in a prefix
-- of its own) and the spec talks to it over HTTP with curl. nginx loads
-- the LuaJIT build of the core, whichever interpreter runs busted.

local CONF = "examples/openresty/nginx.conf"
local LUA_MODULE = "/usr/lib/nginx/modules/ngx_http_lua_module.so"
local LISTEN = "listen 127.0.0.1:8080"

local function sh(cmd)
  return H.sh(H.tool .. cmd)
end

local function cwd()
  local _, out = sh("pwd")
  return (out:gsub("%s+$", ""))
end

-- The lines of s.
local function lines(s)
  local t = {}
  for line in s:gmatch("[^\n]+") do t[#t + 1] = line end
  return t
end

-- Tagged #once: nginx runs the LuaJIT build whichever interpreter runs
-- busted, so make test runs this in its first pass only.
describe("OpenResty (nginx with the lua module) #once", function()
  local prefix, base, master

  -- Runs curl over the URLs of paths (curl's globs allowed:
  -- "/order?n=[1-9]"), each on a connection of its own unless keep is
  -- true, and returns what it printed; fails on any curl error.
  local function curl(paths, keep)
    local urls = {}
    for i, path in ipairs(paths) do urls[i] = H.quote(base .. path) end
    local status, out = sh(("curl -sS -m 10 %s%s 2>&1"):format(
      keep and "" or "-H 'Connection: close' ", table.concat(urls, " ")))
    assert(status == 0, ("curl %s failed (%s): %s")
                        :format(table.concat(paths, " "), status, out))
    return out
  end

  local function get(path)
    return curl { path }
  end

  local function seen(key)
    return (get("/seen?key=" .. key):gsub("%s+$", ""))
  end

  local function audit()
    local text = H.slurp(prefix .. "/audit.log") or ""
    local ns, ids = {}, {}
    for _, line in ipairs(lines(text)) do
      local n, id = line:match("^(%d+) (%d+)$")
      assert(n, "a bad line in audit.log: " .. line)
      ns[#ns + 1], ids[#ids + 1] = tonumber(n), tonumber(id)
    end
    return ns, ids
  end

  local function error_log()
    return H.slurp(prefix .. "/logs/error.log") or ""
  end

  local function is_alive(pid)
    return sh(("kill -0 %d 2>/dev/null"):format(pid)) == 0
  end

  local function start()
    local _, uid = sh("id -u")
    local user = uid:match("^0%s") and "-g 'user root;' " or ""
    local conf = H.read(CONF)
    local out
    for _ = 1, 5 do                      -- a port someone else holds: retry
      local port = math.random(20000, 60000)
      local text, n = conf:gsub(LISTEN:gsub("%.", "%%."),
                                "listen 127.0.0.1:" .. port)
      assert(n == 1, CONF .. " no longer holds one \"" .. LISTEN .. "\"")
      H.spit(prefix .. "/conf/nginx.conf", text)
      local status
      status, out = sh(("nginx -p %s -c conf/nginx.conf %s2>&1")
                       :format(H.quote(prefix .. "/"), user))
      if status == 0 then
        base = "http://127.0.0.1:" .. port
        break
      end
      assert(out:find("Address already in use", 1, true),
             "nginx did not start: " .. out .. error_log())
    end
    assert(base, "no free port: " .. tostring(out))
    master = tonumber(H.eventually(function()
      return H.slurp(prefix .. "/logs/nginx.pid")
    end, 10, "nginx.pid"):match("%d+"))
    H.eventually(function()
      local status, body = sh(("curl -s -m 2 %s/ping"):format(base))
      return status == 0 and body == "pong\n"
    end, 10, "nginx to answer /ping")
  end

  -- Stops nginx gracefully (QUIT: the workers close their buses), and
  -- kills what is left after 10 s.
  local function stop()
    if not master then return end
    local pid = master
    master = nil
    local _, kids = sh(("ps -o pid= --ppid %d"):format(pid))
    sh(("kill -QUIT %d"):format(pid))
    local ok = pcall(H.eventually, function() return not is_alive(pid) end,
                     10, "nginx to stop")
    if not ok then
      for k in kids:gmatch("%d+") do sh("kill -KILL " .. k) end
      sh(("kill -KILL %d"):format(pid))
      error("nginx did not stop within 10 s (killed)")
    end
  end

  setup(function()
    assert(sh("nginx -v 2>/dev/null") == 0 and H.slurp(LUA_MODULE),
           "nginx with the lua module is not installed: run make deps "
           .. "(tools/deps.sh installs nginx and libnginx-mod-http-lua)")
    assert(H.slurp("build/luajit/buzz/core.so"),
           "build/luajit/buzz/core.so is missing: run make")
    math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)"), 16))
    prefix = H.mktemp_dir()
    local here = cwd()
    assert(sh(("mkdir %s/conf %s/logs %s/temp"):format(
      H.quote(prefix), H.quote(prefix), H.quote(prefix))) == 0)
    for link, target in pairs { lua = "lua", build = "build/luajit",
                                app = "examples/openresty" } do
      assert(sh(("ln -s %s %s"):format(H.quote(here .. "/" .. target),
                                       H.quote(prefix .. "/" .. link))) == 0)
    end
    start()
  end)

  teardown(function()
    local ok, err = pcall(stop)
    if prefix then H.remove_dir(prefix) end
    assert(ok, err)
  end)

  it("delivers a request's event to a handler in the same worker", function()
    local worker = get("/greet?name=ann"):match("in worker (%d+)")
    assert.is_truthy(worker)
    assert.are.equal(worker, H.eventually(function()
      local w = seen("greet:ann")
      return w ~= "-" and w
    end, 10, "the greet handler"))
    -- by the turn the publish scheduled at the end of the request, not
    -- by a later timer (the heartbeat would deliver it too)
    assert.are.equal("wake", seen("greet_cause:ann"))
  end)

  it("sums the workers' metrics into one Prometheus text at /metrics",
     function()
    local function greeted()
      local n = get("/metrics"):match('\nbuzz_deliveries_total{job="app",'
                                      .. 'subscription="greet%.%*"} (%d+)\n')
      return tonumber(n)
    end
    -- what earlier greetings left, once the workers' shares (every 0.2 s)
    -- have settled: two reads half a second apart agree
    local before = H.eventually(function()
      local a = greeted()
      sh("sleep 0.5")
      return a and a == greeted() and a
    end, 10, "the greet handler's counter to settle")
    local said = curl { "/greet?name=m[1-20]" }  -- a connection each
    assert.matches("in worker 0", said, 1, true)  -- both workers took some
    assert.matches("in worker 1", said, 1, true)
    H.eventually(function() return greeted() == before + 20 end, 10,
                 "20 more greetings counted, from both workers")
    local text = get("/metrics")
    local path = prefix .. "/metrics.txt"
    H.spit(path, text)
    local status, out = H.sh("promtool check metrics < " .. H.quote(path)
                             .. " 2>&1")
    assert.are.equal(0, status, out)
    assert.matches("# TYPE buzz_handler_duration_seconds histogram", text,
                   1, true)
  end)

  it("lets a handler sleep and use a cosocket while others go on",
     function()
    -- One connection, so one worker: the fetch handler sleeps 0.5 s, and
    -- the greeting published after it is delivered meanwhile.
    local out = curl({ "/fetch?tag=slow&sleep=0.5", "/greet?name=bob" },
                     true)
    local w1, w2 = out:match("^fetching in worker (%d)\npublished #%d+ in "
                             .. "worker (%d)\n$")
    assert.is_truthy(w1, out)
    assert.are.equal(w1, w2)
    assert.are.equal("HTTP/1.1 200 OK", H.eventually(function()
      local s = seen("fetch:slow")
      return s ~= "-" and s
    end, 10, "the fetch handler"))
    local greeted = tonumber(seen("greeted_at:bob"))
    local fetched = tonumber(seen("fetched_at:slow"))
    assert.is_truthy(greeted and fetched)
    assert.is_true(greeted < fetched, ("greeted at %s, fetched at %s")
                                      :format(greeted, fetched))
  end)

  it("delivers within the request with buzz.ngx.drain, cosockets too",
     function()
    assert.are.equal("fetched: HTTP/1.1 200 OK\n", get("/fetch_now?tag=now"))
  end)

  it("runs a handler's ngx calls for the request or timer that resumes it",
     function()
    -- A handler's thread is reused across requests and timers: while one
    -- handler sleeps in a timer, a request's drain in the same worker
    -- (one connection) reuses threads; each must serve its own context.
    for i = 1, 5 do
      local out = curl({ ("/fetch?tag=reuse%d&sleep=0.2"):format(i),
                         ("/fetch_now?tag=now%d"):format(i) }, true)
      assert.matches("fetched: HTTP/1.1 200 OK\n$", out)
    end
    for i = 1, 5 do
      assert.are.equal("HTTP/1.1 200 OK", H.eventually(function()
        local s = seen("fetch:reuse" .. i)
        return s ~= "-" and s
      end, 10, "the sleeping fetch " .. i))
    end
  end)

  it("fires a delayed event on the worker's timers", function()
    assert.matches("reminding", get("/remind?tag=r1&delay=0.3"))
    local late = tonumber(H.eventually(function()
      local s = seen("remind:r1")
      return s ~= "-" and s
    end, 10, "the reminder"))
    assert.is_true(late >= 0.29 and late < 3, "fired after " .. late .. " s")
  end)

  -- What the handlers recorded under key, once they did.
  local function seen_soon(key, what)
    return H.eventually(function()
      local s = seen(key)
      return s ~= "-" and s
    end, 10, what or key)
  end

  it("retries a handler that uses a cosocket, each attempt yielding",
     function()
    assert.matches("paying", get("/pay?tag=p1&fail=1"))
    assert.are.equal("2", seen_soon("paid:p1", "the second attempt"))
    -- Both attempts got past ngx.sleep and got the cosocket's answer.
    assert.are.equal("HTTP/1.1 200 OK", seen("pay:p1:1"))
    assert.are.equal("HTTP/1.1 200 OK", seen("pay:p1:2"))
    assert.are.equal("-", seen("pay:p1:3"))
  end)

  it("carries retries that come due together, each through its wait",
     function()
    -- Four attempts fail at about the same time (the same backoff, no
    -- jitter), so their retries come due in one turn of the worker.
    assert.matches("paying", get("/pay?tag=q&fail=1&n=4"))
    for i = 1, 4 do
      assert.are.equal("2", seen_soon("paid:q" .. i, "payment q" .. i))
      assert.are.equal("HTTP/1.1 200 OK", seen("pay:q" .. i .. ":2"))
    end
  end)

  it("keeps each key's order when an ordered handler sleeps", function()
    -- Each key's first event sleeps longest. One connection, so one
    -- worker: while a's events wait behind their first, b's go on.
    curl({ "/ship?key=a&n=3", "/ship?key=b&n=3" }, true)
    assert.are.equal("1 2 3", H.eventually(function()
      local s = seen("ship:a")
      return #s >= 5 and s
    end, 10, "three shipments of a"))
    assert.are.equal("1 2 3", H.eventually(function()
      local s = seen("ship:b")
      return #s >= 5 and s
    end, 10, "three shipments of b"))
  end)

  it("times out a handler that sleeps past its timeout, then retries it",
     function()
    assert.matches("working", get("/slow?tag=s1"))
    assert.matches("^ETIMEOUT: handler did not finish within 0.1 s after 2 "
                   .. "attempts$", seen_soon("slow_dead:s1", "the letter"))
    assert.are.equal("started", seen("slow:s1:1"))
    assert.are.equal("started", seen("slow:s1:2"))
    assert.are.equal("-", seen("slow:s1:3"))
    os.execute(H.tool .. "sleep 0.4")  -- the sleeps end: nothing resumes
    assert.are.equal("-", seen("slow_done:s1:1"))
    assert.are.equal("-", seen("slow_done:s1:2"))
  end)

  it("resumes a handler that mixes buzz.sleep and ngx calls", function()
    assert.matches("napping", get("/nap?tag=n1"))
    local status, took = seen_soon("nap:n1", "the nap"):match(
      "^(.-) after ([%d.]+)$")
    assert.are.equal("HTTP/1.1 200 OK", status)
    assert.is_true(tonumber(took) >= 0.14, "took " .. took .. " s")
  end)

  -- Checks that audit.log holds the numbers of want (a set) exactly once
  -- each, besides what it held before (count lines).
  local function consumed_once(before, want, count)
    H.eventually(function() return #audit() >= before + count end, 15,
                 ("%d events at the durable consumer"):format(count))
    os.execute(H.tool .. "sleep 0.3")     -- no late duplicate either
    local ns = audit()
    assert.are.equal(before + count, #ns)
    local times = {}
    for i = before + 1, #ns do
      local n = ns[i]
      assert.is_true(want[n], "unexpected event " .. n)
      times[n] = (times[n] or 0) + 1
    end
    for n in pairs(want) do
      assert.are.equal(1, times[n], ("event %d consumed %s times")
                                   :format(n, tostring(times[n])))
    end
  end

  it("gives two workers one log: each event reaches the durable consumer "
     .. "once", function()
    local before = #audit()
    local by_worker, want = {}, {}
    for _, line in ipairs(lines(get("/order?n=[1-40]"))) do
      local w, result = line:match("^worker (%d) (.*)$")
      assert.is_truthy(w, "a bad response: " .. line)
      by_worker[w] = (by_worker[w] or 0) + 1
      assert.is_truthy(result:match("^%d+ nil$")
                       or result == "true forwarded", result)
    end
    assert.is_truthy(by_worker["0"] and by_worker["1"],
                     "both workers should publish: " .. (by_worker["0"] or 0)
                     .. " and " .. (by_worker["1"] or 0))
    for n = 1, 40 do want[n] = true end
    consumed_once(before, want, 40)
  end)

  it("keeps the consumer's position and the ids across a restart",
     function()
    local before, ids = audit()
    before = #before
    local last = ids[#ids] or 0
    stop()
    start()
    get("/order?n=[101-110]")
    local want = {}
    for n = 101, 110 do want[n] = true end
    consumed_once(before, want, 10)
    local _, after = audit()
    assert.is_true(after[before + 1] > last, "ids go on after a restart")
  end)

  -- The gateway under nginx: buzz.ngx.sse over the shared log,
  -- buzz.ngx.ingest for GitHub and POST /events.
  local TOKEN, SECRET = "example-token", "It's a Secret to Everybody"

  -- curl with headers and an optional body; its status and output.
  local function request(method, path, headers, body, max_time)
    local args = { "curl -sS -i -N -m " .. (max_time or 10), "-X", method }
    for k, v in pairs(headers or {}) do
      args[#args + 1] = "-H " .. H.quote(k .. ": " .. v)
    end
    if body then args[#args + 1] = "--data-binary " .. H.quote(body) end
    args[#args + 1] = H.quote(base .. path)
    return sh(table.concat(args, " ") .. " 2>/dev/null")
  end

  local function status_of(out)
    return tonumber(out:match("^HTTP/1%.1 (%d+)"))
  end

  local function sse_ids(out, etype)
    local ids = {}
    for id, t in out:gmatch("id: (%d+)\nevent: ([^\n]+)\n") do
      if not etype or t == etype then ids[#ids + 1] = tonumber(id) end
    end
    return ids
  end

  it("streams the shared log over SSE: resume after Last-Event-ID, then "
     .. "live, heartbeats, auth", function()
    local auth = { Authorization = "Bearer " .. TOKEN }
    local _, out = request("GET", "/repos/42/events", {}, nil, 2)
    assert.equal(401, status_of(out))
    for i = 1, 3 do
      local _, r = request("POST", "/events", auth,
                           '{"type":"repo.42.push","payload":{"i":' .. i
                           .. '}}')
      assert.equal(202, status_of(r), r)
    end
    request("POST", "/events", auth, '{"type":"repo.7.push"}')
    -- from the start of the log: the three, in id order
    local got = H.eventually(function()
      local _, o = request("GET", "/repos/42/events",
                           { Authorization = auth.Authorization,
                             ["Last-Event-ID"] = "0" }, nil, 2.5)
      return #sse_ids(o, "repo.42.push") >= 3 and o
    end, 15, "the stream to replay three events")
    assert.matches("Content%-Type: text/event%-stream", got)
    assert.matches("X%-Accel%-Buffering: no", got)
    assert.matches(": connected\n\nretry: 3000\n\n", got)
    assert.matches(": heartbeat\n\n", got, 1, true)
    assert.is_nil(got:find("repo.7.push", 1, true))
    local ids = sse_ids(got, "repo.42.push")
    assert.equal(3, #ids)
    for i = 2, #ids do assert.is_true(ids[i] > ids[i - 1]) end
    -- after the second: only the third, then a live one
    local file = prefix .. "/stream.out"
    H.sh(("(curl -sS -N -m 3 -H %s -H 'Last-Event-ID: %d' %s > %s 2>&1 &)")
       :format(H.quote("Authorization: Bearer " .. TOKEN), ids[2],
               H.quote(base .. "/repos/42/events"), H.quote(file)))
    H.eventually(function()
      return #sse_ids(H.slurp(file) or "", "repo.42.push") == 1
    end, 10, "the stream to resume with the third event")
    local _, r = request("POST", "/events", auth,
                         '{"type":"repo.42.merge","payload":{}}')
    assert.equal(202, status_of(r), r)
    local live = H.eventually(function()
      local o = H.slurp(file) or ""
      return #sse_ids(o) == 2 and o
    end, 10, "the live event on the resumed stream")
    assert.same({ ids[3] }, sse_ids(live, "repo.42.push"))
    assert.is_true(sse_ids(live, "repo.42.merge")[1] > ids[3])
    -- an id the log has not reached: reset
    local _, o4 = request("GET", "/repos/42/events",
                          { Authorization = auth.Authorization,
                            ["Last-Event-ID"] = "99999999" }, nil, 1)
    assert.matches("event: reset\ndata: {\"last_event_id\":99999999}", o4)
  end)

  it("takes GitHub webhooks: signature checked, one event per delivery",
     function()
    local body = '{"ref":"refs/heads/main","n":77}'
    local function hook(sig, delivery)
      return request("POST", "/webhook/github", {
        ["X-GitHub-Event"] = "push", ["X-GitHub-Delivery"] = delivery,
        ["Content-Type"] = "application/json",
        ["X-Hub-Signature-256"] = sig }, body)
    end
    local good = "sha256=" .. require("buzz.core").hmac_sha256(SECRET, body)
    local _, bad = hook("sha256=" .. ("0"):rep(64), "nginx-d-1")
    assert.equal(401, status_of(bad))
    for _ = 1, 3 do
      local _, ok = hook(good, "nginx-d-1")
      assert.equal(202, status_of(ok), ok)
    end
    local _, get405 = request("GET", "/webhook/github")
    assert.equal(405, status_of(get405))
    local buzz = require "buzz"
    local n = H.eventually(function()
      local log = assert(buzz.new{ store = prefix .. "/events.db",
                                   readonly = true })
      local count = 0
      for ev in log:events{ types = "github.push" } do
        if ev.payload.n == 77 then count = count + 1 end
      end
      log:close()
      return count > 0 and count
    end, 15, "the webhook's event in the log")
    os.execute(H.tool .. "sleep 0.3")
    assert.equal(1, n)
  end)

  -- The failures the tests above cause on purpose, which on_error logs.
  local MEANT = { "buzz: %S+: the payment service hung up",
                  "buzz: ETIMEOUT: handler did not finish within 0.1 s" }

  it("logs no error", function()
    for _, line in ipairs(lines(error_log())) do
      local is_meant = false
      for _, p in ipairs(MEANT) do
        is_meant = is_meant or line:find(p) ~= nil
      end
      assert.is_falsy(not is_meant and (line:match("%[error%]")
                      or line:match("%[alert%]") or line:match("%[crit%]")
                      or line:match("%[emerg%]")), line)
    end
  end)
end)

describe('buzz.new{ loop = "ngx" } outside OpenResty', function()
  it("is refused, naming OpenResty", function()
    local buzz = require "buzz"
    assert.has_error(function() buzz.new{ loop = "ngx" } end,
                     'loop = "ngx" drives a bus inside OpenResty (nginx '
                     .. "with the lua module), and ngx is not here")
  end)

  it("cause and drain take only a bus made with loop = \"ngx\"", function()
    local ngx_driver = require "buzz.ngx"
    local bus = H.bus()
    for _, fn in ipairs { "cause", "drain" } do
      local ok, err = pcall(function() ngx_driver[fn](bus) end)
      assert.is_false(ok)
      assert.matches(("^spec/nginx_spec%%.lua:%%d+: buzz%%.ngx%%.%s%%(bus%%): "
                      .. "expected a bus made with buzz%%.new{ loop = "
                      .. '"ngx" }, got buzz%%.bus'):format(fn), err)
    end
    H.done()
  end)
end)

-- As root, nginx's workers run as nobody: a store in a directory only
-- root may write cannot be opened by the shared store's owner. It must
-- say so once, with what to do, and not once a poll.
describe("a shared store the workers cannot write #once", function()
  it("is logged once with a hint, not at every poll", function()
    local _, uid = H.sh(H.tool .. "id -u")
    if not uid:match("^0%s") then
      pending("needs root: as another user nginx's workers are that user")
      return
    end
    local prefix = H.mktemp_dir()          -- 0700, root's
    finally(function()
      H.sh(H.tool .. ("kill -QUIT $(cat %s/logs/nginx.pid) 2>/dev/null")
                     :format(H.quote(prefix)))
      os.execute(H.tool .. "sleep 0.5")
      H.remove_dir(prefix)
    end)
    local here = H.ROOT
    assert(H.sh(H.tool .. ("mkdir %s/conf %s/logs %s/temp && chmod 755 %s")
                 :format(H.quote(prefix), H.quote(prefix), H.quote(prefix),
                         H.quote(prefix))) == 0)
    local port = math.random(20000, 60000)
    H.spit(prefix .. "/conf/nginx.conf", ([[
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
  lua_package_path "%s/lua/?.lua;%s/lua/?/init.lua;;";
  lua_package_cpath "%s/build/luajit/?.so;;";
  lua_shared_dict buzz 1m;
  init_worker_by_lua_block {
    require("buzz.ngx").shared{ dict = "buzz",
                                store = ngx.config.prefix() .. "events.db" }
  }
  server { listen 127.0.0.1:%d; location = /ping { return 200 "pong"; } }
}
]]):format(here, here, here, port))
    local status, out = H.sh(H.tool .. ("nginx -p %s -c conf/nginx.conf 2>&1")
                             :format(H.quote(prefix .. "/")))
    assert.equal(0, status, out)
    os.execute(H.tool .. "sleep 1.5")      -- 30 polls
    local log = H.slurp(prefix .. "/logs/error.log") or ""
    local _, n = log:gsub("the shared store is not open yet", "")
    assert.equal(1, n, log)
    assert.matches("Permission denied", log, 1, true)
    assert.matches("give nginx's workers a user that can", log, 1, true)
  end)
end)
