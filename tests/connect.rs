//! Connecting the way libpq does, against real servers with TLS: sslmode and the
//! certificate checks, the PG* environment, the password and service files, client
//! certificates, channel binding, several hosts with target_session_attrs.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::tls::{PASSWORD, Pki, owner_setup, server_log, tls_cluster};
use common::try_connect;
use ghostwire::ephemeral::{Cluster, ClusterOptions, HostAuth};
use tokio::process::Command;

/// Runs the ghostwire binary with `env` and no other PG* variable, DATABASE_URL or HOME.
async fn ghostwire(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ghostwire"));
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("PG") || k == "DATABASE_URL" || k == "HOME" {
            cmd.env_remove(k);
        }
    }
    cmd.env("HOME", "/nonexistent").env("PGCONNECT_TIMEOUT", "5").envs(env.iter().copied());
    cmd.output().await.expect("run ghostwire")
}

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn url(host: &str, cluster: &Cluster, query: &str) -> String {
    format!("postgres://app:{PASSWORD}@{host}:{}/appdb?{query}", cluster.port())
}

#[tokio::test]
async fn verify_full_checks_the_ca_and_the_host_name_and_says_what_to_pass() {
    let (cluster, pki) = tls_cluster(HostAuth::ScramSha256, true).await;
    owner_setup(&cluster).await;
    let ca = pki.ca_file.display().to_string();
    let plan = ["plan", "ALTER TABLE \"Sales\".\"Order Items\" ADD COLUMN x int"];
    let good = url("localhost", &cluster, &format!("sslmode=verify-full&sslrootcert={ca}"));
    let out = ghostwire(&plan, &[("DATABASE_URL", &good)]).await;
    assert!(out.status.success(), "{}", text(&out));

    let other = Pki::new("other");
    let wrong_ca = url("localhost", &cluster, &format!("sslmode=verify-full&sslrootcert={}", other.ca_file.display()));
    let out = ghostwire(&plan, &[("DATABASE_URL", &wrong_ca)]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("not signed by a certificate authority in sslrootcert"), "{}", text(&out));
    assert!(text(&out).contains("sslrootcert=FILE"), "{}", text(&out));

    let wrong_host = url("127.0.0.1", &cluster, &format!("sslmode=verify-full&sslrootcert={ca}"));
    let out = ghostwire(&plan, &[("DATABASE_URL", &wrong_host)]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("certificate is for localhost but the connection is to \"127.0.0.1\""),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("sslmode=verify-ca"), "{}", text(&out));
    // verify-ca checks the CA alone.
    let ca_only = url("127.0.0.1", &cluster, &format!("sslmode=verify-ca&sslrootcert={ca}"));
    assert!(ghostwire(&plan, &[("DATABASE_URL", &ca_only)]).await.status.success());
    // A root certificate file that is not there: refused before connecting.
    let missing = url("localhost", &cluster, "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem");
    let out = ghostwire(&plan, &[("DATABASE_URL", &missing)]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("does not exist"), "{}", text(&out));
    assert!(!text(&out).contains(PASSWORD), "the password leaked: {}", text(&out));
}

#[tokio::test]
async fn require_never_falls_back_to_plain_text() {
    // A server without TLS: require is refused, prefer goes on in plain text.
    let plain = Cluster::shared().unwrap();
    let base = format!("postgres://postgres@127.0.0.1:{}/postgres", plain.port());
    let err = try_connect(&format!("{base}?sslmode=require")).await.err().unwrap_or_else(|| panic!("require refused"));
    assert!(err.to_string().contains("server does not support TLS"), "{err}");
    let ssl = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    let c = try_connect(&format!("{base}?sslmode=prefer")).await.unwrap();
    assert!(!c.query_one(ssl, &[]).await.unwrap().get::<_, bool>(0));

    // A server with TLS that accepts both: prefer and require encrypt, allow and disable do not.
    let (both, _pki) = tls_cluster(HostAuth::Trust, false).await;
    let base = format!("postgres://postgres@localhost:{}/postgres", both.port());
    for (mode, encrypted) in [("prefer", true), ("require", true), ("allow", false), ("disable", false)] {
        let c = try_connect(&format!("{base}?sslmode={mode}")).await.unwrap();
        assert_eq!(c.query_one(ssl, &[]).await.unwrap().get::<_, bool>(0), encrypted, "sslmode={mode}");
    }
    // A server that accepts TLS only: allow retries with TLS, disable is refused by the server.
    let (tls_only, _pki) = tls_cluster(HostAuth::Trust, true).await;
    let base = format!("postgres://postgres@localhost:{}/postgres", tls_only.port());
    let c = try_connect(&format!("{base}?sslmode=allow")).await.unwrap();
    assert!(c.query_one(ssl, &[]).await.unwrap().get::<_, bool>(0));
    let err =
        try_connect(&format!("{base}?sslmode=disable")).await.err().unwrap_or_else(|| panic!("plain text refused"));
    assert!(err.to_string().contains("no encryption"), "{err}");
}

#[tokio::test]
async fn the_environment_and_the_password_and_service_files_are_read() {
    let (cluster, pki) = tls_cluster(HostAuth::ScramSha256, true).await;
    owner_setup(&cluster).await;
    let port = cluster.port().to_string();
    let ca = pki.ca_file.display().to_string();
    let plan = ["plan", "ALTER TABLE \"Sales\".\"Order Items\" ADD COLUMN x int"];
    let env = |extra: &[(&'static str, String)]| {
        let mut v: Vec<(&'static str, String)> = vec![
            ("PGHOST", "localhost".into()),
            ("PGPORT", port.clone()),
            ("PGUSER", "app".into()),
            ("PGDATABASE", "appdb".into()),
            ("PGSSLMODE", "verify-full".into()),
            ("PGSSLROOTCERT", ca.clone()),
        ];
        v.extend(extra.iter().cloned());
        v
    };
    let run = |vars: Vec<(&'static str, String)>| async move {
        let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        ghostwire(&plan, &refs).await
    };
    let out = run(env(&[("PGPASSWORD", PASSWORD.into())])).await;
    assert!(out.status.success(), "PGPASSWORD: {}", text(&out));
    // No password: a login needs one.
    let out = run(env(&[])).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    // The password file named by PGPASSFILE, with a wildcard; ignored when others may read it.
    let dir = tempfile::tempdir().unwrap();
    let passfile = dir.path().join("pgpass");
    std::fs::write(&passfile, format!("other:*:*:*:wrong\nlocalhost:{port}:*:app:{PASSWORD}\n")).unwrap();
    std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = run(env(&[("PGPASSFILE", passfile.display().to_string())])).await;
    assert!(out.status.success(), "PGPASSFILE: {}", text(&out));
    std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(env(&[("PGPASSFILE", passfile.display().to_string())])).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("group or world access"), "{}", text(&out));
    // ~/.pgpass.
    let home = tempfile::tempdir().unwrap();
    let pgpass = home.path().join(".pgpass");
    std::fs::write(&pgpass, format!("*:*:appdb:app:{PASSWORD}\n")).unwrap();
    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = run(env(&[("HOME", home.path().display().to_string())])).await;
    assert!(out.status.success(), "~/.pgpass: {}", text(&out));
    // A service file gives everything but the password.
    let services = dir.path().join("pg_service.conf");
    std::fs::write(
        &services,
        format!("[gw]\nhost=localhost\nport={port}\nuser=app\ndbname=appdb\nsslmode=verify-full\nsslrootcert={ca}\n"),
    )
    .unwrap();
    let out = run(vec![
        ("PGSERVICEFILE", services.display().to_string()),
        ("PGSERVICE", "gw".into()),
        ("PGPASSWORD", PASSWORD.into()),
    ])
    .await;
    assert!(out.status.success(), "PGSERVICE: {}", text(&out));
    // The string wins over the environment (a wrong PGHOST is not used).
    let given = url("localhost", &cluster, &format!("sslmode=verify-full&sslrootcert={ca}"));
    let out = run(vec![("DATABASE_URL", given), ("PGHOST", "nowhere.invalid".into())]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains(PASSWORD), "the password leaked: {}", text(&out));
}

#[tokio::test]
async fn client_certificates_are_sent_and_their_keys_kept_private() {
    let pki = Pki::new("server");
    let server = pki.server("server", &["localhost"]);
    let options = ClusterOptions {
        tls: Some(server.server_tls()),
        client_ca_pem: Some(pki.ca_pem()),
        hba_tcp: Some("hostssl all all 127.0.0.1/32 cert".into()),
        ..ClusterOptions::default()
    };
    let cluster = tokio::task::spawn_blocking(move || Cluster::start(options)).await.unwrap().unwrap();
    cluster.connect("postgres").await.unwrap().batch_execute("CREATE ROLE app LOGIN").await.unwrap();
    let client = pki.client("app", "app");
    let base = format!(
        "host=localhost port={} user=app dbname=postgres sslmode=verify-full sslrootcert={}",
        cluster.port(),
        pki.ca_file.display()
    );
    let with_cert = format!("{base} sslcert={} sslkey={}", client.cert_file.display(), client.key_file.display());
    let c = try_connect(&with_cert).await.unwrap_or_else(|e| panic!("{e}"));
    let who: String = c.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(who, "app");
    let err = try_connect(&base).await.err().unwrap_or_else(|| panic!("no certificate, no login"));
    assert!(err.to_string().contains("certificate"), "{err}");
    std::fs::set_permissions(&client.key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = try_connect(&with_cert).await.err().unwrap_or_else(|| panic!("a readable key is refused"));
    assert!(err.is_refusal() && err.to_string().contains("group or world access"), "{err}");
}

#[tokio::test]
async fn channel_binding_is_used_over_tls_when_the_server_offers_it() {
    let (cluster, pki) = tls_cluster(HostAuth::ScramSha256, true).await;
    owner_setup(&cluster).await;
    let ca = pki.ca_file.display();
    // tokio-postgres with channel_binding=require fails unless SCRAM-SHA-256-PLUS was used.
    let c = try_connect(&url(
        "localhost",
        &cluster,
        &format!("sslmode=verify-full&sslrootcert={ca}&channel_binding=require"),
    ))
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let row = c.query_one("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap();
    assert!(row.get::<_, bool>(0));
    assert!(row.get::<_, String>(1).starts_with("TLSv1."));
    assert!(server_log(&cluster).contains("identity=\"app\" method=scram-sha-256"), "{}", server_log(&cluster));
    // md5 has no channel binding: require refuses the login at once.
    let (md5, pki) = tls_cluster(HostAuth::Md5, true).await;
    owner_setup(&md5).await;
    let err = try_connect(&url(
        "localhost",
        &md5,
        &format!("sslmode=verify-full&sslrootcert={}&channel_binding=require", pki.ca_file.display()),
    ))
    .await
    .err()
    .unwrap_or_else(|| panic!("refused"));
    assert!(err.to_string().contains("channel binding"), "{err}");
}

#[tokio::test]
async fn several_hosts_are_tried_in_turn_for_the_session_asked_for() {
    let primary = tokio::task::spawn_blocking(|| Cluster::start(ClusterOptions::default())).await.unwrap().unwrap();
    if !common::has_client_for_server(
        &primary,
        "pg_basebackup",
        "several_hosts_are_tried_in_turn_for_the_session_asked_for",
    ) {
        return;
    }
    let standby = {
        let p = &primary;
        std::thread::scope(|s| s.spawn(|| p.start_standby()).join()).unwrap().unwrap()
    };
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (p, s) = (primary.port(), standby.port());
    let in_recovery = |attrs: &'static str, ports: String| async move {
        let url = format!("host=127.0.0.1,127.0.0.1,127.0.0.1 port={ports} user=postgres dbname=postgres {attrs}");
        let c = try_connect(&url).await.unwrap_or_else(|e| panic!("{attrs}: {e}"));
        c.query_one("SELECT pg_is_in_recovery()", &[]).await.unwrap().get::<_, bool>(0)
    };
    assert!(!in_recovery("", format!("{dead},{p},{s}")).await, "the first live host");
    assert!(in_recovery("target_session_attrs=standby", format!("{dead},{p},{s}")).await);
    assert!(!in_recovery("target_session_attrs=primary", format!("{s},{dead},{p}")).await);
    assert!(!in_recovery("target_session_attrs=read-write", format!("{s},{p},{dead}")).await);
    assert!(in_recovery("target_session_attrs=read-only", format!("{p},{s},{dead}")).await);
    assert!(in_recovery("target_session_attrs=prefer-standby", format!("{p},{dead},{s}")).await);
    assert!(!in_recovery("target_session_attrs=prefer-standby", format!("{p},{dead},{p}")).await);
    let err = try_connect(&format!(
        "host=127.0.0.1,127.0.0.1 port={dead},{p} user=postgres dbname=postgres target_session_attrs=standby"
    ))
    .await
    .err()
    .unwrap_or_else(|| panic!("no standby"));
    let shown = err.to_string();
    assert!(shown.contains(&format!("port {dead}")) && shown.contains("not in hot standby"), "{shown}");
}

#[test]
fn a_unix_socket_directory_is_a_host() {
    let cluster = Cluster::shared().unwrap();
    let dir = cluster.socket_dir().display().to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let url =
            format!("postgresql:///postgres?host={}&port={}&user=postgres", dir.replace('/', "%2F"), cluster.port());
        let c = try_connect(&url).await.unwrap_or_else(|e| panic!("{e}"));
        let addr: Option<String> = c.query_one("SELECT inet_client_addr()::text", &[]).await.unwrap().get(0);
        assert_eq!(addr, None, "connected over the socket");
    });
    assert!(Path::new(&dir).join(format!(".s.PGSQL.{}", cluster.port())).exists());
}
