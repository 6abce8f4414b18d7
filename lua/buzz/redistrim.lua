--- buzz.redistrim: a Redis link's retention (bus:redis{ retain = S },
-- lua/buzz/redis.lua): the stream is trimmed with XTRIM MINID to what is
-- younger than retain, never past what a group still needs.
-- @module buzz.redistrim
local type, ipairs, tonumber = type, ipairs, tonumber
local floor, min = math.floor, math.min

local M = {}

-- Stream ids ("ms-seq"): their order, and the one after id.
local function id_parts(id)
  local a, b = id:match("^(%d+)%-(%d+)$")
  return tonumber(a) or 0, tonumber(b) or 0
end
local function id_less(x, y)
  local a1, b1 = id_parts(x)
  local a2, b2 = id_parts(y)
  return a1 < a2 or (a1 == a2 and b1 < b2)
end
local function id_next(id)
  local a, b = id_parts(id)
  return ("%d-%d"):format(a, b + 1)
end

-- Trims one stream of link self to retain (XTRIM MINID), never past
-- what a group still needs: its oldest pending entry, and what it has
-- not read yet (MAXLEN ~ would delete pending entries).
local function trim_stream(self, stream)
  local c = self.cmdc
  local limit = ("%d-0"):format(self.bus:_now() - self.retain)
  local function lower(id)                   -- keep id and what follows
    if id and id_less(id, limit) then
      limit = id
    end
  end
  c:cmd(function(ok, groups)
    if not ok or self.is_closed then return end
    local waiting = 1
    local function done()
      waiting = waiting - 1
      if waiting > 0 then return end
      c:cmd(function(is_ok, v)
        if is_ok then self.counts.trimmed = self.counts.trimmed + v end
      end, "XTRIM", stream, "MINID", limit)
    end
    for _, g in ipairs(groups) do
      local f = {}
      for i = 1, #g - 1, 2 do f[g[i]] = g[i + 1] end
      lower(f["last-delivered-id"] and
            id_next(f["last-delivered-id"]))
      if f.pending and f.pending > 0 then
        waiting = waiting + 1
        c:cmd(function(is_ok, v)
          if is_ok and type(v) == "table" then lower(v[2]) end
          done()
        end, "XPENDING", stream, f.name)
      end
    end
    done()
  end, "XINFO", "GROUPS", stream)
end

--- Trims the link's streams (each partition's), and again every
--- retain / 2 (at most a minute).
-- @local
function M.trim(self)
  self.trimmer = nil
  if self.is_closed then return end
  for _, stream in ipairs(self.part_streams) do trim_stream(self, stream) end
  self.trimmer = self.bus:_after(min(floor(self.retain / 2), 60000),
                                 M.trim, self):unref()
end

return M
