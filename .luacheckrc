-- luacheck configuration (make check).
std = "max"
globals = { "H" }
max_line_length = 80
files["spec/"] = { std = "+busted" }
-- OpenResty's globals (ngx) where buzz runs inside nginx.
files["lua/buzz/ngx.lua"] = { std = "+ngx_lua" }
files["lua/buzz/ngxgate.lua"] = { std = "+ngx_lua" }
files["lua/buzz/redisngx.lua"] = { std = "+ngx_lua" }
files["lua/buzz/redis.lua"] = { std = "+ngx_lua" }
files["examples/openresty/"] = { std = "+ngx_lua" }
files["bench/"] = { max_line_length = 100 }
exclude_files = { "build/" }
