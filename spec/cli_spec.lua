--- bin/buzz, the command-line tool: run as a child process of the
-- interpreter running busted (so under Lua 5.4 and LuaJIT alike) against
-- real stores written here through the public API.
local buzz = require "buzz"
local core = require "buzz.core"

local json_decode = core.json_decode

local quote, sh, slurp, spit = H.quote, H.sh, H.slurp, H.spit
local mktemp_dir, remove_dir, eventually = H.mktemp_dir, H.remove_dir,
                                           H.eventually

local function lines(s)
  local out = {}
  for line in s:gmatch("([^\n]*)\n") do out[#out + 1] = line end
  return out
end

-- Under make asan system tools run without the sanitizer (H.tool).
local TOOL = H.tool

-- The shell command that runs bin/buzz with args (spec/helper.lua).
local command = H.cli

local function has_script()
  return (sh("command -v script >/dev/null"))
end

-- A scratch directory with a store of real events; the caller removes it
-- with s.remove in finally. The store holds:
--   1 order.created {n=1}  key "k1", correlation "req-1", headers
--   2 order.paid    {n=2}  key 7 (an integer), priority high
--   3 invoice.sent  {n=3}  key "7" (a string)
--   4 order.created {items={"a","b"}, n=4}  key "k2"
--   5 order.shipped {n=5}
-- and a durable consumer "billing" on order.* that saw ids 1 to 3, so two
-- order events (4 and 5) wait for it.
local function new_store()
  local dir = mktemp_dir()
  local s = { dir = dir, path = dir .. "/events.db" }
  function s.remove() remove_dir(dir) end
  local w = assert(buzz.new{ store = s.path })
  w:subscribe("order.*", function() end, { durable = "billing" })
  w:publish("order.created", { n = 1 }, {
    key = "k1", correlation_id = "req-1",
    headers = { traceparent = "00-abc-01", tenant = "acme" },
  })
  w:publish("order.paid", { n = 2 }, { key = 7, priority = "high" })
  w:publish("invoice.sent", { n = 3 }, { key = "7" })
  w:drain()
  w:publish("order.created", { n = 4, items = { "a", "b" } }, { key = "k2" })
  w:publish("order.shipped", { n = 5 })
  assert(w:flush())
  w:close()
  return s
end

-- Runs bin/buzz on the store with args (and env, VAR=value words);
-- returns status, stdout, stderr.
local function run(s, args, env)
  local err = s.dir .. "/stderr"
  local status, out = sh(("%s 2>%s"):format(
    command(("--store %s %s"):format(quote(s.path), args), env),
    quote(err)))
  return status, out, slurp(err) or ""
end

-- Publishes more events into the store, then closes the writer.
local function publish(s, events)
  local w = assert(buzz.new{ store = s.path })
  for _, e in ipairs(events) do w:publish(e[1], e[2], e[3]) end
  assert(w:flush())
  w:close()
end

-- What a read-only bus sees in the store, for comparisons.
local function stored(s)
  local bus = assert(buzz.new{ store = s.path, readonly = true })
  local evs = {}
  for ev in assert(bus:events()) do evs[#evs + 1] = ev end
  local info = assert(bus:store_info())
  bus:close()
  return evs, info
end

local function iso(ts)
  local sec = math.floor(ts / 1000)
  return os.date("!%Y-%m-%dT%H:%M:%S", sec)
         .. (".%03dZ"):format(ts - sec * 1000)
end

local TIME = "%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ"


describe("bin/buzz", function()
  it("prints its version with --version or version, as buzz._VERSION",
     function()
    for _, args in ipairs{ "--version", "version", "ls --version" } do
      local status, out = H.sh(H.cli(args) .. " 2>&1")
      assert.equal(0, status, out)
      assert.equal("buzz " .. buzz._VERSION .. "\n", out)
    end
    assert.equal("0.2.0", buzz._VERSION)
    assert.equal(buzz._VERSION, require("buzz.core").version)
  end)

  describe("ls", function()
    it("prints one line per event: id, UTC time, type, key and payload",
       function()
      local s = new_store()
      finally(s.remove)
      local status, out, err = run(s, "ls")
      assert.are.equal(0, status, err)
      assert.are.equal("", err)
      local evs = stored(s)
      local want = {
        '1 %s order.created key=k1 {"n":1}',
        '2 %s order.paid key=7 {"n":2}',
        '3 %s invoice.sent key="7" {"n":3}',
        '4 %s order.created key=k2 {"items":["a","b"],"n":4}',
        '5 %s order.shipped {"n":5}',
      }
      for i, w in ipairs(want) do want[i] = w:format(iso(evs[i].ts)) end
      assert.are.same(want, lines(out))
      assert.matches("^1 " .. TIME .. " ", out)
    end)

    it("filters by type pattern, id range and limit", function()
      local s = new_store()
      finally(s.remove)
      local function ids(args)
        local status, out, err = run(s, "ls " .. args)
        assert.are.equal(0, status, err)
        local got = {}
        for _, line in ipairs(lines(out)) do
          got[#got + 1] = tonumber(line:match("^(%d+) "))
        end
        return got
      end
      assert.are.same({ 1, 2, 4, 5 }, ids("--types 'order.*'"))
      assert.are.same({ 1, 4 }, ids("--types order.created"))
      assert.are.same({ 2, 3, 4 }, ids("--from 2 --to 4"))
      assert.are.same({ 2, 4 }, ids("--types='order.*' --from=2 --limit=2"))
      assert.are.same({ 4 }, ids("--key k2"))
      assert.are.same({}, ids("--types 'nothing.>'"))
    end)

    it("matches a numeric key stored as a string or as an integer",
       function()
      local s = new_store()
      finally(s.remove)
      local status, out, err = run(s, "ls --key 7")
      assert.are.equal(0, status, err)
      assert.are.same({ 2, 3 }, {
        tonumber(lines(out)[1]:match("^%d+")),
        tonumber(lines(out)[2]:match("^%d+")),
      })
      assert.are.equal(2, #lines(out))
      status, out = run(s, "ls --key 7 --limit 1")
      assert.are.equal(0, status)
      assert.matches("^2 [^\n]* order%.paid key=7 ", out)
      assert.are.equal(1, #lines(out))
    end)

    it("takes UTC times for --from and --to", function()
      local s = new_store()
      finally(s.remove)
      local status, out = run(s, "ls --from 2000-01-01 --to 2000-12-31")
      assert.are.equal(0, status)
      assert.are.equal("", out)
      status, out = run(s, "ls --from 2000-01-01T00:00:00Z --limit 1")
      assert.are.equal(0, status)
      assert.matches("^1 ", out)
      local evs = stored(s)
      local last = iso(evs[5].ts + 1000):sub(1, 19) .. "Z"
      status, out = run(s, "ls --to " .. last)
      assert.are.equal(0, status)
      assert.are.equal(5, #lines(out))
    end)

    it("prints each event's full envelope as a JSON line with --json",
       function()
      local s = new_store()
      finally(s.remove)
      local status, out, err = run(s, "ls --json")
      assert.are.equal(0, status, err)
      local evs = stored(s)
      local got = lines(out)
      assert.are.equal(#evs, #got)
      for i, line in ipairs(got) do
        local ev = assert(json_decode(line))
        assert.are.equal(evs[i].id, ev.id)
        assert.are.equal(evs[i].type, ev.type)
        assert.are.equal(evs[i].ts, ev.ts)
        assert.are.equal(evs[i].priority, ev.priority)
        assert.are.equal(evs[i].key, ev.key)
        assert.are.equal(evs[i].version, ev.version)
        assert.are.same(evs[i].payload, ev.payload)
      end
      local first = json_decode(got[1])
      assert.are.equal("req-1", first.correlation_id)
      assert.are.same({ traceparent = "00-abc-01", tenant = "acme" },
                      first.headers)
      assert.are.equal("k1", first.key)
      assert.are.equal(7, json_decode(got[2]).key)
      assert.are.equal("high", json_decode(got[2]).priority)
      assert.are.equal("7", json_decode(got[3]).key)
      assert.matches('^{"id":1,"type":"order%.created","ts":%d+,', got[1])
    end)

    it("never cuts lines when stdout is not a terminal", function()
      local s = new_store()
      finally(s.remove)
      publish(s, { { "note.long", { text = ("x"):rep(300) } } })
      local status, out = run(s, "ls --types note.long", "COLUMNS=60")
      assert.are.equal(0, status)
      assert.matches(('{"text":"%s"}\n$'):format(("x"):rep(300)), out)
    end)

    it("cuts lines to the terminal's width when stdout is a terminal",
       function()
      if not has_script() then
        pending("script(1) is not installed")
        return
      end
      local s = new_store()
      finally(s.remove)
      publish(s, { { "note.long", { text = ("x"):rep(300) } } })
      local cmd = command(("--store %s ls"):format(quote(s.path)),
                          "COLUMNS=60")
      local status, out = sh((TOOL .. "script -qec %s /dev/null </dev/null")
                             :format(quote(cmd)))
      assert.are.equal(0, status, out)
      out = out:gsub("\r", "")
      local got = lines(out)
      assert.are.equal(6, #got, out)
      for _, line in ipairs(got) do
        local _, continuation = line:gsub("[\128-\191]", "")
        assert.is_true(#line - continuation <= 60, line)
      end
      assert.matches("^6 [^\n]* note%.long {\"text\":\"x+…$", got[6])
      local _, continuation = got[6]:gsub("[\128-\191]", "")
      assert.are.equal(60, #got[6] - continuation)
    end)
  end)

  describe("tail", function()
    it("prints the last N events, 10 by default", function()
      local s = new_store()
      finally(s.remove)
      local status, out, err = run(s, "tail -n 2")
      assert.are.equal(0, status, err)
      local got = lines(out)
      assert.are.equal(2, #got)
      assert.matches("^4 [^\n]* order%.created key=k2 ", got[1])
      assert.matches("^5 [^\n]* order%.shipped ", got[2])
      status, out = run(s, "tail")
      assert.are.equal(0, status)
      assert.are.equal(5, #lines(out))
      status, out = run(s, "tail -n3 --json")
      assert.are.equal(0, status)
      assert.are.same({ 3, 4, 5 }, {
        json_decode(lines(out)[1]).id, json_decode(lines(out)[2]).id,
        json_decode(lines(out)[3]).id,
      })
    end)

    it("finds the last events of a type far behind the newest ids",
       function()
      local s = new_store()
      finally(s.remove)
      local noise = {}
      for i = 1, 300 do noise[i] = { "metric.tick", { i = i } } end
      publish(s, noise)
      local status, out, err = run(s, "tail -n 2 --types 'order.*'")
      assert.are.equal(0, status, err)
      local got = lines(out)
      assert.are.equal(2, #got)
      assert.matches("^4 ", got[1])
      assert.matches("^5 ", got[2])
      status, out = run(s, "tail -n 10 --types 'invoice.>'")
      assert.are.equal(0, status)
      assert.matches("^3 [^\n]* invoice%.sent ", out)
      assert.are.equal(1, #lines(out))
    end)

    it("reads only the ends of the log, not a count of it: a damaged "
       .. "middle page is not met", function()
      local s = new_store()
      finally(s.remove)
      local rows = {}
      for i = 1, 3000 do
        rows[i] = { "metric.tick", { i = i, pad = ("x"):rep(40) } }
      end
      publish(s, rows)
      H.damage_middle_of_log(s.path)
      local status, out, err = run(s, "tail -n 2 --json")
      assert.are.equal(0, status, err)
      local got = lines(out)
      assert.are.same({ 2999, 3000 }, { json_decode(got[1]).payload.i,
                                        json_decode(got[2]).payload.i })
      local st_status, _, st_err = run(s, "stats")   -- which counts: it
      assert.are.equal(1, st_status)                   -- cannot
      assert.matches("malformed", st_err)
    end)

    it("follows events stored after it started and exits after --count",
       function()
      local s = new_store()
      local out, rc, pid = s.dir .. "/tail.out", s.dir .. "/tail.rc",
                           s.dir .. "/tail.pid"
      finally(function()              -- one finally per test: both jobs
        local p = slurp(pid)
        if p and not slurp(rc) then os.execute("kill " .. tonumber(p)) end
        s.remove()
      end)
      local script = ("%s > %s 2>&1 & echo $! > %s; wait $!; echo $? > %s")
                     :format(command(("--store %s tail -f -n 1 --types "
                                      .. "'order.*' --count 4")
                                     :format(quote(s.path))),
                             quote(out), quote(pid), quote(rc))
      os.execute(("sh -c %s >/dev/null 2>&1 &"):format(quote(script)))
      -- The first line is the newest stored event: tail is polling now.
      eventually(function() return (slurp(out) or ""):find("\n") end, 10,
                 "tail's first line")
      publish(s, {
        { "order.created", { n = 6 } },
        { "metric.tick", { n = 7 } },
        { "order.paid", { n = 8 } },
      })
      os.execute(TOOL .. "sleep 0.3")
      publish(s, {
        { "order.shipped", { n = 9 } },
        { "order.created", { n = 10 } },
      })
      -- rc exists (empty) from the redirect before echo writes the line.
      local status = eventually(function()
        local r = slurp(rc)
        return r and r:find("\n") and r
      end, 10,
                                "tail to exit")
      assert.are.equal("0\n", status)
      local got = lines(slurp(out))
      assert.are.equal(4, #got, slurp(out))
      assert.matches("^5 [^\n]* order%.shipped {\"n\":5}$", got[1])
      assert.matches("^6 [^\n]* order%.created {\"n\":6}$", got[2])
      assert.matches("^8 [^\n]* order%.paid {\"n\":8}$", got[3])
      assert.matches("^9 [^\n]* order%.shipped {\"n\":9}$", got[4])
    end)
  end)

  describe("show", function()
    it("prints one event's envelope, headers and pretty payload", function()
      local s = new_store()
      finally(s.remove)
      local status, out, err = run(s, "show 1")
      assert.are.equal(0, status, err)
      local ts = stored(s)[1].ts
      assert.are.equal(table.concat({
        "id              1",
        "type            order.created",
        ("time            %s (ts %d)"):format(iso(ts), ts),
        "priority        normal",
        "key             k1",
        "correlation_id  req-1",
        "causation_id    -",
        "version         1",
        "headers",
        "  tenant: acme",
        "  traceparent: 00-abc-01",
        "payload",
        "  {",
        '    "n": 1',
        "  }",
        "",
      }, "\n"), out)
      status, out = run(s, "show 4")
      assert.are.equal(0, status)
      assert.matches('\nheaders         %-\npayload\n  {\n    "items": %[\n'
                     .. '      "a",\n      "b"\n    %],\n    "n": 4\n  }\n$',
                     out)
    end)

    it("prints the envelope as one JSON object with --json", function()
      local s = new_store()
      finally(s.remove)
      local status, out, err = run(s, "show 2 --json")
      assert.are.equal(0, status, err)
      local ev = assert(json_decode(out))
      assert.are.equal(2, ev.id)
      assert.are.equal("order.paid", ev.type)
      assert.are.equal("high", ev.priority)
      assert.are.equal(7, ev.key)
      assert.are.same({ n = 2 }, ev.payload)
      assert.are.equal(1, #lines(out))
    end)

    it("exits 1 with a message on stderr for an unknown id", function()
      local s = new_store()
      finally(s.remove)
      local status, out, err = run(s, "show 99")
      assert.are.equal(1, status)
      assert.are.equal("", out)
      assert.are.equal(("buzz: no event 99 in %s\n"):format(s.path), err)
    end)

    it("exits 1 with EDECODE for a stored payload that is not JSON, and ls "
       .. "and replay say so too", function()
      local s = new_store()
      finally(s.remove)
      local st, out = sh(("%ssqlite3 %s %s 2>&1"):format(TOOL, quote(s.path),
        quote("UPDATE events SET payload = '{nope' WHERE id = 2")))
      assert.are.equal(0, st, out)
      local status, err
      status, out, err = run(s, "show 2")
      assert.are.equal(1, status)
      assert.are.equal("", out)
      assert.matches("^buzz: EDECODE: event 2's stored payload is not valid "
                     .. "JSON", err)
      status, out, err = run(s, "ls")
      assert.are.equal(1, status)
      assert.are.equal(4, #lines(out))          -- the other four events
      assert.no.matches("null", out, 1, true)
      assert.matches("^buzz: EDECODE: event 2", err)
      local handler = s.dir .. "/h.lua"
      spit(handler, "return function() end\n")
      status, out, err = run(s, "replay --handler " .. quote(handler))
      assert.are.equal(1, status)
      assert.matches("replayed 4 events, 1 failed", out, 1, true)
      assert.matches("EDECODE: event 2", err, 1, true)
    end)
  end)

  describe("stats", function()
    it("counts events per type and shows each consumer's lag", function()
      local s = new_store()
      finally(s.remove)
      local status, out, err = run(s, "stats")
      assert.are.equal(0, status, err)
      assert.matches("store +" .. s.path:gsub("%p", "%%%0") .. "\n", out)
      assert.matches("\nevents +5 %(ids 1 to 5%)\n", out)
      assert.matches("\nsize +[%d.]+ KiB %(%d+ bytes%)\n", out)
      assert.matches("\nheld back +0 ", out)
      assert.matches("\ntype +events\n"
                     .. "invoice%.sent +1\n"
                     .. "order%.created +2\n"
                     .. "order%.paid +1\n"
                     .. "order%.shipped +1\n", out)
      assert.matches("\nconsumer +pattern +acked +lag +updated\n"
                     .. "billing +order%.%* +3 +2 +" .. TIME .. "\n$", out)
    end)

    it("prints the same as one JSON object with --json", function()
      local s = new_store()
      finally(s.remove)
      local status, out, err = run(s, "stats --json")
      assert.are.equal(0, status, err)
      local st = assert(json_decode(out))
      local _, info = stored(s)
      assert.are.equal(s.path, st.path)
      assert.are.equal(5, st.events)
      assert.are.equal(1, st.first_id)
      assert.are.equal(5, st.last_id)
      assert.are.equal(info.size_bytes, st.size_bytes)
      assert.are.same({ ["invoice.sent"] = 1, ["order.created"] = 2,
                        ["order.paid"] = 1, ["order.shipped"] = 1 },
                      st.types)
      assert.are.equal(1, #st.consumers)
      local c = st.consumers[1]
      assert.are.same({ "billing", "order.*", 3, 2 },
                      { c.name, c.pattern, c.acked, c.lag })
      assert.is_number(c.updated_ms)
      assert.are.same({ 0, 0, 0 }, { st.retries, st.dead_letters,
                                     st.delayed })
    end)

    it("counts pending retries, dead letters and delayed events",
       function()
      local dir = H.mktemp_dir()
      finally(function() H.remove_dir(dir) end)
      local path = dir .. "/events.db"
      local clock = buzz.manual_clock(1000)
      local bus = assert(buzz.new{ store = path, clock = clock,
                                   on_error = function() end })
      bus:subscribe("a", function() error("x") end, { retry = { max = 1 } })
      bus:subscribe("b", function(ev)
        if ev.payload == 1 then error("later") end
      end, { retry = { max = 3, base = 60 } })
      for i = 1, 3 do bus:publish("a", i) end
      bus:publish("b", 1)
      bus:publish("b", 2, { delay = 100 })
      bus:drain()
      bus:close()
      local status, out, err = run({ path = path, dir = dir }, "stats")
      assert.are.equal(0, status, err)
      assert.matches("\nretries +1 pending\n", out)
      assert.matches("\ndead +3 dead letters %(buzz dlq%)\n", out)
      assert.matches("\ndelayed +1 events not yet due\n", out)
      status, out, err = run({ path = path, dir = dir }, "stats --json")
      assert.are.equal(0, status, err)
      local st = assert(json_decode(out))
      assert.are.same({ 1, 3, 1 }, { st.retries, st.dead_letters,
                                     st.delayed })
    end)
  end)

  describe("replay", function()
    -- A handler file that appends "id type is_replay" to log, and raises
    -- on the ids in fail_ids.
    local function handler_file(s, fail_ids)
      local file, log = s.dir .. "/handler.lua", s.dir .. "/handled.log"
      spit(file, ([[
local fail = { %s }
return function(ev)
  local f = assert(io.open(%q, "a"))
  f:write(ev.id, " ", ev.type, " ", tostring(ev.is_replay), "\n")
  f:close()
  for _, id in ipairs(fail) do
    if ev.id == id then error("refused #" .. id) end
  end
end
]]):format(table.concat(fail_ids or {}, ", "), log))
      return file, log
    end

    it("feeds the matching events to the handler and appends nothing",
       function()
      local s = new_store()
      finally(s.remove)
      local before_evs, before = stored(s)
      local file, log = handler_file(s)
      local status, out, err = run(s, ("replay --types 'order.*' "
                                       .. "--handler %s"):format(quote(file)))
      assert.are.equal(0, status, err)
      assert.are.equal("", err)
      assert.matches("^replayed 4 events, 0 failed, in [%d.]+ s\n$", out)
      assert.are.equal("1 order.created true\n2 order.paid true\n"
                       .. "4 order.created true\n5 order.shipped true\n",
                       slurp(log))
      local after_evs, after = stored(s)
      assert.are.equal(before.events, after.events)
      assert.are.equal(before.last_id, after.last_id)
      assert.are.equal(#before_evs, #after_evs)
    end)

    it("takes the same filters as ls", function()
      local s = new_store()
      finally(s.remove)
      local file, log = handler_file(s)
      local status, out, err = run(s, ("replay --from 2 --to 4 --key 7 "
                                       .. "--handler=%s"):format(quote(file)))
      assert.are.equal(0, status, err)
      assert.matches("^replayed 2 events, 0 failed", out)
      assert.are.equal("3 invoice.sent true\n2 order.paid true\n",
                       slurp(log))
      os.remove(log)
      status, out = run(s, ("replay --limit 2 --handler %s")
                           :format(quote(file)))
      assert.are.equal(0, status)
      assert.matches("^replayed 2 events", out)
      assert.are.equal("1 order.created true\n2 order.paid true\n",
                       slurp(log))
    end)

    it("reports handler failures on stderr, goes on, and exits 1",
       function()
      local s = new_store()
      finally(s.remove)
      local file, log = handler_file(s, { 2, 4 })
      local status, out, err = run(s, ("replay --handler %s --json")
                                      :format(quote(file)))
      assert.are.equal(1, status)
      local summary = assert(json_decode(out))
      assert.are.equal(5, summary.count)
      assert.are.equal(2, summary.failed)
      assert.is_number(summary.seconds)
      assert.are.equal(5, #lines(slurp(log)))
      local msgs = lines(err)
      assert.are.equal(2, #msgs, err)
      assert.matches("^buzz: handler failed on order%.paid #2: .*refused #2$",
                     msgs[1])
      assert.matches("^buzz: handler failed on order%.created #4: "
                     .. ".*refused #4$", msgs[2])
    end)

    it("refuses a handler file that does not return a function", function()
      local s = new_store()
      finally(s.remove)
      local file = s.dir .. "/bad.lua"
      spit(file, "return 42\n")
      local status, out, err = run(s, "replay --handler " .. quote(file))
      assert.are.equal(1, status)
      assert.are.equal("", out)
      assert.are.equal(("buzz: %s must return a function(ev), but returned "
                        .. "number\n"):format(file), err)
      local no = s.dir .. "/no.lua"
      status, out, err = run(s, "replay --handler " .. quote(no))
      assert.are.equal("", out)
      assert.are.equal(1, status)
      assert.matches("^buzz: cannot load the handler: .*no%.lua", err)
    end)

    it("draws a progress bar on stderr when it is a terminal", function()
      if not has_script() then
        pending("script(1) is not installed")
        return
      end
      local s = new_store()
      finally(s.remove)
      local many = {}
      for i = 1, 1500 do many[i] = { "metric.tick", { i = i } } end
      publish(s, many)
      local file = handler_file(s)
      spit(file, "return function() end\n")
      local cmd = command(("--store %s replay --handler %s")
                          :format(quote(s.path), quote(file)), "COLUMNS=60")
      local status, out = sh((TOOL .. "script -qec %s /dev/null </dev/null")
                             :format(quote(cmd)))
      assert.are.equal(0, status, out)
      assert.matches("\rreplay %[[#.]+%] +%d+%%  %d+/1505", out)
      assert.matches("replayed 1505 events, 0 failed", out)
      -- Not a terminal: no bar.
      local _, plain, err = run(s, "replay --handler " .. quote(file))
      assert.are.equal("", err)
      assert.matches("^replayed 1505 events", plain)
    end)
  end)

  describe("dlq", function()
    -- Two dead letters of subscription "billing": order.paid (key o-1)
    -- after two attempts, then invoice.sent after one (fatal).
    local function dead_store()
      local s = new_store()
      local clock = buzz.manual_clock(1700000000)
      local w = assert(buzz.new{ store = s.path, clock = clock,
                                 on_error = function() end })
      w:subscribe("order.paid", function(ev)
        error("card declined " .. ev.payload.n)
      end, { name = "billing", retry = { max = 2, base = 1, jitter = 0 } })
      w:subscribe("invoice.sent", function()
        error(buzz.fatal("no address"))
      end, { name = "billing-invoices", retry = 3 })
      s.paid = w:publish("order.paid", { n = 6 }, { key = "o-1" })
      w:drain()
      clock:advance(1)                 -- $DLQ.order.paid takes an id too
      s.sent = w:publish("invoice.sent", { n = 7 })
      w:drain()
      assert(w:flush())
      w:close()
      return s
    end

    it("lists dead letters, one a line, filtered like the bus", function()
      local s = dead_store()
      finally(s.remove)
      local status, out, err = run(s, "dlq")
      assert.are.equal(0, status, err)
      local ls = lines(out)
      assert.are.equal(2, #ls)
      assert.matches("^1  2023%-11%-14T22:13:21%.000Z  billing  exhausted  "
                     .. "order%.paid #" .. s.paid .. "  .*card declined 6$",
                     ls[1])
      assert.matches("^2  " .. TIME .. "  billing%-invoices  fatal  "
                     .. "invoice%.sent #" .. s.sent .. "  no address$", ls[2])
      status, out = run(s, "dlq --types 'invoice.*'")
      assert.are.equal(0, status)
      assert.are.equal(1, #lines(out))
      assert.matches("invoice.sent", out, 1, true)
      status, out = run(s, "dlq --subscription billing --limit 1 --json")
      assert.are.equal(0, status)
      local d = json_decode(lines(out)[1])
      assert.are.equal(1, d.id)
      assert.are.equal("billing", d.subscription)
      assert.are.equal(2, #d.attempts)
      assert.are.same({ n = 6 }, d.event.payload)
    end)

    it("shows one in full, with each attempt's traceback", function()
      local s = dead_store()
      finally(s.remove)
      local status, out, err = run(s, "dlq 1")
      assert.are.equal(0, status, err)
      assert.matches("dead letter     1\n", out, 1, true)
      assert.matches("subscription    billing (pattern order.paid)\n", out,
                     1, true)
      assert.matches("key             o-1\n", out, 1, true)
      assert.matches("attempt 1 at 2023-11-14T22:13:20.000Z\n", out, 1, true)
      assert.matches("attempt 2 at 2023-11-14T22:13:21.000Z\n", out, 1, true)
      assert.matches("stack traceback:", out, 1, true)
      status, out, err = run(s, "dlq 9")
      assert.are.equal(1, status)
      assert.are.equal("", out)
      assert.are.equal(("buzz: no dead letter 9 in %s\n"):format(s.path), err)
      local st2, _, err2 = run(s, "dlq x1")
      assert.are.equal(2, st2)
      assert.matches("bad dead letter id \"x1\"", err2, 1, true)
    end)
  end)

  describe("replay --publish", function()
    it("appends each matching event again as a new event of the type, "
       .. "keeping its payload, key, priority, correlation and headers",
       function()
      local s = new_store()
      finally(s.remove)
      local status, out, err = run(s, "replay --types 'order.*' --to 2 "
                                      .. "--publish order.replayed")
      assert.are.equal(0, status, err)
      assert.are.equal("published 2 events as order.replayed, #6 to #7\n",
                       out)
      local evs = stored(s)
      assert.equal(7, #evs)
      local a, b = evs[6], evs[7]
      assert.equal("order.replayed", a.type)
      assert.same({ n = 1 }, a.payload)
      assert.equal("k1", a.key)
      assert.equal("req-1", a.correlation_id)
      assert.same({ traceparent = "00-abc-01", tenant = "acme",
                    replay_of = "1" }, a.headers)
      assert.same({ n = 2 }, b.payload)
      assert.equal(7, b.key)
      assert.equal("high", b.priority)
      assert.equal("2", b.headers.replay_of)
      -- the application's subscribers to the type get them
      local app = assert(buzz.new{ store = s.path })
      local got = {}
      app:subscribe("order.replayed", function(ev)
        got[#got + 1] = ev.payload.n
      end, { durable = "again", start = "all" })
      app:drain()
      app:close()
      assert.same({ 1, 2 }, got)
    end)

    it("never feeds itself: a type its filter matches stops at the last "
       .. "event stored when it began", function()
      local s = new_store()
      finally(s.remove)
      local status, out, err = run(s, "replay --types 'order.>' "
                                      .. "--publish order.again --json")
      assert.are.equal(0, status, err)
      assert.are.equal('{"count":4,"first":6,"last":9}\n', out)
      assert.equal(9, #stored(s))
    end)

    it("refuses a bad type, --handler with it, and a locked store",
       function()
      local s = new_store()
      finally(s.remove)
      local status, out, err = run(s, "replay --publish 'a..b'")
      assert.are.equal(2, status)
      assert.are.equal("", out)
      assert.matches('bad type "a..b": has an empty token', err, 1, true)
      status, out, err = run(s, "replay --publish '$SYS.x'")
      assert.are.equal(2, status)
      assert.are.equal("", out)
      assert.matches("reserved for the engine", err, 1, true)
      status, out, err = run(s, "replay --publish a.b --handler h.lua")
      assert.are.equal(2, status)
      assert.are.equal("", out)
      assert.matches("give --handler or --publish, not both", err, 1, true)
      local writer = assert(buzz.new{ store = s.path })
      finally(function() writer:close() end)
      status, out, err = run(s, "replay --publish a.b")
      assert.are.equal(1, status)
      assert.are.equal("", out)
      assert.matches("cannot replay: .*locked by another writer %(pid "
                     .. require("buzz.core").pid() .. "%)", err)
      assert.equal(5, #stored(s))
    end)
  end)

  describe("redrive, discard and remove-consumer", function()
    local function dead_store()
      local s = new_store()
      local w = assert(buzz.new{ store = s.path, on_error = function() end })
      w:subscribe("order.paid", function() error("card declined") end,
                  { name = "billing2", retry = 1 })
      w:subscribe("invoice.sent", function() error("no address") end,
                  { name = "invoices", retry = 1 })
      s.paid = w:publish("order.paid", { n = 6 })
      s.sent = w:publish("invoice.sent", { n = 7 })
      w:drain()
      assert(w:flush())
      w:close()
      return s
    end

    it("redrive makes dead letters retries the application runs when it "
       .. "opens the store", function()
      local s = dead_store()
      finally(s.remove)
      local status, out, err = run(s, "redrive --subscription billing2")
      assert.are.equal(0, status, err)
      assert.matches("^1 dead letter to be delivered again", out)
      local app = assert(buzz.new{ store = s.path })
      assert.equal(1, #app:dead_letters())      -- invoices' stays
      local got
      app:subscribe("order.paid", function(ev) got = ev end,
                    { name = "billing2", retry = 1 })
      app:drain()
      assert.is_not_nil(got, "the redriven letter was not delivered")
      assert.equal(s.paid, got.id)
      assert.equal(1, got.attempt)
      assert.equal(1, got.redrives)
      app:close()
    end)

    it("discard removes dead letters; remove-consumer a position",
       function()
      local s = dead_store()
      finally(s.remove)
      local status, out, err = run(s, "discard --all")
      assert.are.equal(0, status, err)
      assert.are.equal("2 dead letters discarded\n", out)
      status, out, err = run(s, "remove-consumer billing")
      assert.are.equal(0, status, err)
      assert.are.equal("consumer billing removed\n", out)
      status, out, err = run(s, "remove-consumer nobody")
      assert.are.equal(1, status)
      assert.are.equal("", out)
      assert.matches("no durable consumer nobody", err, 1, true)
      local r = assert(buzz.new{ store = s.path, readonly = true })
      assert.equal(0, #r:dead_letters())
      assert.equal(0, #r:consumers())
      r:close()
      status, out, err = run(s, "discard")
      assert.are.equal(2, status)
      assert.are.equal("", out)
      assert.matches("name the dead letters", err, 1, true)
    end)

    it("are refused while another process is the writer, naming it",
       function()
      local s = dead_store()
      finally(s.remove)
      local writer = assert(buzz.new{ store = s.path })
      finally(function() writer:close() end)
      local status, out, err = run(s, "discard --all")
      assert.are.equal(1, status)
      assert.are.equal("", out)
      assert.matches("cannot discard: .*locked by another writer %(pid "
                     .. require("buzz.core").pid() .. "%)", err)
      assert.matches("call bus:discard from inside it", err, 1, true)
    end)
  end)

  describe("usage", function()
    it("prints the usage for help, --help and no command", function()
      for _, args in ipairs { "help", "--help", "", "ls -h" } do
        local status, out = sh(command(args) .. " 2>&1")
        assert.are.equal(0, status, args)
        assert.matches("^usage: buzz %[%-%-store FILE%] COMMAND", out)
        assert.matches("\n  replay ", out)
      end
    end)

    -- Arguments, and the line expected on stderr before the usage hint.
    local CASES = {
      { "frob", 'buzz: unknown command "frob"', "buzz" },
      { "ls --frob", "buzz: unknown option --frob", "buzz ls" },
      { "ls -x", "buzz: unknown option -x", "buzz ls" },
      { "ls --limit x", 'buzz: bad --limit "x": expected a positive '
                        .. "integer", "buzz ls" },
      { "ls --limit 0", 'buzz: bad --limit "0": expected a positive '
                        .. "integer", "buzz ls" },
      { "ls --from soon", 'buzz: bad --from "soon": expected an event id '
                          .. "or a UTC time", "buzz ls" },
      { "ls --types a..b", 'buzz: --types: bad pattern "a..b"', "buzz ls" },
      { "ls --json=yes", "buzz: --json takes no value", "buzz ls" },
      { "tail -n", "buzz: -n needs a value", "buzz tail" },
      { "tail --count -1", 'buzz: bad --count "-1"', "buzz tail" },
      { "show", "buzz: show needs an event id", "buzz show" },
      { "show one", 'buzz: bad event id "one"', "buzz show" },
      { "show 1 2", 'buzz: unexpected argument "2"', "buzz show" },
      { "stats --types x", "buzz: unknown option --types", "buzz stats" },
      { "replay", "buzz: replay needs --handler FILE.lua", "buzz replay" },
    }
    for _, case in ipairs(CASES) do
      it(("exits 2 with a hint for `buzz %s`"):format(case[1]), function()
        local s = new_store()
        finally(s.remove)
        local status, out, err = run(s, case[1])
        assert.are.equal(2, status, err)
        assert.are.equal("", out)
        local msgs = lines(err)
        assert.are.equal(2, #msgs, err)
        assert.are.equal(case[2], msgs[1]:sub(1, #case[2]))
        assert.matches("^usage: " .. case[3]:gsub("%p", "%%%0") .. " ",
                       msgs[2])
      end)
    end
  end)

  describe("a store it cannot read", function()
    it("exits 1 and names the default store when there is none", function()
      local dir = mktemp_dir()
      finally(function() remove_dir(dir) end)
      local status, out = sh(("cd %s && %s 2>&1"):format(quote(dir),
                                                        command("ls")))
      assert.are.equal(1, status, out)
      assert.are.equal("buzz: cannot open the store: ESTORE: events.db: "
                       .. "No such file or directory (name one with "
                       .. "--store FILE or $BUZZ_STORE)\n", out)
      status, out = sh(("cd %s && %s 2>&1")
                       :format(quote(dir),
                               command("stats", "BUZZ_STORE=other.db")))
      assert.are.equal(1, status, out)
      assert.matches("^buzz: cannot open the store: ESTORE: other%.db: ",
                     out)
      assert.is_nil(slurp(dir .. "/events.db"))
      assert.is_nil(slurp(dir .. "/other.db"))
    end)

    it("exits 1 when the file is not a buzz store", function()
      local dir = mktemp_dir()
      finally(function() remove_dir(dir) end)
      local text, empty = dir .. "/notes.txt", dir .. "/empty.db"
      spit(text, ("not a database\n"):rep(100))
      spit(empty, "")
      local status, out = sh(command("--store " .. quote(text) .. " ls")
                             .. " 2>&1")
      assert.are.equal(1, status, out)
      assert.are.equal(("buzz: cannot open the store: ESTORE: %s: file is "
                        .. "not a database\n"):format(text), out)
      status, out = sh(command("--store " .. quote(empty) .. " tail")
                       .. " 2>&1")
      assert.are.equal(1, status, out)
      assert.are.equal(("buzz: cannot open the store: ESTORE: %s is not a "
                        .. "buzz store\n"):format(empty), out)
    end)
  end)
end)

-- The tool's modules in this process (bin/buzz runs them in a child,
-- which the specs above see only through its output).
describe("buzz.cliargs and buzz.clitext", function()
  local args = require "buzz.cliargs"
  local text = require "buzz.clitext"

  -- The table a usage error or failure raises.
  local function raised(fn, ...)
    local ok, e = pcall(fn, ...)
    assert.is_false(ok)
    assert.are.equal("table", type(e))
    return e
  end

  it("parses a command, its options and words", function()
    local name, opts = args.parse{ "--store", "x.db", "ls", "--types",
                                   "order.*", "--from=2024-05-01",
                                   "--limit", "3", "--json" }
    assert.are.equal("ls", name)
    assert.are.equal("x.db", opts.store)
    assert.are.equal("order.*", opts.types)
    assert.are.same({ time = 1714521600 }, opts.from)
    assert.are.equal(3, opts.limit)
    assert.is_true(opts.json)
    name, opts = args.parse{ "tail", "-n5", "-f" }
    assert.are.equal("tail", name)
    assert.are.equal(5, opts.n)
    assert.is_true(opts.f)
    opts = select(2, args.parse{ "show", "42" })
    assert.are.same({ "42" }, opts.words)
    assert.are.equal("help", (args.parse{}))
    assert.are.equal("help", (args.parse{ "ls", "-h" }))
  end)

  it("raises usage errors that name the option and the command", function()
    local e = raised(args.parse, { "ls", "--frob" })
    assert.are.same({ exit = 2, msg = "unknown option --frob", cmd = "ls" },
                    e)
    e = raised(args.parse, { "ls", "--limit", "0" })
    assert.are.equal('bad --limit "0": expected a positive integer', e.msg)
    e = raised(args.parse, { "ls", "--types", "a..b" })
    assert.matches("^%-%-types: ", e.msg)
    e = raised(args.parse, { "ls", "--from", "May" })
    assert.matches("^bad %-%-from \"May\": expected an event id or a UTC "
                   .. "time", e.msg)
    e = raised(args.parse, { "frob" })
    assert.are.equal('unknown command "frob"', e.msg)
    e = raised(args.parse, { "stats", "--json=1" })
    assert.are.equal("--json takes no value", e.msg)
    assert.is_string(args.COMMANDS.replay.usage)
    assert.matches("^usage: buzz", args.USAGE)
  end)

  it("reads and writes UTC times", function()
    assert.are.equal(0, text.parse_time("1970-01-01"))
    assert.are.equal(1714566600, text.parse_time("2024-05-01T12:30:00Z"))
    assert.are.equal(1714566600.5, text.parse_time("2024-05-01 12:30:00.5"))
    assert.is_nil(text.parse_time("2024-13-01"))
    assert.is_nil(text.parse_time("2024-05-01T25:00"))
    assert.are.equal("2024-05-01T12:30:00.250Z",
                     text.iso_time(1714566600250))
  end)

  it("prints JSON with sorted keys and events in envelope order", function()
    assert.are.equal('{"a":1,"b":[true,null],"c":{"d":"x"}}',
                     text.encode{ c = { d = "x" }, b = { true, core.null },
                                  a = 1 })
    local t = {}
    t.self = t
    assert.matches("contains itself", raised(text.encode, t).msg)
    local ev = { payload = { n = 1 }, type = "a.b", id = 7, ts = 0,
                 key = "k 1", zeta = true }
    assert.are.equal('{"id":7,"type":"a.b","ts":0,"key":"k 1",'
                     .. '"payload":{"n":1},"zeta":true}', text.event_json(ev))
    assert.are.equal('7 1970-01-01T00:00:00.000Z a.b key="k 1" {"n":1}',
                     text.event_line(ev))
    assert.are.equal("7", text.key_text(7))
    assert.are.equal('"7"', text.key_text("7"))
    assert.are.equal("cust-7", text.key_text("cust-7"))
  end)

  it("cuts lines by UTF-8 columns and prints sizes", function()
    assert.are.equal("abc", text.cut("abc", 3))
    assert.are.equal("ab…", text.cut("abcd", 3))
    assert.are.equal("éé…", text.cut("éééé", 3))
    assert.are.equal("512 bytes", text.human_size(512))
    assert.are.equal("1.5 KiB (1536 bytes)", text.human_size(1536))
  end)

  it("fails with the API's message", function()
    assert.are.equal(5, text.checked(5))
    assert.are.same({ exit = 1, msg = "ESTORE: gone" },
                    raised(text.checked, nil, "ESTORE: gone"))
  end)
end)
