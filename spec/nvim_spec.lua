-- A real, headless Neovim (Debian's neovim: 0.7, LuaJIT, vim.loop) with
-- the example plugin examples/nvim on a bus driven by the editor's loop:
-- spec/nvim/script.lua writes a file (an autocommand publishes), fires a
-- User autocommand, asks for a reminder (a delayed event) and reports
-- what the plugin's log buffer holds. Neovim is LuaJIT, so it loads the
-- LuaJIT build whichever interpreter runs busted. A missing nvim fails:
-- tools/deps.sh installs it.

-- The checkout's absolute path (the spec runs from its root).
local function root()
  local status, out = H.sh(H.tool .. "pwd")
  assert(status == 0, out)
  return (out:gsub("\n$", ""))
end

-- Runs spec/nvim/script.lua in nvim; returns its exit status and the
-- lines of its report (out.txt), or nil and everything nvim printed.
local function run_editor(dir, script)
  local top = root()
  local cmd = ("%sBUZZ_ROOT=%s BUZZ_BUILD=%s BUZZ_DIR=%s timeout 20 "
               .. "nvim --headless --clean -n +%s 2>&1")
              :format(H.tool, H.quote(top), H.quote(top .. "/build/luajit"),
                      H.quote(dir),
                      H.quote("luafile " .. top .. "/spec/nvim/"
                              .. (script or "script.lua")))
  local status, out = H.sh(cmd)
  local report = H.slurp(dir .. "/out.txt")
  if not report then return status, nil, out end
  local lines = {}
  for l in report:gmatch("([^\n]*)\n") do lines[#lines + 1] = l end
  return status, lines, out
end

describe("Neovim", function()
  it("is installed (tools/deps.sh installs Debian's neovim)", function()
    local status, out = H.sh(H.tool .. "nvim --version 2>&1")
    assert.are.equal(0, status, "nvim is missing: run sh tools/deps.sh "
                                .. "(Debian's neovim) -- " .. out)
    assert.matches("^NVIM v0%.", out)
    assert.matches("LuaJIT", out, 1, true)
  end)

  it("has the LuaJIT build to load", function()
    assert.is_truthy(H.slurp("build/luajit/buzz/core.so"),
                     "build/luajit/buzz/core.so is missing: run make")
  end)

  it("runs the example plugin's handlers on the editor's loop: vim.api "
     .. "from handlers, autocommands publish, a delay fires", function()
    local dir = H.mktemp_dir()
    finally(function() H.remove_dir(dir) end)
    local status, lines, out = run_editor(dir)
    assert.is_truthy(lines, "nvim wrote no report (status "
                            .. tostring(status) .. "):\n" .. out)
    local report = table.concat(lines, "\n")
    assert.are.equal(0, status, report .. "\n" .. out)
    assert.are.same({
      -- the plugin's log buffer, written by its handlers with vim.api
      "log: written notes.txt (3 lines)",   -- BufWritePost published it
      "log: user BuzzDemoPing",             -- a User autocommand
      "log: reminder: stretch",             -- delayed 30 ms, on the loop
      -- no handler ran in a fast callback
      "handler: editor.written fast=false",
      "handler: editor.user fast=false",
      "handler: editor.reminder fast=false",
      "metrics: delivered 3",
      "status: ok",
    }, lines)
    assert.are.equal("one\ntwo\nthree\n", H.read(dir .. "/notes.txt"))
  end)

  it("serves HTTP on the editor's loop (a stream gets an event, /metrics "
     .. "answers), and a failure without on_error goes to vim.notify",
     function()
    local dir = H.mktemp_dir()
    finally(function() H.remove_dir(dir) end)
    local status, lines, out = run_editor(dir, "serve.lua")
    assert.is_truthy(lines, "nvim wrote no report (status "
                            .. tostring(status) .. "):\n" .. out)
    assert.are.same({ "stream: editor.saved nvim", "metrics: 200",
                      'notify ERROR: buzz: handler for "editor.broken" '
                      .. "failed on editor.broken #2: oops",
                      "status: ok" }, lines)
    assert.are.equal(0, status, out)
  end)
end)
