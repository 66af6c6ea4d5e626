-- Direct-client baseline for PUT /v1/cache/{key}?ttl_seconds=3600: the sidecar's upsert
-- (cache.rs, WriteBatch) for one row, autocommit like the sidecar's. The ~1 KiB JSON value goes
-- over the wire as a parameter (:payload comes from pgbench -D payload=..., 998 bytes), as an
-- application would send it; it is the same shape the seed and the wrk PUT body use.
\set k random(1, 100000)
INSERT INTO pgsidecar.cache (key, value, tags, expires_at)
VALUES ('k' || :k, '{"id":' || :k || ',"payload":"' || :payload || '"}', '{}'::text[], now() + make_interval(secs => 3600))
ON CONFLICT (key) DO UPDATE
SET value = EXCLUDED.value, tags = EXCLUDED.tags, expires_at = EXCLUDED.expires_at, updated_at = now();
