-- make rock's last step: the installed rock loads from its own tree (run
-- from /tmp, with `luarocks path` for that tree), reports the release's
-- version and delivers an event. arg[1]: the version expected.
local buzz = require "buzz"
assert(buzz._VERSION == arg[1], ("version %s, expected %s")
                                :format(buzz._VERSION, tostring(arg[1])))
local core_path = package.searchpath("buzz.core", package.cpath)
assert(not core_path:find("^%./"), "the core came from the working "
       .. "directory: " .. core_path)
local bus = buzz.new()
local n = 0
bus:subscribe("a.*", function() n = n + 1 end)
bus:publish("a.b", {})
bus:drain()
assert(n == 1, "no delivery")
bus:close()
print(("buzz %s from %s"):format(buzz._VERSION, core_path))
