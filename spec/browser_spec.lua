-- The dashboard in a real browser (#browser: make test-browser, which
-- installs Debian's chromium and playwright-core first). The driver,
-- tools/browser/dashboard.mjs, runs examples/live.lua, opens its page,
-- times a publish until the page shows it, kills the server and starts it
-- again on the same store, and prints the ids the page showed. Here they
-- are checked against the store: the page saw every event from its first
-- one on, in order, once each, across the restart.
local buzz = require "buzz"

local function has(cmd)
  return (H.sh("command -v " .. cmd .. " >/dev/null 2>&1")) == 0
end

describe("the dashboard in chromium #browser", function()
  it("shows an event within 1 s and resumes with no gap and no duplicate "
     .. "after the server restarts", function()
    local chromium = os.getenv("CHROMIUM") or "/usr/bin/chromium"
    if not (has("node") and io.open(chromium)
            and io.open("tools/browser/node_modules/playwright-core/"
                        .. "package.json")) then
      error("no browser here: run make test-browser, which installs "
            .. "chromium and playwright-core")
    end
    local dir = H.mktemp_dir()
    finally(function() H.remove_dir(dir) end)
    local store = dir .. "/live.db"
    local port = 20000 + math.random(0, 20000)
    local status, out = H.sh(("cd %s && node tools/browser/dashboard.mjs "
                              .. "%s %d %s %s 2>&1")
                             :format(H.quote(H.ROOT), H.lua, port,
                                     H.quote(store), H.quote(dir)))
    assert.equal(0, status, out)
    local line = out:match("(%b{})%s*$")
    assert.is_not_nil(line, out)
    local seen = require("buzz.core").json_decode(line)
    assert.is_true(seen.latency < 1000,
                   "shown " .. seen.latency .. " ms after its publish")
    assert.is_true(seen.opens >= 2, "the page did not reconnect: " .. line)
    assert.equal(0, seen.resets)
    assert.equal("live", seen.status)
    -- every stored event from the page's first on, in id order, once
    local bus = assert(buzz.new{ store = store, readonly = true })
    local want = {}
    for ev in bus:events{ from = seen.ids[1] } do
      want[#want + 1] = ev.id
    end
    bus:close()
    local shown = {}
    for i, id in ipairs(seen.ids) do shown[i] = id end
    while #want > #shown do want[#want] = nil end  -- published after the
    assert.same(want, shown)                        -- screenshot
    assert.is_true(#shown >= 5, line)
    local png = H.slurp(dir .. "/dashboard.png")
    assert.is_true(png and png:sub(2, 4) == "PNG", "no screenshot")
    local keep = os.getenv("BUZZ_SCREENSHOT")
    if keep then H.spit(keep, png) end
  end)
end)
