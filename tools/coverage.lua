--- The coverage report of make coverage (tools/coverage.sh runs it).
--
--   lua5.4 tools/coverage.lua C_INFO HITS_DIR OUT_DIR [MIN_C MIN_LUA]
--
-- C: line coverage of csrc/*.c from an lcov tracefile (its DA records).
-- Lua: the lines of lua/buzz/*.lua that spec/coverage.lua saw run (the
-- .hits files in HITS_DIR, from every busted run), over the executable
-- lines of each file: the lines luac5.4 -l -l gives an instruction, less
-- the implicit return a function ends with at its "end" when nothing else
-- is on that line (it runs only when the body falls off the end, which
-- many functions never do) and VARARGPREP (a vararg function's first
-- instruction, whose line the hook never reports).
--
-- Prints "C lines: NN.N%", "Lua lines: NN.N%" and a table per file; writes
-- the same to OUT_DIR/report.txt and each file's uncovered lines to
-- OUT_DIR/uncovered.txt. Exits 1 when a figure is below its minimum
-- (default 90 for C, 85 for Lua).
local c_info, hits_dir, out_dir = arg[1], arg[2], arg[3]
local min_c, min_lua = tonumber(arg[4] or 90), tonumber(arg[5] or 85)
if not (c_info and hits_dir and out_dir) then
  io.stderr:write("usage: lua5.4 tools/coverage.lua C_INFO HITS_DIR "
                  .. "OUT_DIR [MIN_C MIN_LUA]\n")
  os.exit(2)
end

local function lines_of(cmd)
  local p = assert(io.popen(cmd))
  local t = {}
  for l in p:lines() do t[#t + 1] = l end
  p:close()
  return t
end

local function cwd()
  return lines_of("pwd")[1]
end

-- ------------------------------------------------------------ C

--- file (relative to the checkout) -> { [line] = count }
local function read_lcov(path)
  local files, cur = {}, nil
  local root = cwd() .. "/"
  for l in io.lines(path) do
    local sf = l:match("^SF:(.*)$")
    if sf then
      if sf:sub(1, #root) == root then sf = sf:sub(#root + 1) end
      cur = files[sf] or {}
      files[sf] = cur
    else
      local line, count = l:match("^DA:(%d+),(%d+)")
      if line and cur then
        line = tonumber(line)
        cur[line] = (cur[line] or 0) + tonumber(count)
      end
    end
  end
  return files
end

-- ------------------------------------------------------------ Lua

--- The executable lines of a Lua file, as a set, from luac5.4's listing.
local function executable(path)
  local set, funcs, cur = {}, {}, nil
  for _, l in ipairs(lines_of("luac5.4 -p -l -l " .. path .. " 2>&1")) do
    local last = l:match("^%a+ <[^>]-:%d+,(%d+)>")
    if last then
      cur = { last = tonumber(last), code = {} }
      funcs[#funcs + 1] = cur
    else
      local line, op = l:match("^%s+%d+%s+%[(%d+)%]%s+([%u%d_]+)")
      if line and cur then cur.code[#cur.code + 1] = { tonumber(line), op } end
    end
  end
  assert(#funcs > 0, "luac5.4 could not list " .. path)
  for _, f in ipairs(funcs) do
    local n = #f.code
    for i, ins in ipairs(f.code) do
      local line, op = ins[1], ins[2]
      -- the implicit return; its line counts if other code is there
      local is_implicit = i == n and (op == "RETURN0" or op == "RETURN")
                          and (line == f.last or f.last == 0)
      -- VARARGPREP never reports its line: 5.4's hooks start after it
      if not is_implicit and op ~= "VARARGPREP" then set[line] = true end
    end
  end
  return set
end

--- path -> { [line] = true } from every .hits file in dir.
local function read_hits(dir)
  local hits = {}
  for _, name in ipairs(lines_of("ls " .. dir)) do
    if name:match("%.hits$") then
      for l in io.lines(dir .. "/" .. name) do
        local path, list = l:match("^(.-)\t(.*)$")
        if path then
          local t = hits[path] or {}
          hits[path] = t
          for n in list:gmatch("%d+") do t[tonumber(n)] = true end
        end
      end
    end
  end
  return hits
end

-- ------------------------------------------------------------ report

local report, uncovered = {}, {}

local function out(s)
  report[#report + 1] = s
  print(s)
end

--- Line ranges "12-15, 20" of the lines in set that are not in hit.
local function ranges(set, is_hit)
  local list = {}
  for l in pairs(set) do if not is_hit(l) then list[#list + 1] = l end end
  table.sort(list)
  local parts, i = {}, 1
  while i <= #list do
    local j = i
    while j < #list and list[j + 1] == list[j] + 1 do j = j + 1 end
    parts[#parts + 1] = i == j and tostring(list[i])
                        or ("%d-%d"):format(list[i], list[j])
    i = j + 1
  end
  return table.concat(parts, ", "), #list
end

--- Prints one table; returns the total percentage.
local function section(title, rows)
  local total, hit = 0, 0
  table.sort(rows, function(a, b) return a.path < b.path end)
  out(("%-28s %7s %7s %7s"):format(title, "lines", "hit", "cover"))
  for _, r in ipairs(rows) do
    total, hit = total + r.total, hit + r.hit
    out(("%-28s %7d %7d %6.1f%%"):format(r.path, r.total, r.hit,
                                         r.total > 0 and 100 * r.hit / r.total
                                         or 100))
    uncovered[#uncovered + 1] = ("%s: %s"):format(r.path, r.missed)
  end
  local pct = total > 0 and 100 * hit / total or 0
  out(("%-28s %7d %7d %6.1f%%"):format("total", total, hit, pct))
  out("")
  return pct
end

local c_rows = {}
for path, lines in pairs(read_lcov(c_info)) do
  if path:match("^csrc/[%w_]+%.c$") then
    local total, hit = 0, 0
    for _, count in pairs(lines) do
      total = total + 1
      if count > 0 then hit = hit + 1 end
    end
    local missed = ranges(lines, function(l) return lines[l] > 0 end)
    c_rows[#c_rows + 1] = { path = path, total = total, hit = hit,
                            missed = missed }
  end
end

local hits = read_hits(hits_dir)
local lua_rows = {}
for _, path in ipairs(lines_of("ls lua/buzz/*.lua")) do
  local set, seen = executable(path), hits[path] or {}
  local total, hit = 0, 0
  for l in pairs(set) do
    total = total + 1
    if seen[l] then hit = hit + 1 end
  end
  local missed = ranges(set, function(l) return seen[l] end)
  lua_rows[#lua_rows + 1] = { path = path, total = total, hit = hit,
                              missed = missed }
end

local c_pct = section("C (gcov)", c_rows)
local lua_pct = section("Lua (line hook)", lua_rows)
out(("C lines: %.1f%%"):format(c_pct))
out(("Lua lines: %.1f%%"):format(lua_pct))
out("(Lua: lines run in busted's own process; child processes such as "
    .. "bin/buzz, H.run, nginx and Neovim are not counted. C: every "
    .. "process that loaded the coverage build and exited.)")

local f = assert(io.open(out_dir .. "/report.txt", "w"))
f:write(table.concat(report, "\n"), "\n")
f:close()
f = assert(io.open(out_dir .. "/uncovered.txt", "w"))
f:write(table.concat(uncovered, "\n"), "\n")
f:close()

local ok = true
if c_pct < min_c then
  io.stderr:write(("coverage: C lines %.1f%% are below %g%%\n")
                  :format(c_pct, min_c))
  ok = false
end
if lua_pct < min_lua then
  io.stderr:write(("coverage: Lua lines %.1f%% are below %g%%\n")
                  :format(lua_pct, min_lua))
  ok = false
end
os.exit(ok and 0 or 1)
