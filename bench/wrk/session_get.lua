-- GET /v1/sessions/{token}: uniform random token among the ROWS seeded sessions, all valid and
-- fresh (no sliding write). The tokens are read from the file given after "--" (one a line,
-- written by run.sh from the same SQL expression the seed used).
dofile("bench/wrk/common.lua")

local tokens = {}

function init(args)
  seed_rng()
  local path = args[1] or "bench/work/tokens.txt"
  for line in io.lines(path) do
    tokens[#tokens + 1] = line
  end
  if #tokens == 0 then
    error("no tokens in " .. path)
  end
end

function request()
  return wrk.format("GET", "/v1/sessions/" .. tokens[math.random(1, #tokens)])
end
