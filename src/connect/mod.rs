//! Every connection ghostwire makes, the way libpq makes it (DESIGN.md §1): URIs and
//! keyword/value strings ([`conninfo`]), the service file, the `PG*` environment and the
//! defaults ([`params`]), the password file ([`files`]), TLS by `sslmode` with rustls
//! ([`tls`]; the proxy's own side in [`tls_server`]), several hosts tried in turn with
//! `target_session_attrs`, and a timeout on every attempt. This is the only module that
//! knows about TLS.

pub mod conninfo;
pub mod env;
pub mod files;
pub mod params;
pub mod stream;
pub mod tls;
pub mod tls_server;

use std::time::Duration;

use rand::seq::SliceRandom;
use thiserror::Error;
use tokio_postgres::Client;

pub use conninfo::ConninfoError;
pub use params::{ChannelBinding, Host, HostKind, Params, Secret, SslMode, TargetSessionAttrs};
use tls::{ClientTls, HandshakeError, MakeConnector, TlsSetupError};

#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("invalid connection settings: {0}")]
    Invalid(#[from] ConninfoError),
    #[error("{0}")]
    Tls(#[from] TlsSetupError),
    #[error("could not connect to the database: {}{}", .attempts.join("; "), if *.nothing_given { ". No database was given: pass --database-url postgres://user@host:port/dbname, or set DATABASE_URL or PGHOST" } else { "" })]
    Failed { attempts: Vec<String>, nothing_given: bool },
}

impl ConnectError {
    /// Bad settings (refused before anything happened), as opposed to a server that could
    /// not be reached or refused the login.
    pub fn is_refusal(&self) -> bool {
        !matches!(self, ConnectError::Failed { .. })
    }
}

/// Parses `conninfo` (a URI or keyword/value string; none means the environment alone) and
/// names the sessions `name` unless the string names them.
pub fn params(conninfo: Option<&str>, name: &str) -> Result<Params, ConnectError> {
    Ok(Params::from_conninfo(conninfo)?.with_fallback_name(name))
}

/// Connects; the connection is driven by a spawned task until the client is dropped.
pub async fn connect(p: &Params) -> Result<Client, ConnectError> {
    let tls = if p.tls.mode == SslMode::Disable { None } else { Some(ClientTls::new(&p.tls)?) };
    let mut order: Vec<&Host> = p.hosts.iter().collect();
    if p.load_balance_hosts {
        order.shuffle(&mut rand::rng());
    }
    let passes: &[TargetSessionAttrs] = match p.target_session_attrs {
        TargetSessionAttrs::PreferStandby => &[TargetSessionAttrs::Standby, TargetSessionAttrs::Any],
        _ => std::slice::from_ref(&p.target_session_attrs),
    };
    let mut attempts = Vec::new();
    for attrs in passes {
        for host in &order {
            match connect_host(p, host, *attrs, tls.as_ref()).await {
                Ok(client) => return Ok(client),
                Err(e) => attempts.push(format!("{}: {e}", where_(host))),
            }
        }
    }
    Err(ConnectError::Failed { attempts, nothing_given: p.all_defaults })
}

fn where_(host: &Host) -> String {
    match &host.kind {
        HostKind::Tcp(name) => format!("server at \"{name}\", port {}", host.port),
        HostKind::Unix(dir) => format!("server on socket \"{}/.s.PGSQL.{}\"", dir.display(), host.port),
    }
}

/// The password for `host`: given, or from the password file.
pub(crate) fn password_for(p: &Params, host: &Host) -> Option<String> {
    if let Some(pw) = &p.password {
        return Some(pw.expose().to_owned());
    }
    let name = match &host.kind {
        HostKind::Tcp(h) => h.clone(),
        HostKind::Unix(dir) if dir.as_os_str() == "/var/run/postgresql" || dir.as_os_str() == "/tmp" => {
            "localhost".into()
        }
        HostKind::Unix(dir) => dir.display().to_string(),
    };
    let key = files::PassKey { host: &name, port: host.port, dbname: &p.dbname, user: &p.user };
    p.passfile.as_deref().and_then(|f| files::pgpass_lookup(f, &key))
}

fn base_config(p: &Params, host: &Host) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.user(&p.user).dbname(&p.dbname).port(host.port);
    match &host.kind {
        HostKind::Tcp(name) => c.host(name),
        HostKind::Unix(dir) => c.host_path(dir),
    };
    if let Some(a) = host.addr {
        c.hostaddr(a);
    }
    if let Some(pw) = password_for(p, host) {
        c.password(pw);
    }
    if let Some(o) = &p.options {
        c.options(o);
    }
    if let Some(name) = p.effective_application_name() {
        c.application_name(name);
    }
    c.connect_timeout(p.connect_timeout);
    match p.keepalives {
        Some(k) => {
            c.keepalives(true).keepalives_idle(k.idle).keepalives_interval(k.interval).keepalives_retries(k.count)
        }
        None => c.keepalives(false),
    };
    if let Some(t) = p.tcp_user_timeout {
        c.tcp_user_timeout(t);
    }
    c.channel_binding(match p.channel_binding {
        ChannelBinding::Disable => tokio_postgres::config::ChannelBinding::Disable,
        ChannelBinding::Prefer => tokio_postgres::config::ChannelBinding::Prefer,
        ChannelBinding::Require => tokio_postgres::config::ChannelBinding::Require,
    });
    if p.tls.direct {
        c.ssl_negotiation(tokio_postgres::config::SslNegotiation::Direct);
    }
    c
}

/// The sslmodes to try in turn for one host, as libpq does: `allow` tries plain text
/// first, `prefer` falls back to it when the TLS handshake fails. Unix sockets never use TLS.
fn modes(p: &Params, host: &Host) -> &'static [tokio_postgres::config::SslMode] {
    use tokio_postgres::config::SslMode as M;
    if matches!(host.kind, HostKind::Unix(_)) {
        return &[M::Disable];
    }
    match p.tls.mode {
        SslMode::Disable => &[M::Disable],
        SslMode::Allow => &[M::Disable, M::Require],
        SslMode::Prefer => &[M::Prefer, M::Disable],
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => &[M::Require],
    }
}

fn is_handshake_failure(e: &tokio_postgres::Error) -> bool {
    std::error::Error::source(e).is_some_and(|s| s.is::<HandshakeError>())
}

async fn connect_host(
    p: &Params,
    host: &Host,
    attrs: TargetSessionAttrs,
    tls: Option<&ClientTls>,
) -> Result<Client, String> {
    let mut config = base_config(p, host);
    let modes = modes(p, host);
    let mut last = String::new();
    for (i, mode) in modes.iter().enumerate() {
        config.ssl_mode(*mode);
        let connector = MakeConnector::new(tls.cloned(), host.name());
        let attempt = tokio::time::timeout(p.connect_timeout, config.connect(connector)).await;
        let (client, connection) = match attempt {
            Err(_) => {
                return Err(format!("timeout expired after {} s (connect_timeout)", p.connect_timeout.as_secs()));
            }
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => {
                last = describe(&e);
                let retry = match (p.tls.mode, i + 1 < modes.len()) {
                    (SslMode::Prefer, true) => is_handshake_failure(&e),
                    (SslMode::Allow, true) => e.as_db_error().is_some(),
                    _ => false,
                };
                if retry {
                    tracing::debug!(
                        "connecting to {}: {last}; trying again with sslmode {:?}",
                        host.name(),
                        modes[i + 1]
                    );
                    continue;
                }
                return Err(last);
            }
        };
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("database connection closed: {e}");
            }
        });
        check_session_attrs(&client, attrs).await?;
        return Ok(client);
    }
    Err(last)
}

async fn check_session_attrs(client: &Client, attrs: TargetSessionAttrs) -> Result<(), String> {
    if attrs == TargetSessionAttrs::Any {
        return Ok(());
    }
    let row = client
        .query_one("SELECT pg_catalog.pg_is_in_recovery(), pg_catalog.current_setting('transaction_read_only')", &[])
        .await
        .map_err(|e| describe(&e))?;
    let (standby, read_only): (bool, String) = (row.get(0), row.get(1));
    let read_only = read_only == "on";
    let refusal = match attrs {
        TargetSessionAttrs::ReadWrite if read_only => Some("session is read-only"),
        TargetSessionAttrs::ReadOnly if !read_only => Some("session is not read-only"),
        TargetSessionAttrs::Primary if standby => Some("server is in hot standby mode"),
        TargetSessionAttrs::Standby if !standby => Some("server is not in hot standby mode"),
        _ => None,
    };
    match refusal {
        Some(why) => Err(format!("{why} (target_session_attrs={})", attrs.as_str())),
        None => Ok(()),
    }
}

/// PostgreSQL's own words for an error: message, detail and hint (tokio-postgres's
/// `Display` says only "db error"); for other errors, the whole chain of causes.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = db.message().to_owned();
            if let Some(d) = db.detail() {
                s.push_str(&format!(" ({d})"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!("; hint: {h}"));
            }
            s
        }
        None => {
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                s.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            s
        }
    }
}

/// A database error displayed with the server's message.
#[derive(Debug)]
pub struct DbError(pub tokio_postgres::Error);

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&describe(&self.0))
    }
}

impl std::error::Error for DbError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// Whether an error means the session is gone (the server restarted or failed over, the
/// backend was terminated, the network dropped), so reconnecting may help; recognised by
/// SQLSTATE class and connection state, never by message.
pub fn is_connection_lost(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(code) => {
            let c = code.code();
            c.starts_with("08") || matches!(c, "57P01" | "57P02" | "57P03" | "57P05")
        }
        None => e.as_db_error().is_none() && std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>()),
    }
}

/// A short pause before the `attempt`-th reconnection (from 0): 0.1 s doubling to 5 s.
pub fn reconnect_pause(attempt: u32) -> Duration {
    Duration::from_millis(100).saturating_mul(1 << attempt.min(6)).min(Duration::from_secs(5))
}
