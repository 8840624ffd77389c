//! `ghostwire proxy` relaying real PostgreSQL traffic: every authentication method, psql,
//! pgbench in each query mode, tokio-postgres pipelining, COPY both ways, cancel requests,
//! SSL/GSSENC requests, and clients or servers that disconnect mid-stream.

mod common;

use std::time::{Duration, Instant};
use tokio::process::Command;

use common::proxy::TestProxy;
use common::{TestDb, connect};
use futures_util::{SinkExt, StreamExt};
use ghostwire::ephemeral::{Cluster, ClusterOptions, HostAuth};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::error::SqlState;

#[tokio::test]
async fn trust_md5_and_scram_authentication_pass_through() {
    for (auth, encryption, stored) in [
        (HostAuth::Trust, "scram-sha-256", "SCRAM"),
        (HostAuth::Md5, "md5", "md5"),
        (HostAuth::ScramSha256, "scram-sha-256", "SCRAM"),
    ] {
        let options = ClusterOptions { host_auth: auth, ..ClusterOptions::default() }
            .with_setting("password_encryption", format!("'{encryption}'"));
        let cluster = tokio::task::spawn_blocking(move || Cluster::start(options)).await.unwrap().unwrap();
        let admin = cluster.connect("postgres").await.unwrap();
        admin.batch_execute("CREATE ROLE app LOGIN PASSWORD 'sekret'").await.unwrap();
        let kind: String = admin
            .query_one("SELECT left(rolpassword, 5) FROM pg_authid WHERE rolname = 'app'", &[])
            .await
            .unwrap()
            .get(0);
        assert!(kind.starts_with(stored), "{auth:?}: stored {kind}");
        let proxy = TestProxy::start(&format!("127.0.0.1:{}", cluster.port())).await;
        let good = format!("postgres://app:sekret@{}/postgres", proxy.addr);
        let client = connect(&good).await;
        let user: String = client.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
        assert_eq!(user, "app", "{auth:?}");
        if auth != HostAuth::Trust {
            let bad = format!("postgres://app:wrong@{}/postgres", proxy.addr);
            let err = common::try_connect(&bad).await.err().unwrap_or_else(|| panic!("a wrong password is refused"));
            let message = err.to_string();
            assert!(message.contains("password authentication failed"), "{auth:?}: {message}");
        }
    }
}

#[tokio::test]
async fn psql_and_pgbench_in_every_query_mode() {
    let db = TestDb::new().await;
    let proxy = TestProxy::start(&db.upstream()).await;
    let bin = Cluster::shared().unwrap().binaries().clone();
    let dbname = db.url.rsplit('/').next().unwrap().to_owned();
    let port = proxy.addr.port().to_string();
    // tokio's Command: the proxy runs on this test's runtime and must not be blocked.
    let out = Command::new(bin.path("psql"))
        .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-d", &dbname, "-Atc", "SELECT 40 + 2"])
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42", "{}", String::from_utf8_lossy(&out.stderr));
    let pgbench = |args: Vec<&'static str>| {
        let mut cmd = Command::new(bin.path("pgbench"));
        cmd.args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"]).args(&args).arg(&dbname);
        async move {
            let out = cmd.output().await.unwrap();
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success(), "pgbench {args:?}: {text}");
            text
        }
    };
    pgbench(vec!["-i", "-s", "1", "-q"]).await;
    for mode in ["simple", "extended", "prepared"] {
        let text = pgbench(vec!["-M", mode, "-c", "4", "-t", "50"]).await;
        assert!(text.contains("number of transactions actually processed: 200/200"), "{mode}: {text}");
        assert!(text.contains("number of failed transactions: 0"), "{mode}: {text}");
    }
}

#[tokio::test]
async fn pipelined_extended_protocol_queries() {
    let db = TestDb::new().await;
    let proxy = TestProxy::start(&db.upstream()).await;
    let client = connect(&proxy.url_for(&db.url)).await;
    let statement = client.prepare("SELECT $1::int * 2").await.unwrap();
    let queries = (0..500).map(|i| {
        let (client, statement) = (&client, &statement);
        async move { client.query_one(statement, &[&i]).await.map(|r| r.get::<_, i32>(0) == i * 2) }
    });
    let results = futures_util::future::join_all(queries).await;
    assert!(results.into_iter().all(|r| r.unwrap()));
}

#[tokio::test]
async fn copy_in_and_out_including_messages_larger_than_the_hold_limit() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE blobs (id int PRIMARY KEY, body text)").await;
    let proxy = TestProxy::start(&db.upstream()).await;
    let client = connect(&proxy.url_for(&db.url)).await;
    let sink = client.copy_in("COPY blobs FROM STDIN").await.unwrap();
    let mut sink = Box::pin(sink);
    let big = "x".repeat(300_000); // one CopyData message of 300 kB: streamed, not held
    for i in 0..5000 {
        let body = if i % 1000 == 0 { big.clone() } else { format!("row {i}") };
        sink.send(bytes::Bytes::from(format!("{i}\t{body}\n"))).await.unwrap();
    }
    assert_eq!(sink.as_mut().finish().await.unwrap(), 5000);
    let expected: String = db
        .client
        .query_one("SELECT md5(string_agg(id || ':' || body, ',' ORDER BY id)) FROM blobs", &[])
        .await
        .unwrap()
        .get(0);
    let stream = client.copy_out("COPY (SELECT id, body FROM blobs ORDER BY id) TO STDOUT").await.unwrap();
    let chunks: Vec<bytes::Bytes> = stream.map(|c| c.unwrap()).collect().await;
    let text = String::from_utf8(chunks.concat()).unwrap();
    let joined: Vec<String> = text.lines().map(|l| l.replacen('\t', ":", 1)).collect();
    let got: String = db.client.query_one("SELECT md5($1)", &[&joined.join(",")]).await.unwrap().get(0);
    assert_eq!(got, expected);
    let long: i64 =
        db.client.query_one("SELECT count(*) FROM blobs WHERE length(body) = 300000", &[]).await.unwrap().get(0);
    assert_eq!(long, 5);
}

#[tokio::test]
async fn a_cancel_request_reaches_the_right_backend() {
    let db = TestDb::new().await;
    let proxy = TestProxy::start(&db.upstream()).await;
    let url = proxy.url_for(&db.url);
    let (victim, bystander) = (connect(&url).await, connect(&url).await);
    let token = victim.cancel_token();
    let slow = tokio::spawn(async move { victim.query("SELECT pg_sleep(30)", &[]).await });
    let other =
        tokio::spawn(
            async move { bystander.query_one("SELECT pg_sleep(0.5), 7", &[]).await.map(|r| r.get::<_, i32>(1)) },
        );
    // Cancel once the sleep is running.
    let deadline = Instant::now() + Duration::from_secs(10);
    while db
        .client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
        == 0
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = slow.await.unwrap().expect_err("cancelled");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(other.await.unwrap().unwrap(), 7, "the other session was not touched");
    assert_eq!(proxy.status().cancels_total, 1);
}

/// StartupMessage for user postgres on `db`, raw.
fn startup_packet(db: &str) -> Vec<u8> {
    let mut body = 196608u32.to_be_bytes().to_vec();
    for s in ["user", "postgres", "database", db] {
        body.extend(s.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    p.extend(body);
    p
}

/// Reads server messages until ReadyForQuery.
async fn until_ready(stream: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut framer = ghostwire_proto::Framer::new(1 << 20, 1 << 20);
    loop {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed before ReadyForQuery");
        buf.extend_from_slice(&chunk[..n]);
        while let ghostwire_proto::Item::Message { tag, total, .. } = framer.next(&buf).unwrap() {
            buf.drain(..total);
            if tag == b'Z' {
                return;
            }
        }
    }
}

#[tokio::test]
async fn ssl_and_gssenc_requests_are_declined_and_startup_goes_on() {
    let db = TestDb::new().await;
    let proxy = TestProxy::start(&db.upstream()).await;
    let dbname = db.url.rsplit('/').next().unwrap().to_owned();
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    for code in [ghostwire_proto::GSSENC_REQUEST_CODE, ghostwire_proto::SSL_REQUEST_CODE] {
        let mut req = 8u32.to_be_bytes().to_vec();
        req.extend(code.to_be_bytes());
        s.write_all(&req).await.unwrap();
        let mut answer = [0u8; 1];
        s.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"N");
    }
    s.write_all(&startup_packet(&dbname)).await.unwrap();
    until_ready(&mut s).await;
}

#[tokio::test]
async fn clients_and_servers_that_disconnect_mid_stream_are_cleaned_up() {
    let db = TestDb::new().await;
    let proxy = TestProxy::start(&db.upstream()).await;
    let dbname = db.url.rsplit('/').next().unwrap().to_owned();
    // A client that leaves in the middle of a message.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&startup_packet(&dbname)).await.unwrap();
    until_ready(&mut s).await;
    proxy.wait_until("one session", |st| st.sessions == 1).await;
    s.write_all(&[b'Q', 0, 0, 0, 40, b'S', b'E']).await.unwrap();
    drop(s);
    proxy.wait_until("the session to go", |st| st.sessions == 0).await;
    // A server that goes away: the client is told, the session is gone.
    let client = connect(&proxy.url_for(&db.url)).await;
    let pid: i32 = client.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    db.client.execute("SELECT pg_terminate_backend($1)", &[&pid]).await.unwrap();
    assert!(client.query_one("SELECT 1", &[]).await.is_err());
    proxy.wait_until("the session to go", |st| st.sessions == 0).await;
    // Garbage instead of a startup packet closes only that connection.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&[0, 0, 0, 4, 1, 2, 3, 4]).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await.expect("closed");
    let ok: i32 = connect(&proxy.url_for(&db.url)).await.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(ok, 1);
}

#[tokio::test]
async fn the_control_api_reports_status_and_metrics() {
    let db = TestDb::new().await;
    let proxy = TestProxy::start(&db.upstream()).await;
    let client = connect(&proxy.url_for(&db.url)).await;
    client.batch_execute("BEGIN; SELECT 1;").await.unwrap();
    let (code, body) =
        ghostwire::control::call(&proxy.control, None, "GET", "/status", Duration::from_secs(5)).await.unwrap();
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["sessions"], 1);
    assert_eq!(status["in_transaction"], 1);
    assert_eq!(status["gate"]["state"], "open");
    let (code, metrics) =
        ghostwire::control::call(&proxy.control, None, "GET", "/metrics", Duration::from_secs(5)).await.unwrap();
    assert_eq!(code, 200);
    for name in ["ghostwire_proxy_connections_total", "ghostwire_proxy_bytes_total", "ghostwire_proxy_requests_total"] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
    let (code, _) =
        ghostwire::control::call(&proxy.control, None, "GET", "/nope", Duration::from_secs(5)).await.unwrap();
    assert_eq!(code, 404);
}

/// Starts the `ghostwire proxy` binary; returns the child and the port it listens on.
async fn proxy_binary(upstream: &str, grace: &str) -> (tokio::process::Child, u16) {
    use tokio::io::AsyncBufReadExt;
    let mut child = Command::new(env!("CARGO_BIN_EXE_ghostwire"))
        .args(["proxy", "--listen", "127.0.0.1:0", "--upstream", upstream, "--shutdown-timeout", grace])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next_line().await.unwrap().unwrap();
    let after = line.split("listening on 127.0.0.1:").nth(1).unwrap();
    let port = after.chars().take_while(char::is_ascii_digit).collect::<String>().parse().unwrap();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, port)
}

#[tokio::test]
async fn sigterm_stops_accepting_lets_sessions_finish_then_exits() {
    let db = TestDb::new().await;
    let (mut child, port) = proxy_binary(&db.upstream(), "30s").await;
    let url = db.url.replace(&db.upstream(), &format!("127.0.0.1:{port}"));
    let client = connect(&url).await;
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    // No new clients…
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // …but the open session keeps working until its client leaves; then the proxy exits.
    assert_eq!(client.query_one("SELECT 3", &[]).await.unwrap().get::<_, i32>(0), 3);
    assert!(child.try_wait().unwrap().is_none());
    drop(client);
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.expect("exits").unwrap();
    assert!(status.success());
    // With a short grace period, lingering sessions are closed.
    let (mut child, port) = proxy_binary(&db.upstream(), "300ms").await;
    let lingering = connect(&db.url.replace(&db.upstream(), &format!("127.0.0.1:{port}"))).await;
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.expect("exits").unwrap();
    assert!(status.success());
    assert!(lingering.query_one("SELECT 1", &[]).await.is_err());
}
