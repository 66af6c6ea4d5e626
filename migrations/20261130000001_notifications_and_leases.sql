-- Issue 17: change notifications (for the near caches, the change feed and lease wake-ups), and
-- fill leases.
--
-- Additive only (functions, triggers, new tables): a sidecar built before this migration keeps
-- serving against the migrated schema, and its writes are announced like anyone's.
--
-- Every committed change that another sidecar could have cached is announced with NOTIFY on the
-- channel named like the schema, in the transaction of the write, by statement-level AFTER
-- triggers with transition tables: one notification per statement (a batch of writes is one
-- statement), whoever wrote (this binary, an older one, bare SQL, the storage-cap eviction).
--
-- Only while some sidecar of the fleet needs them (a near cache on, a change-feed subscriber, a
-- fill-lease waiter), that is while a row of `listeners` is unexpired: a transaction that
-- notifies takes a cluster-wide lock from its NOTIFY's queue insert through its commit's WAL
-- flush (PostgreSQL's PreCommit_Notify), so notifying commits are serialized and lose group
-- commit (measured: 64 clients writing, 8,190 commits/s without a notifying trigger, 370 to
-- 1,370 with one). A sidecar that needs notifications upserts its row (`until` 30 s ahead)
-- every 5 s, deletes it when it no longer needs them, and counts on them only once every
-- transaction that could have run its trigger before the row was visible has ended
-- (src/store/registry.rs).
--
-- Payloads are JSON, at most about 7,900 bytes each (Postgres refuses 8,000 and more): the
-- items of one statement are split over several notifications, and past 64 of them (or for an
-- item too large for one) replaced by one {"op":"flush"}. They carry keys, tags, token hashes,
-- session ids and user ids, never values or tokens.
--
--   {"op":"put","items":[[key, tags], ...]}          cache entries written
--   {"op":"del","items":[[key, tags], ...]}          live cache entries deleted
--   {"op":"drop","items":[[key, tags], ...]}         entries deleted or expired by a tag invalidation
--   {"op":"prefix","prefix":"p"}                     a prefix delete (instead of its keys)
--   {"op":"inval","expire_seconds":n,"items":[tag]}  tags invalidated (cache_tags written)
--   {"op":"sess","items":[[hash, user, id], ...]}    sessions updated (data, sliding expiry), or
--                                                    revoked by a revoke-all (see revoke_all)
--   {"op":"revoke","items":[[hash, user, id], ...]}  live sessions deleted (revoke, cap eviction)
--   {"op":"revoke_all","user_id":"u"}                a user's sessions revoked at once
--   {"op":"lease","items":[key, ...]}                live fill leases released or voided
--   {"op":"lease","all":true}                        many of them (wake every waiter)
--   {"op":"flush"}                                   anything may have changed
--
-- The sidecar's prefix delete, tag invalidation and revoke-all name themselves to the triggers
-- with the transaction-local settings pgsidecar.op and pgsidecar.arg (set_config), so that they
-- are announced as one operation. Rows deleted after they expired (the cleanup) are not
-- announced: no sidecar serves an entry past its expiry.
--
-- The functions name their tables and each other in this schema, spliced in below (format), so
-- they work whatever the caller's search_path (an older binary, psql), and their plans are
-- cached like any static statement's.

-- The sidecars that need notifications now (src/store/registry.rs).
CREATE TABLE listeners (
    id    text PRIMARY KEY,
    until timestamptz NOT NULL
);

-- Fill leases (GET /v1/cache/{key}?fill_lease_ms=N): at most one per key, fleet-wide. A lease
-- is granted when the key has no live entry and no live lease; a PUT with its token writes only
-- while the row is still there with that token and no tag of the PUT was invalidated after
-- `granted_at`, and deletes the row (releases the lease). A delete or prefix delete of the key
-- deletes the row (voids the lease). Expired rows stay until the cleanup (an hour later): a
-- slow holder may still write while nobody has taken the lease over.
CREATE TABLE cache_leases (
    key        text COLLATE "C" PRIMARY KEY,
    token      text        NOT NULL,
    granted_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX cache_leases_expires_at_idx ON cache_leases (expires_at);

DO $migration$
DECLARE
    -- The schema the tables were created in (this migration runs with it first on the
    -- search_path), as a quoted identifier.
    s text := (SELECT relnamespace::regnamespace::text FROM pg_class WHERE oid = 'cache'::regclass);
BEGIN

-- Sends `items` on `channel` as `head` || item, item, ... || ']}', split into notifications of
-- at most about 7,800 bytes; past 64 of them, or for an item too large for one, a flush
-- instead of the rest. Returns whether it flushed.
EXECUTE format($fn$CREATE FUNCTION %1$s.notify_items(channel text, head text, items text[])
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    item text;
    buf  text := '';
    sent int := 0;
BEGIN
    FOREACH item IN ARRAY items LOOP
        IF octet_length(item) > 7000 OR sent >= 64 THEN
            PERFORM pg_notify(channel, '{"op":"flush"}');
            RETURN true;
        END IF;
        IF octet_length(buf) + octet_length(item) > 7800 THEN
            PERFORM pg_notify(channel, head || buf || ']}');
            sent := sent + 1;
            buf := '';
        END IF;
        buf := CASE buf WHEN '' THEN item ELSE buf || ',' || item END;
    END LOOP;
    PERFORM pg_notify(channel, head || buf || ']}');
    RETURN false;
END $$;$fn$, s);

EXECUTE format($fn$CREATE FUNCTION %1$s.cache_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    op    text := coalesce(current_setting('pgsidecar.op', true), '');
    head  text;
    whole text;
    total int8;
    items text[];
BEGIN
    IF NOT EXISTS (SELECT 1 FROM %1$s.listeners WHERE until > now()) THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        IF op = 'prefix' THEN
            IF EXISTS (SELECT 1 FROM gone) THEN
                PERFORM pg_notify(TG_TABLE_SCHEMA, json_build_object(
                    'op', 'prefix', 'prefix', current_setting('pgsidecar.arg'))::text);
            END IF;
            RETURN NULL;
        END IF;
        head := CASE op WHEN 'invalidate' THEN '{"op":"drop","items":[' ELSE '{"op":"del","items":[' END;
        SELECT string_agg(i, ','), sum(octet_length(i) + 1) INTO whole, total
        FROM (SELECT json_build_array(key, tags)::text AS i FROM gone WHERE expires_at > now()) s;
    ELSE
        head := CASE op WHEN 'invalidate' THEN '{"op":"drop","items":[' ELSE '{"op":"put","items":[' END;
        SELECT string_agg(i, ','), sum(octet_length(i) + 1) INTO whole, total
        FROM (SELECT json_build_array(key, tags)::text AS i FROM written) s;
    END IF;
    IF whole IS NULL THEN
        RETURN NULL;
    END IF;
    -- The usual case, one notification, without building an array.
    IF total <= 7800 THEN
        PERFORM pg_notify(TG_TABLE_SCHEMA, head || whole || ']}');
        RETURN NULL;
    END IF;
    -- Far more than 64 notifications' worth: a flush at once, rather than 64 lists first.
    IF total > 64 * 7800 THEN
        PERFORM pg_notify(TG_TABLE_SCHEMA, '{"op":"flush"}');
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        SELECT array_agg(json_build_array(key, tags)::text) INTO items FROM gone WHERE expires_at > now();
    ELSE
        SELECT array_agg(json_build_array(key, tags)::text) INTO items FROM written;
    END IF;
    PERFORM %1$s.notify_items(TG_TABLE_SCHEMA, head, items);
    RETURN NULL;
END $$;$fn$, s);

-- Tag invalidations: one list per distinct expire_seconds (one, from the sidecar).
EXECUTE format($fn$CREATE FUNCTION %1$s.cache_tags_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    head  text;
    items text[];
BEGIN
    IF NOT EXISTS (SELECT 1 FROM %1$s.listeners WHERE until > now()) THEN
        RETURN NULL;
    END IF;
    FOR head, items IN
        SELECT '{"op":"inval","expire_seconds":' || s || ',"items":[', array_agg(to_json(tag)::text)
        FROM (SELECT tag, greatest(0, round(extract(epoch FROM expires_at - invalidated_at)))::int8 AS s
              FROM written) w
        GROUP BY s
    LOOP
        IF %1$s.notify_items(TG_TABLE_SCHEMA, head, items) THEN
            RETURN NULL;
        END IF;
    END LOOP;
    RETURN NULL;
END $$;$fn$, s);

-- Sessions: updates (data, sliding) and deletions of live sessions. Creation is not announced:
-- nobody can have cached a session before it exists.
EXECUTE format($fn$CREATE FUNCTION %1$s.sessions_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    op    text := coalesce(current_setting('pgsidecar.op', true), '');
    head  text := '{"op":"sess","items":[';
    items text[];
BEGIN
    IF NOT EXISTS (SELECT 1 FROM %1$s.listeners WHERE until > now()) THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        SELECT array_agg(json_build_array(encode(token_hash, 'hex'), user_id, id)::text) INTO items
        FROM written;
    ELSE
        SELECT array_agg(json_build_array(encode(token_hash, 'hex'), user_id, id)::text) INTO items
        FROM gone WHERE expires_at > now();
        IF items IS NOT NULL AND op = 'revoke_user' THEN
            PERFORM pg_notify(TG_TABLE_SCHEMA, json_build_object(
                'op', 'revoke_all', 'user_id', current_setting('pgsidecar.arg'))::text);
        ELSE
            head := '{"op":"revoke","items":[';
        END IF;
    END IF;
    IF items IS NOT NULL THEN
        PERFORM %1$s.notify_items(TG_TABLE_SCHEMA, head, items);
    END IF;
    RETURN NULL;
END $$;$fn$, s);

-- Waiters for a key wake up when its live lease goes (released, voided): a lease that simply
-- expires wakes them by their own timer.
EXECUTE format($fn$CREATE FUNCTION %1$s.cache_leases_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    whole text;
    total int8;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM %1$s.listeners WHERE until > now()) THEN
        RETURN NULL;
    END IF;
    SELECT string_agg(i, ','), sum(octet_length(i) + 1) INTO whole, total
    FROM (SELECT to_json(key)::text AS i FROM gone WHERE expires_at > now()) s;
    IF whole IS NULL THEN
        RETURN NULL;
    END IF;
    IF total <= 7800 THEN
        PERFORM pg_notify(TG_TABLE_SCHEMA, '{"op":"lease","items":[' || whole || ']}');
    ELSE
        PERFORM pg_notify(TG_TABLE_SCHEMA, '{"op":"lease","all":true}');
    END IF;
    RETURN NULL;
END $$;$fn$, s);
END $migration$;

CREATE TRIGGER cache_inserted AFTER INSERT ON cache REFERENCING NEW TABLE AS written
    FOR EACH STATEMENT EXECUTE FUNCTION cache_changed();
CREATE TRIGGER cache_updated AFTER UPDATE ON cache REFERENCING NEW TABLE AS written
    FOR EACH STATEMENT EXECUTE FUNCTION cache_changed();
CREATE TRIGGER cache_deleted AFTER DELETE ON cache REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION cache_changed();
CREATE TRIGGER cache_tags_inserted AFTER INSERT ON cache_tags REFERENCING NEW TABLE AS written
    FOR EACH STATEMENT EXECUTE FUNCTION cache_tags_changed();
CREATE TRIGGER cache_tags_updated AFTER UPDATE ON cache_tags REFERENCING NEW TABLE AS written
    FOR EACH STATEMENT EXECUTE FUNCTION cache_tags_changed();
CREATE TRIGGER sessions_updated AFTER UPDATE ON sessions REFERENCING NEW TABLE AS written
    FOR EACH STATEMENT EXECUTE FUNCTION sessions_changed();
CREATE TRIGGER sessions_deleted AFTER DELETE ON sessions REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION sessions_changed();
CREATE TRIGGER cache_leases_deleted AFTER DELETE ON cache_leases REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION cache_leases_changed();
