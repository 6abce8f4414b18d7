--- The rockspec: `luarocks make` builds buzz offline into a fresh tree, and
-- what it installs loads and works on its own, without the checkout.
--
-- The rock is built for Lua 5.4 under either busted flavour: the test shells
-- out to luarocks and lua5.4, so it does not depend on the interpreter
-- running busted. luarocks compiles in its working directory (csrc/*.o,
-- buzz/core.so), so it runs in a scratch copy of the checkout: nothing is
-- left in the working tree, and the two flavours may run at once.

local ROCKSPEC = "rockspec/buzz-scm-1.rockspec"
local LUA = "lua5.4"

local quote, mktemp_dir, remove_dir = H.quote, H.mktemp_dir, H.remove_dir

-- Runs a shell command; returns its exit status and its output, stdout and
-- stderr together.
local function sh(cmd)
  return H.sh(cmd .. " 2>&1")
end

-- Builds and installs the rock from a copy of the checkout into tree.
-- Returns luarocks's exit status and output.
local function install(scratch, tree)
  local src = scratch .. "/src"
  local status, out = sh(("mkdir %s && tar -cf - --exclude=./.git "
                          .. "--exclude=./build --exclude=./buzz "
                          .. "--exclude='*.o' . | tar -xf - -C %s")
                         :format(quote(src), quote(src)))
  assert(status == 0, "copying the checkout failed: " .. out)
  return sh(("cd %s && luarocks --lua-version=5.4 make --tree=%s %s")
            :format(quote(src), quote(tree), ROCKSPEC))
end

-- Runs a Lua file with lua5.4 from inside tree, with package paths that
-- reach only the tree and the system defaults.
local function run_installed(tree, file)
  local lpath = ("%s/share/lua/5.4/?.lua;%s/share/lua/5.4/?/init.lua;;")
                :format(tree, tree)
  local cpath = ("%s/lib/lua/5.4/?.so;;"):format(tree)
  return sh(("cd %s && env -u LUA_INIT -u LUA_INIT_5_4 "
             .. "LUA_PATH=%s LUA_PATH_5_4=%s LUA_CPATH=%s LUA_CPATH_5_4=%s "
             .. "%s %s")
            :format(quote(tree), quote(lpath), quote(lpath), quote(cpath),
                    quote(cpath), LUA, quote(file)))
end

local CHECK = [[
local buzz, where = require "buzz"
print("buzz: " .. where)
print("buzz.core: " .. package.searchpath("buzz.core", package.cpath))
local bus = buzz.new()
local got = {}
bus:subscribe("order.*", function(ev)
  got[#got + 1] = ev.type .. "=" .. ev.payload.n
end)
bus:publish("order.created", { n = 1 })
bus:publish("order.paid", { n = 2 }, { priority = "high" })
bus:publish("invoice.sent", { n = 3 })
print("drained " .. bus:drain() .. ": " .. table.concat(got, " "))
print("closed " .. bus:close())
]]

-- Writes a small store for the installed bin/buzz to read.
local WRITE = [[
local bus = require("buzz").new{ store = "events.db" }
bus:publish("order.created", { n = 1 }, { key = "k1" })
bus:publish("invoice.sent", { n = 3 })
bus:publish("order.paid", { n = 2 })
assert(bus:flush())
bus:close()
]]

-- Tagged #rock: make asan skips it (it tests packaging, and the preloaded
-- sanitizer runtime would abort the system tools it runs on their leaks).
describe("rockspec/buzz-scm-1.rockspec #rock", function()
  it("installs with luarocks make offline, and the installed buzz works",
     function()
    local scratch = mktemp_dir()
    finally(function() remove_dir(scratch) end)
    local tree = scratch .. "/tree"

    local status, out = install(scratch, tree)
    assert.are.equal(0, status, out)
    assert.matches("buzz scm-1 is now installed in " .. tree, out, 1, true)

    H.spit(tree .. "/check.lua", CHECK)
    status, out = run_installed(tree, tree .. "/check.lua")
    assert.are.equal(0, status, out)
    assert.are.equal(table.concat({
      "buzz: " .. tree .. "/share/lua/5.4/buzz/init.lua",
      "buzz.core: " .. tree .. "/lib/lua/5.4/buzz/core.so",
      "drained 2: order.paid=2 order.created=1",
      "closed 0",
      "",
    }, "\n"), out)
  end)

  it("runs examples/demo.lua against the installed rock", function()
    local scratch = mktemp_dir()
    finally(function() remove_dir(scratch) end)
    local tree = scratch .. "/tree"

    local status, out = install(scratch, tree)
    assert.are.equal(0, status, out)

    -- A copy outside the checkout, so the demo finds no build to prefer.
    status, out = sh(("mkdir %s/examples && cp examples/demo.lua %s/examples/")
                     :format(quote(tree), quote(tree)))
    assert.are.equal(0, status, out)
    status, out = run_installed(tree, tree .. "/examples/demo.lua")
    assert.are.equal(0, status, out)
    local last = "close() discarded 1 pending event; bus closed\n"
    assert.are.equal(last, out:sub(-#last), out)
  end)

  it("installs bin/buzz, which reads a store with the installed buzz",
     function()
    local scratch = mktemp_dir()
    finally(function() remove_dir(scratch) end)
    local tree = scratch .. "/tree"

    local status, out = install(scratch, tree)
    assert.are.equal(0, status, out)

    H.spit(tree .. "/write.lua", WRITE)
    status, out = run_installed(tree, tree .. "/write.lua")
    assert.are.equal(0, status, out)
    -- The wrapper LuaRocks writes finds the tree by itself: no paths.
    status, out = sh(("cd %s && env -u LUA_PATH -u LUA_PATH_5_4 "
                      .. "-u LUA_CPATH -u LUA_CPATH_5_4 %s/bin/buzz "
                      .. "--store events.db ls --types 'order.*'")
                     :format(quote(tree), quote(tree)))
    assert.are.equal(0, status, out)
    assert.matches("^1 %S+Z order%.created key=k1 {\"n\":1}\n"
                   .. "3 %S+Z order%.paid {\"n\":2}\n$", out)
  end)
end)

describe("rockspec/buzz-scm-1.rockspec's module list", function()
  -- LuaRocks' builtin backend copies all of lua/ whatever the list says,
  -- so an install cannot show a module missing from it: read the list.
  it("names every file of the Lua layer, and nothing that is not there",
     function()
    local listed = {}
    local entry = '%["(buzz[%w.]*)"%] = "(lua/[^"]+)"'
    for mod, file in H.read(ROCKSPEC):gmatch(entry) do listed[file] = mod end
    local p = assert(io.popen("ls lua/buzz/*.lua"))
    local files = {}
    for file in p:lines() do files[#files + 1] = file end
    p:close()
    assert.is_true(#files > 0)
    for _, file in ipairs(files) do
      local name = file:match("^lua/buzz/(.-)%.lua$")
      local mod = name == "init" and "buzz" or "buzz." .. name
      assert.equal(mod, listed[file], file .. " is not in the rockspec")
      listed[file] = nil
    end
    assert.same({}, listed)
  end)
end)
