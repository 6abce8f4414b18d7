-- luacheck configuration (make check).
std = "max"
globals = { "H" }
max_line_length = 80
files["spec/"] = { std = "+busted" }
files["bench/"] = { max_line_length = 100 }
exclude_files = { "build/" }
