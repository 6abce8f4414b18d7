--- The rockspec: `luarocks make` builds buzz offline into a fresh tree, for
-- Lua 5.4 and for LuaJIT, and what it installs loads and works from a clean
-- shell given only the environment `luarocks path` prints, as a user's
-- shell would be after `eval "$(luarocks path)"`.
--
-- Both rocks are built under either busted flavour: the test shells out to
-- luarocks, lua5.4 and luajit, so it does not depend on the interpreter
-- running busted. luarocks runs the Makefile in its working directory
-- (which builds under build/rock-core/), so it runs in a scratch copy of
-- the checkout: the two busted flavours may run at once.
-- Each rock is built once per run (lazy_setup) and shared by its tests.
--
-- LuaJIT is LuaRocks's Lua 5.1 told two things, as README says: run
-- luajit (lua_interpreter; it also names the interpreter in the bin/
-- wrapper) and compile against LuaJIT's headers (LUA_INCDIR). Without
-- them LuaRocks picks Debian's lua5.1, when installed, and its headers.
-- The scratch directory is HOME, so `luarocks config` writes that to a
-- scratch ~/.luarocks/config-5.1.lua and the user's own config is never
-- read or touched.

local ROCKSPEC = "rockspec/buzz-scm-1.rockspec"

local FLAVOURS = {
  { name = "Lua 5.4", version = "5.4", lua = "lua5.4" },
  { name = "LuaJIT", version = "5.1", lua = "luajit",
    config = { lua_interpreter = "luajit",
               ["variables.LUA_INCDIR"] = "/usr/include/luajit-2.1" } },
}

local quote, mktemp_dir, remove_dir = H.quote, H.mktemp_dir, H.remove_dir

-- Runs a shell command; returns its exit status and its output, stdout and
-- stderr together.
local function sh(cmd)
  return H.sh(cmd .. " 2>&1")
end

-- cmd in a clean shell: no variable of this process but PATH (to find
-- luarocks and the interpreters), and home as HOME. So no LUA_PATH,
-- LUA_INIT or LD_PRELOAD of busted's reaches it.
local function clean(home, cmd)
  return ("env -i PATH=%s HOME=%s sh -c %s")
         :format(quote(os.getenv("PATH")), quote(home), quote(cmd))
end

-- Configures LuaRocks for the flavour (in home), copies the checkout and
-- builds and installs the rock from the copy into tree. Returns luarocks's
-- exit status and output.
local function install(f, home, tree)
  local src = home .. "/src"
  local status, out = sh(("mkdir %s %s/.luarocks && tar -cf - "
                          .. "--exclude=./.git --exclude=./build "
                          .. "--exclude=./buzz --exclude='*.o' . "
                          .. "| tar -xf - -C %s")
                         :format(quote(src), quote(home), quote(src)))
  assert(status == 0, "copying the checkout failed: " .. out)
  local cmds = {}
  for _, key in ipairs { "lua_interpreter", "variables.LUA_INCDIR" } do
    local value = f.config and f.config[key]
    if value then
      cmds[#cmds + 1] = ("luarocks --lua-version=%s config %s %s")
                        :format(f.version, key, quote(value))
    end
  end
  cmds[#cmds + 1] = ("cd %s && luarocks --lua-version=%s make --tree=%s "
                     .. "--deps-mode=none %s")
                    :format(quote(src), f.version, quote(tree), ROCKSPEC)
  return sh(clean(home, table.concat(cmds, " && ")))
end

-- Runs cmd from inside tree in a clean shell that has evaluated what
-- `luarocks path --tree=tree` prints (LUA_PATH, LUA_CPATH and PATH).
local function in_tree(f, home, tree, cmd)
  return sh(clean(home, ('eval "$(luarocks --lua-version=%s path --tree=%s)"'
                         .. " && cd %s && %s")
                        :format(f.version, quote(tree), quote(tree), cmd)))
end

local CHECK = [[
local buzz = require "buzz"
print(jit and "LuaJIT" or _VERSION)
print("buzz: " .. package.searchpath("buzz", package.path))
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

-- The examples run against the installed rock, with the last line each
-- prints.
local EXAMPLES = {
  ["demo.lua"] = "close() discarded 1 pending event; bus closed\n",
  ["orchestrator.lua"] = "5 callbacks, 1 notification, 1 dead letter; "
                         .. "all checks passed\n",
}

-- Tagged #once: it builds both rocks whichever interpreter runs busted,
-- so make test runs it in its first pass only. Tagged #rock: make asan
-- skips it (it tests packaging, and the preloaded
-- sanitizer runtime would abort the system tools it runs on their leaks).
for _, f in ipairs(FLAVOURS) do
  describe(("rockspec/buzz-scm-1.rockspec for %s #rock #once")
           :format(f.name),
           function()
    local home, tree, status, out          -- set once, by lazy_setup
    local moddir = "/share/lua/" .. f.version
    local libdir = "/lib/lua/" .. f.version

    lazy_setup(function()
      home = mktemp_dir()
      tree = home .. "/tree"
      status, out = install(f, home, tree)
    end)
    lazy_teardown(function()
      if home then remove_dir(home) end
    end)

    it("installs with luarocks make offline, --deps-mode=none", function()
      assert.are.equal(0, status, out)
      assert.matches("buzz scm-1 is now installed in " .. tree, out, 1, true)
      if f.config then        -- compiled against LuaJIT's own headers
        assert.matches(" -I" .. f.config["variables.LUA_INCDIR"] .. " ", out,
                       1, true)
      end
    end)

    it("leaves nothing loadable in the source tree: the build is under "
       .. "build/", function()
      assert.are.equal(0, status, out)
      local st, found = sh(("cd %s/src && find . -path ./build -prune -o "
                            .. "\\( -name '*.so' -o -name '*.o' \\) -print")
                           :format(quote(home)))
      assert.are.equal(0, st, found)
      assert.are.equal("", found)
      assert.is_truthy(H.slurp(home .. "/src/build/rock-core/buzz/core.so"))
    end)

    it("loads from a clean shell with the luarocks path environment",
       function()
      assert.are.equal(0, status, out)
      H.spit(tree .. "/check.lua", CHECK)
      local st, got = in_tree(f, home, tree, f.lua .. " check.lua")
      assert.are.equal(0, st, got)
      assert.are.equal(table.concat({
        f.lua == "luajit" and "LuaJIT" or "Lua " .. f.version,
        "buzz: " .. tree .. moddir .. "/buzz/init.lua",
        "buzz.core: " .. tree .. libdir .. "/buzz/core.so",
        "drained 2: order.paid=2 order.created=1",
        "closed 0",
        "",
      }, "\n"), got)
    end)

    it("fails to load from a clean shell without that environment",
       function()
      -- The check above can fail: the tree is not found by default.
      assert.are.equal(0, status, out)
      H.spit(tree .. "/bare.lua", 'require "buzz"')
      local st, got = sh(clean(home, ("cd %s && %s bare.lua")
                                     :format(quote(tree), f.lua)))
      assert.are_not.equal(0, st, got)
      assert.matches("module 'buzz' not found", got, 1, true)
    end)

    it("runs the examples against the installed rock", function()
      assert.are.equal(0, status, out)
      -- Copies outside the checkout, so they find no build to prefer.
      local st, got = sh(("mkdir -p %s/examples && cp examples/demo.lua "
                          .. "examples/orchestrator.lua %s/examples/")
                         :format(quote(tree), quote(tree)))
      assert.are.equal(0, st, got)
      for file, last in pairs(EXAMPLES) do
        st, got = in_tree(f, home, tree, f.lua .. " examples/" .. file)
        assert.are.equal(0, st, got)
        assert.are.equal(last, got:sub(-#last), got)
      end
    end)

    it("installs bin/buzz for " .. f.lua .. ", on the PATH luarocks path "
       .. "gives, and it reads a store", function()
      assert.are.equal(0, status, out)
      -- The wrapper LuaRocks writes runs the flavour's interpreter. (With
      -- --deps-mode=none it names no tree: the environment finds it.)
      assert.matches("exec '[^']*/" .. f.lua .. "' ", H.read(tree
                     .. "/bin/buzz"))
      H.spit(tree .. "/write.lua", WRITE)
      local st, got = in_tree(f, home, tree, f.lua .. " write.lua")
      assert.are.equal(0, st, got)
      st, got = in_tree(f, home, tree, "command -v buzz && "
                        .. "buzz --store events.db ls --types 'order.*'")
      assert.are.equal(0, st, got)
      assert.matches("^" .. tree:gsub("%p", "%%%0") .. "/bin/buzz\n"
                     .. "1 %S+Z order%.created key=k1 {\"n\":1}\n"
                     .. "3 %S+Z order%.paid {\"n\":2}\n$", got)
    end)
  end)
end

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

describe("the release", function()
  it("has a versioned rockspec that differs from scm-1 only in its "
     .. "version and source", function()
    local scm = H.read(ROCKSPEC)
    local rel = H.read("rockspec/buzz-" .. require("buzz")._VERSION
                       .. "-1.rockspec")
    local function body(s)      -- from the description on: the same
      return s:match("\ndescription = {.*$")
    end
    assert.equal(body(scm), body(rel))
    assert.matches('\nversion = "' .. require("buzz")._VERSION:gsub("%.",
                                                                   "%%.")
                   .. '%-1"\n', rel)
    assert.matches('\nsource = {\n  url = "buzz%-[%d.]+%.tar%.gz",', rel)
  end)

  it("has a LICENSE (MIT, as the rockspec says) and a CHANGELOG entry "
     .. "for this version", function()
    assert.matches("^MIT License\n", H.read("LICENSE"))
    assert.matches('license = "MIT"', H.read(ROCKSPEC), 1, true)
    local log = H.read("CHANGELOG.md")
    assert.matches("\n## %[Unreleased%]\n", log)
    assert.matches("\n## %[" .. require("buzz")._VERSION:gsub("%.", "%%.")
                   .. "%] %- %d%d%d%d%-%d%d%-%d%d\n", log)
  end)

  it("says so when the core was built for the other interpreter",
     function()
    local other = H.flavour == "luajit" and "build/lua5.4" or "build/luajit"
    if not H.slurp(other .. "/buzz/core.so") then
      error(other .. "/buzz/core.so is missing: run make")
    end
    local ok, out = H.run(("package.cpath = %q .. package.cpath\n"
                           .. "require 'buzz'"):format(other .. "/?.so;"))
    assert.is_false(ok)
    assert.matches("undefined symbol", out, 1, true)
    assert.matches("this buzz/core.so was built for another Lua than this "
                   .. (jit and "LuaJIT" or "Lua 5.4"), out, 1, true)
  end)
end)
