//! TLS: libpq's `sslmode`, `sslrootcert`, `sslcert` and `sslkey` for the Postgres connections,
//! the rustls set-up of the https:// upstream checks, and what a TLS failure is called in
//! `/health` and the logs.
//!
//! One TLS stack: rustls with the ring provider (no OpenSSL, which the distroless image lacks;
//! ring rather than aws-lc-rs because it builds without a C toolchain's cmake and NASM and adds
//! less to the binary, and sqlx's own `tls-rustls` picks it too).
//!
//! # Postgres: what sqlx does, and what this module adds
//! sqlx (feature `tls-rustls-ring-native-roots`) sends the SSLRequest for every mode but
//! `disable` and `allow`; on the server's "no" it goes on in plaintext only under `prefer`, and
//! fails under `require`, `verify-ca` and `verify-full`. `prefer` and `require` verify nothing;
//! `verify-ca` verifies the chain, `verify-full` the chain and the host name. Its trust store for
//! each handshake is the system's (read through rustls-native-certs, which honours
//! `SSL_CERT_FILE` and `SSL_CERT_DIR`) plus `sslrootcert`. Where that differs from libpq, this
//! module makes it agree ([`PgTls::apply`], [`PgTls::confine_trust`]) or refuses the setting
//! ([`PgTls::check`]):
//! - `sslrootcert=FILE` is the only trust anchor, as in libpq: else `verify-ca` (no host name
//!   check) would accept any certificate any public CA ever issued.
//! - `require` with `sslrootcert` verifies the chain (libpq: it then behaves as `verify-ca`).
//! - `sslrootcert=system` (libpq 16) trusts the system store and needs `verify-full` (its default).
//! - `verify-ca` without `sslrootcert` is refused: libpq fails without a root file too, and
//!   the system store would make it as weak as above.
//! - `allow` is refused: sqlx treats it as `disable`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore};
use sqlx::postgres::{PgConnectOptions, PgSslMode};

/// The crypto provider of every TLS connection the sidecar makes.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Which certificates verify the Postgres server (`sslrootcert`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootCert {
    /// Not given: the system store (sqlx's default).
    Unset,
    /// `sslrootcert=system`: the system store, as libpq 16 says it.
    System,
    /// A PEM file of CA certificates: the only trust anchors.
    File(PathBuf),
}

/// The TLS parameters of a Postgres URL, as libpq reads them: the URL's query first, then the
/// `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT` and `PGSSLKEY` environment variables (which sqlx
/// reads too), then the default `prefer`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgTls {
    /// The mode as given.
    pub mode: SslMode,
    /// Whether `sslmode` was given at all (`sslrootcert=system` changes the default).
    mode_given: bool,
    pub root_cert: RootCert,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl PgTls {
    /// Reads the TLS parameters of `url`, falling back to the process environment.
    pub fn from_url(url: &str) -> Result<Self, String> {
        Self::from_url_and_env(url, |k| std::env::var(k).ok())
    }

    fn from_url_and_env(url: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let parsed =
            url::Url::parse(url).map_err(|_| "is not a valid PostgreSQL URL".to_string())?;
        let (mut mode, mut root, mut cert, mut key) = (
            env("PGSSLMODE"),
            env("PGSSLROOTCERT"),
            env("PGSSLCERT"),
            env("PGSSLKEY"),
        );
        // The same names and aliases sqlx accepts.
        for (k, v) in parsed.query_pairs() {
            let v = Some(v.into_owned());
            match &*k {
                "sslmode" | "ssl-mode" => mode = v,
                "sslrootcert" | "ssl-root-cert" | "ssl-ca" => root = v,
                "sslcert" | "ssl-cert" => cert = v,
                "sslkey" | "ssl-key" => key = v,
                // sqlx would ignore it with a warning that logs its value: refuse it instead.
                "sslpassword" => {
                    return Err(
                        "sslpassword is not supported: give sslkey an unencrypted key".into(),
                    );
                }
                _ => {}
            }
        }
        let mode_given = mode.is_some();
        let mode = match mode.as_deref().unwrap_or("prefer") {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode={other:?} is not one of disable, prefer, require, verify-ca, verify-full"
                ));
            }
        };
        let root_cert = match root.as_deref() {
            None | Some("") => RootCert::Unset,
            Some("system") => RootCert::System,
            Some(path) => RootCert::File(PathBuf::from(path)),
        };
        let path = |v: Option<String>| v.filter(|s| !s.is_empty()).map(PathBuf::from);
        Ok(Self {
            mode,
            mode_given,
            root_cert,
            client_cert: path(cert),
            client_key: path(key),
        })
    }

    /// The mode the connections use: libpq's rules applied to what was given.
    pub fn effective_mode(&self) -> SslMode {
        match (self.mode, &self.root_cert) {
            // libpq: "if a root CA file exists, sslmode=require behaves as verify-ca".
            (SslMode::Require, RootCert::File(_)) => SslMode::VerifyCa,
            // libpq 16: sslrootcert=system defaults to verify-full.
            (_, RootCert::System) if !self.mode_given => SslMode::VerifyFull,
            (mode, _) => mode,
        }
    }

    fn uses_tls(&self) -> bool {
        !matches!(self.effective_mode(), SslMode::Disable | SslMode::Allow)
    }

    /// Refuses settings sqlx would not honour as libpq does, and certificate or key files that
    /// cannot be used (so they fail at start-up with their name, not at every connection).
    pub fn check(&self) -> Result<(), String> {
        let mode = self.effective_mode();
        if mode == SslMode::Allow {
            return Err(
                "sslmode=allow is not supported (it would never use TLS); use prefer, or disable"
                    .into(),
            );
        }
        if self.root_cert == RootCert::System && mode != SslMode::VerifyFull {
            return Err("sslrootcert=system needs sslmode=verify-full (as in libpq)".into());
        }
        if mode == SslMode::VerifyCa && self.root_cert == RootCert::Unset {
            return Err(
                "sslmode=verify-ca checks no host name, so it needs sslrootcert=FILE: \
                 the CA certificate(s) that signed the server's certificate"
                    .into(),
            );
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err("sslcert and sslkey must be given together".into());
        }
        if !self.uses_tls() {
            return Ok(());
        }
        if let RootCert::File(path) = &self.root_cert {
            read_certs("sslrootcert", path)?;
        }
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            let chain = read_certs("sslcert", cert)?;
            let key_der = read_key(key)?;
            // Builds the client configuration sqlx will build: a key that does not belong to the
            // certificate, or of an unsupported type, fails here.
            ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("tls: {e}"))?
                .with_root_certificates(RootCertStore::empty())
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| {
                    format!(
                        "sslkey {} cannot be used with sslcert {}: {e}",
                        key.display(),
                        cert.display()
                    )
                })?;
        }
        Ok(())
    }

    /// Applies libpq's rules (see [`PgTls::effective_mode`]) to options sqlx parsed from the
    /// same URL.
    pub fn apply(&self, opts: PgConnectOptions) -> PgConnectOptions {
        let opts = opts.ssl_mode(self.effective_mode().to_sqlx());
        match self.root_cert {
            // sqlx would read a file named "system": an empty PEM list leaves it the system store.
            RootCert::System => opts.ssl_root_cert_from_pem(Vec::new()),
            _ => opts,
        }
    }

    /// Makes `sslrootcert=FILE` the only trust anchors of the Postgres connections, as in libpq.
    ///
    /// sqlx starts every handshake's trust store from the system store, which rustls-native-certs
    /// reads from `SSL_CERT_FILE` when that is set, and adds `sslrootcert` to it. Pointing
    /// `SSL_CERT_FILE` at `sslrootcert` leaves that file alone; it is the only lever sqlx offers.
    /// With `keep_system_roots` (https:// upstreams will need them), the system store is loaded
    /// first (see [`system_roots`]).
    ///
    /// # Safety
    /// Changes the process environment: call it before any other thread starts.
    pub unsafe fn confine_trust(&self, keep_system_roots: bool) {
        if let RootCert::File(path) = &self.root_cert
            && matches!(
                self.effective_mode(),
                SslMode::VerifyCa | SslMode::VerifyFull
            )
        {
            if keep_system_roots {
                system_roots();
            }
            // SAFETY: the caller guarantees no other thread runs yet (see above).
            unsafe {
                std::env::set_var("SSL_CERT_FILE", path);
                std::env::remove_var("SSL_CERT_DIR");
            }
        }
    }

    /// What the connections verify, for the start-up log line.
    pub fn describe(&self) -> String {
        let mode = self.effective_mode();
        let name = mode.name();
        let trust = match &self.root_cert {
            RootCert::File(p) => format!("sslrootcert {}", p.display()),
            _ => "the system CA store".into(),
        };
        let what = match mode {
            SslMode::Disable | SslMode::Allow => "plaintext".to_string(),
            SslMode::Prefer => {
                "TLS when the server offers it, else plaintext; certificate not verified".into()
            }
            SslMode::Require => "TLS, never plaintext; certificate not verified".into(),
            SslMode::VerifyCa => format!("TLS; certificate chain verified against {trust}"),
            SslMode::VerifyFull => {
                format!("TLS; certificate chain verified against {trust}, and the host name")
            }
        };
        let client = if self.client_cert.is_some() && self.uses_tls() {
            "; client certificate sent"
        } else {
            ""
        };
        format!("sslmode={name}: {what}{client}")
    }
}

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Allow => "allow",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    fn to_sqlx(self) -> PgSslMode {
        match self {
            Self::Disable => PgSslMode::Disable,
            Self::Allow => PgSslMode::Allow,
            Self::Prefer => PgSslMode::Prefer,
            Self::Require => PgSslMode::Require,
            Self::VerifyCa => PgSslMode::VerifyCa,
            Self::VerifyFull => PgSslMode::VerifyFull,
        }
    }
}

/// The certificates of a PEM file; `what` names the setting in errors.
pub fn read_certs(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem =
        std::fs::read(path).map_err(|e| format!("{what} {}: cannot read: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {}: not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: holds no PEM certificate",
            path.display()
        ));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem =
        std::fs::read(path).map_err(|e| format!("sslkey {}: cannot read: {e}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| {
        format!(
            "sslkey {}: holds no unencrypted PEM private key (PKCS#8, PKCS#1 or SEC1)",
            path.display()
        )
    })
}

/// The system's CA certificates (`SSL_CERT_FILE` / `SSL_CERT_DIR` when set, else the platform's
/// bundle), loaded once: before [`PgTls::confine_trust`] changes `SSL_CERT_FILE`.
pub fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    // Unreadable entries are skipped: an upstream they would have verified fails its check
    // with "unknown issuer", which says where to look.
    ROOTS.get_or_init(|| rustls_native_certs::load_native_certs().certs)
}

/// The rustls configuration of an https:// upstream check: the system CAs, plus the
/// certificates of `ca_file` when given.
pub fn upstream_config(ca_file: Option<&Path>) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(system_roots().iter().cloned());
    if let Some(path) = ca_file {
        for cert in read_certs("ca_file", path)? {
            roots
                .add(cert)
                .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
        }
    }
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A TLS failure, named by what went wrong. Its text is fixed (it carries no error text from the
/// peer or the network), so it can go to `/health` and the logs as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsFailure {
    /// The server's certificate did not verify (unknown issuer, expired, ...).
    Untrusted(&'static str),
    /// The certificate verified, but names another host (verify-full).
    WrongHost,
    /// The server answered the TLS request with "no"; require and stricter never go on in
    /// plaintext.
    NotOffered,
    /// The server accepts only TLS connections (pg_hba.conf), and this one was plaintext.
    Required,
    /// The server refused the client certificate, or wants one.
    ClientCertRefused(&'static str),
    /// The handshake failed for another reason.
    Handshake(&'static str),
}

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Untrusted(why) => write!(f, "tls: server certificate not trusted ({why})"),
            Self::WrongHost => f.write_str(
                "tls: server certificate not valid for the host name connected to (verify-full)",
            ),
            Self::NotOffered => f.write_str(
                "tls: the server does not offer TLS, and sslmode=require or stricter never falls \
                 back to plaintext",
            ),
            Self::Required => f.write_str(
                "tls: the server accepts only TLS connections (pg_hba.conf hostssl); set \
                 sslmode=require or stricter",
            ),
            Self::ClientCertRefused(why) => {
                write!(f, "tls: client certificate refused by the server ({why})")
            }
            Self::Handshake(why) => write!(f, "tls: handshake failed ({why})"),
        }
    }
}

impl TlsFailure {
    /// Names a rustls error.
    pub fn from_rustls(e: &rustls::Error) -> Self {
        use CertificateError as C;
        match e {
            rustls::Error::InvalidCertificate(c) => match c {
                C::NotValidForName | C::NotValidForNameContext { .. } => Self::WrongHost,
                C::UnknownIssuer => Self::Untrusted("unknown issuer"),
                C::Expired | C::ExpiredContext { .. } => Self::Untrusted("expired"),
                C::NotValidYet | C::NotValidYetContext { .. } => Self::Untrusted("not yet valid"),
                C::Revoked => Self::Untrusted("revoked"),
                C::BadSignature => Self::Untrusted("bad signature"),
                C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
                    Self::Untrusted("not a server certificate")
                }
                C::BadEncoding => Self::Untrusted("malformed"),
                _ => Self::Untrusted("rejected"),
            },
            rustls::Error::NoCertificatesPresented => Self::Untrusted("none presented"),
            rustls::Error::AlertReceived(alert) => match alert {
                AlertDescription::UnknownCA => {
                    Self::ClientCertRefused("its issuer is unknown to the server")
                }
                AlertDescription::CertificateExpired => Self::ClientCertRefused("expired"),
                AlertDescription::CertificateRevoked => Self::ClientCertRefused("revoked"),
                AlertDescription::CertificateRequired => {
                    Self::ClientCertRefused("the server requires one")
                }
                AlertDescription::BadCertificate
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateUnknown
                | AlertDescription::AccessDenied => Self::ClientCertRefused("rejected"),
                AlertDescription::ProtocolVersion => Self::Handshake("no TLS version in common"),
                AlertDescription::HandshakeFailure | AlertDescription::InsufficientSecurity => {
                    Self::Handshake("no cipher suite or parameters in common")
                }
                _ => Self::Handshake("the server sent an alert"),
            },
            rustls::Error::PeerIncompatible(_) => {
                Self::Handshake("no TLS version or cipher suite in common")
            }
            rustls::Error::InvalidMessage(_) | rustls::Error::PeerMisbehaved(_) => {
                Self::Handshake("protocol error; is this a TLS server?")
            }
            _ => Self::Handshake("rustls error"),
        }
    }

    /// Finds a rustls error in `e` or its sources, also inside (nested) `io::Error`s, whose
    /// `source()` skips the error they wrap.
    pub fn find(e: &(dyn std::error::Error + 'static)) -> Option<Self> {
        let mut next = Some(e);
        while let Some(err) = next {
            if let Some(tls) = err.downcast_ref::<rustls::Error>() {
                return Some(Self::from_rustls(tls));
            }
            next = match err.downcast_ref::<std::io::Error>() {
                Some(io) => io.get_ref().map(|inner| inner as _),
                None => err.source(),
            };
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str, env: &[(&str, &str)]) -> PgTls {
        PgTls::from_url_and_env(url, |k| {
            env.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.to_string())
        })
        .unwrap()
    }

    #[test]
    fn libpq_rules_for_the_effective_mode() {
        let t = parse("postgres://h/d", &[]);
        assert_eq!(t.effective_mode(), SslMode::Prefer);
        assert_eq!(t.root_cert, RootCert::Unset);
        let t = parse("postgres://h/d?sslmode=require&sslrootcert=/ca.pem", &[]);
        assert_eq!(t.effective_mode(), SslMode::VerifyCa);
        let t = parse("postgres://h/d?sslrootcert=system", &[]);
        assert_eq!(t.effective_mode(), SslMode::VerifyFull);
        // The URL wins over the environment.
        let t = parse(
            "postgres://h/d?sslmode=disable",
            &[("PGSSLMODE", "verify-full")],
        );
        assert_eq!(t.effective_mode(), SslMode::Disable);
        let t = parse("postgres://h/d", &[("PGSSLMODE", "require")]);
        assert_eq!(t.effective_mode(), SslMode::Require);
        let t = parse("postgres://h/d?ssl-mode=verify-full&ssl-ca=/x.pem", &[]);
        assert_eq!(t.effective_mode(), SslMode::VerifyFull);
        assert_eq!(t.root_cert, RootCert::File("/x.pem".into()));
    }

    #[test]
    fn settings_sqlx_would_not_honour_are_refused() {
        let err = |url: &str| parse(url, &[]).check().unwrap_err();
        assert!(err("postgres://h/d?sslmode=allow").contains("allow"));
        assert!(err("postgres://h/d?sslmode=verify-ca").contains("sslrootcert"));
        assert!(err("postgres://h/d?sslmode=require&sslrootcert=system").contains("verify-full"));
        assert!(err("postgres://h/d?sslcert=/c.pem").contains("together"));
        assert!(
            err("postgres://h/d?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem")
                .contains("sslrootcert /nonexistent/ca.pem: cannot read")
        );
        let bad = PgTls::from_url_and_env("postgres://h/d?sslmode=sometimes", |_| None);
        assert!(bad.unwrap_err().contains("sometimes"));
        let secret = PgTls::from_url_and_env("postgres://h/d?sslpassword=hunter2", |_| None);
        let e = secret.unwrap_err();
        assert!(e.contains("sslpassword") && !e.contains("hunter2"), "{e}");
        // Files are not read when no TLS is used, and the defaults need none.
        parse(
            "postgres://h/d?sslmode=disable&sslrootcert=/nonexistent",
            &[],
        )
        .check()
        .unwrap();
        parse("postgres://h/d", &[]).check().unwrap();
        parse("postgres://h/d?sslmode=verify-full", &[])
            .check()
            .unwrap();
    }

    #[test]
    fn a_file_without_certificates_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let url = format!(
            "postgres://h/d?sslmode=verify-full&sslrootcert={}",
            path.display()
        );
        let e = parse(&url, &[]).check().unwrap_err();
        assert!(e.contains("holds no PEM certificate"), "{e}");
    }

    #[test]
    fn failures_read_as_what_they_are() {
        let unknown = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        assert_eq!(
            TlsFailure::from_rustls(&unknown).to_string(),
            "tls: server certificate not trusted (unknown issuer)"
        );
        // Inside an io::Error, as sqlx and hyper return it.
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, unknown);
        assert_eq!(
            TlsFailure::find(&io),
            Some(TlsFailure::Untrusted("unknown issuer"))
        );
        let host = rustls::Error::InvalidCertificate(CertificateError::NotValidForName);
        assert_eq!(TlsFailure::from_rustls(&host), TlsFailure::WrongHost);
        // Wrapped twice, as hyper-rustls returns it.
        let twice = std::io::Error::other(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::Expired),
        ));
        assert_eq!(
            TlsFailure::find(&twice),
            Some(TlsFailure::Untrusted("expired"))
        );
        let plain = std::io::Error::other("connection reset");
        assert_eq!(TlsFailure::find(&plain), None);
    }
}
