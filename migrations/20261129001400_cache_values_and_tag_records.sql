-- Issue 14: cache values of any type, and tag invalidation records.
--
-- Additive only (nullable columns, a new table, new indexes): a sidecar built before this migration keeps
-- serving against the migrated schema, and rows either version writes stay readable by both.

-- A value that is not JSON: its bytes and its Content-Type, as sent. `value` then holds the
-- marker ' null' (a JSON null with a leading space). No sidecar ever stores a JSON value with
-- surrounding whitespace (every version trims it), so the marker tells a binary entry apart
-- exactly; and an older sidecar, which reads only `value`, serves such an entry as JSON null
-- instead of failing. An older sidecar's write replaces `value` but leaves these two columns
-- behind: without the marker in `value` they are ignored (and cleared by the next write).
ALTER TABLE cache ADD COLUMN content_type text;
ALTER TABLE cache ADD COLUMN bytes bytea;

-- What such a value weighs for cache.max_bytes, beyond byte_size (which counts `value`, here the
-- marker): its bytes and its media type; NULL for JSON. Set by the sidecar's writes rather than
-- generated, so adding it rewrites nothing (an older sidecar keeps serving meanwhile); an older
-- sidecar's write over a binary entry leaves it behind, counted until the next write of ours.
-- The partial index lists only the entries that have one, so the cleanup sums them without
-- reading the table, and JSON writes do not touch it.
ALTER TABLE cache ADD COLUMN raw_size integer;
CREATE INDEX cache_raw_size_idx ON cache (updated_at) INCLUDE (raw_size) WHERE raw_size > 0;

-- When each tag was last invalidated (POST /v1/cache/_invalidate), on the database clock:
-- entries written before `invalidated_at` are stale, and those written before `expires_at` are
-- expired once it has passed (the same rules as Next.js's tag manifest). One row per tag.
CREATE TABLE cache_tags (
    tag            text COLLATE "C" PRIMARY KEY,
    invalidated_at timestamptz NOT NULL,
    expires_at     timestamptz NOT NULL
);
-- The cleanup drops a record a year after it expired (no entry written before can live longer).
CREATE INDEX cache_tags_expires_at_idx ON cache_tags (expires_at);
