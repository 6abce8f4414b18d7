-- csrc/match.c: the subject grammar, the trie and the match cache.
local core = require "buzz.core"

local function noop() end

-- { subject, valid as a published type?, valid as a pattern? }
local GRAMMAR = {
  { "task",              true,  true  },
  { "task.start",        true,  true  },
  { "a.b.c.d.e.f",       true,  true  },
  { "a.b*",              true,  true  },  -- wildcard inside a token: literal
  { "a.*b",              true,  true  },
  { "a.>b",              true,  true  },
  { "order.créé",        true,  true  },  -- UTF-8 is fine
  { "$SYS.breaker",      true,  true  },  -- reserved, but grammatical
  { "a-b_c:d/e",         true,  true  },
  { "*",                 false, true  },
  { ">",                 false, true  },
  { "task.*",            false, true  },
  { "task.>",            false, true  },
  { "*.start",           false, true  },
  { "*.*.>",             false, true  },
  { "",                  false, false },
  { ".",                 false, false },
  { "a..b",              false, false },
  { ".a",                false, false },
  { "a.",                false, false },
  { "a.>.b",             false, false },
  { ">.a",               false, false },
  { "a b",               false, false },
  { "a.b ",              false, false },
  { "a\tb",              false, false },
  { "a\nb",              false, false },
  { "a\0b",              false, false },
  { ("x"):rep(1025),     false, false },
}

describe("the subject grammar", function()
  for _, case in ipairs(GRAMMAR) do
    local s, as_type, as_pattern = case[1], case[2], case[3]
    local shown = ("%q"):format(#s > 20 and s:sub(1, 20) .. "..." or s)
    it(("%s is %s type and %s pattern"):format(
         shown, as_type and "a valid" or "an invalid",
         as_pattern and "a valid" or "an invalid"), function()
      local ok, why = core.check_subject(s, false)
      assert.equal(as_type, ok, why)
      if not ok then assert.is_string(why) end
      ok, why = core.check_subject(s, true)
      assert.equal(as_pattern, ok, why)
    end)
  end

  it("explains what is wrong and how to fix it", function()
    local _, why = core.check_subject("a..b", true)
    assert.matches("empty token", why)
    assert.matches("single dots", why)
    _, why = core.check_subject("a.>.b", true)
    assert.matches("only come last", why)
    _, why = core.check_subject("task.*", false)
    assert.matches("wildcard", why)
    _, why = core.check_subject("a b", true)
    assert.matches("white space", why)
    _, why = core.check_subject("", true)
    assert.matches("empty", why)
  end)
end)

-- { pattern, type, matches? }
local MATCHING = {
  { "a",         "a",         true  },
  { "a",         "a.b",       false },
  { "a.b",       "a.b",       true  },
  { "a.b",       "a.c",       false },
  { "a.*",       "a.b",       true  },
  { "a.*",       "a",         false },
  { "a.*",       "a.b.c",     false },
  { "*.b",       "a.b",       true  },
  { "*",         "a",         true  },
  { "*",         "a.b",       false },
  { "a.>",       "a.b",       true  },
  { "a.>",       "a.b.c.d",   true  },
  { "a.>",       "a",         false },
  { ">",         "a",         true  },
  { ">",         "a.b.c",     true  },
  { "*.>",       "a",         false },
  { "*.>",       "a.b",       true  },
  { "a.*.c",     "a.b.c",     true  },
  { "a.*.c",     "a.b.d",     false },
  { "a.b*",      "a.b*",      true  },  -- literal token
  { "a.b*",      "a.bc",      false },
  { "A.b",       "a.b",       false },  -- case-sensitive
  { "*",         "$SYS",      false },  -- reserved: no wildcard first
  { ">",         "$SYS.x",    false },
  { "*.x",       "$SYS.x",    false },
  { "$SYS.>",    "$SYS.x",    true  },
  { "$SYS.*",    "$SYS.x",    true  },
  { "$DLQ.task", "$DLQ.task", true  },
  { "a.$b",      "a.$b",      true  },
  { "a.*",       "a.$b",      true  },  -- only the first token is special
}

describe("matching", function()
  local c
  before_each(function() c = assert(core.new(1000)) end)
  after_each(function() c:close() end)

  for _, case in ipairs(MATCHING) do
    local pattern, etype, expected = case[1], case[2], case[3]
    it(("%q %s %q"):format(pattern, expected and "matches" or "does not match",
                           etype), function()
      local sub = {}
      assert(c:subscribe(pattern, sub, noop))
      local aud = c:audience(etype)
      assert.equal(expected and 1 or 0, #aud)
      if expected then assert.equal(sub, aud[1]) end
    end)
  end

  it("returns the audience in subscription order, whatever the pattern",
     function()
    local subs = {}
    local patterns = { "a.>", "a.b.c", "*.b.*", ">", "a.*.c", "a.b.>" }
    for i, p in ipairs(patterns) do
      subs[i] = { p }
      assert(c:subscribe(p, subs[i], noop))
    end
    local aud = c:audience("a.b.c")
    assert.equal(#patterns, #aud)
    for i = 1, #patterns do assert.equal(subs[i], aud[i]) end
  end)

  it("rebuilds a cached audience after subscribe and unsubscribe", function()
    local s1, s2 = {}, {}
    local id1 = assert(c:subscribe("x.*", s1, noop))
    assert.equal(1, #c:audience("x.y"))        -- now cached
    local id2 = assert(c:subscribe("x.>", s2, noop))
    assert.same({ s1, s2 }, c:audience("x.y"))
    assert.is_true(c:unsubscribe(id1, s1))
    assert.same({ s2 }, c:audience("x.y"))
    assert.is_true(c:unsubscribe(id2, s2))
    assert.same({}, c:audience("x.y"))
  end)

  it("refuses a stale id whose slot was reused", function()
    local s1, s2 = {}, {}
    local id1 = assert(c:subscribe("x", s1, noop))
    assert.is_true(c:unsubscribe(id1, s1))
    local id2 = assert(c:subscribe("x", s2, noop))
    assert.equal(id1, id2)                     -- the slot is reused
    assert.is_false(c:unsubscribe(id1, s1))    -- but s1 cannot remove s2
    assert.same({ s2 }, c:audience("x"))
  end)

  it("keeps many patterns apart (trie, not a scan)", function()
    local n = 0
    for i = 1, 200 do
      assert(c:subscribe(("svc%d.*"):format(i), { i }, noop))
      assert(c:subscribe(("svc%d.>"):format(i), { -i }, noop))
      n = n + 2
    end
    assert.equal(n, c:stats().subscriptions)
    for i = 1, 200, 37 do
      local aud = c:audience(("svc%d.x"):format(i))
      assert.equal(2, #aud)
      assert.same({ i }, aud[1])
      assert.same({ -i }, aud[2])
      assert.equal(1, #c:audience(("svc%d.x.y"):format(i)))
    end
  end)

  it("bounds the cache of published types", function()
    assert(c:subscribe(">", {}, noop))
    for i = 1, 10000 do c:audience("t" .. i) end
    assert.is_true(c:stats().cached_types <= 4096)
    assert.equal(1, #c:audience("t1"))         -- still correct after eviction
  end)

  it("evicts one type at a time when the cache is full", function()
    assert(c:subscribe(">", {}, noop))
    for i = 1, 4096 + 100 do c:audience("t" .. i) end
    assert.equal(4096, c:stats().cached_types)
    assert.equal(4096 + 100, c:stats().type_misses)
  end)

  it("keeps a hot type cached while more types than it holds go by",
     function()
    assert(c:subscribe(">", {}, noop))
    for i = 1, 10000 do
      assert.equal(1, #c:audience("hot"))
      c:audience("cold" .. i)
    end
    -- "hot" missed once, on its first lookup; each cold type once
    assert.equal(1 + 10000, c:stats().type_misses)
  end)

  it("still hits most of a rotation a little larger than the cache",
     function()
    assert(c:subscribe(">", {}, noop))
    local function rotate()
      for i = 1, 4200 do c:audience("r" .. i) end
    end
    rotate()                                   -- fills it: 4,200 misses
    assert.equal(4200, c:stats().type_misses)
    rotate()
    rotate()
    -- emptied when full, or evicted in a fixed order (FIFO, LRU), every
    -- lookup of such a rotation would miss: 8,400 more
    assert.is_true(c:stats().type_misses - 4200 < 8400 / 4,
                   "misses: " .. c:stats().type_misses - 4200)
  end)

  it("keeps audiences right under rotation, unsubscribe and resubscribe",
     function()
    local patterns = { ">", "a.*", "a.>", "*.b", "a.b", "*.*", "a.*.c",
                       "b.>", "*.b.>", "a.b.c", "$SYS.>", "*.*.*" }
    local types = {}
    for i = 1, 6000 do                        -- more than the cache holds
      local k = i % 7
      types[i] = k == 0 and ("a.b." .. i) or k == 1 and ("a." .. i)
                 or k == 2 and (i .. ".b") or k == 3 and ("b." .. i .. ".c")
                 or k == 4 and ("a." .. i .. ".c") or k == 5 and ("$SYS." .. i)
                 or ("x" .. i)
    end
    types[#types + 1] = "a.b"
    types[#types + 1] = "a.b.c"
    local live = {}                           -- { pattern, obj, id }, in order
    local function subscribe(p)
      local obj = { p }
      local id = assert(c:subscribe(p, obj, noop))
      live[#live + 1] = { p, obj, id }
    end
    local function check(step)
      for i = 1, #types, step do
        local ty, want = types[i], {}
        for _, s in ipairs(live) do
          if core.match(s[1], ty) then want[#want + 1] = s[2] end
        end
        local got = c:audience(ty)
        local same = #got == #want
        for j = 1, #want do same = same and got[j] == want[j] end
        if not same then assert.same(want, got, ty) end
      end
    end
    for _, p in ipairs(patterns) do subscribe(p) end
    for round = 1, 6 do
      check(round % 2 == 0 and 1 or 7)
      -- unsubscribe every third (from a rotating start), then subscribe
      -- a fresh object to each pattern that went, at the end of the order
      local gone, kept = {}, {}
      for j, s in ipairs(live) do
        if (j + round) % 3 == 0 then
          assert.is_true(c:unsubscribe(s[3], s[2]))
          gone[#gone + 1] = s[1]
        else
          kept[#kept + 1] = s
        end
      end
      live = kept
      check(5)
      for _, p in ipairs(gone) do subscribe(p) end
    end
    check(1)
    assert.is_true(c:stats().cached_types <= 4096)
  end)

  it("prunes the trie when subscriptions go", function()
    for round = 1, 3 do
      local ids, subs = {}, {}
      for i = 1, 500 do
        subs[i] = {}
        ids[i] = assert(c:subscribe(("r%d.k%d.*"):format(round, i), subs[i],
                                      noop))
      end
      for i = 1, 500 do assert.is_true(c:unsubscribe(ids[i], subs[i])) end
      assert.equal(0, c:stats().subscriptions)
      assert.same({}, c:audience(("r%d.k1.x"):format(round)))
    end
  end)

  it("rejects bad patterns with ESUBJECT, leaving no subscription", function()
    local ok, err, code = c:subscribe("a..b", {}, noop)
    assert.is_nil(ok)
    assert.equal("ESUBJECT", code)
    assert.matches('bad pattern "a..b"', err, 1, true)
    assert.equal(0, c:stats().subscriptions)
  end)

  it("quotes unprintable subjects in its messages", function()
    local _, err = c:subscribe("a\nb", {}, noop)
    assert.matches('"a\\010b"', err, 1, true)
  end)
end)

describe("the match cache under a bus", function()
  it("delivers a queued event whose type was evicted meanwhile", function()
    local bus = H.bus()
    local got = {}
    bus:subscribe("a.*", function(ev) got[#got + 1] = ev.type end)
    bus:subscribe("other.>", H.counter(0))
    assert(bus:publish("a.x", nil))           -- queued, holds its type
    for i = 1, 10000 do assert(bus:publish("cold.t" .. i, nil)) end
    local late = H.counter(1)
    bus:subscribe("a.x", late)                -- after: not in its audience
    bus:drain()
    assert.same({ "a.x" }, got)
    assert(bus:publish("a.x", nil))           -- a fresh lookup of the type
    bus:drain()
    assert.same({ "a.x", "a.x" }, got)
    H.done()
  end)
end)
