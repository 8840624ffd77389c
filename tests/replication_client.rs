//! ghostwire's own replication client logs in the way every other connection does: TLS by
//! `sslmode` with the certificate checked, SCRAM-SHA-256 with channel binding, MD5, the
//! password never shown; and a migration with `--capture logical` runs over such a
//! connection as a role that is not a superuser.

mod common;

use common::tls::{PASSWORD, owner_setup, tls_cluster};
use ghostwire::connect::Params;
use ghostwire::ephemeral::HostAuth;
use ghostwire::replication::{ReplicationClient, ReplicationError};

fn params(url: &str) -> Params {
    Params::from_conninfo(Some(url)).expect("a valid URL")
}

#[tokio::test]
async fn scram_with_channel_binding_over_verified_tls() {
    let (cluster, pki) = tls_cluster(HostAuth::ScramSha256, true).await;
    owner_setup(&cluster).await;
    let admin = cluster.connect("appdb").await.unwrap();
    admin.batch_execute("ALTER ROLE app REPLICATION").await.unwrap();
    let ca = pki.ca_file.display().to_string();
    let url = format!(
        "postgres://app:{PASSWORD}@localhost:{}/appdb?sslmode=verify-full&sslrootcert={ca}&channel_binding=require",
        cluster.port()
    );
    let mut repl = ReplicationClient::connect(&params(&url)).await.unwrap_or_else(|e| panic!("{e}"));
    let rows = repl.simple_query("IDENTIFY_SYSTEM").await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get(3).cloned().flatten().as_deref(), Some("appdb"), "{rows:?}");
    // The session is a walsender, over TLS.
    let row = admin
        .query_one(
            "SELECT a.backend_type, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.pid = $1",
            &[&repl.pid],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, String>(0), row.get::<_, bool>(1)), ("walsender".to_owned(), true));
    // A wrong password is the server's refusal, with the password nowhere in it.
    let wrong = url.replace(PASSWORD, "not-the-password");
    let err = ReplicationClient::connect(&params(&wrong)).await.err().expect("refused");
    assert!(matches!(&err, ReplicationError::Server { code, .. } if code == "28P01"), "{err}");
    assert!(!err.to_string().contains("not-the-password"), "{err}");
    // A certificate for another name is refused before any password is sent.
    let by_ip = url.replace("localhost", "127.0.0.1");
    let err = ReplicationClient::connect(&params(&by_ip)).await.err().expect("refused");
    assert!(err.to_string().contains("certificate is for localhost"), "{err}");

    // A whole migration with logical capture, as this role over this connection.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ghostwire"))
        .args([
            "migrate",
            "--yes",
            "--capture",
            "logical",
            "ALTER TABLE \"Sales\".\"Order Items\" ALTER COLUMN qty TYPE bigint",
        ])
        .env("DATABASE_URL", &url)
        .output()
        .await
        .unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{said}");
    assert!(!said.contains(PASSWORD), "the password leaked: {said}");
    let capture: String = admin.query_one("SELECT capture FROM ghostwire.migrations", &[]).await.unwrap().get(0);
    assert_eq!(capture, "logical");
    common::assert_same_rows(&admin, "SELECT * FROM \"Sales\".\"Order Items\"", "SELECT * FROM \"Sales\".oracle").await;
}

#[tokio::test]
async fn md5_over_plain_text() {
    let (cluster, _pki) = tls_cluster(HostAuth::Md5, false).await;
    owner_setup(&cluster).await;
    cluster.connect("appdb").await.unwrap().batch_execute("ALTER ROLE app REPLICATION").await.unwrap();
    let url = format!("postgres://app:{PASSWORD}@127.0.0.1:{}/appdb?sslmode=disable", cluster.port());
    let mut repl = ReplicationClient::connect(&params(&url)).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(repl.simple_query("IDENTIFY_SYSTEM").await.unwrap().len(), 1);
    // A wrong MD5 password is refused by the server.
    let wrong = url.replace(PASSWORD, "nope");
    let err = ReplicationClient::connect(&params(&wrong)).await.err().expect("refused");
    assert!(matches!(&err, ReplicationError::Server { code, .. } if code == "28P01"), "{err}");
}
