-- The layout (issue 14, "one concern per file"): every file of csrc/,
-- lua/buzz/ and bin/ stays within MAX_LINES lines, except the files
-- listed below, each with its reason; an exception that has come down to
-- the limit must be delisted (the list stays honest). README's layout
-- section names every file of csrc/ and lua/buzz/.
local read = H.read

local MAX_LINES = 600

-- path -> why it may be longer, for now.
local EXCEPTIONS = {
}

local DIRS = { "csrc", "lua/buzz", "bin" }

-- The names of the files in dir (not directories), sorted.
local function files_of(dir)
  local ok, out = H.sh(("find %s -maxdepth 1 -type f"):format(H.quote(dir)))
  assert(ok, out)
  local names = {}
  for path in out:gmatch("[^\n]+") do names[#names + 1] = path end
  table.sort(names)
  return names
end

local function line_count(path)
  local n = 0
  for _ in read(path):gmatch("\n") do n = n + 1 end
  return n
end

describe("layout", function()
  local all = {}
  for _, dir in ipairs(DIRS) do
    for _, path in ipairs(files_of(dir)) do all[#all + 1] = path end
  end

  it("finds the files it checks", function()
    assert.is_true(#all >= 40, ("found %d files"):format(#all))
    local set = {}
    for _, p in ipairs(all) do set[p] = true end
    assert.is_true(set["lua/buzz/init.lua"] and set["csrc/bus.c"]
                   and set["bin/buzz"])
  end)

  it("keeps every file within " .. MAX_LINES .. " lines, but the listed "
     .. "exceptions", function()
    local over = {}
    for _, path in ipairs(all) do
      local n = line_count(path)
      if n > MAX_LINES and not EXCEPTIONS[path] then
        over[#over + 1] = ("%s (%d lines)"):format(path, n)
      end
    end
    assert.same({}, over)
  end)

  it("lists only exceptions that are still over the limit and exist",
     function()
    local stale = {}
    for path, why in pairs(EXCEPTIONS) do
      assert.is_string(why)
      local f = io.open(path)
      if not f then
        stale[#stale + 1] = path .. " (gone)"
      else
        f:close()
        local n = line_count(path)
        if n <= MAX_LINES then
          stale[#stale + 1] = ("%s (%d lines: delist it)"):format(path, n)
        end
      end
    end
    table.sort(stale)
    assert.same({}, stale)
  end)

  it("names every file of csrc/ and lua/buzz/ in README's layout section",
     function()
    local readme = read("README.md")
    local section = readme:match("\n## Layout\n(.-)\n## ")
    assert.is_string(section, "README has no Layout section")
    local missing = {}
    for _, dir in ipairs { "csrc", "lua/buzz" } do
      for _, path in ipairs(files_of(dir)) do
        local name = path:match("[^/]+$")
        if not section:find("`" .. name .. "`", 1, true) then
          missing[#missing + 1] = path
        end
      end
    end
    assert.same({}, missing)
  end)

  -- DESIGN.md: delivery is pulled, and C never calls Lua (no handler, no
  -- reporter, no upcaster): Lua resumes its own threads (core:resume is
  -- a call Lua makes), so no lua_call or lua_pcall appears in csrc/.
  it("keeps calls into Lua out of the C core", function()
    local calls = {}
    for _, path in ipairs(files_of("csrc")) do
      local n = 0
      for line in read(path):gmatch("[^\n]+") do
        n = n + 1
        if line:find("lua_p?callk?%s*%(") then
          calls[#calls + 1] = ("%s:%d: %s"):format(path, n, line)
        end
      end
    end
    assert.same({}, calls)
  end)
end)
