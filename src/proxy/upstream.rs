//! The proxy's server leg: where the database is and how to reach it (`--upstream`, a
//! libpq URL or keyword string, or `host:port`). Only the hosts and the TLS settings are
//! used: clients bring their own user, database and credentials.

use rustls::pki_types::CertificateDer;

use crate::connect::params::Params;
use crate::connect::stream::{ServerStream, open};
use crate::connect::tls::ClientTls;
use crate::connect::{HostKind, SslMode};

use super::ProxyError;

#[derive(Debug, Clone)]
pub struct Upstream {
    params: Params,
    tls: Option<ClientTls>,
}

impl Upstream {
    pub fn parse(text: &str) -> Result<Upstream, ProxyError> {
        let invalid = |why: String| ProxyError::Upstream(why);
        let conninfo = if text.contains("://") || text.contains('=') {
            text.to_owned()
        } else {
            let (host, port) = text
                .rsplit_once(':')
                .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
                .ok_or_else(|| invalid(format!("{text:?}: expected host:port or a postgres:// URL")))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            format!("host='{host}' port={port}")
        };
        let params = Params::from_conninfo(Some(&conninfo)).map_err(|e| invalid(e.to_string()))?;
        if params.hosts.iter().any(|h| matches!(h.kind, HostKind::Unix(_))) {
            return Err(invalid("Unix sockets are not supported as the upstream yet; use host:port".into()));
        }
        let tls = match params.tls.mode {
            SslMode::Disable | SslMode::Allow => None,
            _ => Some(ClientTls::new(&params.tls).map_err(|e| invalid(e.to_string()))?),
        };
        Ok(Upstream { params, tls })
    }

    /// `host:port` of each server, for `/status` and messages (never credentials).
    pub fn describe(&self) -> String {
        self.params.describe_hosts()
    }

    pub fn sslmode(&self) -> SslMode {
        self.params.tls.mode
    }

    /// A connection to the first server that answers, with TLS as the upstream's sslmode
    /// says, and the certificate the server presented.
    pub async fn open(&self) -> Result<(ServerStream, Option<CertificateDer<'static>>), String> {
        let mut errors = Vec::new();
        for host in &self.params.hosts {
            let attempt = open(host, &self.params.tls, self.tls.as_ref());
            match tokio::time::timeout(self.params.connect_timeout, attempt).await {
                Ok(Ok(opened)) => return Ok(opened),
                Ok(Err(e)) => errors.push(e),
                Err(_) => errors.push(format!("{}:{}: timed out", host.name(), host.port)),
            }
        }
        Err(errors.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_forms() {
        assert_eq!(
            Upstream::parse("postgres://u:p@db.example:6543/app?sslmode=disable").unwrap().describe(),
            "db.example:6543"
        );
        assert_eq!(Upstream::parse("127.0.0.1:5432").unwrap().describe(), "127.0.0.1:5432");
        assert_eq!(Upstream::parse("[::1]:5432").unwrap().describe(), "::1:5432");
        assert_eq!(Upstream::parse("host=a,b port=1,2 sslmode=disable").unwrap().describe(), "a:1, b:2");
        assert!(Upstream::parse("nonsense").is_err());
        assert!(Upstream::parse("postgres:///app?host=/var/run/postgresql").is_err());
        let shown = Upstream::parse("postgres://u:hunter2@h:1/d?sslmode=bogus").unwrap_err().to_string();
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
