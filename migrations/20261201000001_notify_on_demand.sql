-- Notify on demand: the change triggers send notifications only while some sidecar of the fleet
-- needs them (a near cache on, a change-feed subscriber, a fill-lease waiter), that is while a
-- row of `listeners` is unexpired. A transaction that notifies takes a cluster-wide lock from
-- its NOTIFY's queue insert through its commit's WAL flush (PostgreSQL's PreCommit_Notify), so
-- notifying commits are serialized and lose group commit: with nobody listening, writes no
-- longer pay that (measured: 64 clients writing, 8,190 commits/s without a notifying trigger,
-- 370 to 1,370 with one).
--
-- A sidecar that needs notifications upserts its row (`until` 30 s ahead) every 5 s, deletes it
-- when it no longer needs them, and counts on them only once every transaction that could have
-- run its trigger before the row was visible has ended (see src/store/registry.rs).
--
-- Additive: a new table, and the four trigger functions replaced by the same ones with a check
-- first. The check names the table in this schema, spliced in here (format), so it works
-- whatever the caller's search_path and its plan is cached like any static statement.

CREATE TABLE listeners (
    id    text PRIMARY KEY,
    until timestamptz NOT NULL
);

DO $migration$
DECLARE
    -- The schema the tables were created in (this migration runs with it first on the
    -- search_path), as a quoted identifier.
    s text := (SELECT relnamespace::regnamespace::text FROM pg_class WHERE oid = 'cache'::regclass);
BEGIN
EXECUTE format($fn$CREATE OR REPLACE FUNCTION cache_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    op    text := coalesce(current_setting('pgsidecar.op', true), '');
    head  text;
    whole text;
    total int8;
    items text[];
    item  text;
    buf   text := '';
    sent  int := 0;
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
    IF total <= 7800 THEN
        PERFORM pg_notify(TG_TABLE_SCHEMA, head || whole || ']}');
        RETURN NULL;
    END IF;
    -- Far more than 64 notifications' worth: a flush at once, rather than 64 lists first.
    IF total > 64 * 7800 THEN
        PERFORM pg_notify(TG_TABLE_SCHEMA, '{"op":"flush"}');
        RETURN NULL;
    END IF;
    -- More than one notification's worth: split.
    IF TG_OP = 'DELETE' THEN
        SELECT array_agg(json_build_array(key, tags)::text) INTO items FROM gone WHERE expires_at > now();
    ELSE
        SELECT array_agg(json_build_array(key, tags)::text) INTO items FROM written;
    END IF;
    FOREACH item IN ARRAY items LOOP
        IF octet_length(item) > 7000 OR sent >= 64 THEN
            PERFORM pg_notify(TG_TABLE_SCHEMA, '{"op":"flush"}');
            RETURN NULL;
        END IF;
        IF octet_length(buf) + octet_length(item) > 7800 THEN
            PERFORM pg_notify(TG_TABLE_SCHEMA, head || buf || ']}');
            sent := sent + 1;
            buf := '';
        END IF;
        buf := CASE buf WHEN '' THEN item ELSE buf || ',' || item END;
    END LOOP;
    PERFORM pg_notify(TG_TABLE_SCHEMA, head || buf || ']}');
    RETURN NULL;
END $$;$fn$, s);

EXECUTE format($fn$CREATE OR REPLACE FUNCTION cache_tags_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    head  text;
    items text[];
    item  text;
    buf   text;
    sent  int := 0;
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
        buf := '';
        FOREACH item IN ARRAY items LOOP
            IF octet_length(item) > 7000 OR sent >= 64 THEN
                PERFORM pg_notify(TG_TABLE_SCHEMA, '{"op":"flush"}');
                RETURN NULL;
            END IF;
            IF octet_length(buf) + octet_length(item) > 7800 THEN
                PERFORM pg_notify(TG_TABLE_SCHEMA, head || buf || ']}');
                sent := sent + 1;
                buf := '';
            END IF;
            buf := CASE buf WHEN '' THEN item ELSE buf || ',' || item END;
        END LOOP;
        PERFORM pg_notify(TG_TABLE_SCHEMA, head || buf || ']}');
        sent := sent + 1;
    END LOOP;
    RETURN NULL;
END $$;$fn$, s);

EXECUTE format($fn$CREATE OR REPLACE FUNCTION sessions_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    op    text := coalesce(current_setting('pgsidecar.op', true), '');
    head  text;
    items text[];
    item  text;
    buf   text := '';
    sent  int := 0;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM %1$s.listeners WHERE until > now()) THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        head := '{"op":"sess","items":[';
        SELECT array_agg(json_build_array(encode(token_hash, 'hex'), user_id, id)::text) INTO items
        FROM written;
    ELSE
        SELECT array_agg(json_build_array(encode(token_hash, 'hex'), user_id, id)::text) INTO items
        FROM gone WHERE expires_at > now();
        IF items IS NULL THEN
            RETURN NULL;
        END IF;
        IF op = 'revoke_user' THEN
            PERFORM pg_notify(TG_TABLE_SCHEMA, json_build_object(
                'op', 'revoke_all', 'user_id', current_setting('pgsidecar.arg'))::text);
            head := '{"op":"sess","items":[';
        ELSE
            head := '{"op":"revoke","items":[';
        END IF;
    END IF;
    IF items IS NULL THEN
        RETURN NULL;
    END IF;
    FOREACH item IN ARRAY items LOOP
        IF octet_length(item) > 7000 OR sent >= 64 THEN
            PERFORM pg_notify(TG_TABLE_SCHEMA, '{"op":"flush"}');
            RETURN NULL;
        END IF;
        IF octet_length(buf) + octet_length(item) > 7800 THEN
            PERFORM pg_notify(TG_TABLE_SCHEMA, head || buf || ']}');
            sent := sent + 1;
            buf := '';
        END IF;
        buf := CASE buf WHEN '' THEN item ELSE buf || ',' || item END;
    END LOOP;
    PERFORM pg_notify(TG_TABLE_SCHEMA, head || buf || ']}');
    RETURN NULL;
END $$;$fn$, s);

EXECUTE format($fn$CREATE OR REPLACE FUNCTION cache_leases_changed() RETURNS trigger LANGUAGE plpgsql AS $$
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
