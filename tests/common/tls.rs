//! Certificates for the TLS tests: a CA of the test's own, server and client certificates
//! signed by it, written as PEM files (keys 0600, as PostgreSQL and libpq require).

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use ghostwire::ephemeral::{Cluster, ClusterOptions, HostAuth, ServerTls};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};

pub struct Pki {
    pub dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate (what `sslrootcert` names).
    pub ca_file: PathBuf,
}

/// A certificate and its key, as PEM and as files.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl Issued {
    pub fn server_tls(&self) -> ServerTls {
        ServerTls { cert_pem: self.cert_pem.clone(), key_pem: self.key_pem.clone() }
    }
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().expect("a folder for certificates");
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let ca_file = dir.path().join(format!("{name}-ca.pem"));
        std::fs::write(&ca_file, ca.pem()).unwrap();
        Pki { dir, ca, ca_file }
    }

    fn issue(&self, file: &str, common_name: &str, names: &[&str]) -> Issued {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, common_name);
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        let cert_file = self.dir.path().join(format!("{file}.crt"));
        let key_file = self.dir.path().join(format!("{file}.key"));
        std::fs::write(&cert_file, &cert_pem).unwrap();
        std::fs::write(&key_file, &key_pem).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        Issued { cert_pem, key_pem, cert_file, key_file }
    }

    /// A server certificate for these host names or IP addresses.
    pub fn server(&self, file: &str, names: &[&str]) -> Issued {
        self.issue(file, names.first().copied().unwrap_or("server"), names)
    }

    /// A client certificate for role `user` (its common name).
    pub fn client(&self, file: &str, user: &str) -> Issued {
        self.issue(file, user, &[])
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }
}

/// A cluster serving TLS with a certificate for `localhost` (not for 127.0.0.1): TCP only
/// over TLS when `tls_only`, logins by `auth`, connections logged.
pub async fn tls_cluster(auth: HostAuth, tls_only: bool) -> (Cluster, Pki) {
    let pki = Pki::new("server");
    let server = pki.server("server", &["localhost"]);
    let options =
        ClusterOptions { host_auth: auth, tls: Some(server.server_tls()), tls_only, ..ClusterOptions::default() }
            .with_setting("log_connections", "on")
            .with_setting("password_encryption", if auth == HostAuth::Md5 { "'md5'" } else { "'scram-sha-256'" });
    let cluster = tokio::task::spawn_blocking(move || Cluster::start(options)).await.unwrap().expect("a TLS cluster");
    (cluster, pki)
}

/// The server's log so far.
pub fn server_log(cluster: &Cluster) -> String {
    std::fs::read_to_string(cluster.socket_dir().join("postgres.log")).unwrap_or_default()
}

/// The password of role `app`.
pub const PASSWORD: &str = "app-secret";

/// Role `app` (not a superuser) with a password, CREATE on database `appdb`, owning schema
/// `"Sales"` and its table `"Order Items"` (2000 rows), as on a managed service.
pub async fn owner_setup(cluster: &Cluster) {
    let admin = cluster.connect("postgres").await.unwrap();
    for sql in [
        &format!("CREATE ROLE app LOGIN PASSWORD '{PASSWORD}'"),
        "CREATE DATABASE appdb",
        "GRANT CREATE ON DATABASE appdb TO app",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    let db = cluster.connect("appdb").await.unwrap();
    db.batch_execute(
        "CREATE SCHEMA \"Sales\" AUTHORIZATION app; SET ROLE app;
         CREATE TABLE \"Sales\".\"Order Items\" (id bigint PRIMARY KEY, qty int, note text, payload text);
         CREATE INDEX ON \"Sales\".\"Order Items\" (qty);
         CREATE TABLE \"Sales\".oracle (id bigint PRIMARY KEY, qty int, note text, payload text);
         INSERT INTO \"Sales\".\"Order Items\" (id, qty, note) SELECT g, g, 'n' || g FROM generate_series(1, 2000) g;
         INSERT INTO \"Sales\".oracle SELECT * FROM \"Sales\".\"Order Items\";",
    )
    .await
    .unwrap();
}
