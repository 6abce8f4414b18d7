--- Lua line coverage for make coverage (luacov is not in Debian).
--
-- spec/helper.lua loads this file when BUZZ_COVERAGE names a directory.
-- A debug.sethook line hook records which lines of lua/buzz/*.lua and
-- bin/buzz run in this process, and at busted's exit writes them to a file
-- of its own in that directory: one line per source file, "path<TAB>"
-- followed by the line numbers, comma-separated. tools/coverage.lua adds
-- up the files and divides by the executable lines luac5.4 lists.
--
-- Threads. Lua 5.4 keeps hook functions per thread: a thread made by
-- lua_newthread (coroutine.create, and the core's delivery pool in
-- csrc/lbuzz.c) inherits the hook mask but finds no function in the debug
-- library's hook table, so its lines would go unseen. Wrapping
-- coroutine.create would miss the core's threads, so instead the hook
-- table is served through the registry's __index: the first line a new
-- thread runs looks the table up, and the lookup enters that thread. It
-- runs inside the hook (hooks are off there). LuaJIT has one hook for all
-- threads; its compiler is turned off so that every line reaches it.
--
-- Not counted: child processes the specs start (H.run, bin/buzz, the
-- crash specs' children, nginx, Neovim).
local dir = assert(os.getenv("BUZZ_COVERAGE"), "BUZZ_COVERAGE is not set")

local getinfo, sethook, running = debug.getinfo, debug.sethook,
                                  coroutine.running
local hits = {}            -- source ("@lua/buzz/x.lua") -> { [line] = true }
local wanted = {}          -- source -> its hits table, or false

local function is_wanted(source)
  local path = source:match("^@%.?/?(.*)$")
  return path ~= nil and (path:match("^lua/buzz/[%w_]+%.lua$") ~= nil
                          or path == "bin/buzz")
end

local function hook(_, line)
  local source = getinfo(2, "S").source
  local t = wanted[source]
  if t == nil then
    t = is_wanted(source) and {} or false
    if t then hits[source:match("^@%.?/?(.*)$")] = t end
    wanted[source] = t
  end
  if t then t[line] = true end
end

if jit then
  jit.off()
  sethook(hook, "l")
else
  local registry = debug.getregistry()
  local hooks = setmetatable({}, { __mode = "k" })
  registry._HOOKKEY = nil               -- ldblib.c's HOOKKEY, served below
  setmetatable(registry, { __index = function(_, k)
    if k ~= "_HOOKKEY" then return nil end
    local co = running()
    if hooks[co] == nil then hooks[co] = hook end
    return hooks
  end })
  sethook(hook, "l")
end

local is_written = false

--- Writes what was hit to a fresh file in dir (once).
local function write()
  if is_written then return end
  is_written = true
  sethook()
  local name = ("%s/%d-%s-%d.hits"):format(dir, os.time(),
    tostring(hits):match("(%x+)$"), math.random(1, 1e9))
  local f = assert(io.open(name, "w"))
  for path, lines in pairs(hits) do
    local list = {}
    for l in pairs(lines) do list[#list + 1] = l end
    table.sort(list)
    f:write(path, "\t", table.concat(list, ","), "\n")
  end
  f:close()
end

local ok, busted = pcall(require, "busted")
if ok and type(busted) == "table" and busted.subscribe then
  busted.subscribe({ "exit" }, function()
    write()
    return nil, true
  end)
end
-- Without busted, or if it exits another way: at the state's close.
local sentinel = setmetatable({}, { __gc = write })
debug.getregistry()["buzz.coverage"] = sentinel
return write
