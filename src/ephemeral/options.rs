//! What a throwaway cluster is started with: authentication, TLS, extra settings, and the
//! configuration files written from them.

/// How clients other than the superuser `postgres` authenticate over TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostAuth {
    #[default]
    Trust,
    Md5,
    ScramSha256,
}

impl HostAuth {
    fn hba_method(self) -> &'static str {
        match self {
            HostAuth::Trust => "trust",
            HostAuth::Md5 => "md5",
            HostAuth::ScramSha256 => "scram-sha-256",
        }
    }
}

/// The server's certificate (PEM, the chain from the leaf up) and its private key (PEM).
#[derive(Clone)]
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls { .. }")
    }
}

/// Options for [`super::Cluster::start`].
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Authentication for roles other than `postgres` over TCP (`postgres` is always trusted,
    /// so the harness can set things up; it also connects over the Unix socket).
    pub host_auth: HostAuth,
    /// Also require `host_auth` for the `postgres` superuser.
    pub auth_superuser: bool,
    /// Serve TLS (`ssl = on`) with this certificate.
    pub tls: Option<ServerTls>,
    /// With `tls`: accept TCP connections only over TLS (`hostssl` lines alone), so the
    /// server itself refuses plain text.
    pub tls_only: bool,
    /// With `tls`: the CA (PEM) whose client certificates the server accepts (`ssl_ca_file`).
    pub client_ca_pem: Option<String>,
    /// `pg_hba.conf` lines for TCP instead of those made from the options above (the Unix
    /// socket stays trusted).
    pub hba_tcp: Option<String>,
    /// Extra `postgresql.conf` settings, applied after the defaults.
    pub settings: Vec<(String, String)>,
}

impl ClusterOptions {
    pub fn with_setting(mut self, name: &str, value: impl ToString) -> Self {
        self.settings.push((name.to_owned(), value.to_string()));
        self
    }

    /// The lines added to `postgresql.conf`.
    pub(super) fn conf(&self) -> String {
        let mut conf = String::from("\n# ghostwire throwaway cluster\n");
        for (k, v) in BASE_SETTINGS {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        if self.tls.is_some() {
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
            if self.client_ca_pem.is_some() {
                conf.push_str("ssl_ca_file = 'root.crt'\n");
            }
        }
        for (k, v) in &self.settings {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        conf
    }

    /// `pg_hba.conf`: the Unix socket trusted (the harness's own way in), TCP as the options say.
    pub(super) fn hba(&self) -> String {
        let local = "local all all trust\nlocal replication all trust\n";
        if let Some(tcp) = &self.hba_tcp {
            return format!("{local}{tcp}\n");
        }
        let method = self.host_auth.hba_method();
        let superuser = if self.auth_superuser { method } else { "trust" };
        let host = if self.tls.is_some() && self.tls_only { "hostssl" } else { "host" };
        format!(
            "{local}\
             {host} all postgres 127.0.0.1/32 {superuser}\n\
             {host} replication postgres 127.0.0.1/32 {superuser}\n\
             {host} all all 127.0.0.1/32 {method}\n\
             {host} replication all 127.0.0.1/32 {method}\n"
        )
    }
}

/// Settings every throwaway cluster gets: logical decoding, and speed over durability.
pub(super) const BASE_SETTINGS: &[(&str, &str)] = &[
    ("wal_level", "logical"),
    ("max_replication_slots", "20"),
    ("max_wal_senders", "20"),
    ("max_connections", "300"),
    ("fsync", "off"),
    ("synchronous_commit", "off"),
    ("full_page_writes", "off"),
    ("shared_buffers", "256MB"),
    ("maintenance_work_mem", "256MB"),
    ("max_wal_size", "8GB"),
    ("checkpoint_timeout", "30min"),
    ("log_min_messages", "warning"),
    ("log_line_prefix", "'%m [%p] %d '"),
    ("lc_messages", "'C'"),
    ("timezone", "'UTC'"),
];
