-- GET /v1/cache/k{n}: uniform random key among the ROWS seeded entries, so every request is a hit.
dofile("bench/wrk/common.lua")

function init(args)
  seed_rng()
end

function request()
  return wrk.format("GET", "/v1/cache/k" .. math.random(1, ROWS))
end
