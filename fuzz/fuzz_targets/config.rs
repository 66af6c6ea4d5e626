//! The configuration loader (`Settings::load_from_toml`, the same layering as
//! `Settings::load_from`): the defaults, a file's TOML, then `PGSIDECAR_*` and `DATABASE_URL`
//! environment pairs.
//!
//! The input is structured so that most runs reach validation: values for real keys (taken
//! from `config/default.toml`) written as a TOML file and as environment pairs, or raw TOML.
//! Properties of every configuration that loads (and so has passed validation):
//! - loading is deterministic;
//! - written back out as a file (secrets included) and loaded again, it loads, to the same
//!   settings: what `check-config` shows is a configuration the sidecar accepts;
//! - the invariants the rest of the code relies on hold: every data thread gets at least one
//!   pool connection and the threads' shares add up to `database.max_connections`;
//! - no secret reaches the redacted form (`check-config`, the start-up line) or `Debug`: not
//!   the auth token, and not the database password as sqlx's URL parser reads it.
//!
//! Any input: an error names a key, and nothing panics.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use pgsidecar::config::{DEFAULT_TOML, Settings, redact_url};
use serde_json::Value;

/// Every `section.key` of the defaults.
fn keys() -> &'static [(String, String)] {
    static KEYS: OnceLock<Vec<(String, String)>> = OnceLock::new();
    KEYS.get_or_init(|| {
        let table: toml::Table = toml::from_str(DEFAULT_TOML).expect("the defaults parse");
        let mut keys = Vec::new();
        for (section, body) in table {
            if let toml::Value::Table(body) = body {
                for key in body.keys() {
                    keys.push((section.clone(), key.clone()));
                }
            }
        }
        keys
    })
}

/// Values that sit on the validation rules' edges.
const INTERESTING: &[&str] = &[
    "0",
    "1",
    "-1",
    "16",
    "100",
    "1024",
    "31536000",
    "31536001",
    "4294967296",
    "18446744073709551615",
    "1e308",
    "0.5",
    "true",
    "127.0.0.1:0",
    "[::1]:7070",
    "0.0.0.0:7070",
    "unix:/tmp/pgsidecar.sock",
    "unix:",
    "postgres://user:hunter2hunter2@db.example:5432/app?application_name=x",
    "postgresql://u:p%40ss@h/db?sslmode=verify-full&sslrootcert=/nonexistent",
    "postgres://h/db?password=topsecretvalue&sslmode=require",
    "postgres://a:b@c@d/e",
    "mysql://h/db",
    "http://127.0.0.1:3000/health?token=abc",
    "https://app.example/ready",
    "none",
    "session",
    "transaction",
    "info",
    "debug,pgsidecar=trace",
    "verbose",
    "all",
    "errors",
    "off",
    "pg_sidecar_2",
    "0123456789abcdef",
];

#[derive(Arbitrary, Debug)]
enum Scalar {
    Known(u8),
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
}

impl Scalar {
    fn text(&self) -> String {
        match self {
            Self::Known(i) => INTERESTING[*i as usize % INTERESTING.len()].to_string(),
            Self::Int(i) => i.to_string(),
            Self::Float(f) => f.to_string(),
            Self::Bool(b) => b.to_string(),
            Self::Text(s) => s.clone(),
        }
    }

    /// As a TOML value: what the text would be read as, like figment reads environment values.
    fn toml(&self) -> toml::Value {
        match self {
            Self::Int(i) => toml::Value::Integer(*i),
            Self::Float(f) => toml::Value::Float(*f),
            Self::Bool(b) => toml::Value::Boolean(*b),
            Self::Text(s) => toml::Value::String(s.clone()),
            Self::Known(_) => {
                let t = self.text();
                toml::from_str::<toml::Table>(&format!("v = {t}"))
                    .ok()
                    .and_then(|mut t| t.remove("v"))
                    .unwrap_or(toml::Value::String(t))
            }
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Upstream {
    /// `Ok(n)`: a valid name, `upstream-n` (so that whole upstream lists load too).
    name: Result<u8, Scalar>,
    url: Scalar,
    timeout_ms: Option<u16>,
    critical: Option<bool>,
}

#[derive(Arbitrary, Debug)]
enum File {
    /// Raw text, for the TOML parser's and figment's error paths.
    Raw(String),
    /// Values for known keys, written out as TOML.
    Keys {
        values: Vec<(u8, Scalar)>,
        upstreams: Vec<Upstream>,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    file: File,
    /// `PGSIDECAR_<SECTION>__<KEY>` pairs for known keys.
    env: Vec<(u8, Scalar)>,
    /// Any pairs (names not starting with PGSIDECAR_ are ignored).
    raw_env: Vec<(String, String)>,
    database_url: Option<Scalar>,
}

fn file_text(file: &File) -> String {
    match file {
        File::Raw(s) => s.clone(),
        File::Keys { values, upstreams } => {
            let keys = keys();
            let mut table = toml::Table::new();
            for (i, v) in values {
                let (section, key) = &keys[*i as usize % keys.len()];
                let entry = table
                    .entry(section.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                if let toml::Value::Table(t) = entry {
                    t.insert(key.clone(), v.toml());
                }
            }
            if !upstreams.is_empty() {
                let list = upstreams
                    .iter()
                    .map(|u| {
                        let mut t = toml::Table::new();
                        let name = match &u.name {
                            Ok(n) => toml::Value::String(format!("upstream-{n}")),
                            Err(s) => s.toml(),
                        };
                        t.insert("name".into(), name);
                        t.insert("url".into(), u.url.toml());
                        if let Some(ms) = u.timeout_ms {
                            t.insert("timeout_ms".into(), toml::Value::Integer(ms.into()));
                        }
                        if let Some(c) = u.critical {
                            t.insert("critical".into(), toml::Value::Boolean(c));
                        }
                        toml::Value::Table(t)
                    })
                    .collect();
                let health = table
                    .entry("health")
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                if let toml::Value::Table(h) = health {
                    h.insert("upstreams".into(), toml::Value::Array(list));
                }
            }
            toml::to_string(&table).unwrap_or_default()
        }
    }
}

/// The effective settings as a file, secrets included; `None` when TOML cannot say it (an
/// integer past i64, which an environment value can set).
fn dump(s: &Settings) -> Option<String> {
    let mut v = s.redacted_json();
    v["server"]["auth_token"] = Value::from(s.server.auth_token.expose());
    v["database"]["url"] = Value::from(s.database.url.expose());
    v["database"]["migrate_url"] = Value::from(s.database.migrate_url.expose());
    for (i, u) in s.health.upstreams.iter().enumerate() {
        v["health"]["upstreams"][i]["url"] = Value::from(u.url.as_str());
    }
    strip_nulls(&mut v);
    toml::to_string(&v).ok()
}

fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, v| !v.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// The password sqlx would send, as it appears in the URL's text.
fn password(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    parsed
        .password()
        .filter(|p| !p.is_empty())
        .map(String::from)
}

/// `url`'s password must not be in its redacted form, unless the URL holds that text elsewhere.
fn check_url_redaction(url: &str) {
    let redacted = redact_url(url);
    let Some(pw) = password(url) else { return };
    if !redacted.contains(&pw) {
        return;
    }
    // Where else may it be? The URL with the password cut out.
    let parsed = url::Url::parse(url).expect("parsed above");
    let mut without = parsed.clone();
    let _ = without.set_password(None);
    let elsewhere = without.as_str().contains(&pw) || url.replacen(&pw, "", 1).contains(&pw);
    assert!(
        elsewhere,
        "password {pw:?} of {url:?} left in its redacted form {redacted:?}"
    );
}

fuzz_target!(|input: Input| {
    let keys = keys();
    let file = file_text(&input.file);
    let mut env: Vec<(String, String)> = input
        .env
        .iter()
        .map(|(i, v)| {
            let (section, key) = &keys[*i as usize % keys.len()];
            (
                format!("PGSIDECAR_{}__{}", section, key).to_ascii_uppercase(),
                v.text(),
            )
        })
        .collect();
    env.extend(input.raw_env.iter().cloned());
    if let Some(url) = &input.database_url {
        env.push(("DATABASE_URL".into(), url.text()));
        check_url_redaction(&url.text());
    }

    let settings = match Settings::load_from_toml(&file, &env) {
        Ok(s) => s,
        Err(e) => {
            // The key is a real one (its section's), or the file as a whole.
            let section = e.key.split(['.', '[']).next().unwrap_or_default();
            assert!(
                ["config", "RUST_LOG"].contains(&e.key.as_str())
                    || keys.iter().any(|(s, _)| s == section),
                "the error names no key: {e}"
            );
            return;
        }
    };
    let shown = settings.redacted_json();

    // Deterministic.
    let again = Settings::load_from_toml(&file, &env).expect("loaded once, loads again");
    assert_eq!(again.redacted_json(), shown);

    // Written out and read back: the same settings.
    if let Some(text) = dump(&settings) {
        match Settings::load_from_toml(&text, &[]) {
            Ok(back) => {
                assert_eq!(back.redacted_json(), shown, "{text}");
                assert!(back.server.auth_token == settings.server.auth_token);
                assert_eq!(back.database.url.expose(), settings.database.url.expose());
            }
            Err(e) => panic!("the effective configuration does not load again: {e}\n{text}"),
        }
    }

    // Every data thread has connections of its own, and together no more than configured.
    let n = settings.data_threads();
    let max = settings.database.max_connections;
    assert!(
        n >= 1 && n as u32 <= max,
        "{n} threads for {max} connections"
    );
    let shares: Vec<Settings> = (0..n).map(|i| settings.for_data_thread(i, n)).collect();
    assert_eq!(
        shares
            .iter()
            .map(|s| s.database.max_connections)
            .sum::<u32>(),
        max
    );
    assert_eq!(
        shares
            .iter()
            .map(|s| s.database.min_connections)
            .sum::<u32>(),
        settings.database.min_connections
    );
    for s in &shares {
        assert!(s.database.max_connections >= 1);
        assert!(s.database.min_connections <= s.database.max_connections);
    }

    // Secrets stay out of what is shown. The token may equal other text of the configuration
    // (the fuzzer can make it so): it leaks when changing it changes what is shown.
    let token = settings.server.auth_token.expose();
    if !token.is_empty() {
        let text = shown.to_string();
        let debug = format!("{settings:?}");
        let mut other = env.clone();
        let replacement = if token == "Z".repeat(token.len()) {
            "Y"
        } else {
            "Z"
        };
        other.push((
            "PGSIDECAR_SERVER__AUTH_TOKEN".into(),
            replacement.repeat(token.len().max(16)),
        ));
        if let Ok(without) = Settings::load_from_toml(&file, &other) {
            let text2 = without.redacted_json().to_string();
            let debug2 = format!("{without:?}");
            assert_eq!(text.matches(token).count(), text2.matches(token).count());
            assert_eq!(debug.matches(token).count(), debug2.matches(token).count());
        }
    }
    check_url_redaction(settings.database.url.expose());
    check_url_redaction(settings.database.migrate_url.expose());
    for u in &settings.health.upstreams {
        check_url_redaction(&u.url);
    }
});
