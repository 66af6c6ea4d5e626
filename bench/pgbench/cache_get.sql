-- Direct-client baseline for GET /v1/cache/{key}: the sidecar's read (cache.rs, ReadBatch) as a
-- single-row statement. Run with -M prepared, so 'k' || :k is a bound parameter.
\set k random(1, 100000)
SELECT value, expires_at FROM pgsidecar.cache WHERE key = 'k' || :k AND expires_at > now();
