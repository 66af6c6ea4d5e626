//! Statement text with every table named in the configured schema.
//!
//! Statements name their tables `{schema}.table`; a store replaces the placeholder once, when it
//! is built. So no statement depends on a connection's `search_path`: behind a transaction-mode
//! pooler (PgBouncer) each transaction may run on another server connection, and none of them
//! carries the start-up options of ours.

use std::sync::Arc;

use sqlx::{AssertSqlSafe, SqlSafeStr, SqlStr};

/// The configured schema, ready to qualify statements.
#[derive(Clone, Debug)]
pub(crate) struct Schema {
    /// `"name".`, the prefix that replaces `{schema}.`.
    prefix: String,
}

impl Schema {
    /// `name` is validated by the configuration as a lower-case identifier; it is quoted all the
    /// same, so a reserved word (`user`) works too.
    pub fn new(name: &str) -> Self {
        Self {
            prefix: format!("\"{name}\"."),
        }
    }

    /// `template` with `{schema}.` replaced. The result is shared (cloning it costs one atomic
    /// increment), so statements are built once per store, not per call.
    pub fn sql(&self, template: &str) -> SqlStr {
        // Only the schema, a validated identifier, is spliced into the template, which callers
        // build from constants (and validated integers: the cleanup's batch size).
        let text: Arc<str> = template.replace("{schema}.", &self.prefix).into();
        AssertSqlSafe(text).into_sql_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qualifies_every_table_and_nothing_else() {
        let s = Schema::new("app_state");
        assert_eq!(
            s.sql("SELECT '{}'::text[], to_regclass('{schema}.cache') FROM {schema}.cache")
                .as_str(),
            "SELECT '{}'::text[], to_regclass('\"app_state\".cache') FROM \"app_state\".cache"
        );
    }
}
