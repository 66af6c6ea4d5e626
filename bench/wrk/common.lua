-- Shared by the wrk scripts (loaded with dofile from the repository root, where run.sh runs).
--
-- Every thread gets its own random seed (wrk runs one Lua state per thread), so two threads do
-- not replay the same key sequence. done() prints one machine-readable line, "BENCH {json}",
-- with exact counts and percentiles in microseconds; run.sh passes --latency as well so the
-- human-readable distribution stays in the raw output for eyeballing.

ROWS = 100000

local next_thread = 0
function setup(thread)
  thread:set("thread_id", next_thread)
  next_thread = next_thread + 1
end

function seed_rng()
  -- thread_id is set by setup() before init() runs in the thread's own Lua state.
  math.randomseed(os.time() * 1000 + (thread_id or 0) * 7919 + 17)
  -- LuaJIT's first draws after seeding are poorly mixed; throw a few away.
  for _ = 1, 10 do math.random() end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"bytes":%d,"mean_us":%.2f,"p50_us":%.2f,"p90_us":%.2f,' ..
    '"p99_us":%.2f,"max_us":%.2f,"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d}\n',
    summary.requests, summary.duration, summary.bytes, latency.mean,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
