-- Direct-client baseline for GET /v1/sessions/{token}: the sidecar's validation read
-- (sessions.rs, ReadBatch: same columns, same needs_refresh expression, update_age 86400 s).
--
-- pgbench cannot read the 100,000 tokens from a file, and a helper table would add a join the
-- sidecar does not do, so the token for row :k is derived here with the very expression the
-- seed used (bench/seed.sql, bench_token()), and hashed with SHA-256 like the sidecar does.
-- Cost to the baseline: two SHA-256 of < 50 bytes plus base64/translate in the server, measured
-- at about 0.2 microseconds per query (an application would do the final SHA-256 itself). The
-- expression is immutable, so it is computed once per execution and the unique index on
-- token_hash is used (checked with EXPLAIN under a generic plan).
\set k random(1, 100000)
SELECT token_hash, id, user_id, created_at, updated_at, expires_at, ip_address, user_agent, data,
       expires_at - make_interval(secs => ttl_seconds) + make_interval(secs => 86400) <= now() AS needs_refresh
FROM pgsidecar.sessions
WHERE token_hash = sha256(convert_to(rtrim(translate(encode(sha256(convert_to('bench' || :k, 'UTF8')), 'base64'), '+/', '-_'), '='), 'UTF8'))
  AND expires_at > now();
