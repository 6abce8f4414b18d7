--- Filters: declarative conditions over an event, compiled once into a
-- Lua predicate.
--
-- buzz.where{ ["payload.status"] = "failed",
--             ["payload.tier"] = { "gold", "platinum" },
--             ["payload.cpu"] = { gte = 90 } }
-- holds when every field condition holds. A path names a field of the
-- event, dot-separated ("type", "key", "payload.host", "headers.tenant",
-- "payload.items.1"); a step through anything that is not a table finds
-- nothing (nil). A field condition is:
--   a string, number or boolean: equal to it;
--   an array of those: one of them;
--   a table of operators, all of which must hold: eq, ne, gt, gte, lt,
--     lte (numbers or strings; a value of another type fails), ["in"] and
--     not_in (arrays), exists (boolean), match (a Lua pattern, strings
--     only), ["not"] (any field condition);
--   a function of the value.
-- buzz.any(...), buzz.all(...) and buzz.negate(c) combine conditions,
-- predicates (functions of the event) and where-tables.
--
-- Every mistake is raised when the condition is made, never at the first
-- event. The predicate is generated Lua source, loaded once: constants
-- travel as upvalues, never as source text, so no value can inject code.
-- @module buzz.filter
local type, pairs, ipairs, tostring, setmetatable, getmetatable, select,
      load = type, pairs, ipairs, tostring, setmetatable, getmetatable,
      select, load
local concat, sort = table.concat, table.sort
local next, assert = next, assert

local M = {}

--- A compiled condition: test(ev) -> boolean. Calling it with a handler
--- decorates the handler: buzz.where{...}(fn) calls fn only for events the
--- condition holds for.
local Cond = { __name = "buzz.condition" }
Cond.__index = Cond

local OPERATORS = { "eq", "exists", "gt", "gte", "in", "lt", "lte", "match",
                    "ne", "not", "not_in" }

local KEYWORDS = {}
for w in ([[and break do else elseif end false for function goto if in
            local nil not or repeat return then true until while]])
         :gmatch("%a+") do
  KEYWORDS[w] = true
end

local util = require "buzz.util"
local core = require "buzz.core"
local quote = util.quote

local fail = util.fail

-- Splits "payload.items.1" into { "payload", "items", 1 }.
local function split_path(path, level)
  if type(path) ~= "string" then
    fail(level, "bad path %s: expected a string such as \"payload.status\"",
         quote(path))
  end
  local steps = util.steps(path)
  if steps == nil then
    fail(level, "bad path %q: has an empty step (write \"payload.status\","
         .. " not \"payload..status\" or \".status\")", path)
  end
  return steps
end

local function is_scalar(v)
  local t = type(v)
  return t == "string" or t == "boolean" or (t == "number" and v == v)
end

-- Is t a non-empty array (keys exactly 1..#t)?
local function is_array(t)
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  return n > 0 and n == #t
end

local function check_set(list, what, path, level)
  if type(list) ~= "table" or not is_array(list) then
    fail(level, "bad condition on %q: %s expects an array of values, got %s",
         path, what, quote(list))
  end
  local set = {}
  for _, v in ipairs(list) do
    if not is_scalar(v) then
      fail(level, "bad condition on %q: %s holds %s; only strings, numbers "
           .. "and booleans can be compared", path, what, quote(v))
    end
    set[v] = true
  end
  return set
end

local function check_bound(v, op, path, level)
  if type(v) == "string" or (type(v) == "number" and v == v) then return v end
  fail(level, "bad condition on %q: %s expects a number or a string, got %s",
       path, op, quote(v))
end


-- ------------------------------------------------------------ codegen

-- A code generator: source lines, and the constants they use (upvalues
-- K1, K2, ... of the generated chunk).
local function generator()
  return { lines = {}, consts = {}, nvar = 0,
           at = {},        -- path prefix -> the local holding its value
           is_table = {} } -- local -> the local saying it is a table
end

local function const(g, v)
  local n = #g.consts + 1
  g.consts[n] = v
  return "K" .. n
end

local function emit(g, s)
  g.lines[#g.lines + 1] = s
end

local function var(g)
  g.nvar = g.nvar + 1
  return "v" .. g.nvar
end

-- Emits code that leaves the value at path in a new local, nil when a step
-- is not a table; returns the local's name.
-- Paths that share a prefix share its locals: "payload" is read once for
-- "payload.status" and "payload.tier", and tested for a table once.
local function emit_path(g, steps)
  local parent, prefix = "ev", ""
  for i, step in ipairs(steps) do
    local index
    if type(step) == "string" and step:match("^[%a_][%w_]*$")
       and not KEYWORDS[step] then
      index = "." .. step
    else
      index = "[" .. const(g, step) .. "]"
    end
    prefix = prefix .. "\0" .. type(step):sub(1, 1) .. tostring(step)
    local v = g.at[prefix]
    if not v then
      v = var(g)
      if i == 1 then                   -- the event is always a table
        emit(g, ("local %s = ev%s"):format(v, index))
      else
        local t = g.is_table[parent]
        if not t then
          t = var(g)
          emit(g, ("local %s = type(%s) == 'table'"):format(t, parent))
          g.is_table[parent] = t
        end
        emit(g, ("local %s; if %s then %s = %s%s end")
                :format(v, t, v, parent, index))
      end
      g.at[prefix] = v
    end
    parent = v
  end
  return parent
end

local emit_field, compile_field

local unpack = table.unpack or unpack   -- luacheck: ignore (5.1's global)

-- Loads the generated function: "return function(<arg>) <lines> return
-- true end", its constants as upvalues K1, K2...
local function finish(g, arg)
  local head = { "local type, find = type, string.find" }
  for i = 1, #g.consts do
    head[#head + 1] = ("local K%d = select(%d, ...)"):format(i, i)
  end
  local src = concat(head, "\n") .. ("\nreturn function(%s)\n  "):format(arg)
              .. concat(g.lines, "\n  ") .. "\n  return true\nend\n"
  local chunk = assert(load(src, "=buzz.where", "t",
                            { type = type, string = string,
                              select = select }))
  return chunk(unpack(g.consts, 1, #g.consts))
end

-- Emits "if not (<expr>) then return false end".
local function emit_test(g, expr)
  emit(g, ("if not (%s) then return false end"):format(expr))
end

local function emit_operators(g, v, c, path, level)
  local ops = {}
  for k in pairs(c) do ops[#ops + 1] = k end
  sort(ops, function(a, b) return tostring(a) < tostring(b) end)
  for _, op in ipairs(ops) do
    local x = c[op]
    if op == "eq" or op == "ne" then
      if not is_scalar(x) then
        fail(level, "bad condition on %q: %s expects a string, number or "
             .. "boolean, got %s", path, op, quote(x))
      end
      emit_test(g, ("%s %s %s"):format(v, op == "eq" and "==" or "~=",
                                       const(g, x)))
    elseif op == "gt" or op == "gte" or op == "lt" or op == "lte" then
      local k = const(g, check_bound(x, op, path, level + 1))
      local sym = ({ gt = ">", gte = ">=", lt = "<", lte = "<=" })[op]
      emit_test(g, ("type(%s) == '%s' and %s %s %s")
                   :format(v, type(x), v, sym, k))
    elseif op == "in" or op == "not_in" then
      local k = const(g, check_set(x, op, path, level + 1))
      emit_test(g, ("%s%s[%s]"):format(op == "in" and "" or "not ", k, v))
    elseif op == "exists" then
      if type(x) ~= "boolean" then
        fail(level, "bad condition on %q: exists expects true or false, got "
             .. "%s", path, quote(x))
      end
      emit_test(g, ("%s %s nil"):format(v, x and "~=" or "=="))
    elseif op == "match" then
      if type(x) ~= "string" then
        fail(level, "bad condition on %q: match expects a Lua pattern "
             .. "string, got %s", path, quote(x))
      end
      emit_test(g, ("type(%s) == 'string' and find(%s, %s) ~= nil")
                   :format(v, v, const(g, x)))
    elseif op == "not" then
      local k = const(g, compile_field(x, path, level + 1))
      emit(g, ("if %s(%s) then return false end"):format(k, v))
    else
      fail(level, "unknown operator %s in the condition on %q (known: %s)",
           quote(op), path, concat(OPERATORS, ", "))
    end
  end
end

-- Emits the tests of field condition c on the value in local v.
function emit_field(g, v, c, path, level)
  if is_scalar(c) then
    emit_test(g, ("%s == %s"):format(v, const(g, c)))
  elseif type(c) == "function" then
    emit_test(g, ("%s(%s)"):format(const(g, c), v))
  elseif type(c) == "table" and getmetatable(c) == nil then
    if next(c) == nil then
      fail(level, "bad condition on %q: an empty table matches nothing; "
           .. "give a value, an array of values or operators such as "
           .. "{ gt = 10 }", path)
    end
    if is_array(c) then
      emit_test(g, ("%s[%s]"):format(const(g, check_set(c, "a set", path,
                                                        level + 1)), v))
    else
      emit_operators(g, v, c, path, level + 1)
    end
  else
    fail(level, "bad condition on %q: expected a value, an array of values, "
         .. "a table of operators or a function, got %s", path, quote(c))
  end
end

-- Compiles a where-table into a predicate.
local function compile_where(spec, level)
  local paths = {}
  for path in pairs(spec) do
    if type(path) ~= "string" then
      fail(level, "bad path %s in where{}: paths are strings such as "
           .. "\"payload.status\"", quote(path))
    end
    paths[#paths + 1] = path
  end
  if #paths == 0 then
    fail(level, "where{} needs at least one condition, such as "
         .. "{ [\"payload.status\"] = \"failed\" }")
  end
  sort(paths)                           -- generated code never uses pairs()
  local g = generator()
  for _, path in ipairs(paths) do
    local v = emit_path(g, split_path(path, level + 1))
    emit_field(g, v, spec[path], path, level + 1)
  end
  return finish(g, "ev")
end

-- Compiles a field condition into a function of the value (for "not").
function compile_field(c, path, level)
  local g = generator()
  emit_field(g, "v", c, path, level + 1)
  return finish(g, "v")
end


-- ------------------------------------------------------------ prefilter

-- The part of a where-table the core can test on the payload at dispatch,
-- before it builds the event or resumes a thread: clauses { steps under
-- the payload, op code, value } for the fields under "payload" whose
-- condition is values, sets or comparisons. The core only rejects with
-- it (see csrc/lprefilter.c); the compiled test still runs on
-- every event that gets through, so a clause left out costs nothing but
-- speed. nil when no field qualifies.
local OPS = core.prefilter_ops

local function plan_field(out, steps, c)
  local function add(op, v) out[#out + 1] = { steps, OPS[op], v } end
  if is_scalar(c) then return add("eq", c) end
  if type(c) ~= "table" or getmetatable(c) ~= nil then return end
  if is_array(c) then return add("in", check_set(c, "a set", "", 1)) end
  for op, x in pairs(c) do
    if op == "eq" or op == "ne" or op == "gt" or op == "gte" or op == "lt"
       or op == "lte" then
      add(op, x)
    elseif op == "in" or op == "not_in" then
      add(op, check_set(x, op, "", 1))
    elseif op == "exists" then
      add(x and "exists" or "absent", true)
    end                                -- match, not: Lua only
  end
end

local function plan_where(spec)
  local out = {}
  for path, c in pairs(spec) do
    local steps = util.steps(path)
    if steps[1] == "payload" then
      local under = {}
      for i = 2, #steps do under[i - 1] = steps[i] end
      plan_field(out, under, c)
    end
  end
  return out[1] and out or nil
end

--- The prefilter of a condition (a where-table or buzz.where/all of
--- them), or nil. Only for conditions predicate() has checked.
function M.plan(c)
  if type(c) == "table" and getmetatable(c) == nil then
    return plan_where(c)
  end
  if getmetatable(c) == Cond then return c.plan end
  return nil
end


-- ------------------------------------------------------------ the API

local function wrap(test, spec, plan)
  return setmetatable({ test = test, spec = spec, plan = plan }, Cond)
end

--- A predicate from a condition: a compiled condition, a where-table, or a
--- function of the event.
---@return function test(ev) -> boolean
local function predicate(c, level)
  if getmetatable(c) == Cond then return c.test end
  if type(c) == "function" then return c end
  if type(c) == "table" and getmetatable(c) == nil then
    return compile_where(c, level + 1)
  end
  fail(level, "bad condition: expected buzz.where{...}, a table of field "
       .. "conditions or a function(ev), got %s", quote(c))
end
M.predicate = predicate

--- The condition spec compiled: holds when every field condition does.
---@param spec table path -> field condition
---@return table condition
function M.where(spec)
  if type(spec) ~= "table" or getmetatable(spec) ~= nil then
    fail(2, "bad argument to buzz.where: expected a table such as "
         .. "{ [\"payload.status\"] = \"failed\" }, got %s", quote(spec))
  end
  local test = compile_where(spec, 3)
  return wrap(test, spec, plan_where(spec))
end

local function predicates(what, ...)
  local n = select("#", ...)
  if n == 0 then
    fail(3, "buzz.%s needs at least one condition", what)
  end
  local list = {}
  for i = 1, n do list[i] = predicate((select(i, ...)), 4) end
  return list, n
end

--- Holds when any of the conditions holds (tried in order).
function M.any(...)
  local list, n = predicates("any", ...)
  return wrap(function(ev)
    for i = 1, n do if list[i](ev) then return true end end
    return false
  end)
end

--- Holds when all of the conditions hold (tried in order).
function M.all(...)
  local list, n = predicates("all", ...)
  local plan = {}                      -- every part's clauses must hold
  for i = 1, n do
    for _, clause in ipairs(M.plan((select(i, ...))) or {}) do
      plan[#plan + 1] = clause
    end
  end
  return wrap(function(ev)
    for i = 1, n do if not list[i](ev) then return false end end
    return true
  end, nil, plan[1] and plan or nil)
end

--- Holds when c does not.
function M.negate(c)
  local test = predicate(c, 3)
  return wrap(function(ev) return not test(ev) end)
end

--- A condition from a predicate function of the event.
function M.filter(fn)
  if type(fn) ~= "function" then
    fail(2, "bad argument to buzz.filter: expected a function(ev) that "
         .. "returns true to keep the event, got %s", quote(fn))
  end
  return wrap(fn)
end

--- Decorates handler: it is called only for events the condition holds
--- for, and returns what the handler returns.
-- @local
function Cond:__call(handler)
  if type(handler) ~= "function" then
    fail(2, "a condition decorates a handler: buzz.where{...}(function(ev) "
         .. "... end), got %s", quote(handler))
  end
  local test = self.test
  return function(ev)
    if test(ev) then return handler(ev) end
  end
end

Cond.__tostring = function() return "buzz.condition" end

M.is_condition = function(v) return getmetatable(v) == Cond end

return M
