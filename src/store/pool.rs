//! The sqlx pool and the options every connection starts with.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use super::DbError;
use crate::config::{DatabaseSettings, Settings};
use crate::tls::PgTls;

pub(crate) fn build_pool(settings: &Settings) -> Result<PgPool, DbError> {
    let d = &settings.database;
    let invalid = |e: String| {
        DbError::Other(format!(
            "invalid database url: {}",
            crate::config::redact_url(&e)
        ))
    };
    let opts: PgConnectOptions = d
        .url
        .expose()
        .parse::<PgConnectOptions>()
        .map_err(|e| invalid(e.to_string()))?
        .application_name("pgsidecar");
    // sslmode, sslrootcert, sslcert and sslkey as libpq reads them (see `tls`).
    let opts = PgTls::from_url(d.url.expose())
        .map_err(invalid)?
        .apply(opts);
    Ok(PgPoolOptions::new()
        .max_connections(d.max_connections)
        .min_connections(d.min_connections)
        .idle_timeout(Some(settings.idle_timeout()))
        .acquire_timeout(Duration::from_millis(d.acquire_timeout_ms))
        // sqlx pings a connection from its idle queue before handing it out, so one left
        // there from before a Postgres restart is never given to a statement. The store's own
        // free list (conns.rs) serves almost every statement, without that ping.
        .test_before_acquire(true)
        .connect_lazy_with(start_up_options(opts, d)))
}

/// Settings every connection starts with, after the ones the operator gave in the URL's
/// `options` or in `PGOPTIONS` (sqlx appends ours, and the last `-c` of a name wins).
fn start_up_options(opts: PgConnectOptions, d: &DatabaseSettings) -> PgConnectOptions {
    let operator_chose_plans = opts
        .get_options()
        .is_some_and(|o| o.contains("plan_cache_mode"));
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
