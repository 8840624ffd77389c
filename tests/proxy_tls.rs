//! The proxy with TLS on either leg: every combination of {client leg plain, TLS} ×
//! {server leg plain, TLS} × {trust, md5, SCRAM} × {channel_binding prefer, require,
//! disable} logs in or is refused at once with a message that names the cause; psql and
//! tokio-postgres; `--client-tls require`; direct TLS with ALPN; certificates reloaded on
//! SIGHUP without dropping sessions.

mod common;

use std::time::{Duration, Instant};

use common::proxy::TestProxy;
use common::tls::{Issued, Pki, tls_cluster};
use common::try_connect;
use ghostwire::connect::tls_server::Acceptor;
use ghostwire::ephemeral::{Cluster, HostAuth};
use ghostwire::proxy::{ClientLeg, ClientTlsMode};
use tokio::process::Command;

const PASSWORD: &str = "app-secret";

async fn add_app_role(cluster: &Cluster) {
    let admin = cluster.connect("postgres").await.unwrap();
    admin.batch_execute(&format!("CREATE ROLE app LOGIN PASSWORD '{PASSWORD}'")).await.unwrap();
}

fn tls_leg(mode: ClientTlsMode, cert: &Issued) -> ClientLeg {
    ClientLeg::new(mode, Some(Acceptor::new(&cert.cert_file, &cert.key_file).unwrap())).unwrap()
}

/// What a login through the proxy should do.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    LogIn,
    /// Refused, with this in the message.
    Refused(&'static str),
}

/// Logs in as `app` through `proxy` (TLS towards it when `client_tls`); within 10 s.
async fn login(proxy: &TestProxy, pki: &Pki, client_tls: bool, binding: &str) -> Result<(), String> {
    let tls = if client_tls {
        format!("sslmode=verify-full sslrootcert={}", pki.ca_file.display())
    } else {
        "sslmode=disable".into()
    };
    let conninfo = format!(
        "host=localhost port={} user=app password={PASSWORD} dbname=postgres {tls} channel_binding={binding}",
        proxy.addr.port()
    );
    let started = Instant::now();
    let attempt = tokio::time::timeout(Duration::from_secs(10), try_connect(&conninfo)).await;
    let result = match attempt {
        Err(_) => return Err("HUNG: no answer within 10 s".into()),
        Ok(Ok(client)) => {
            let ssl: bool = client
                .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
                .await
                .map_err(|e| e.to_string())?
                .get(0);
            let _ = ssl;
            Ok(())
        }
        Ok(Err(e)) => Err(e.to_string()),
    };
    assert!(started.elapsed() < Duration::from_secs(10));
    result
}

#[tokio::test]
async fn every_leg_auth_and_channel_binding_combination_logs_in_or_is_refused_at_once() {
    let mut failures = Vec::new();
    for auth in [HostAuth::Trust, HostAuth::Md5, HostAuth::ScramSha256] {
        let (cluster, pki) = tls_cluster(auth, false).await;
        add_app_role(&cluster).await;
        // The proxy's own certificate (same CA, different key) for the client leg.
        let proxy_cert = pki.server("proxy", &["localhost"]);
        let plain_server = format!("host=localhost port={} sslmode=disable", cluster.port());
        let tls_server =
            format!("host=localhost port={} sslmode=verify-full sslrootcert={}", cluster.port(), pki.ca_file.display());
        for (client_tls, server_tls) in [(false, false), (false, true), (true, false), (true, true)] {
            let leg = if client_tls { tls_leg(ClientTlsMode::Allow, &proxy_cert) } else { ClientLeg::default() };
            let proxy = TestProxy::start_with(if server_tls { &tls_server } else { &plain_server }, leg).await;
            for binding in ["prefer", "require", "disable"] {
                let scram = auth == HostAuth::ScramSha256;
                let expect = match binding {
                    "require" if !client_tls => Expect::Refused("channel_binding=require needs TLS"),
                    "require" if !scram => Expect::Refused("channel binding"),
                    "require" if !server_tls => Expect::Refused("channel binding"),
                    "require" | "prefer" if scram && client_tls && server_tls => {
                        Expect::Refused("cannot pass through this ghostwire proxy")
                    }
                    _ => Expect::LogIn,
                };
                let tls = if client_tls {
                    format!("sslmode=verify-full sslrootcert={}", pki.ca_file.display())
                } else {
                    "sslmode=disable".into()
                };
                let started = Instant::now();
                let by_libpq = psql_query(
                    &cluster,
                    proxy.addr.port(),
                    &format!("{tls} channel_binding={binding}"),
                    "SELECT current_user",
                )
                .await;
                assert!(started.elapsed() < Duration::from_secs(10), "psql hung");
                let by_libpq = if by_libpq.0.trim() == "app" { Ok(()) } else { Err(by_libpq.1) };
                for (client, got) in
                    [("tokio-postgres", login(&proxy, &pki, client_tls, binding).await), ("psql", by_libpq)]
                {
                    let ok = match (&got, expect) {
                        (Ok(()), Expect::LogIn) => true,
                        // libpq words its own refusals differently.
                        (Err(e), Expect::Refused(needle)) => {
                            e.contains(needle) || client == "psql" && e.contains("channel binding")
                        }
                        _ => false,
                    };
                    if !ok {
                        failures.push(format!(
                            "{client}: {auth:?} client {} server {} channel_binding={binding}: expected {expect:?}, got {got:?}",
                            if client_tls { "TLS" } else { "plain" },
                            if server_tls { "TLS" } else { "plain" },
                        ));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn with_the_servers_own_certificate_channel_binding_passes_through() {
    let pki = Pki::new("server");
    let server = pki.server("server", &["localhost"]);
    let options = ghostwire::ephemeral::ClusterOptions {
        host_auth: HostAuth::ScramSha256,
        tls: Some(server.server_tls()),
        tls_only: true,
        ..Default::default()
    };
    let cluster = tokio::task::spawn_blocking(move || Cluster::start(options)).await.unwrap().unwrap();
    add_app_role(&cluster).await;
    let upstream =
        format!("host=localhost port={} sslmode=verify-full sslrootcert={}", cluster.port(), pki.ca_file.display());
    let proxy = TestProxy::start_with(&upstream, tls_leg(ClientTlsMode::Require, &server)).await;
    for binding in ["require", "prefer", "disable"] {
        login(&proxy, &pki, true, binding).await.unwrap_or_else(|e| panic!("channel_binding={binding}: {e}"));
    }
    // psql (libpq) too, with its default channel_binding=prefer.
    let out =
        psql(&cluster, proxy.addr.port(), &format!("sslmode=verify-full sslrootcert={}", pki.ca_file.display())).await;
    assert_eq!(out.0.trim(), "app t", "{}", out.1);
}

/// `SELECT current_user, ssl` through psql at `port` as `app`; (stdout, stderr).
async fn psql(cluster: &Cluster, port: u16, tls: &str) -> (String, String) {
    psql_query(cluster, port, tls, "SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").await
}

async fn psql_query(cluster: &Cluster, port: u16, tls: &str, sql: &str) -> (String, String) {
    let conninfo = format!("host=localhost port={port} user=app dbname=postgres {tls}");
    let out = Command::new(cluster.binaries().path("psql"))
        .args(["-X", "-At", "-F", " ", "-d", &conninfo, "-c", sql])
        .env("PGPASSWORD", PASSWORD)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .await
        .unwrap();
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn psql_through_the_proxy_on_each_leg() {
    let (cluster, pki) = tls_cluster(HostAuth::ScramSha256, false).await;
    add_app_role(&cluster).await;
    let proxy_cert = pki.server("proxy", &["localhost"]);
    let tls_server = format!("host=localhost port={} sslmode=require", cluster.port());
    let proxy = TestProxy::start_with(&tls_server, tls_leg(ClientTlsMode::Allow, &proxy_cert)).await;
    let ca = format!("sslrootcert={}", pki.ca_file.display());
    // Plain text to the proxy; the server leg is TLS (the server sees ssl = t).
    let out = psql(&cluster, proxy.addr.port(), "sslmode=disable").await;
    assert_eq!(out.0.trim(), "app t", "{}", out.1);
    // TLS to the proxy with channel binding off.
    let out = psql(&cluster, proxy.addr.port(), &format!("sslmode=verify-full {ca} channel_binding=disable")).await;
    assert_eq!(out.0.trim(), "app t", "{}", out.1);
    // libpq's default channel_binding=prefer over TLS to both: refused at once, with the fix.
    let started = Instant::now();
    let out = psql(&cluster, proxy.addr.port(), &format!("sslmode=verify-full {ca}")).await;
    assert!(
        out.1.contains("cannot pass through this ghostwire proxy") && out.1.contains("channel_binding=disable"),
        "{}",
        out.1
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn client_tls_require_refuses_plain_text_with_a_message() {
    let (cluster, pki) = tls_cluster(HostAuth::ScramSha256, false).await;
    add_app_role(&cluster).await;
    let cert = pki.server("proxy", &["localhost"]);
    let upstream = format!("localhost:{}", cluster.port());
    let proxy = TestProxy::start_with(&upstream, tls_leg(ClientTlsMode::Require, &cert)).await;
    let err = login(&proxy, &pki, false, "disable").await.unwrap_err();
    assert!(err.contains("accepts TLS connections only") && err.contains("sslmode=require"), "{err}");
    login(&proxy, &pki, true, "disable").await.unwrap();
    // Direct TLS (PostgreSQL 17's sslnegotiation=direct, ALPN "postgresql").
    let direct = format!(
        "host=localhost port={} user=app password={PASSWORD} dbname=postgres sslmode=verify-full sslrootcert={} \
         sslnegotiation=direct channel_binding=disable",
        proxy.addr.port(),
        pki.ca_file.display()
    );
    let c = try_connect(&direct).await.unwrap_or_else(|e| panic!("direct TLS: {e}"));
    let ssl: bool = c.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap().get(0);
    assert!(ssl, "the upstream leg (prefer) uses TLS too");
    // Direct TLS without ALPN is refused, as PostgreSQL 17 does.
    let mut config = rustls::ClientConfig::builder_with_provider(ghostwire::connect::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates({
            let mut roots = rustls::RootCertStore::empty();
            for c in ghostwire::connect::tls::read_certs(&pki.ca_file, "CA").unwrap() {
                roots.add(c).unwrap();
            }
            roots
        })
        .with_no_client_auth();
    config.alpn_protocols.clear();
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await.unwrap();
    let mut answer = Vec::new();
    let _ =
        tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut answer)).await;
    assert!(String::from_utf8_lossy(&answer).contains("without ALPN"), "{:?}", String::from_utf8_lossy(&answer));
}

/// The certificate a TLS handshake with the proxy at `port` presents.
async fn presented(port: u16, pki: &Pki) -> Vec<u8> {
    let p = ghostwire::connect::Params::from_conninfo(Some(&format!(
        "host=localhost port={port} sslmode=verify-full sslrootcert={}",
        pki.ca_file.display()
    )))
    .unwrap();
    let tls = ghostwire::connect::tls::ClientTls::new(&p.tls).unwrap();
    let (_, cert) = ghostwire::connect::stream::open(&p.hosts[0], &p.tls, Some(&tls)).await.unwrap();
    cert.unwrap().to_vec()
}

#[tokio::test]
async fn sighup_reloads_the_certificate_without_dropping_sessions() {
    let (cluster, pki) = tls_cluster(HostAuth::ScramSha256, false).await;
    add_app_role(&cluster).await;
    let first = pki.server("proxy", &["localhost"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_ghostwire"))
        .args(["proxy", "--listen", "127.0.0.1:0", "--upstream", &format!("localhost:{}", cluster.port())])
        .args([
            "--tls-cert",
            &first.cert_file.display().to_string(),
            "--tls-key",
            &first.key_file.display().to_string(),
        ])
        .args(["--client-tls", "require"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next_line().await.unwrap().unwrap();
    assert!(line.contains("client TLS: require"), "{line}");
    let after = line.split("listening on 127.0.0.1:").nth(1).unwrap();
    let port: u16 = after.chars().take_while(char::is_ascii_digit).collect::<String>().parse().unwrap();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let conninfo = format!(
        "host=localhost port={port} user=app password={PASSWORD} dbname=postgres sslmode=verify-full sslrootcert={} \
         channel_binding=disable",
        pki.ca_file.display()
    );
    let session = try_connect(&conninfo).await.unwrap();
    let before = presented(port, &pki).await;
    assert_eq!(before, pem_der(&first.cert_pem));
    // New files in the same place, then SIGHUP.
    let second = pki.server("proxy", &["localhost"]);
    assert_ne!(pem_der(&second.cert_pem), before);
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while presented(port, &pki).await != pem_der(&second.cert_pem) {
        assert!(Instant::now() < deadline, "the new certificate was not picked up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let one: i32 = session.query_one("SELECT 1", &[]).await.expect("the old session lives on").get(0);
    assert_eq!(one, 1);
    try_connect(&conninfo).await.expect("a new session with the new certificate");
}

fn pem_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
}
