-- PUT /v1/cache/k{n}?ttl_seconds=3600: uniform random key among the ROWS seeded entries (all
-- updates, never inserts), body the same ~1 KiB JSON shape the seed wrote (bench/seed.sql).
dofile("bench/wrk/common.lua")

local payload = string.rep("x", 998)
local headers = { ["Content-Type"] = "application/json" }

function init(args)
  seed_rng()
end

function request()
  local n = math.random(1, ROWS)
  local body = '{"id":' .. n .. ',"payload":"' .. payload .. '"}'
  return wrk.format("PUT", "/v1/cache/k" .. n .. "?ttl_seconds=3600", headers, body)
end
