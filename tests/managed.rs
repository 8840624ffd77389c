//! A server set up as managed services are: TLS only, SCRAM, and a main role that is not a
//! superuser but owns the table and may create schemas. ghostwire plans, migrates (under
//! concurrent writers checked against an oracle, through a TLS proxy), reports, aborts and
//! finishes over `sslmode=verify-full`, and no password shows anywhere.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::proxy::TestProxy;
use common::running::Running;
use common::tls::{PASSWORD, owner_setup, tls_cluster};
use common::workload::{Shape, Workload};
use common::{assert_same_rows, connect, debris, run_migration, strings, test_options};
use ghostwire::connect::tls_server::Acceptor;
use ghostwire::ephemeral::HostAuth;
use ghostwire::migrate::Options;
use ghostwire::proxy::{ClientLeg, ClientTlsMode};
use ghostwire::state::Phase;

const TABLE: &str = "\"Sales\".\"Order Items\"";

fn shape() -> Shape {
    Shape { table: TABLE.into(), oracle: "\"Sales\".oracle".into(), ..Shape::items() }
}

async fn ghostwire(url: &str, args: &[&str]) -> std::process::Output {
    common::items::ghostwire(url, args, None).await
}

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[tokio::test]
async fn an_owner_role_migrates_over_verify_full_through_a_tls_proxy_under_load() {
    let (cluster, pki) = tls_cluster(HostAuth::ScramSha256, true).await;
    owner_setup(&cluster).await;
    let ca = pki.ca_file.display().to_string();
    let url =
        format!("postgres://app:{PASSWORD}@localhost:{}/appdb?sslmode=verify-full&sslrootcert={ca}", cluster.port());
    let statement = format!("ALTER TABLE {TABLE} ALTER COLUMN qty TYPE bigint");
    let out = ghostwire(&url, &["plan", &statement]).await;
    assert!(out.status.success(), "{}", text(&out));

    // The proxy shows clients the server's own certificate, so SCRAM channel binding passes.
    let server_cert = pki.dir.path().join("server.crt");
    let server_key = pki.dir.path().join("server.key");
    let leg = ClientLeg::new(ClientTlsMode::Require, Some(Acceptor::new(&server_cert, &server_key).unwrap())).unwrap();
    let upstream = format!("host=localhost port={} sslmode=verify-full sslrootcert={ca}", cluster.port());
    let proxy = TestProxy::start_with(&upstream, leg).await;
    let through_proxy = format!(
        "postgres://app:{PASSWORD}@localhost:{}/appdb?sslmode=verify-full&sslrootcert={ca}&channel_binding=require",
        proxy.addr.port()
    );
    let load = Workload::start(&through_proxy, shape(), 2, 2000, 31);
    load.wait_for_more(20).await;
    let admin = Arc::new(cluster.connect("appdb").await.unwrap());
    let counters = Arc::clone(&load.counters);
    let seen_plaintext = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (a, seen) = (Arc::clone(&admin), Arc::clone(&seen_plaintext));
    let hook: ghostwire::migrate::PhaseHook = Arc::new(move |phase: Phase| {
        let (a, seen, counters) = (Arc::clone(&a), Arc::clone(&seen), Arc::clone(&counters));
        Box::pin(async move {
            // Every ghostwire session, and every client of the proxy, is encrypted.
            let plain = strings(
                &a,
                "SELECT a.application_name || ' ' || coalesce(s.ssl::text, 'null') FROM pg_stat_activity a
                   JOIN pg_stat_ssl s USING (pid)
                  WHERE a.usename = 'app' AND NOT s.ssl",
            )
            .await;
            seen.lock().unwrap().extend(plain.into_iter().map(|p| format!("{phase}: {p}")));
            common::workload::wait_for_more(&counters, 10).await;
        })
    });
    let opts = Options { proxies: vec![proxy.control.clone()], ..test_options() };
    let outcome = run_migration(&url, &statement, &opts, Some(hook)).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(outcome.swap.is_some());
    load.wait_for_more(20).await;
    load.stop().await; // panics on any client error
    assert!(seen_plaintext.lock().unwrap().is_empty(), "plain-text sessions: {:?}", seen_plaintext.lock().unwrap());
    let owner = connect(&url).await;
    assert_same_rows(
        &owner,
        &format!("SELECT id, qty, note, payload FROM {TABLE}"),
        "SELECT id, qty::bigint, note, payload FROM \"Sales\".oracle",
    )
    .await;
    let ssl_sessions = strings(&admin, "SELECT count(*)::text FROM pg_stat_ssl WHERE ssl").await;
    assert!(ssl_sessions[0] != "0");
    let out = ghostwire(&url, &["status"]).await;
    assert!(out.status.success() && text(&out).contains("swapped"), "{}", text(&out));
    let out = ghostwire(&url, &["finish", TABLE]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(debris(&admin, outcome.id).await.is_empty(), "{:?}", debris(&admin, outcome.id).await);
    let leaked = strings(
        &admin,
        &format!(
            "SELECT message FROM ghostwire.events WHERE message LIKE '%{PASSWORD}%' OR details::text LIKE '%{PASSWORD}%'
             UNION ALL SELECT statement FROM ghostwire.migrations WHERE statement LIKE '%{PASSWORD}%' OR settings::text LIKE '%{PASSWORD}%'"
        ),
    )
    .await;
    assert!(leaked.is_empty(), "{leaked:?}");
}

#[tokio::test]
async fn an_owner_role_aborts_a_running_migration_over_verify_full() {
    let (cluster, pki) = tls_cluster(HostAuth::ScramSha256, true).await;
    owner_setup(&cluster).await;
    let url = format!(
        "postgres://app:{PASSWORD}@localhost:{}/appdb?sslmode=verify-full&sslrootcert={}",
        cluster.port(),
        pki.ca_file.display()
    );
    let statement = format!("ALTER TABLE {TABLE} ALTER COLUMN qty TYPE bigint");
    let mut run = Running::start(&url, &["migrate", "--postpone-cutover", "--yes", &statement]).await;
    run.wait_until("the postponed cut-over", |p| p["awaiting_cutover"] == true).await;
    let out = ghostwire(&url, &["abort", TABLE]).await;
    assert!(out.status.success(), "{}", text(&out));
    let aborted = Instant::now();
    let ended = run.wait().await;
    // The abort ended the run's sessions; the run noticed, saw the mark, and stopped.
    assert!(aborted.elapsed() < Duration::from_secs(1), "the run took {:?} to stop", aborted.elapsed());
    assert_eq!(ended.status.code(), Some(1), "{}", ended.output());
    assert!(ended.stderr.contains("was aborted by `ghostwire abort` from elsewhere"), "{}", ended.output());
    let admin = cluster.connect("appdb").await.unwrap();
    assert!(debris(&admin, 1).await.is_empty(), "{:?}", debris(&admin, 1).await);
    assert_eq!(strings(&admin, "SELECT phase FROM ghostwire.migrations").await, ["aborted"]);
    let kind = strings(&admin, "SELECT data_type::text FROM information_schema.columns WHERE table_name = 'Order Items' AND column_name = 'qty'").await;
    assert_eq!(kind, ["integer"], "the table is as it was");
    assert!(!ended.output().contains(PASSWORD) && !text(&out).contains(PASSWORD));
}
