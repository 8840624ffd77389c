//! Typed connection parameters, resolved as libpq resolves them: the connection string
//! first, then the service file (`service=` or `PGSERVICE`), then the `PG*` environment,
//! then the defaults. Values are checked here, so bad input is refused before any
//! connection is tried.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::conninfo::{self, Conninfo, ConninfoError};
pub use super::env::{Env, ProcessEnv};
use super::files;

/// A value that must never be printed (a password).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKind {
    Tcp(String),
    /// A Unix-domain socket directory.
    Unix(PathBuf),
}

/// One entry of the host list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub kind: HostKind,
    /// `hostaddr`: the address to connect to, skipping name resolution.
    pub addr: Option<IpAddr>,
    pub port: u16,
}

impl Host {
    /// The name certificates are checked against, and shown in messages.
    pub fn name(&self) -> String {
        match &self.kind {
            HostKind::Tcp(h) => h.clone(),
            HostKind::Unix(dir) => dir.display().to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// A plaintext connection is never acceptable.
    pub fn requires_tls(self) -> bool {
        self >= SslMode::Require
    }
}

/// Where the certificate authorities come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM file; `explicit` when given (else libpq's default `~/.postgresql/root.crt`).
    File { path: PathBuf, explicit: bool },
    /// The platform's trusted roots (`sslrootcert=system`).
    System,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

/// Everything about TLS on the client side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsParams {
    pub mode: SslMode,
    /// `sslnegotiation=direct`: the TLS handshake starts at once (PostgreSQL 17+), no SSLRequest.
    pub direct: bool,
    pub root: RootCert,
    /// The client certificate and key files (`sslcert`, `sslkey`); `explicit` when given.
    pub cert: PathBuf,
    pub key: PathBuf,
    pub cert_explicit: bool,
    /// `sslcertmode=disable`: never send a client certificate.
    pub send_cert: bool,
    /// Certificate revocation lists (`sslcrl`, and the files of `sslcrldir`).
    pub crl: Option<PathBuf>,
    pub crl_dir: Option<PathBuf>,
    /// Send the host name in the TLS handshake (SNI).
    pub sni: bool,
    pub min_version: TlsVersion,
    pub max_version: TlsVersion,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelBinding {
    Disable,
    Prefer,
    Require,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetSessionAttrs {
    Any,
    ReadWrite,
    ReadOnly,
    Primary,
    Standby,
    PreferStandby,
}

impl TargetSessionAttrs {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetSessionAttrs::Any => "any",
            TargetSessionAttrs::ReadWrite => "read-write",
            TargetSessionAttrs::ReadOnly => "read-only",
            TargetSessionAttrs::Primary => "primary",
            TargetSessionAttrs::Standby => "standby",
            TargetSessionAttrs::PreferStandby => "prefer-standby",
        }
    }
}

/// TCP keepalive settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalives {
    pub idle: Duration,
    pub interval: Duration,
    pub count: u32,
}

/// Defaults for ghostwire's sessions where libpq has none (or waits for hours): a run must
/// notice a dead server within about a minute, never hang on it.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_KEEPALIVES: Keepalives =
    Keepalives { idle: Duration::from_secs(30), interval: Duration::from_secs(10), count: 3 };
pub const DEFAULT_TCP_USER_TIMEOUT: Duration = Duration::from_secs(60);

/// Everything needed to connect, resolved and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    pub hosts: Vec<Host>,
    pub user: String,
    /// Given in the connection string, the service file or `PGPASSWORD`.
    pub password: Option<Secret>,
    /// The password file, consulted per host when no password is given.
    pub passfile: Option<PathBuf>,
    pub dbname: String,
    pub options: Option<String>,
    pub application_name: Option<String>,
    pub fallback_application_name: Option<String>,
    pub tls: TlsParams,
    pub channel_binding: ChannelBinding,
    /// Per host attempt.
    pub connect_timeout: Duration,
    pub keepalives: Option<Keepalives>,
    pub tcp_user_timeout: Option<Duration>,
    pub target_session_attrs: TargetSessionAttrs,
    pub load_balance_hosts: bool,
    /// `replication=database|true` (the replication client), as given.
    pub replication: Option<String>,
    /// Neither a connection string nor any PG* variable named a server.
    pub all_defaults: bool,
}

/// The environment variable behind each keyword, as in libpq.
const ENV_VARS: &[(&str, &str)] = &[
    ("host", "PGHOST"),
    ("hostaddr", "PGHOSTADDR"),
    ("port", "PGPORT"),
    ("dbname", "PGDATABASE"),
    ("user", "PGUSER"),
    ("password", "PGPASSWORD"),
    ("passfile", "PGPASSFILE"),
    ("channel_binding", "PGCHANNELBINDING"),
    ("options", "PGOPTIONS"),
    ("application_name", "PGAPPNAME"),
    ("sslmode", "PGSSLMODE"),
    ("sslnegotiation", "PGSSLNEGOTIATION"),
    ("sslcompression", "PGSSLCOMPRESSION"),
    ("sslcert", "PGSSLCERT"),
    ("sslkey", "PGSSLKEY"),
    ("sslcertmode", "PGSSLCERTMODE"),
    ("sslrootcert", "PGSSLROOTCERT"),
    ("sslcrl", "PGSSLCRL"),
    ("sslcrldir", "PGSSLCRLDIR"),
    ("sslsni", "PGSSLSNI"),
    ("requirepeer", "PGREQUIREPEER"),
    ("require_auth", "PGREQUIREAUTH"),
    ("ssl_min_protocol_version", "PGSSLMINPROTOCOLVERSION"),
    ("ssl_max_protocol_version", "PGSSLMAXPROTOCOLVERSION"),
    ("gssencmode", "PGGSSENCMODE"),
    ("krbsrvname", "PGKRBSRVNAME"),
    ("gsslib", "PGGSSLIB"),
    ("gssdelegation", "PGGSSDELEGATION"),
    ("connect_timeout", "PGCONNECT_TIMEOUT"),
    ("client_encoding", "PGCLIENTENCODING"),
    ("target_session_attrs", "PGTARGETSESSIONATTRS"),
    ("load_balance_hosts", "PGLOADBALANCEHOSTS"),
];

fn invalid(keyword: &str, value: &str, expected: &str) -> ConninfoError {
    ConninfoError::Uri(format!("invalid {keyword} value: \"{value}\"; expected {expected}"))
}

fn choice<T: Copy>(c: &Conninfo, keyword: &str, default: T, options: &[(&str, T)]) -> Result<T, ConninfoError> {
    let Some(v) = c.get(keyword) else { return Ok(default) };
    options.iter().find(|(name, _)| *name == v).map(|(_, t)| *t).ok_or_else(|| {
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        invalid(keyword, v, &names.join(", "))
    })
}

fn integer(c: &Conninfo, keyword: &str) -> Result<Option<i64>, ConninfoError> {
    c.get(keyword).map(|v| v.trim().parse::<i64>().map_err(|_| invalid(keyword, v, "an integer"))).transpose()
}

fn flag(c: &Conninfo, keyword: &str, default: bool) -> Result<bool, ConninfoError> {
    choice(c, keyword, default, &[("0", false), ("1", true)])
}

/// The socket directory libpq was built with on Debian, else the upstream default.
fn default_host(env: &dyn Env) -> HostKind {
    ["/var/run/postgresql", "/tmp"]
        .iter()
        .map(Path::new)
        .find(|p| env.exists(p))
        .map(|p| HostKind::Unix(p.to_path_buf()))
        .unwrap_or_else(|| HostKind::Tcp("localhost".into()))
}

impl Params {
    /// Resolves a connection string (or none) against this process's environment.
    pub fn from_conninfo(text: Option<&str>) -> Result<Params, ConninfoError> {
        Params::resolve(text, &ProcessEnv)
    }

    /// Resolves `text` with `env` standing for the environment.
    pub fn resolve(text: Option<&str>, env: &dyn Env) -> Result<Params, ConninfoError> {
        let given = match text.filter(|t| !t.trim().is_empty()) {
            Some(t) => conninfo::parse(t)?,
            None => Conninfo::default(),
        };
        let mut c = given.clone();
        let service = c.get("service").map(str::to_owned).or_else(|| env.var("PGSERVICE"));
        if let Some(name) = service {
            let mut files = Vec::new();
            match env.var("PGSERVICEFILE") {
                Some(f) => files.push(PathBuf::from(f)),
                None => files.extend(env.home().map(|h| h.join(".pg_service.conf"))),
            }
            let sysconf = env.var("PGSYSCONFDIR").unwrap_or_else(|| "/etc/postgresql-common".into());
            files.push(Path::new(&sysconf).join("pg_service.conf"));
            for (k, v) in files::find_service(&name, &files)?.pairs() {
                if !c.contains(k) {
                    c.set(k, v)?;
                }
            }
        }
        let mut from_env = false;
        for (keyword, var) in ENV_VARS {
            if !c.contains(keyword)
                && let Some(v) = env.var(var)
            {
                from_env |= matches!(*keyword, "host" | "hostaddr" | "port" | "dbname" | "user");
                c.set(keyword, v)?;
            }
        }
        let all_defaults = given.pairs().next().is_none() && !from_env && !c.contains("host");
        Params::typed(&c, env, all_defaults)
    }

    fn typed(c: &Conninfo, env: &dyn Env, all_defaults: bool) -> Result<Params, ConninfoError> {
        let home = env.home();
        let in_home = |file: &str| home.as_ref().map(|h| h.join(".postgresql").join(file)).unwrap_or_default();
        let hosts = hosts(c, env)?;
        let user = c.get("user").map(str::to_owned).or_else(|| env.os_user()).ok_or_else(|| {
            ConninfoError::Uri("no user name given and the operating-system user is unknown: pass user=…".into())
        })?;
        let dbname = c.get("dbname").map(str::to_owned).unwrap_or_else(|| user.clone());
        let root = match c.get("sslrootcert") {
            Some("system") => RootCert::System,
            Some(p) => RootCert::File { path: PathBuf::from(p), explicit: true },
            None => RootCert::File { path: in_home("root.crt"), explicit: false },
        };
        use SslMode::*;
        let modes = [
            ("disable", Disable),
            ("allow", Allow),
            ("prefer", Prefer),
            ("require", Require),
            ("verify-ca", VerifyCa),
            ("verify-full", VerifyFull),
        ];
        let default_mode = if root == RootCert::System { VerifyFull } else { Prefer };
        let mode = choice(c, "sslmode", default_mode, &modes)?;
        if root == RootCert::System && mode != VerifyFull {
            return Err(ConninfoError::Uri(format!(
                "weak sslmode \"{}\" may not be used with sslrootcert=system (use \"verify-full\")",
                mode.as_str()
            )));
        }
        let direct = choice(c, "sslnegotiation", false, &[("postgres", false), ("direct", true)])?;
        if direct && !mode.requires_tls() {
            return Err(ConninfoError::Uri(format!(
                "weak sslmode \"{}\" may not be used with sslnegotiation=direct (use \"require\", \"verify-ca\", or \
                 \"verify-full\")",
                mode.as_str()
            )));
        }
        let version = |keyword: &str, default| {
            choice(
                c,
                keyword,
                default,
                &[
                    ("TLSv1", TlsVersion::Tls12),
                    ("TLSv1.1", TlsVersion::Tls12),
                    ("TLSv1.2", TlsVersion::Tls12),
                    ("TLSv1.3", TlsVersion::Tls13),
                    ("", default),
                ],
            )
        };
        let (min_version, max_version) = (
            version("ssl_min_protocol_version", TlsVersion::Tls12)?,
            version("ssl_max_protocol_version", TlsVersion::Tls13)?,
        );
        if min_version == TlsVersion::Tls13 && max_version == TlsVersion::Tls12 {
            return Err(ConninfoError::Uri("ssl_min_protocol_version is above ssl_max_protocol_version".into()));
        }
        let send_cert = match c.get("sslcertmode") {
            None | Some("allow") => true,
            Some("disable") => false,
            Some("require") => return Err(unsupported("sslcertmode=require")),
            Some(v) => return Err(invalid("sslcertmode", v, "disable, allow or require")),
        };
        let tls = TlsParams {
            mode,
            direct,
            root,
            cert: c.get("sslcert").map(PathBuf::from).unwrap_or_else(|| in_home("postgresql.crt")),
            key: c.get("sslkey").map(PathBuf::from).unwrap_or_else(|| in_home("postgresql.key")),
            cert_explicit: c.contains("sslcert"),
            send_cert,
            crl: c.get("sslcrl").filter(|v| !v.is_empty()).map(PathBuf::from),
            crl_dir: c.get("sslcrldir").filter(|v| !v.is_empty()).map(PathBuf::from),
            sni: flag(c, "sslsni", true)?,
            min_version,
            max_version,
        };
        let channel_binding = choice(
            c,
            "channel_binding",
            ChannelBinding::Prefer,
            &[
                ("disable", ChannelBinding::Disable),
                ("prefer", ChannelBinding::Prefer),
                ("require", ChannelBinding::Require),
            ],
        )?;
        if channel_binding == ChannelBinding::Require && mode == Disable {
            return Err(ConninfoError::Uri(
                "channel_binding=require needs TLS, but sslmode is \"disable\": use sslmode=require or stronger".into(),
            ));
        }
        // What ghostwire cannot honour is refused, never silently dropped.
        if c.get("sslpassword").is_some_and(|p| !p.is_empty()) {
            return Err(unsupported("sslpassword (encrypted client keys): decrypt the key file, keep it mode 0600"));
        }
        if c.get("gssencmode") == Some("require") {
            return Err(unsupported("gssencmode=require (GSSAPI encryption); use TLS (sslmode) instead"));
        }
        choice(c, "gssencmode", (), &[("disable", ()), ("prefer", ()), ("require", ())])?;
        for keyword in ["requirepeer", "require_auth"] {
            if c.get(keyword).is_some_and(|v| !v.is_empty()) {
                return Err(unsupported(keyword));
            }
        }
        if let Some(enc) = c.get("client_encoding")
            && !matches!(enc.to_ascii_uppercase().replace('-', "").as_str(), "UTF8" | "UNICODE" | "AUTO")
        {
            return Err(ConninfoError::Uri(format!(
                "client_encoding \"{enc}\" is not supported: ghostwire always talks UTF8 (the server converts)"
            )));
        }
        let seconds = |keyword: &str| -> Result<Option<Duration>, ConninfoError> {
            Ok(integer(c, keyword)?.filter(|s| *s > 0).map(|s| Duration::from_secs(s as u64)))
        };
        // libpq waits forever when connect_timeout is 0 or unset; ghostwire never does.
        let connect_timeout = match integer(c, "connect_timeout")? {
            Some(s) if s > 0 => Duration::from_secs(s.max(2) as u64),
            _ => DEFAULT_CONNECT_TIMEOUT,
        };
        let keepalives = flag(c, "keepalives", true)?.then(|| -> Result<Keepalives, ConninfoError> {
            Ok(Keepalives {
                idle: seconds("keepalives_idle")?.unwrap_or(DEFAULT_KEEPALIVES.idle),
                interval: seconds("keepalives_interval")?.unwrap_or(DEFAULT_KEEPALIVES.interval),
                count: integer(c, "keepalives_count")?
                    .filter(|n| *n > 0)
                    .map(|n| n as u32)
                    .unwrap_or(DEFAULT_KEEPALIVES.count),
            })
        });
        let tcp_user_timeout = match integer(c, "tcp_user_timeout")? {
            Some(ms) if ms > 0 => Some(Duration::from_millis(ms as u64)),
            Some(_) => None,
            None => Some(DEFAULT_TCP_USER_TIMEOUT),
        };
        use TargetSessionAttrs as T;
        let target_session_attrs = choice(
            c,
            "target_session_attrs",
            T::Any,
            &[
                ("any", T::Any),
                ("read-write", T::ReadWrite),
                ("read-only", T::ReadOnly),
                ("primary", T::Primary),
                ("standby", T::Standby),
                ("prefer-standby", T::PreferStandby),
            ],
        )?;
        let load_balance_hosts = choice(c, "load_balance_hosts", false, &[("disable", false), ("random", true)])?;
        let replication = c.get("replication").map(str::to_owned);
        if let Some(r) = &replication {
            choice(
                c,
                "replication",
                (),
                &[
                    ("database", ()),
                    ("true", ()),
                    ("on", ()),
                    ("yes", ()),
                    ("1", ()),
                    ("false", ()),
                    ("off", ()),
                    ("no", ()),
                    ("0", ()),
                ],
            )
            .map_err(|_| invalid("replication", r, "database, true or false"))?;
        }
        Ok(Params {
            hosts,
            user,
            password: c.get("password").map(Secret::new),
            passfile: c.get("passfile").map(PathBuf::from).or_else(|| home.map(|h| h.join(".pgpass"))),
            dbname,
            options: c.get("options").filter(|o| !o.is_empty()).map(str::to_owned),
            application_name: c.get("application_name").map(str::to_owned),
            fallback_application_name: c.get("fallback_application_name").map(str::to_owned),
            tls,
            channel_binding,
            connect_timeout,
            keepalives: keepalives.transpose()?,
            tcp_user_timeout,
            target_session_attrs,
            load_balance_hosts,
            replication,
            all_defaults,
        })
    }

    /// A copy whose sessions are named `name` (shown in `pg_stat_activity`).
    pub fn named(&self, name: &str) -> Params {
        Params { application_name: Some(name.to_owned()), ..self.clone() }
    }

    /// Names the sessions `name` unless the connection string named them already.
    pub fn with_fallback_name(mut self, name: &str) -> Params {
        self.fallback_application_name = Some(name.to_owned());
        self
    }

    /// Adds a server setting to every session (`-c name=value`, through `options`).
    pub fn with_setting(mut self, name: &str, value: &str) -> Params {
        let extra = format!("-c {name}={}", value.replace('\\', "\\\\").replace(' ', "\\ "));
        self.options = Some(match self.options.take() {
            Some(o) => format!("{o} {extra}"),
            None => extra,
        });
        self
    }

    /// The application name the server will see.
    pub fn effective_application_name(&self) -> Option<&str> {
        self.application_name.as_deref().or(self.fallback_application_name.as_deref())
    }

    /// `host:port` (or the socket) of each host, for messages.
    pub fn describe_hosts(&self) -> String {
        self.hosts.iter().map(|h| format!("{}:{}", h.name(), h.port)).collect::<Vec<_>>().join(", ")
    }
}

fn unsupported(what: &str) -> ConninfoError {
    ConninfoError::Uri(format!("{what} is not supported by ghostwire"))
}

fn split_list(v: Option<&str>) -> Vec<String> {
    v.map(|v| v.split(',').map(|s| s.trim().to_owned()).collect()).unwrap_or_default()
}

fn hosts(c: &Conninfo, env: &dyn Env) -> Result<Vec<Host>, ConninfoError> {
    let names = split_list(c.get("host"));
    let addrs = split_list(c.get("hostaddr"));
    let ports = split_list(c.get("port"));
    let count = names.len().max(addrs.len()).max(1);
    if !names.is_empty() && !addrs.is_empty() && names.len() != addrs.len() {
        return Err(ConninfoError::Uri(format!(
            "could not match {} host names to {} hostaddr values",
            names.len(),
            addrs.len()
        )));
    }
    if ports.len() > 1 && ports.len() != count {
        return Err(ConninfoError::Uri(format!("could not match {} port numbers to {count} hosts", ports.len())));
    }
    (0..count)
        .map(|i| {
            let addr = match addrs.get(i).filter(|a| !a.is_empty()) {
                Some(a) => Some(a.parse::<IpAddr>().map_err(|_| invalid("hostaddr", a, "a numeric IP address"))?),
                None => None,
            };
            let kind = match names.get(i).filter(|n| !n.is_empty()) {
                Some(n) if n.starts_with('/') => HostKind::Unix(PathBuf::from(n)),
                Some(n) => HostKind::Tcp(n.clone()),
                None => match addr {
                    Some(a) => HostKind::Tcp(a.to_string()),
                    None => default_host(env),
                },
            };
            let port_text = ports.get(i).or_else(|| ports.first().filter(|_| ports.len() == 1));
            let port = match port_text.filter(|p| !p.is_empty()) {
                Some(p) => {
                    p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| invalid("port", p, "a port number"))?
                }
                None => 5432,
            };
            Ok(Host { kind, addr, port })
        })
        .collect()
}

#[cfg(test)]
#[path = "params_tests.rs"]
mod tests;
