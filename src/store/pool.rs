//! The sqlx pool and the options every connection starts with, directly or behind a pooler.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Executor, SqlSafeStr};

use super::DbError;
use crate::config::{DatabaseSettings, DatabaseUrl, Pooler, Settings};
use crate::tls::PgTls;

pub(crate) fn build_pool(settings: &Settings) -> Result<PgPool, DbError> {
    let d = &settings.database;
    let opts = parse_url(&d.url)?;
    let pool = PgPoolOptions::new()
        .max_connections(d.max_connections)
        .min_connections(d.min_connections)
        .idle_timeout(Some(settings.idle_timeout()))
        // Also enforced on the store's own free list (conns.rs), which sqlx does not see.
        .max_lifetime(settings.max_lifetime())
        .acquire_timeout(Duration::from_millis(d.acquire_timeout_ms))
        // sqlx pings a connection from its idle queue before handing it out, so one left
        // there from before a Postgres restart is never given to a statement. The store's own
        // free list (conns.rs) serves almost every statement, without that ping.
        .test_before_acquire(true);
    Ok(match d.pooler {
        Pooler::None => pool.connect_lazy_with(start_up_options(opts, d)),
        // The pooler refuses start-up parameters it does not know (PgBouncer: "unsupported
        // startup parameter"); these settings last for the session, which a session-mode
        // pooler gives this connection alone.
        Pooler::Session => {
            let set =
                AssertSqlSafe(session_settings(d, operator_chose_plans(&opts))).into_sql_str();
            pool.after_connect(move |conn, _| {
                let set = set.clone();
                Box::pin(async move { conn.execute(set).await.map(drop) })
            })
            .connect_lazy_with(without_start_up_options(opts))
        }
        // Applied per transaction instead (see `pooler.rs`).
        Pooler::Transaction => pool.connect_lazy_with(without_start_up_options(opts)),
    })
}

/// Whether `url`'s own `options` (or `PGOPTIONS`) choose `plan_cache_mode`, which then wins.
pub(crate) fn operator_chose_plans(opts: &PgConnectOptions) -> bool {
    opts.get_options()
        .is_some_and(|o| o.contains("plan_cache_mode"))
}

/// `url` as connect options, with sslmode, sslrootcert, sslcert and sslkey as libpq reads them
/// (see `tls`).
pub(crate) fn parse_url(url: &DatabaseUrl) -> Result<PgConnectOptions, DbError> {
    let invalid = |e: String| {
        DbError::Other(format!(
            "invalid database url: {}",
            crate::config::redact_url(&e)
        ))
    };
    let opts = url
        .expose()
        .parse::<PgConnectOptions>()
        .map_err(|e| invalid(e.to_string()))?
        .application_name("pgsidecar");
    Ok(PgTls::from_url(url.expose()).map_err(invalid)?.apply(opts))
}

/// Behind a pooler: no start-up parameter beyond those PgBouncer tracks itself (user, database,
/// client_encoding, DateStyle, TimeZone, application_name). sqlx's `extra_float_digits` is
/// dropped (the sidecar reads no floating-point column); an `options` given in the URL is the
/// operator's and kept (PgBouncer accepts it only when listed in `ignore_startup_parameters`).
fn without_start_up_options(opts: PgConnectOptions) -> PgConnectOptions {
    opts.extra_float_digits(None)
}

/// The `SET`s a session-mode connection runs once, after connecting: what the start-up options
/// carry on a direct one.
fn session_settings(d: &DatabaseSettings, operator_chose_plans: bool) -> String {
    let mut set = format!("SET statement_timeout = {}", d.statement_timeout_ms);
    if !operator_chose_plans {
        set.push_str("; SET plan_cache_mode = force_generic_plan");
    }
    set
}

/// The options of the one connection migrations run on: `migrate_url` when set (a direct
/// connection), else `url`. The schema goes first on its search_path (the migrations and
/// sqlx's ledger name no schema), as a start-up option on a direct connection, or as a `SET`
/// after connecting through a session-mode pooler (returned here). No statement timeout: a
/// migration that has started is never cut off halfway, and waiting for the migration lock
/// (while another sidecar migrates) is not an error.
pub(crate) fn migration_options(
    d: &DatabaseSettings,
) -> Result<(PgConnectOptions, Option<String>), DbError> {
    let direct = !d.migrate_url.expose().is_empty();
    let url = if direct { &d.migrate_url } else { &d.url };
    let opts = parse_url(url)?;
    if direct || d.pooler == Pooler::None {
        let opts = opts.options([
            ("search_path", d.schema.clone()),
            ("statement_timeout", "0".to_string()),
        ]);
        return Ok((opts, None));
    }
    Ok((
        without_start_up_options(opts),
        Some(format!(
            "SET search_path = \"{}\"; SET statement_timeout = 0",
            d.schema
        )),
    ))
}

/// Settings every connection starts with, after the ones the operator gave in the URL's
/// `options` or in `PGOPTIONS` (sqlx appends ours, and the last `-c` of a name wins).
fn start_up_options(opts: PgConnectOptions, d: &DatabaseSettings) -> PgConnectOptions {
    let operator_chose_plans = operator_chose_plans(&opts);
    let opts = opts.options([
        ("search_path", d.schema.clone()),
        ("statement_timeout", d.statement_timeout_ms.to_string()),
    ]);
    if operator_chose_plans {
        return opts;
    }
    // Plan each prepared statement once per connection (again only when Postgres invalidates
    // the plan). Left to choose, Postgres re-plans the batched `= ANY($1)` and `UNNEST`
    // statements on every execution: it costs their generic plan for ten elements and a custom
    // plan for the real count, so for small batches the custom one always looks cheaper. At one
    // connection that made a cache read cost Postgres about 100 µs of CPU instead of 55.
    // Every statement here keeps an index plan without its parameters' values: the prefix
    // delete is a key range and the cleanup's LIMIT a literal for that reason.
    // Needs PostgreSQL 12 or newer.
    opts.options([("plan_cache_mode", "force_generic_plan")])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options_for(url: &str) -> String {
        let d = Settings::load_from(None, &[]).unwrap().database;
        let opts = start_up_options(url.parse().unwrap(), &d);
        opts.get_options().unwrap_or_default().to_string()
    }

    fn database(pairs: &[(&str, &str)]) -> DatabaseSettings {
        let env: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::load_from(None, &env).unwrap().database
    }

    #[test]
    fn migrations_connect_directly_when_they_can() {
        // migrate_url: that server, with the schema on the search path as a start-up option.
        let d = database(&[
            ("PGSIDECAR_DATABASE__POOLER", "transaction"),
            (
                "PGSIDECAR_DATABASE__MIGRATE_URL",
                "postgres://u@primary:5432/app",
            ),
        ]);
        let (opts, after) = migration_options(&d).unwrap();
        assert_eq!(opts.get_host(), "primary");
        assert!(
            opts.get_options()
                .unwrap()
                .contains("search_path=pgsidecar")
        );
        assert!(after.is_none());
        // Through a session pooler: no start-up option, SETs after connecting.
        let d = database(&[("PGSIDECAR_DATABASE__POOLER", "session")]);
        let (opts, after) = migration_options(&d).unwrap();
        assert!(opts.get_options().is_none());
        assert_eq!(
            after.as_deref(),
            Some("SET search_path = \"pgsidecar\"; SET statement_timeout = 0")
        );
        assert_eq!(
            session_settings(&d, false),
            "SET statement_timeout = 2000; SET plan_cache_mode = force_generic_plan"
        );
    }

    #[test]
    fn connections_use_generic_plans_unless_the_operator_chose() {
        let ours = options_for("postgres://u@db/app");
        assert!(
            ours.contains("plan_cache_mode=force_generic_plan"),
            "{ours}"
        );
        assert!(ours.contains("statement_timeout=2000"), "{ours}");
        let theirs = options_for("postgres://u@db/app?options=-c%20plan_cache_mode%3Dauto");
        assert!(theirs.contains("plan_cache_mode=auto"), "{theirs}");
        assert!(!theirs.contains("force_generic_plan"), "{theirs}");
        assert!(theirs.contains("statement_timeout=2000"), "{theirs}");
    }
}
