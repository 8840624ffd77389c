//! Control APIs beyond loopback need a bearer token: refused without one (exit 2), every
//! request checked against it, and the engine and the commands send it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::workload::{Shape, Workload};
use common::{TestDb, run_migration, test_options};
use ghostwire::connect::Secret;
use ghostwire::control;
use ghostwire::migrate::Options;
use ghostwire::proxy::Proxy;
use tokio::io::AsyncBufReadExt;
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "a-long-enough-token-42";

#[tokio::test]
async fn a_control_api_beyond_loopback_needs_a_token() {
    let db = TestDb::new().await;
    let up = db.upstream();
    let proxy = |extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ghostwire"));
        cmd.args(["proxy", "--listen", "127.0.0.1:0", "--upstream", &up, "--control", "0.0.0.0:0"]).args(extra);
        cmd.env_remove("GHOSTWIRE_CONTROL_TOKEN");
        cmd
    };
    let out = proxy(&[]).output().await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--control-token"), "{out:?}");
    let out = proxy(&["--control-token", "short"]).output().await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 16"), "{out:?}");

    let mut child =
        proxy(&["--control-token", TOKEN]).stdout(std::process::Stdio::piped()).kill_on_drop(true).spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next_line().await.unwrap().unwrap();
    let port: String =
        line.split("control API on http://0.0.0.0:").nth(1).unwrap().chars().take_while(char::is_ascii_digit).collect();
    let addr = format!("127.0.0.1:{port}");
    let timeout = Duration::from_secs(5);
    let (code, _) = control::call(&addr, None, "GET", "/status", timeout).await.unwrap();
    assert_eq!(code, 401);
    let (code, _) =
        control::call(&addr, Some(&Secret::new("wrong-token-of-length")), "GET", "/status", timeout).await.unwrap();
    assert_eq!(code, 401);
    let (code, body) = control::call(&addr, Some(&Secret::new(TOKEN)), "GET", "/status", timeout).await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(!body.contains(TOKEN));

    // A migration's own control API: refused before anything changes.
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v int)").await;
    let out = Command::new(env!("CARGO_BIN_EXE_ghostwire"))
        .args(["migrate", "--yes", "--control", "0.0.0.0:0", "ALTER TABLE t ALTER COLUMN v TYPE bigint"])
        .env("DATABASE_URL", &db.url)
        .env_remove("GHOSTWIRE_CONTROL_TOKEN")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let state = common::strings(&db.client, "SELECT coalesce(to_regclass('ghostwire.migrations')::text, 'none')").await;
    assert_eq!(state, ["none"]);
}

#[tokio::test]
async fn the_engine_drains_a_proxy_that_wants_a_token() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE items (id bigint PRIMARY KEY, qty int, note text, payload text);
         CREATE TABLE oracle (id bigint PRIMARY KEY, qty int, note text, payload text);
         INSERT INTO items (id, qty) SELECT g, g FROM generate_series(1, 2000) g; INSERT INTO oracle SELECT * FROM items;",
    )
    .await;
    let proxy = Proxy::new(&db.upstream(), ghostwire_proto::MAX_MESSAGE_LEN).unwrap();
    let (listener, ctl) =
        (TcpListener::bind("127.0.0.1:0").await.unwrap(), TcpListener::bind("127.0.0.1:0").await.unwrap());
    let (addr, control_url) = (listener.local_addr().unwrap(), format!("http://{}", ctl.local_addr().unwrap()));
    let shutdown = CancellationToken::new();
    tokio::spawn(control::serve(ctl, proxy.control(), Some(Secret::new(TOKEN)), shutdown.clone()));
    let p = proxy.clone();
    let s = shutdown.clone();
    tokio::spawn(async move { p.serve(listener, s, Duration::from_secs(1)).await });
    let through = db.url.replace(&db.upstream(), &addr.to_string());
    let load = Workload::start(&through, Shape::items(), 2, 2000, 51);
    load.wait_for_more(20).await;
    // Without the token every drain is refused, and the swap gives up untouched.
    let opts = Options { proxies: vec![control_url.clone()], cutover_attempts: 2, ..test_options() };
    let err =
        run_migration(&db.url, "ALTER TABLE items ALTER COLUMN qty TYPE bigint", &opts, None).await.err().unwrap();
    assert!(err.to_string().contains("401"), "{err}");
    common::items::ghostwire(&db.url, &["abort", "items"], None).await;
    let opts = Options { proxy_token: Some(Secret::new(TOKEN)), ..opts };
    let hook = common::writes_each_phase(Arc::clone(&load.counters), 5);
    let outcome = run_migration(&db.url, "ALTER TABLE items ALTER COLUMN qty TYPE bigint", &opts, Some(hook))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(outcome.clients_held.is_some(), "the proxy was drained for the swap");
    load.wait_for_more(10).await;
    load.stop().await;
    shutdown.cancel();
}
