//! Settings: layered loading (defaults < file < environment), validation and redaction.
//!
//! `config/default.toml` is compiled into the binary and is the one place that lists every
//! key with its default. A file given with `--config` or `PGSIDECAR_CONFIG` is layered on top,
//! then `PGSIDECAR_<SECTION>__<KEY>` variables, then `DATABASE_URL`. The rest of the code reads
//! only the typed [`Settings`].

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The defaults, embedded so the binary runs with no file at all.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// A configuration problem: which key, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    fn new(key: &str, message: impl Into<String>) -> Self {
        Self {
            key: key.to_string(),
            message: message.into(),
        }
    }
}

/// A string that must never be printed: `Debug` and `Serialize` show a placeholder.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "\"[redacted]\""
        })
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "[redacted]" })
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        lenient_string(d).map(Secret)
    }
}

/// Environment values are parsed as TOML-ish scalars by figment, so a secret of `12345` arrives
/// as a number: accept any scalar where a string is expected.
fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        I(i64),
        U(u64),
        F(f64),
        B(bool),
    }
    Ok(match Scalar::deserialize(d)? {
        Scalar::S(s) => s,
        Scalar::I(i) => i.to_string(),
        Scalar::U(u) => u.to_string(),
        Scalar::F(f) => f.to_string(),
        Scalar::B(b) => b.to_string(),
    })
}

/// The database URL; shown with its password replaced.
#[derive(Clone, Deserialize)]
pub struct DatabaseUrl(#[serde(deserialize_with = "lenient_string")] String);

impl DatabaseUrl {
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// The URL with any password replaced by `[redacted]`, safe for logs.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl Serialize for DatabaseUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

/// Replaces the password of `scheme://user:password@host/...`, the value of every query
/// parameter whose name looks secret (see `secret_param`) and any fragment with `[redacted]`.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest_start = scheme_end + 3;
        let authority_end = out[rest_start..]
            .find(['/', '?', '#'])
            .map_or(out.len(), |i| rest_start + i);
        if let Some(at) = out[rest_start..authority_end].rfind('@') {
            let userinfo = &out[rest_start..rest_start + at];
            if let Some(colon) = userinfo.find(':') {
                let start = rest_start + colon + 1;
                out.replace_range(start..rest_start + at, "[redacted]");
            }
        }
    }
    // A fragment never reaches the server but may carry a token (`#access_token=...`).
    if let Some(hash) = out.find('#') {
        out.replace_range(hash + 1.., "[redacted]");
    }
    if let Some(q) = out.find('?') {
        let end = out.find('#').unwrap_or(out.len());
        let redacted: Vec<String> = out[q + 1..end]
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if secret_param(k) => format!("{k}=[redacted]"),
                _ => pair.to_string(),
            })
            .collect();
        out.replace_range(q + 1..end, &redacted.join("&"));
    }
    out
}

/// Whether a query parameter's name looks like it carries a secret: `password`, `token`,
/// `api_key`, `apikey`, `secret`, `sig`, `auth`, `credential` and the like (also inside longer
/// names, in any case, percent-encoded or not). Too wide rather than too narrow: hiding a
/// harmless value costs nothing, printing a key costs a rotation.
fn secret_param(name: &str) -> bool {
    let mut decoded = Vec::with_capacity(name.len());
    let bytes = name.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).and_then(|&b| hex(b)),
            bytes.get(i + 2).and_then(|&b| hex(b)),
        ) {
            (b'%', Some(h), Some(l)) => {
                decoded.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    let name = String::from_utf8_lossy(&decoded).to_ascii_lowercase();
    [
        "pass",
        "pwd",
        "token",
        "secret",
        "key",
        "auth",
        "sig",
        "credential",
        "session",
    ]
    .iter()
    .any(|word| name.contains(word))
}

/// Where a listener binds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl ListenAddr {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if let Some(path) = raw.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix socket path is empty".into());
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        raw.parse::<SocketAddr>().map(Self::Tcp).map_err(|_| {
            format!("{raw:?} is not host:port (an IP address and a port) or unix:/path")
        })
    }

    /// True for addresses only this machine can reach.
    pub fn is_local(&self) -> bool {
        match self {
            Self::Tcp(addr) => addr.ip().is_loopback(),
            Self::Unix(_) => true,
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl From<ListenAddr> for String {
    fn from(a: ListenAddr) -> String {
        a.to_string()
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = lenient_string(d)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub batch: BatchSettings,
    pub sessions: SessionSettings,
    pub cache: CacheSettings,
    pub cleanup: CleanupSettings,
    pub events: EventsSettings,
    pub health: HealthSettings,
    pub shutdown: ShutdownSettings,
    pub log: LogSettings,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub data_listen: ListenAddr,
    pub ops_listen: ListenAddr,
    pub auth_token: Secret,
    pub request_timeout_ms: u64,
    pub max_body_bytes: usize,
    pub header_read_timeout_ms: u64,
    pub max_concurrent_requests: usize,
    pub worker_threads: usize,
    pub body_read_timeout_ms: u64,
    pub max_body_bytes_in_flight: usize,
    pub max_response_bytes_in_flight: usize,
    pub keep_alive_idle_seconds: u64,
    pub max_connections: usize,
    pub ops_max_connections: usize,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: DatabaseUrl,
    pub max_connections: u32,
    pub min_connections: u32,
    pub idle_timeout_seconds: u64,
    pub connect_timeout_seconds: u64,
    pub acquire_timeout_ms: u64,
    pub statement_timeout_ms: u64,
    pub schema: String,
    pub migrate_on_start: bool,
    pub circuit_failure_threshold: u32,
    /// Applies migrations over this URL instead of `url` (a direct one, when `url` is a pooler).
    pub migrate_url: DatabaseUrl,
    /// What sits between the sidecar and PostgreSQL.
    pub pooler: Pooler,
    /// Under `pooler = "transaction"`: keep named prepared statements (PgBouncer 1.21 or newer
    /// with `max_prepared_statements`).
    pub pooler_prepared_statements: bool,
    /// A pooled connection is closed after this long (0 = never).
    pub max_lifetime_seconds: u64,
    /// The URL of the one listening connection (LISTEN needs a session); empty: `url`, except
    /// behind a transaction-mode pooler, where notifications are then off.
    pub listen_url: DatabaseUrl,
}

impl DatabaseSettings {
    /// Whether migrations may be applied by this process: not over a transaction-mode pooler,
    /// where the migrator's session advisory lock (and its prepared statements) would not hold.
    pub fn can_migrate(&self) -> bool {
        self.pooler != Pooler::Transaction || !self.migrate_url.expose().is_empty()
    }
}

/// What sits between the sidecar and PostgreSQL (`database.pooler`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooler {
    /// Direct connections: start-up options, prepared statements, advisory-lock migrations.
    None,
    /// A pooler that gives each client connection one server connection for its whole life
    /// (PgBouncer `pool_mode = session`).
    Session,
    /// A pooler that may run each transaction on another server connection (PgBouncer
    /// `pool_mode = transaction`).
    Transaction,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSettings {
    pub max_size: usize,
    pub max_in_flight: usize,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSettings {
    pub default_ttl_seconds: u32,
    pub update_age_seconds: u32,
    pub max_data_bytes: usize,
    pub max_per_user: u32,
    pub max_list_bytes: usize,
    pub near: NearSessionSettings,
}

/// `sessions.near`: validations answered from the sidecar's memory.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NearSessionSettings {
    pub enabled: bool,
    pub max_bytes: u64,
}

/// `cache.near`: cache reads answered from the sidecar's memory.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NearCacheSettings {
    pub enabled: bool,
    pub max_bytes: u64,
    /// Past this since the last heartbeat that arrived was sent, both near caches are emptied
    /// and bypassed.
    pub max_staleness_ms: u64,
}

/// `events`: the change feed (`GET /v1/events`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventsSettings {
    pub max_subscribers: usize,
    pub queue_events: usize,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSettings {
    pub default_ttl_seconds: u32,
    pub max_value_bytes: usize,
    pub max_bytes: u64,
    pub max_mget_bytes: usize,
    pub near: NearCacheSettings,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CleanupSettings {
    pub enabled: bool,
    pub interval_seconds: u64,
    pub batch_size: u32,
    pub lease_seconds: u32,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSettings {
    pub interval_ms: u64,
    pub postgres_interval_ms: u64,
    pub check_timeout_ms: u64,
    pub memory_warn_percent: f64,
    pub cpu_warn_percent: f64,
    pub disk_warn_percent: f64,
    pub disk_paths: Vec<PathBuf>,
    pub upstreams: Vec<UpstreamSettings>,
    /// `/ready` also needs PostgreSQL reachable (false: only the sidecar itself).
    pub ready_requires_database: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSettings {
    pub name: String,
    #[serde(serialize_with = "serialize_redacted_url")]
    pub url: String,
    #[serde(default = "default_upstream_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_true")]
    pub critical: bool,
    /// PEM CA certificates trusted for this https:// upstream, besides the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn serialize_redacted_url<S: Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(url))
}

fn default_upstream_timeout_ms() -> u64 {
    1000
}
fn default_true() -> bool {
    true
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    pub drain_seconds: u64,
    pub grace_seconds: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub level: String,
    pub access: AccessLog,
    pub access_slow_ms: u64,
    pub access_sample_rate: f64,
}

/// Which requests get an access line (`log.access`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLog {
    /// Every request.
    All,
    /// Server errors, client errors other than 404, requests slower than `log.access_slow_ms`,
    /// and a sample (`log.access_sample_rate`) of the rest.
    Errors,
    /// None.
    Off,
}

impl DatabaseSettings {
    /// The URL's TLS parameters (with libpq's `PGSSL*` environment variables as fallback).
    pub fn tls(&self) -> Result<crate::tls::PgTls, ConfigError> {
        crate::tls::PgTls::from_url(self.url.expose())
            .map_err(|e| ConfigError::new("database.url", e))
    }
}

/// Keys whose environment values are taken verbatim, never parsed as numbers or lists.
const TEXT_KEYS: [&str; 9] = [
    "server.auth_token",
    "server.data_listen",
    "server.ops_listen",
    "database.url",
    "database.migrate_url",
    "database.listen_url",
    "database.schema",
    "log.level",
    "log.access",
];

/// The longest TTL anyone may ask for: one year.
pub const MAX_TTL_SECONDS: u32 = 31_536_000;

impl Settings {
    /// Loads defaults, then `file` (if any), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(file, &env)
    }

    /// Like [`Settings::load`] with an explicit environment, so tests need not mutate the process.
    pub fn load_from(file: Option<&Path>, env: &[(String, String)]) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::new(
                    "--config",
                    format!("{} does not exist or is not a file", path.display()),
                ));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        Self::layer_env(figment, env)
    }

    /// Like [`Settings::load_from`] with the file's text given instead of its path: what the
    /// configuration fuzz target (`fuzz/fuzz_targets/config.rs`) drives, with no file per input.
    pub fn load_from_toml(toml: &str, env: &[(String, String)]) -> Result<Self, ConfigError> {
        let figment = Figment::from(Toml::string(DEFAULT_TOML)).merge(Toml::string(toml));
        Self::layer_env(figment, env)
    }

    /// The environment's layers over `figment` (defaults and file), then extraction and
    /// validation.
    fn layer_env(mut figment: Figment, env: &[(String, String)]) -> Result<Self, ConfigError> {
        // Only PGSIDECAR_<SECTION>__<KEY> names are keys; PGSIDECAR_CONFIG names the file.
        // Values are parsed like TOML scalars ("20" is a number, "true" a bool).
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("PGSIDECAR_") else {
                continue;
            };
            if !rest.contains("__") {
                continue;
            }
            let key = rest.to_ascii_lowercase().replace("__", ".");
            // Text keys stay text: a secret like "0123" must not become the number 123.
            let parsed = if TEXT_KEYS.contains(&key.as_str()) {
                figment::value::Value::from(value.clone())
            } else {
                value
                    .parse::<figment::value::Value>()
                    .unwrap_or_else(|_| figment::value::Value::from(value.clone()))
            };
            figment = figment.merge(Serialized::default(&key, parsed));
        }
        if let Some((_, url)) = env.iter().find(|(k, _)| k == "DATABASE_URL") {
            figment = figment.merge(("database.url", url.as_str()));
        }
        // RUST_LOG overrides log.level (see `telemetry::init`), so it is held to the same rules.
        if let Some((_, filter)) = env.iter().find(|(k, v)| k == "RUST_LOG" && !v.is_empty()) {
            check_log_filter(filter).map_err(|m| ConfigError::new("RUST_LOG", m))?;
        }
        let settings: Settings = figment.extract().map_err(|e| {
            let key = e.path.join(".");
            let key = if key.is_empty() {
                "config".to_string()
            } else {
                key
            };
            ConfigError::new(&key, e.kind.to_string())
        })?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if !s.data_listen.is_local() && s.auth_token.is_empty() {
            return Err(ConfigError::new(
                "server.data_listen",
                format!(
                    "{} is not a loopback address; set server.auth_token to expose the data API beyond this host",
                    s.data_listen
                ),
            ));
        }
        if matches!(s.ops_listen, ListenAddr::Unix(_)) {
            return Err(ConfigError::new(
                "server.ops_listen",
                "must be host:port (load balancers and Prometheus connect over TCP)",
            ));
        }
        if !s.auth_token.is_empty() && s.auth_token.expose().len() < 16 {
            return Err(ConfigError::new(
                "server.auth_token",
                "must be at least 16 characters when set",
            ));
        }
        positive("server.request_timeout_ms", s.request_timeout_ms)?;
        positive("server.header_read_timeout_ms", s.header_read_timeout_ms)?;
        if s.worker_threads > 256 {
            return Err(ConfigError::new(
                "server.worker_threads",
                "must be between 0 (one per CPU) and 256",
            ));
        }
        if s.worker_threads > self.database.max_connections as usize {
            return Err(ConfigError::new(
                "server.worker_threads",
                "must not exceed database.max_connections: each data thread has its own connections",
            ));
        }
        positive(
            "server.max_concurrent_requests",
            s.max_concurrent_requests as u64,
        )?;
        if s.max_body_bytes < 1024 {
            return Err(ConfigError::new(
                "server.max_body_bytes",
                "must be at least 1024",
            ));
        }
        positive("server.body_read_timeout_ms", s.body_read_timeout_ms)?;
        if s.max_body_bytes_in_flight < s.max_body_bytes {
            return Err(ConfigError::new(
                "server.max_body_bytes_in_flight",
                "must be at least server.max_body_bytes (one largest body must fit)",
            ));
        }
        positive("server.keep_alive_idle_seconds", s.keep_alive_idle_seconds)?;
        positive("server.max_connections", s.max_connections as u64)?;
        positive("server.ops_max_connections", s.ops_max_connections as u64)?;

        let d = &self.database;
        let url = d.url.expose();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(ConfigError::new(
                "database.url",
                "must start with postgres:// or postgresql://",
            ));
        }
        // sslmode, sslrootcert, sslcert, sslkey: supported as libpq means them, and their
        // files readable, so a TLS mistake stops the start (and check-config) with its name.
        d.tls()?
            .check()
            .map_err(|e| ConfigError::new("database.url", e))?;
        if url.parse::<sqlx::postgres::PgConnectOptions>().is_err() {
            return Err(ConfigError::new(
                "database.url",
                "is not a valid PostgreSQL URL",
            ));
        }
        let migrate_url = d.migrate_url.expose();
        if !migrate_url.is_empty()
            && (!(migrate_url.starts_with("postgres://")
                || migrate_url.starts_with("postgresql://"))
                || migrate_url
                    .parse::<sqlx::postgres::PgConnectOptions>()
                    .is_err())
        {
            return Err(ConfigError::new(
                "database.migrate_url",
                "must be empty or a PostgreSQL URL (postgres:// or postgresql://)",
            ));
        }
        let listen_url = d.listen_url.expose();
        if !listen_url.is_empty()
            && (!(listen_url.starts_with("postgres://") || listen_url.starts_with("postgresql://"))
                || listen_url
                    .parse::<sqlx::postgres::PgConnectOptions>()
                    .is_err())
        {
            return Err(ConfigError::new(
                "database.listen_url",
                "must be empty or a PostgreSQL URL (postgres:// or postgresql://)",
            ));
        }
        if d.pooler_prepared_statements && d.pooler != Pooler::Transaction {
            return Err(ConfigError::new(
                "database.pooler_prepared_statements",
                "applies only with database.pooler = \"transaction\" (the other modes keep prepared statements anyway)",
            ));
        }
        if d.max_connections == 0 || d.max_connections > 1000 {
            return Err(ConfigError::new(
                "database.max_connections",
                "must be between 1 and 1000",
            ));
        }
        if d.min_connections > d.max_connections {
            return Err(ConfigError::new(
                "database.min_connections",
                "must not exceed database.max_connections",
            ));
        }
        positive(
            "database.connect_timeout_seconds",
            d.connect_timeout_seconds,
        )?;
        positive("database.acquire_timeout_ms", d.acquire_timeout_ms)?;
        positive("database.statement_timeout_ms", d.statement_timeout_ms)?;
        if !(1..=100).contains(&d.circuit_failure_threshold) {
            return Err(ConfigError::new(
                "database.circuit_failure_threshold",
                "must be between 1 and 100",
            ));
        }
        if !is_identifier(&d.schema) {
            return Err(ConfigError::new(
                "database.schema",
                "must be a lower-case SQL identifier (a-z, 0-9, _; not starting with a digit; at most 63 bytes)",
            ));
        }

        if !(1..=10_000).contains(&self.batch.max_size) {
            return Err(ConfigError::new(
                "batch.max_size",
                "must be between 1 and 10000",
            ));
        }
        // Above what one kind can get of the pool it is capped (`batch::Share`), so that a small
        // pool does not also require lowering this.
        if !(1..=1000).contains(&self.batch.max_in_flight) {
            return Err(ConfigError::new(
                "batch.max_in_flight",
                "must be between 1 and 1000",
            ));
        }

        ttl(
            "sessions.default_ttl_seconds",
            self.sessions.default_ttl_seconds,
        )?;
        // 0 would make every validation a write; above the longest TTL it means nothing.
        ttl(
            "sessions.update_age_seconds",
            self.sessions.update_age_seconds,
        )?;
        positive(
            "sessions.max_data_bytes",
            self.sessions.max_data_bytes as u64,
        )?;
        if self.sessions.max_list_bytes < 2 * self.sessions.max_data_bytes {
            return Err(ConfigError::new(
                "sessions.max_list_bytes",
                "must be at least twice sessions.max_data_bytes (a page holds at least one session)",
            ));
        }
        ttl("cache.default_ttl_seconds", self.cache.default_ttl_seconds)?;
        positive("cache.max_value_bytes", self.cache.max_value_bytes as u64)?;
        if self.cache.max_value_bytes > s.max_body_bytes {
            return Err(ConfigError::new(
                "cache.max_value_bytes",
                "must not exceed server.max_body_bytes",
            ));
        }

        // A cap below one value would evict an entry as soon as it was written.
        let c = &self.cache;
        if c.max_bytes != 0 && c.max_bytes < c.max_value_bytes as u64 {
            return Err(ConfigError::new(
                "cache.max_bytes",
                "must be 0 (no cap) or at least cache.max_value_bytes",
            ));
        }
        if self.cache.max_mget_bytes < self.cache.max_value_bytes {
            return Err(ConfigError::new(
                "cache.max_mget_bytes",
                "must be at least cache.max_value_bytes (one largest value must fit)",
            ));
        }
        if s.max_response_bytes_in_flight
            < self.cache.max_mget_bytes.max(self.sessions.max_list_bytes)
        {
            return Err(ConfigError::new(
                "server.max_response_bytes_in_flight",
                "must be at least cache.max_mget_bytes and sessions.max_list_bytes (one largest answer must fit)",
            ));
        }

        let near = &self.cache.near;
        if near.enabled && near.max_bytes < 1024 * 1024 {
            return Err(ConfigError::new(
                "cache.near.max_bytes",
                "must be at least 1048576 (1 MiB) when cache.near.enabled",
            ));
        }
        if self.sessions.near.enabled && self.sessions.near.max_bytes < 1024 * 1024 {
            return Err(ConfigError::new(
                "sessions.near.max_bytes",
                "must be at least 1048576 (1 MiB) when sessions.near.enabled",
            ));
        }
        if !(50..=60_000).contains(&near.max_staleness_ms) {
            return Err(ConfigError::new(
                "cache.near.max_staleness_ms",
                "must be between 50 and 60000",
            ));
        }
        if !(1..=100_000).contains(&self.events.max_subscribers) {
            return Err(ConfigError::new(
                "events.max_subscribers",
                "must be between 1 and 100000",
            ));
        }
        if !(16..=1_000_000).contains(&self.events.queue_events) {
            return Err(ConfigError::new(
                "events.queue_events",
                "must be between 16 and 1000000",
            ));
        }

        positive("cleanup.interval_seconds", self.cleanup.interval_seconds)?;
        if !(1..=100_000).contains(&self.cleanup.batch_size) {
            return Err(ConfigError::new(
                "cleanup.batch_size",
                "must be between 1 and 100000",
            ));
        }
        positive("cleanup.lease_seconds", self.cleanup.lease_seconds as u64)?;

        let h = &self.health;
        if h.interval_ms < 100 {
            return Err(ConfigError::new(
                "health.interval_ms",
                "must be at least 100",
            ));
        }
        if h.postgres_interval_ms < 50 {
            return Err(ConfigError::new(
                "health.postgres_interval_ms",
                "must be at least 50",
            ));
        }
        positive("health.check_timeout_ms", h.check_timeout_ms)?;
        for (key, v) in [
            ("health.memory_warn_percent", h.memory_warn_percent),
            ("health.cpu_warn_percent", h.cpu_warn_percent),
            ("health.disk_warn_percent", h.disk_warn_percent),
        ] {
            if !(0.0..=100.0).contains(&v) {
                return Err(ConfigError::new(key, "must be between 0 and 100"));
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, u) in h.upstreams.iter().enumerate() {
            let key = format!("health.upstreams[{i}]");
            if u.name.is_empty()
                || !u
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(ConfigError::new(
                    &format!("{key}.name"),
                    "must be non-empty and use only a-z, A-Z, 0-9, -, _, .",
                ));
            }
            if !names.insert(u.name.clone()) {
                return Err(ConfigError::new(
                    &format!("{key}.name"),
                    format!("{:?} is used twice", u.name),
                ));
            }
            let https = u.url.starts_with("https://");
            if !(https || u.url.starts_with("http://")) || u.url.parse::<hyper::Uri>().is_err() {
                return Err(ConfigError::new(
                    &format!("{key}.url"),
                    "must be an http:// or https:// URL",
                ));
            }
            if let Some(ca) = &u.ca_file {
                if !https {
                    return Err(ConfigError::new(
                        &format!("{key}.ca_file"),
                        "applies to https:// URLs only",
                    ));
                }
                crate::tls::read_certs("ca_file", ca)
                    .map_err(|e| ConfigError::new(&format!("{key}.ca_file"), e))?;
            }
            positive(&format!("{key}.timeout_ms"), u.timeout_ms)?;
        }
        check_log_filter(&self.log.level).map_err(|m| ConfigError::new("log.level", m))?;
        if !(0.0..=1.0).contains(&self.log.access_sample_rate) {
            return Err(ConfigError::new(
                "log.access_sample_rate",
                "must be between 0 and 1",
            ));
        }
        Ok(())
    }

    /// How many threads serve the data API: `server.worker_threads`, or for 0 one per CPU (as
    /// the process's CPU affinity and cgroup quota allow), but at most one per
    /// [`CONNECTIONS_PER_AUTO_THREAD`] pool connections: every thread has its own slice of the pool.
    pub fn data_threads(&self) -> usize {
        match self.server.worker_threads {
            0 => {
                let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
                let by_pool =
                    (self.database.max_connections / CONNECTIONS_PER_AUTO_THREAD) as usize;
                cpus.min(by_pool).max(1)
            }
            n => n,
        }
    }

    /// The settings of data thread `i` of `n`: `database.max_connections` and
    /// `min_connections` divided among the threads, the first ones taking the remainder, so the
    /// threads together open no more connections than configured.
    pub fn for_data_thread(&self, i: usize, n: usize) -> Settings {
        let share = |total: u32| {
            let (n, i) = (n as u32, i as u32);
            total / n + u32::from(i < total % n)
        };
        let mut s = self.clone();
        s.database.max_connections = share(self.database.max_connections);
        s.database.min_connections = share(self.database.min_connections);
        s
    }

    /// `database.max_lifetime_seconds`, or `None` when 0 (no limit).
    pub fn max_lifetime(&self) -> Option<Duration> {
        let s = self.database.max_lifetime_seconds;
        (s > 0).then(|| Duration::from_secs(s))
    }

    /// `database.idle_timeout_seconds`, at least a second.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.database.idle_timeout_seconds.max(1))
    }

    /// The URL of the listening connection, or why there is none (notifications off): the
    /// explicit `database.listen_url`, else `database.url` unless that is a transaction-mode
    /// pooler (which cannot keep a LISTEN).
    pub fn listen_url(&self) -> Result<&DatabaseUrl, &'static str> {
        let d = &self.database;
        if !d.listen_url.expose().is_empty() {
            return Ok(&d.listen_url);
        }
        if d.pooler == Pooler::Transaction {
            return Err(
                "database.pooler = \"transaction\" without database.listen_url: a \
                 transaction-mode pooler cannot keep a LISTEN, so change notifications, the near \
                 caches, the change feed (/v1/events answers 503) and lease wake-ups are off \
                 (leases still work: waiters poll); set database.listen_url to a direct or \
                 session-mode URL to turn them on",
            );
        }
        Ok(&d.url)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.server.request_timeout_ms)
    }

    /// The effective settings as JSON with every secret redacted, for the start-up line and `check-config`.
    pub fn redacted_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// `server.worker_threads = 0` starts one data thread per CPU, but none with fewer pool
/// connections than this: the smallest slice in which the batchers still reserve a connection
/// per kind and leave two for unbatched statements (see `store::batch::Share`).
pub const CONNECTIONS_PER_AUTO_THREAD: u32 = 10;

fn positive(key: &str, v: u64) -> Result<(), ConfigError> {
    if v == 0 {
        return Err(ConfigError::new(key, "must be greater than 0"));
    }
    Ok(())
}

fn ttl(key: &str, v: u32) -> Result<(), ConfigError> {
    if !(1..=MAX_TTL_SECONDS).contains(&v) {
        return Err(ConfigError::new(
            key,
            format!("must be between 1 and {MAX_TTL_SECONDS}"),
        ));
    }
    Ok(())
}

/// A log filter: a level, or comma-separated `target=level` directives. tracing's `EnvFilter`
/// alone is too lenient: it takes a bare word such as "verbose" for a target name, which turns
/// on that (non-existent) target only and so silences every line, the start line included.
fn check_log_filter(filter: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let directives: Vec<&str> = filter
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return Err("is empty; use a level: off, error, warn, info, debug or trace".into());
    }
    for d in directives {
        let level = match d.rsplit_once('=') {
            Some((target, level)) if !target.is_empty() => level,
            _ => d,
        };
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{d:?} is not a level (off, error, warn, info, debug, trace) or a target=level directive"
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(filter)
        .map(drop)
        .map_err(|e| format!("{filter:?} is not a tracing filter: {e}"))
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_load_and_validate() {
        let s = Settings::load_from(None, &[]).expect("defaults are valid");
        assert_eq!(s.database.max_connections, 20);
        assert_eq!(s.database.idle_timeout_seconds, 30);
        assert_eq!(s.database.connect_timeout_seconds, 10);
        assert_eq!(s.server.data_listen.to_string(), "127.0.0.1:7070");
    }

    #[test]
    fn env_overrides_single_keys() {
        let s = Settings::load_from(
            None,
            &env(&[
                ("PGSIDECAR_SERVER__DATA_LISTEN", "127.0.0.1:0"),
                ("PGSIDECAR_DATABASE__MAX_CONNECTIONS", "7"),
                ("PGSIDECAR_CONFIG", "/nonexistent-but-ignored-here"),
                ("DATABASE_URL", "postgres://u:hunter2@db:5432/app"),
            ]),
        )
        .unwrap();
        assert_eq!(s.server.data_listen.to_string(), "127.0.0.1:0");
        assert_eq!(s.database.max_connections, 7);
        assert_eq!(
            s.database.url.redacted(),
            "postgres://u:[redacted]@db:5432/app"
        );
        assert!(!s.redacted_json().to_string().contains("hunter2"));
    }

    #[test]
    fn data_threads_split_the_pool_without_exceeding_it() {
        let load = |pairs: &[(&str, &str)]| Settings::load_from(None, &env(pairs)).unwrap();
        let s = load(&[
            ("PGSIDECAR_SERVER__WORKER_THREADS", "3"),
            ("PGSIDECAR_DATABASE__MAX_CONNECTIONS", "20"),
            ("PGSIDECAR_DATABASE__MIN_CONNECTIONS", "2"),
        ]);
        assert_eq!(s.data_threads(), 3);
        let parts: Vec<_> = (0..3)
            .map(|i| s.for_data_thread(i, 3).database)
            .map(|d| (d.max_connections, d.min_connections))
            .collect();
        assert_eq!(parts, [(7, 1), (7, 1), (6, 0)]);
        // Auto: one per CPU, but never a thread with fewer than 10 connections of its own.
        let cpus = std::thread::available_parallelism().unwrap().get();
        let auto = |max: &str| load(&[("PGSIDECAR_DATABASE__MAX_CONNECTIONS", max)]).data_threads();
        assert_eq!(auto("20"), cpus.min(2));
        assert_eq!(auto("19"), 1);
        assert_eq!(auto("1000"), cpus.min(100));
        let e = Settings::load_from(
            None,
            &env(&[
                ("PGSIDECAR_SERVER__WORKER_THREADS", "5"),
                ("PGSIDECAR_DATABASE__MAX_CONNECTIONS", "4"),
            ]),
        )
        .unwrap_err();
        assert_eq!(e.key, "server.worker_threads");
    }

    #[test]
    fn leading_zeros_in_a_secret_survive() {
        let s = Settings::load_from(
            None,
            &env(&[("PGSIDECAR_SERVER__AUTH_TOKEN", "0000111122223333")]),
        )
        .unwrap();
        assert_eq!(s.server.auth_token.expose(), "0000111122223333");
    }

    #[test]
    fn numeric_secret_from_env_is_a_string() {
        let s = Settings::load_from(
            None,
            &env(&[("PGSIDECAR_SERVER__AUTH_TOKEN", "12345678901234567890")]),
        )
        .unwrap();
        assert_eq!(s.server.auth_token.expose(), "12345678901234567890");
        assert!(!s.redacted_json().to_string().contains("1234567890"));
    }

    #[test]
    fn public_data_listener_needs_a_secret() {
        let e = Settings::load_from(
            None,
            &env(&[("PGSIDECAR_SERVER__DATA_LISTEN", "0.0.0.0:7070")]),
        )
        .unwrap_err();
        assert_eq!(e.key, "server.data_listen");
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = Settings::load_from(
            None,
            &env(&[("PGSIDECAR_DATABASE__MAX_CONNECTIONS", "many")]),
        )
        .unwrap_err();
        assert_eq!(e.key, "database.max_connections");
        let e = Settings::load_from(
            None,
            &env(&[("PGSIDECAR_DATABASE__SCHEMA", "Robert'); drop")]),
        )
        .unwrap_err();
        assert_eq!(e.key, "database.schema");
        let e =
            Settings::load_from(None, &env(&[("PGSIDECAR_CACHE__MAX_BYTES", "1000")])).unwrap_err();
        assert_eq!(e.key, "cache.max_bytes");
        assert!(
            Settings::load_from(None, &env(&[("PGSIDECAR_CACHE__MAX_BYTES", "0")])).is_ok(),
            "0 = no cap"
        );
        for bad in ["0", "31536001"] {
            let e = Settings::load_from(
                None,
                &env(&[("PGSIDECAR_SESSIONS__UPDATE_AGE_SECONDS", bad)]),
            )
            .unwrap_err();
            assert_eq!(e.key, "sessions.update_age_seconds", "{bad}");
        }
        let e = Settings::load_from(None, &env(&[("PGSIDECAR_SERVER__NOPE", "1")])).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn batch_in_flight_may_exceed_a_small_pool_but_not_the_bounds() {
        // The default (8) with a pool of 4 is fine: the store caps it at its share of the pool.
        let s = Settings::load_from(None, &env(&[("PGSIDECAR_DATABASE__MAX_CONNECTIONS", "4")]))
            .unwrap();
        assert_eq!(s.batch.max_in_flight, 8);
        for bad in ["0", "1001"] {
            let e = Settings::load_from(None, &env(&[("PGSIDECAR_BATCH__MAX_IN_FLIGHT", bad)]))
                .unwrap_err();
            assert_eq!(e.key, "batch.max_in_flight", "{bad}");
        }
    }

    #[test]
    fn log_levels_are_checked_strictly() {
        let level = |v: &str| Settings::load_from(None, &env(&[("PGSIDECAR_LOG__LEVEL", v)]));
        for good in [
            "info",
            "DEBUG",
            "warn,sqlx=error",
            "pgsidecar=debug,sqlx=warn",
            "off",
        ] {
            assert!(level(good).is_ok(), "{good}");
        }
        for bad in [
            "verbose",
            "",
            " , ",
            "pgsidecar",
            "info,sqlx",
            "sqlx=loud",
            "=info",
        ] {
            let e = level(bad).unwrap_err();
            assert_eq!(e.key, "log.level", "{bad}");
        }
        let e = Settings::load_from(None, &env(&[("RUST_LOG", "verbose")])).unwrap_err();
        assert_eq!(e.key, "RUST_LOG");
        assert!(Settings::load_from(None, &env(&[("RUST_LOG", "debug")])).is_ok());
    }

    #[test]
    fn redacts_secret_query_parameters_and_fragments() {
        assert_eq!(
            redact_url("http://app:3000/health?token=t0k&x=1&api_key=k3y"),
            "http://app:3000/health?token=[redacted]&x=1&api_key=[redacted]"
        );
        assert_eq!(
            redact_url("http://h/p?ApiKey=1&access_token=2&X-Amz-Signature=3&client_secret=4"),
            "http://h/p?ApiKey=[redacted]&access_token=[redacted]&X-Amz-Signature=[redacted]&client_secret=[redacted]"
        );
        assert_eq!(
            redact_url("http://h/p?api%5Fkey=1&page=2&sslpassword=3"),
            "http://h/p?api%5Fkey=[redacted]&page=2&sslpassword=[redacted]"
        );
        assert_eq!(
            redact_url("http://h/p?q=1#access_token=abc"),
            "http://h/p?q=1#[redacted]"
        );
        assert_eq!(redact_url("http://h/p#x"), "http://h/p#[redacted]");
        // Nothing secret: unchanged.
        for plain in [
            "http://127.0.0.1:3000/api/health",
            "postgres://u@h:5432/d?sslmode=require&application_name=web",
            "http://h/p?flag&x=",
        ] {
            assert_eq!(redact_url(plain), plain);
        }
    }

    #[test]
    fn pooler_settings() {
        let load = |pairs: &[(&str, &str)]| Settings::load_from(None, &env(pairs));
        let d = load(&[]).unwrap().database;
        assert_eq!(d.pooler, Pooler::None);
        assert!(d.can_migrate());
        let d = load(&[("PGSIDECAR_DATABASE__POOLER", "transaction")])
            .unwrap()
            .database;
        assert_eq!(d.pooler, Pooler::Transaction);
        assert!(
            !d.can_migrate(),
            "no advisory lock through a transaction pooler"
        );
        let d = load(&[
            ("PGSIDECAR_DATABASE__POOLER", "transaction"),
            (
                "PGSIDECAR_DATABASE__MIGRATE_URL",
                "postgres://u:secret-pw@db/app",
            ),
        ])
        .unwrap();
        assert!(d.database.can_migrate());
        assert!(!d.redacted_json().to_string().contains("secret-pw"));
        for (pairs, key) in [
            (
                vec![("PGSIDECAR_DATABASE__POOLER", "statement")],
                "database.pooler",
            ),
            (
                vec![("PGSIDECAR_DATABASE__POOLER_PREPARED_STATEMENTS", "true")],
                "database.pooler_prepared_statements",
            ),
            (
                vec![("PGSIDECAR_DATABASE__MIGRATE_URL", "mysql://db/app")],
                "database.migrate_url",
            ),
        ] {
            assert_eq!(load(&pairs).unwrap_err().key, key);
        }
        let s = load(&[("PGSIDECAR_DATABASE__MAX_LIFETIME_SECONDS", "0")]).unwrap();
        assert_eq!(s.max_lifetime(), None);
        assert_eq!(
            load(&[]).unwrap().max_lifetime(),
            Some(Duration::from_secs(1800))
        );
    }

    #[test]
    fn budgets_must_hold_one_largest_item() {
        let key = |pairs: &[(&str, &str)]| Settings::load_from(None, &env(pairs)).unwrap_err().key;
        assert_eq!(
            key(&[("PGSIDECAR_SERVER__MAX_BODY_BYTES_IN_FLIGHT", "1024")]),
            "server.max_body_bytes_in_flight"
        );
        assert_eq!(
            key(&[("PGSIDECAR_CACHE__MAX_MGET_BYTES", "1024")]),
            "cache.max_mget_bytes"
        );
        assert_eq!(
            key(&[("PGSIDECAR_SESSIONS__MAX_LIST_BYTES", "65536")]),
            "sessions.max_list_bytes"
        );
        assert_eq!(
            key(&[("PGSIDECAR_SERVER__MAX_RESPONSE_BYTES_IN_FLIGHT", "1048576")]),
            "server.max_response_bytes_in_flight"
        );
        assert_eq!(
            key(&[("PGSIDECAR_SERVER__MAX_CONNECTIONS", "0")]),
            "server.max_connections"
        );
        assert_eq!(
            key(&[("PGSIDECAR_SERVER__KEEP_ALIVE_IDLE_SECONDS", "0")]),
            "server.keep_alive_idle_seconds"
        );
    }

    #[test]
    fn access_log_modes() {
        let load = |v: &str| Settings::load_from(None, &env(&[("PGSIDECAR_LOG__ACCESS", v)]));
        assert_eq!(load("all").unwrap().log.access, AccessLog::All);
        assert_eq!(load("off").unwrap().log.access, AccessLog::Off);
        assert_eq!(
            Settings::load_from(None, &[]).unwrap().log.access,
            AccessLog::Errors
        );
        assert_eq!(load("verbose").unwrap_err().key, "log.access");
        let e = Settings::load_from(None, &env(&[("PGSIDECAR_LOG__ACCESS_SAMPLE_RATE", "1.5")]))
            .unwrap_err();
        assert_eq!(e.key, "log.access_sample_rate");
    }

    #[test]
    fn redacts_passwords_in_urls() {
        assert_eq!(
            redact_url("postgres://a:b@h/d"),
            "postgres://a:[redacted]@h/d"
        );
        assert_eq!(redact_url("postgres://a@h/d"), "postgres://a@h/d");
        assert_eq!(
            redact_url("postgres://h/d?user=a&password=s3"),
            "postgres://h/d?user=a&password=[redacted]"
        );
        assert_eq!(
            redact_url("postgres://a:p%40ss@h:1/d"),
            "postgres://a:[redacted]@h:1/d"
        );
    }
}
