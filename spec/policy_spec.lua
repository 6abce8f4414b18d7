-- The pure policy functions (lua/buzz/policy.lua): normalisation of the
-- retry and breaker options and the backoff computed from them.
local policy = require "buzz.policy"

describe("policy", function()
  it("normalises retry: defaults filled in, times in milliseconds", function()
    local p = policy.retry(3, 1)
    assert.same({ max = 3, base = 200, factor = 2, max_delay = 30000,
                  jitter = 0.2 }, p)
    p = policy.retry({ base = 1, max_delay = 5, jitter = 0 }, 1)
    assert.same({ max = 5, base = 1000, factor = 2, max_delay = 5000,
                  jitter = 0 }, p)
  end)

  it("lets the default cap give way to a larger base, not a given one",
     function()
    assert.equal(60000, policy.retry({ base = 60 }, 1).max_delay)
    assert.has_error(function() policy.retry({ base = 60, max_delay = 5 }, 1)
    end, "bad retry.max_delay: 5 is less than retry.base (60)")
  end)

  it("refuses unknown keys and out-of-range numbers", function()
    assert.has_error(function() policy.retry({ tries = 2 }, 1) end,
      'unknown option "tries" in retry (known: base, factor, jitter, '
      .. "max, max_delay)")
    assert.has_error(function() policy.retry({ jitter = 2 }, 1) end,
      "bad retry.jitter: expected a fraction from 0 to 1, got 2")
    assert.has_error(function() policy.breaker({ within = 0 }, 1) end,
      "bad breaker.within: expected a number > 0, got 0")
  end)

  it("normalises breaker = true to the defaults, in milliseconds", function()
    assert.same({ failures = 5, within = 10000, cool_down = 30000 },
                policy.breaker(true, 1))
  end)

  it("computes backoff: base * factor^(attempt - 1), capped, jittered",
     function()
    local p = policy.retry({ base = 0.1, factor = 3, max_delay = 1,
                             jitter = 0 }, 1)
    assert.equal(100, policy.backoff(p, 1))
    assert.equal(300, policy.backoff(p, 2))
    assert.equal(900, policy.backoff(p, 3))
    assert.equal(1000, policy.backoff(p, 4))   -- the cap
    p = policy.retry({ base = 1, jitter = 0.5 }, 1)
    assert.equal(500, policy.backoff(p, 1, function() return 0 end))
    assert.equal(1500, policy.backoff(p, 1, function() return 1 end))
    assert.equal(1000, policy.backoff(p, 1, function() return 0.5 end))
  end)

  it("makes no policy for a plain subscription, and retry = 1 for a "
     .. "durable one", function()
    assert.is_nil(policy.subscription({}, "a.*", 1))
    local p = policy.subscription({ durable = "billing" }, "billing", 1)
    assert.equal(1, p.retry.max)
    assert.is_true(p.is_durable)
    assert.is_nil(policy.subscription({ durable = "b", retry = false }, "b",
                                      1))
    assert.equal(1500, policy.subscription({ timeout = 1.5 }, "x", 1).timeout)
  end)
end)
