-- csrc/json.c: Lua values to JSON text and back (payloads and headers of
-- the event store).
local core = require "buzz.core"

local encode, decode, null = core.json_encode, core.json_decode, core.null
local math_type = math.type          -- nil on LuaJIT: no integer subtype

local function noop() end

-- A table nested n levels deep: { { { ... } } }.
local function nest(n)
  local root = {}
  local t = root
  for _ = 2, n do
    t[1] = {}
    t = t[1]
  end
  return root
end

-- { value, exact JSON text }
local EXACT = {
  { nil,                   "null" },
  { null,                  "null" },
  { true,                  "true" },
  { false,                 "false" },
  { 0,                     "0" },
  { 42,                    "42" },
  { -7,                    "-7" },
  { 3.0,                   "3" },
  { 9.5,                   "9.5" },
  { 0.1,                   "0.1" },
  { 0.1 + 0.2,             "0.30000000000000004" },
  { 1 / 3,                 "0.3333333333333333" },
  { -1.5e-7,               "-1.5e-07" },
  { 1e300,                 "1e+300" },
  { 2^53,                  "9007199254740992" },
  { 2^53 - 1,              "9007199254740991" },
  { -(2^53 - 1),           "-9007199254740991" },
  { "",                    '""' },
  { "A-1",                 '"A-1"' },
  { "caf\195\169 /",       '"caf\195\169 /"' },
  { "q\"b\\n\nt\tr\rb\bf\f", [["q\"b\\n\nt\tr\rb\bf\f"]] },
  { "\1\31\127",           '"\\u0001\\u001f\127"' },
  { {},                    "{}" },
  { { 1, 2, 3 },           "[1,2,3]" },
  { { "x", null, true },   '["x",null,true]' },
  { { a = 1 },             '{"a":1}' },
  { { { {} } },            "[[{}]]" },
  { { a = { b = { "c" } } }, '{"a":{"b":["c"]}}' },
  { { ["two words"] = "" }, '{"two words":""}' },
}

describe("core.json_encode", function()
  for _, case in ipairs(EXACT) do
    local value, text = case[1], case[2]
    it(("writes %s as %s"):format(
         type(value) == "string" and ("%q"):format(value) or tostring(value),
         text), function()
      assert.equal(text, encode(value))
    end)
  end

  it("writes a typical payload with every member once", function()
    local text = encode{ order = 42, sku = "A-1", qty = 3, price = 9.5,
                         tags = { "x", "y" } }
    assert.equal(#('{"order":42,"sku":"A-1","qty":3,"price":9.5,'
                   .. '"tags":["x","y"]}'), #text)
    for _, member in ipairs{ '"order":42', '"sku":"A-1"', '"qty":3',
                             '"price":9.5', '"tags":["x","y"]' } do
      assert.truthy(text:find(member, 1, true), member)
    end
  end)

  it("writes negative zero as -0", function()
    local negz = -0.0
    if 1 / negz == -math.huge then assert.equal("-0", encode(negz)) end
  end)

  it("writes a table met twice as two copies (only cycles are refused)",
     function()
    local shared = { 1 }
    local text = encode{ list = { shared, shared } }
    assert.equal('{"list":[[1],[1]]}', text)
  end)

  it("writes 1000 levels of nesting", function()
    local text = assert(encode(nest(1000)))
    assert.equal(("["):rep(999) .. "{}" .. ("]"):rep(999), text)
  end)

  it("writes 1000 levels with little C stack (1 MiB), on both interpreters",
     function()
    -- A luaL_Buffer (8 KiB on LuaJIT) in each level's frame once took
    -- 8 MiB for 1000 levels, and LuaJIT crashed with a smaller stack.
    local ok, out = H.run([[
      local t = {}
      for _ = 1, 999 do t = { t } end
      local text = assert(require("buzz.core").json_encode(t))
      print(#text)
    ]], "ulimit -s 1024;")
    assert.is_true(ok, out)
    assert.equal("2000\n", out)
  end)

  it("ignores metatables", function()
    local t = setmetatable({ a = 1 }, { __index = function() return 2 end,
                                        __pairs = error })
    assert.equal('{"a":1}', encode(t))
  end)

  it("raises on misuse", function()
    assert.has_error(function() encode() end)
    local ok, err = pcall(encode, {}, -1)
    assert.is_false(ok)
    assert.matches("bad argument #2 to '.*' %(max must be >= 0 bytes "
                   .. "%(0 = no limit%)%)", err)
  end)
end)

-- { name, value, message after "EINVAL: " }
local REFUSED = {
  { "a function", { items = { {}, {}, { cb = noop } } },
    "value.items[3].cb: functions cannot be encoded as JSON" },
  { "a function at the root", noop,
    "value: functions cannot be encoded as JSON" },
  { "userdata", { f = io.stdout },
    "value.f: userdata cannot be encoded as JSON" },
  { "a thread", { ["two words"] = { co = coroutine.create(noop) } },
    'value["two words"].co: threads cannot be encoded as JSON' },
  { "NaN", { x = 0 / 0 }, "value.x: NaN cannot be encoded as JSON" },
  { "inf", { 1, math.huge }, "value[2]: inf cannot be encoded as JSON" },
  { "-inf", -math.huge, "value: -inf cannot be encoded as JSON" },
  { "a string with a NUL byte", { s = "a\0b" },
    "value.s: strings with a NUL byte cannot be encoded as JSON "
    .. "(encode binary data as base64 or hex)" },
  { "a key with a NUL byte", { ["a\0b"] = 1 },
    'value["a\\u0000b"]: keys with a NUL byte cannot be encoded as JSON' },
  { "a table with integer and string keys", { { 1, x = 1 } },
    'value[1]: table mixes integer keys ([1]) and string keys (["x"]); '
    .. "JSON would lose keys" },
  { "an array with a hole", { list = { 1, nil, 3 } },
    "value.list: array has a hole: [2] is missing (use null to fill holes)" },
  { "an array without its first item", { [2] = "b" },
    "value: array has a hole: [1] is missing (use null to fill holes)" },
  { "a boolean key", { [true] = 1 },
    "value: table has key true; JSON keys must be strings, array "
    .. "indexes 1..n" },
  { "a float key", { [1.5] = 1 },
    "value: table has key 1.5; JSON keys must be strings, array "
    .. "indexes 1..n" },
  { "key 0", { [0] = "zero", "one" },
    "value: table has key 0; JSON keys must be strings, array "
    .. "indexes 1..n" },
  { "a negative key", { [-1] = 1 },
    "value: table has key -1; JSON keys must be strings, array "
    .. "indexes 1..n" },
  { "a table key", { [{}] = 1 },
    "value: table has a table key; JSON keys must be strings, array "
    .. "indexes 1..n" },
}

describe("core.json_encode refuses", function()
  for _, case in ipairs(REFUSED) do
    it(case[1] .. ", naming its path", function()
      local text, err, code = encode(case[2])
      assert.is_nil(text)
      assert.equal("EINVAL: " .. case[3], err)
      assert.equal("EINVAL", code)
    end)
  end

  it("integers beyond 2^53 - 1, suggesting a string", function()
    if not math_type then return end      -- LuaJIT: 2^53 is a double
    for _, n in ipairs{ math.maxinteger, math.mininteger,
                        math.tointeger(2^53), -math.tointeger(2^53) } do
      local text, err = encode{ id = n }
      assert.is_nil(text)
      assert.equal(("EINVAL: value.id: integer %d is beyond 2^53 - 1, "
                    .. "which JSON readers cannot hold exactly; send it as "
                    .. "a string"):format(n), err)
    end
  end)

  it("a table that contains itself", function()
    local t = {}
    t.self = t
    local _, err = encode(t)
    assert.equal("EINVAL: value.self: table refers to itself "
                 .. "(cycle back to value)", err)
    local a = { b = { c = {} } }
    a.b.c.d = { a.b }
    _, err = encode{ a = a }
    assert.equal("EINVAL: value.a.b.c.d[1]: table refers to itself "
                 .. "(cycle back to value.a.b)", err)
  end)

  it("nesting deeper than 1000 levels, eliding the middle of the path",
     function()
    local _, err, code = encode(nest(1001))
    assert.equal("EINVAL", code)
    assert.equal("EINVAL: value" .. ("[1]"):rep(6) .. "..." .. ("[1]"):rep(6)
                 .. ": tables nest deeper than 1000 levels", err)
  end)

  it("writing keys that are not identifiers in brackets, cut when long",
     function()
    local cases = {
      { "_ok1", "value._ok1" },
      { "1a", 'value["1a"]' },
      { 'say "hi"\n', 'value["say \\"hi\\"\\n"]' },
      { ("k"):rep(40), 'value["' .. ("k"):rep(32) .. '..."]' },
    }
    for _, case in ipairs(cases) do
      local _, err = encode{ [case[1]] = noop }
      assert.equal("EINVAL: " .. case[2]
                   .. ": functions cannot be encoded as JSON", err)
    end
  end)
end)

describe("core.json_encode with a limit", function()
  local value = { ("x"):rep(100) }           -- 104 bytes as JSON

  it("refuses text longer than max bytes with ETOOBIG", function()
    local text, err, code = encode(value, 50)
    assert.is_nil(text)
    assert.equal("ETOOBIG: value is above the limit of 50 bytes as JSON "
                 .. "(encoding stopped at 104 bytes)", err)
    assert.equal("ETOOBIG", code)
    assert.is_nil(encode(value, 103))
  end)

  it("accepts text of exactly max bytes, and 0 means no limit", function()
    assert.equal(104, #encode(value, 104))
    assert.equal(104, #encode(value, 0))
  end)

  it("reports a refused value met before the limit is passed", function()
    local _, _, code = encode({ "x", noop, ("x"):rep(100) }, 10)
    assert.equal("EINVAL", code)
  end)

  it("stops at the limit: what comes after it is not looked at", function()
    local _, err, code = encode({ ("x"):rep(100), noop }, 10)
    assert.equal("ETOOBIG", code)
    assert.matches("stopped at 104 bytes", err, 1, true)
  end)

  -- A table that holds the same table twice, n levels deep: 2^n leaves,
  -- gigabytes of JSON from a few hundred bytes of Lua. Encoding used to
  -- build the whole cJSON tree before it looked at the size: 23 levels
  -- took 13 s and 1.3 GB to be refused, 30 would exhaust memory. A child
  -- encodes them (its peak memory is its own) and reports the outcome
  -- and its peak resident set (VmHWM, kB) from /proc.
  it("refuses tables that double at each of 23 and 30 levels early, "
     .. "with little memory", function()
    local ok, out = H.run([[
      local core = require "buzz.core"
      for _, levels in ipairs { 23, 30 } do
        local t = {}
        for _ = 1, levels do t = { t, t } end
        local text, err, code = core.json_encode(t, 1048576)
        print(levels, tostring(text), code, err)
      end
      local status = io.open("/proc/self/status"):read("*a")
      print("VmHWM", status:match("VmHWM:%s*(%d+) kB"))
    ]])
    assert(ok, out)
    for _, levels in ipairs { 23, 30 } do
      assert.matches(levels .. "\tnil\tETOOBIG\tETOOBIG: value is above "
                     .. "the limit of 1048576 bytes as JSON", out, 1, true)
    end
    local hwm = tonumber(out:match("VmHWM\t(%d+)"))
    -- generous: about 40 MB here (the cJSON tree of 1 MiB of text), more
    -- under the sanitizers; without the bound 1.3 GB for 23 levels alone
    assert.is_true(hwm < 400 * 1024, ("peak RSS %d kB"):format(hwm))
  end)

  it("refuses nesting past 1000 levels without walking the rest", function()
    local _, err, code = encode(nest(20000), 1048576)
    assert.equal("EINVAL", code)
    assert.matches("tables nest deeper than 1000 levels", err, 1, true)
  end)
end)

-- Values that must come back equal.
local ROUND_TRIP = {
  { "an empty string",        "" },
  { "UTF-8 text",             "\230\151\165\230\156\172 \226\156\147 "
                              .. "caf\195\169" },
  { "every control byte",     (function()
                                 local b = {}
                                 for i = 1, 31 do b[i] = string.char(i) end
                                 return table.concat(b)
                               end)() },
  { "bytes that are not UTF-8", "\128\255\254 \192" },
  { "quotes and backslashes", [[\"\\"/\u0000\n]] },
  { "the largest safe integers", { 2^53 - 1, -(2^53 - 1) } },
  { "floats",                 { 0.1, 1e300, -1e-300, 5e-324,
                                1.7976931348623157e308, math.pi, 2^60,
                                -2^53, 123456.789 } },
  { "a typical payload",      { order = 42, sku = "A-1", qty = 3,
                                price = 9.5, tags = { "x", "y" } } },
  { "nested arrays and objects", { a = { { b = { 1, { c = "d" } } }, {} },
                                   e = { f = { g = { true, false } } } } },
  { "null in arrays",         { null, 1, null } },
  { "a long string (more than the 1 KiB print buffer)",
                              { s = ("0123456789"):rep(1000) } },
}

describe("core.json_encode's count of the text", function()
  -- The limit is checked on a running count of the text, as it is
  -- built: it must be exact, or a value at the limit is refused (or one
  -- above it let through).
  local cases = {}
  for _, c in ipairs(EXACT) do cases[#cases + 1] = { c[2], c[1] } end
  for _, c in ipairs(ROUND_TRIP) do cases[#cases + 1] = c end
  it("is exact, so a value fits a limit of its own length", function()
    for _, case in ipairs(cases) do
      local text = assert(encode(case[2]))
      assert.equal(text, encode(case[2], #text), case[1])
      if #text > 1 then
        local _, _, code = encode(case[2], #text - 1)
        assert.equal("ETOOBIG", code, case[1])
      end
    end
  end)
end)

describe("core.json_decode(core.json_encode(v))", function()
  for _, case in ipairs(ROUND_TRIP) do
    it("gives back " .. case[1], function()
      local text = assert(encode(case[2]))
      assert.same(case[2], decode(text))
    end)
  end

  it("keeps integers integers and floats floats", function()
    if not math_type then return end
    for _, n in ipairs{ 0, 42, -7, 2^53 - 1 } do
      local i = math.tointeger(n)
      assert.equal("integer", math_type(decode(encode(i))))
    end
    for _, f in ipairs{ 9.5, 0.1, 1e300, 2^53, 2^60 } do
      assert.equal("float", math_type(decode(encode(f))))
    end
  end)

  it("keeps negative zero", function()
    local negz = -0.0
    if 1 / negz ~= -math.huge then return end
    assert.equal(-math.huge, 1 / decode(encode(negz)))
  end)

  it("gives back 1000 levels of nesting", function()
    assert.same(nest(1000), decode(encode(nest(1000))))
  end)
end)

describe("core.json_decode", function()
  it("makes objects tables and arrays sequences", function()
    local v = decode(' {"a": [1, "two", {"b": true}], "c": {}, "d": []} ')
    assert.same({ a = { 1, "two", { b = true } }, c = {}, d = {} }, v)
  end)

  it("gives nil for null at the root", function()
    assert.equal(1, select("#", decode("null")))
    assert.is_nil(decode("null"))
  end)

  it("gives core.null inside arrays, so their length stays", function()
    local v = decode("[1,null,3]")
    assert.equal(3, #v)
    assert.equal(null, v[2])
    assert.equal("[1,null,3]", encode(v))
  end)

  it("leaves null members out of objects", function()
    local v = decode('{"a":null,"b":1}')
    assert.same({ b = 1 }, v)
    assert.same({}, decode('{"a":1,"a":null}'))
    assert.same({ a = 2 }, decode('{"a":1,"a":2}'))
  end)

  it("decodes escapes and surrogate pairs to UTF-8", function()
    assert.equal("\195\169\n\"\\/\t", decode([["\u00e9\n\"\\\/\t"]]))
    assert.equal("\240\159\152\128", decode([["\ud83d\ude00"]]))
  end)

  -- { text, value, Lua 5.4 subtype }
  local NUMBERS = {
    { "42",                42,     "integer" },
    { "-7",                -7,     "integer" },
    { "4.2e1",             42,     "integer" },   -- integral: an integer
    { "1.5",               1.5,    "float" },
    { "9007199254740991",  2^53 - 1, "integer" },
    { "9007199254740992",  2^53,   "float" },     -- may have been 2^53 + 1
    { "9007199254740993",  2^53,   "float" },
    { "1e300",             1e300,  "float" },
  }
  for _, case in ipairs(NUMBERS) do
    it(("reads %s as the %s %s"):format(case[1], case[3], case[2]), function()
      local v = decode(case[1])
      assert.equal(case[2], v)
      if math_type then assert.equal(case[3], math_type(v)) end
    end)
  end

  -- { text, message after "EINVAL: invalid JSON" }
  local BAD = {
    { "",          ": the text is empty" },
    { " \n\t",     ": the text is empty" },
    { "nul",       " at byte offset 0 near 'nul': syntax error" },
    { "[1,x]",     " at byte offset 3 near 'x]': syntax error" },
    { '{"a" 1}',   " at byte offset 5 near '1}': syntax error" },
    { "[1,2",      " at byte offset 3 near '2': syntax error, or the text "
                   .. "is cut short" },
    { "[1] x",     " at byte offset 4 near 'x': unexpected text after the "
                   .. "value" },
    { "1e",        " at byte offset 1 near 'e': unexpected text after the "
                   .. "value" },
    { "[1]\0",     " at byte offset 3 near '\\x00': unexpected text after "
                   .. "the value" },
    { '"\\ud800"', " at byte offset 1 near '\\ud800\"': syntax error" },
    { '["a\\u0000b"]', " at byte offset 3 near '\\u0000b\"]': strings with "
                   .. "\\u0000 (NUL) are not supported" },
    { "1e400",     ": a number is out of range (beyond +-1.8e308)" },
    { ("["):rep(1001) .. ("]"):rep(1001),
                   " at byte offset 1000 near '[]]]]]]]]]]]...': arrays "
                   .. "and objects nest deeper than 1000 levels" },
  }
  for _, case in ipairs(BAD) do
    it(("refuses %q with the byte offset"):format(case[1]:sub(1, 12)),
       function()
      local v, err, code = decode(case[1])
      assert.is_nil(v)
      assert.equal("EINVAL: invalid JSON" .. case[2], err)
      assert.equal("EINVAL", code)
    end)
  end

  it("reads an escaped backslash before u0000 as text", function()
    assert.equal("\\u0000", decode([["\\u0000"]]))
  end)

  it("raises on misuse", function()
    assert.has_error(function() decode() end)
    assert.has_error(function() decode({}) end)
  end)
end)

-- jsondec.c reads plain texts itself and leaves the rest to cJSON. An
-- escaped member ("\u0041") sends a text to cJSON, so wrapping the same
-- value as {"v": value} and {"v": value, "~": "\u0041"} reads it both
-- ways; the two must agree on every value and on every number's subtype.
describe("core.json_decode's reader of plain texts", function()
  local function same(a, b, path)
    if type(a) ~= type(b) then
      return false, ("%s: %s vs %s"):format(path, type(a), type(b))
    end
    if type(a) ~= "table" then
      if a ~= a and b ~= b then return true end
      if a ~= b or (math_type and math_type(a) ~= math_type(b))
         or (a == 0 and 1 / a ~= 1 / b) then
        return false, ("%s: %s vs %s"):format(path, tostring(a), tostring(b))
      end
      return true
    end
    for k, v in pairs(a) do
      local ok, why = same(v, b[k], path .. "." .. tostring(k))
      if not ok then return false, why end
    end
    for k in pairs(b) do
      if a[k] == nil then return false, path .. "." .. tostring(k) end
    end
    return true
  end

  local function both(text)
    local fast, e1 = decode('{"v":' .. text .. '}')
    local slow, e2 = decode('{"v":' .. text .. ',"~":"\\u0041"}')
    assert(slow == nil or slow["~"] == "A")
    if slow then slow["~"] = nil end
    return fast, slow, e1, e2
  end

  local EDGES = {
    "0", "-1", "7", "123456789012345", "-123456789012345",
    "1234567890123456", "9007199254740991", "9007199254740993", "-0",
    "0.5", "1e2", "1E2", "-0.0", "01", "-01", "00", '"plain"', '""',
    '"a\\"b"', '"tab\tin"', '"é ü"', "true", "false", "null",
    "[]", "{}", "[null]", "[1,null,3]", '{"a":null}', '{"a":1,"a":2}',
    '{"a":null,"a":1}', '{"a":1,"a":null}', ' [ 1 , { "b" : [ ] } ] ',
    '{"n":1,"sku":"A-1","qty":3}', ("["):rep(40) .. ("]"):rep(40),
    "[1,]", '{"a":1,}', "[1 2]", '{"a" 1}', "tru", "nul", "[", "-",
  }
  for _, text in ipairs(EDGES) do
    it(("agrees with cJSON on %q"):format(text:sub(1, 30)), function()
      local fast, slow, e1, e2 = both(text)
      assert.equal(e2 ~= nil, e1 ~= nil)     -- both refuse, or neither
      if fast ~= nil then assert(same(fast, slow, "v")) end
    end)
  end

  it("agrees with cJSON on 3,000 random texts", function()
    local seed = 20261206
    local function rand(n)                       -- deterministic, 1..n
      seed = (seed * 1103515245 + 12345) % 2147483648
      return seed % n + 1
    end
    local WORDS = { '"k"', '"sku"', '""', '"\\n"', '"x y"', '"\\u00e9"' }
    local NUMS = { "0", "-0", "5", "-42", "1.5", "1e3", "999999999999999",
                   "9999999999999999", "-9007199254740991", "12" }
    local function value(depth)
      local r = rand(depth > 3 and 4 or 7)
      if r == 1 then return NUMS[rand(#NUMS)]
      elseif r == 2 then return WORDS[rand(#WORDS)]
      elseif r == 3 then return ({ "true", "false", "null" })[rand(3)]
      elseif r == 4 then return tostring(rand(1000) - 500)
      elseif r <= 6 then
        local parts = {}
        for i = 1, rand(5) - 1 do parts[i] = value(depth + 1) end
        return "[" .. table.concat(parts, rand(2) == 1 and "," or " , ")
               .. "]"
      end
      local parts = {}
      for i = 1, rand(5) - 1 do
        parts[i] = WORDS[rand(#WORDS)] .. ":" .. value(depth + 1)
      end
      return "{" .. table.concat(parts, ",") .. "}"
    end
    for i = 1, 3000 do
      local text = value(0)
      local fast, slow = both(text)
      assert(slow ~= nil, text)
      local ok, why = same(fast, slow, "v")
      assert(ok, ("text %d %s: %s"):format(i, text, why))
    end
  end)
end)

describe("core.json_encode and json_decode under the collector", function()
  -- A finalizer may run inside a call, when that call allocates. It must
  -- not reuse the memory the call is working with.
  local function inside_json()
    for level = 3, 10 do
      local info = debug.getinfo(level, "f")
      if not info then return false end
      if info.func == encode or info.func == decode then return true end
    end
    return false
  end

  -- Makes garbage that runs fn when collected (LuaJIT: only userdata).
  local function garbage(fn)
    if newproxy then
      getmetatable(newproxy(true)).__gc = fn
    else
      setmetatable({}, { __gc = fn })
    end
  end

  it("survives finalizers that encode and decode during a call", function()
    local nested, wrong = 0, 0
    local function finalizer()
      if inside_json() then nested = nested + 1 end
      local text = encode{ a = { 1, 2 } }
      if text ~= '{"a":[1,2]}' or decode(text).a[2] ~= 2 then
        wrong = wrong + 1
      end
    end
    local payload = {}    -- escapes: decoded by cJSON, so through the box
    for i = 1, 200 do payload[i] = { id = i, name = "item\t" .. i } end
    local text = encode(payload)
    -- An eager collector (a new cycle as soon as one ends, big steps), so
    -- that finalizers run inside calls whatever else made garbage before
    -- (the coverage build's line hook does).
    local pause = collectgarbage("setpause", 100)
    local stepmul = collectgarbage("setstepmul", 400)
    for round = 1, 2000 do
      for _ = 1, 50 do garbage(finalizer) end
      assert.same(payload, decode(text))
      assert.equal(#text, #encode(payload))
      if nested > 0 and round > 20 then break end
    end
    collectgarbage("setpause", pause)
    collectgarbage("setstepmul", stepmul)
    collectgarbage()
    assert.equal(0, wrong)
    assert.is_true(nested > 0, "no finalizer ran inside a call")
  end)
end)

describe("core.json_text", function()
  local text = core.json_text

  it("gives clean text back, escapes NUL and bytes that are not UTF-8, "
     .. "and cuts at the limit", function()
    assert.equal("caf\195\169", text("caf\195\169"))
    assert.equal("a\\0b\\xFF", text("a\0b\255"))
    assert.equal("\\xE2\\x82", text("\226\130"))          -- cut short
    assert.equal("ab... [truncated 1 bytes]", text("abc", 2))
    assert.equal("\\0... [truncated 1 bytes]", text("\0\0", 3))
    assert.equal(("x"):rep(70000), text(("x"):rep(70000), 0))
    assert.equal(65536 + #"... [truncated 1 bytes]",
                 #text(("x"):rep(65537)))
  end)

  it("raises on misuse", function()
    assert.has_error(function() text() end)
    assert.has_error(function() text("x", -1) end)
  end)
end)
