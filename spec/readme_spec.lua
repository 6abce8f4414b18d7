-- README.md: the tour's code runs, in order, and its asserts hold; the
-- commands it promises exist.
local read = H.read

describe("README.md", function()
  local readme = read("README.md")

  it("tour runs as written", function()
    local blocks = {}
    for code in readme:gmatch("```lua\n(.-)```") do
      blocks[#blocks + 1] = code
    end
    assert.is_true(#blocks >= 5, "expected the tour's lua blocks")
    local chunk = table.concat(blocks, "\ndo end\n") .. "\nprint('tour ok')\n"
    local ok, out = H.run(chunk)
    assert.is_true(ok, out)
    assert.matches("tour ok", out, 1, true)
  end)

  it("shows examples/live.lua's program as it is", function()
    local shown = readme:match("```lua examples/live%.lua\n(.-)```")
    assert.is_not_nil(shown, "README lost the live page's program")
    local example = read("examples/live.lua")
    local program = example:match("%-%- the program the README shows\n"
                                  .. "(.-)%-%- end of the program")
    assert.equal(program, shown)
  end)

  it("starts a newcomer with make demo and make test", function()
    local cmds = readme:match("```sh\n(.-)```")
    assert.matches("make demo", cmds, 1, true)
    assert.matches("make test", cmds, 1, true)
    local makefile = read("Makefile")
    assert.matches("\ndemo: deps", makefile, 1, true)
    assert.matches("\ntest: deps", makefile, 1, true)
  end)

  it("names the test command that .ci/run runs", function()
    assert.matches("make test", read(".ci/run"), 1, true)
  end)
end)
