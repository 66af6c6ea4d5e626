-- pgsidecar schema. Every object lives in the configured schema (database.schema): the sidecar
-- creates the schema and puts it first on each connection's search_path before migrating.

-- Login sessions. Only SHA-256(token) is stored: a dump of this table yields no usable token.
CREATE TABLE sessions (
    id          uuid        PRIMARY KEY,
    token_hash  bytea       NOT NULL UNIQUE CHECK (octet_length(token_hash) = 32),
    user_id     text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    -- The session's own lifetime: sliding moves expires_at to now() + ttl_seconds.
    ttl_seconds integer     NOT NULL CHECK (ttl_seconds > 0),
    ip_address  text,
    user_agent  text,
    -- The client's JSON object, stored as sent (text keeps it byte-exact and skips re-encoding).
    data        text        NOT NULL DEFAULT '{}'
);
CREATE INDEX sessions_user_id_idx ON sessions (user_id, created_at DESC);
CREATE INDEX sessions_expires_at_idx ON sessions (expires_at);

-- Shared cache. "C" collation makes the primary key usable for prefix (LIKE 'p%') deletes.
CREATE TABLE cache (
    key        text COLLATE "C" PRIMARY KEY,
    -- JSON validated on write and passed through as bytes on read.
    value      text        NOT NULL,
    tags       text[]      NOT NULL DEFAULT '{}',
    expires_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX cache_expires_at_idx ON cache (expires_at);
-- Tag invalidation looks entries up by tag; untagged entries stay out of the index.
CREATE INDEX cache_tags_idx ON cache USING gin (tags) WHERE cardinality(tags) > 0;

-- Fleet-wide leases (one row per background job), won with a conditional UPDATE, so the same
-- schema works behind transaction poolers where advisory locks do not.
CREATE TABLE leases (
    name       text        PRIMARY KEY,
    holder     text,
    expires_at timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO leases (name) VALUES ('cleanup');
