//! Proxy overhead: `cargo bench --bench proxy`.
//!
//! pgbench select-only (`-S`, 8 clients, 2 threads) on a throwaway cluster, directly,
//! through `ghostwire proxy`, and through PgBouncer in session mode (when installed:
//! `apt-get install pgbouncer`), in one run, in plain text and with TLS from the client
//! (`sslmode=require`; the proxies terminate it with the same certificate, their server
//! leg is plain text); each path is measured `GHOSTWIRE_BENCH_RUNS` times (default 3,
//! interleaved) for `GHOSTWIRE_BENCH_SECONDS` (default 10) and the median is printed with
//! its ratio to direct (direct TLS for the TLS rows). Target: at least PgBouncer's
//! throughput in both.

use std::process::Stdio;
use std::time::Duration;

use ghostwire::connect::tls_server::Acceptor;
use ghostwire::control;
use ghostwire::ephemeral::{Cluster, ClusterOptions, ServerTls};
use ghostwire::proxy::{ClientLeg, ClientTlsMode, Proxy, ProxyOptions};
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A self-signed certificate for localhost and its key, as PEM.
fn certificate() -> ServerTls {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap().self_signed(&key).unwrap();
    ServerTls { cert_pem: cert.pem(), key_pem: key.serialize_pem() }
}

/// Starts PgBouncer (session mode, trust, plain text to the server) in front of `pg_port`,
/// terminating TLS from clients with the certificate in `dir` when `tls`; None if it is
/// not installed.
async fn start_pgbouncer(pg_port: u16, dir: &std::path::Path, tls: bool) -> Option<(tokio::process::Child, u16)> {
    let binary = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    let port = free_port();
    let d = dir.display();
    let name = if tls { "tls" } else { "plain" };
    std::fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n").ok()?;
    let client_tls = if tls {
        format!(
            "client_tls_sslmode = require\nclient_tls_cert_file = {d}/server.crt\nclient_tls_key_file = {d}/server.key\n"
        )
    } else {
        String::new()
    };
    std::fs::write(
        dir.join(format!("pgbouncer-{name}.ini")),
        format!(
            "[databases]\n* = host=127.0.0.1 port={pg_port}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
             auth_type = trust\nauth_file = {d}/users.txt\npool_mode = session\nmax_client_conn = 200\n\
             default_pool_size = 50\nunix_socket_dir =\nlogfile = {d}/pgbouncer-{name}.log\npidfile = {d}/pgbouncer-{name}.pid\n\
             server_tls_sslmode = disable\n{client_tls}"
        ),
    )
    .ok()?;
    // PgBouncer refuses to run as root.
    let root = unsafe { libc::geteuid() } == 0;
    let mut cmd = if root {
        std::process::Command::new("chown").args(["-R", "postgres", &d.to_string()]).status().ok()?;
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", binary]);
        c
    } else {
        Command::new(binary)
    };
    let child = cmd
        .arg(dir.join(format!("pgbouncer-{name}.ini")))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .ok()?;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Some((child, port));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

async fn pgbench_tps(bin: &std::path::Path, port: u16, seconds: u32, sslmode: &str) -> f64 {
    let out = Command::new(bin)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-n", "-S", "-c", "8", "-j", "2"])
        .args(["-T", &seconds.to_string(), "postgres"])
        .env("PGSSLMODE", sslmode)
        .output()
        .await
        .expect("pgbench");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("pgbench failed: {text}{}", String::from_utf8_lossy(&out.stderr)))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let runs: usize = std::env::var("GHOSTWIRE_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3).max(1);
    let seconds: u32 = std::env::var("GHOSTWIRE_BENCH_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let tls = certificate();
    let options = ClusterOptions { tls: Some(tls.clone()), ..ClusterOptions::default() };
    let cluster = Cluster::start(options).expect("a throwaway cluster");
    println!("PostgreSQL {} ({})", cluster.binaries().version, cluster.binaries().bindir.display());
    let pgbench = cluster.binaries().path("pgbench");
    let init = Command::new(&pgbench)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &cluster.port().to_string(),
            "-U",
            "postgres",
            "-i",
            "-s",
            "10",
            "-q",
            "postgres",
        ])
        .output()
        .await
        .unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("server.crt"), &tls.cert_pem).unwrap();
    std::fs::write(dir.path().join("server.key"), &tls.key_pem).unwrap();
    std::fs::set_permissions(dir.path().join("server.key"), std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .unwrap();
    let shutdown = CancellationToken::new();
    control::metrics();
    let upstream = format!("host=127.0.0.1 port={} sslmode=disable", cluster.port());
    let plain_leg = ClientLeg::default();
    let acceptor = Acceptor::new(&dir.path().join("server.crt"), &dir.path().join("server.key")).unwrap();
    let tls_leg = ClientLeg::new(ClientTlsMode::Require, Some(acceptor)).unwrap();
    let mut proxy_ports = Vec::new();
    for leg in [plain_leg, tls_leg] {
        let options = ProxyOptions {
            upstream: upstream.clone(),
            max_message_len: ghostwire_proto::MAX_MESSAGE_LEN,
            client_tls: leg,
        };
        let proxy = Proxy::with_options(options).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        proxy_ports.push(listener.local_addr().unwrap().port());
        let s = shutdown.clone();
        tokio::spawn(async move { proxy.serve(listener, s, Duration::from_secs(1)).await });
    }

    let bouncer = start_pgbouncer(cluster.port(), dir.path(), false).await;
    let tls_bouncer = start_pgbouncer(cluster.port(), dir.path(), true).await;
    if bouncer.is_none() {
        println!("(PgBouncer not found: apt-get install pgbouncer to compare with it)");
    }
    // (name, port, sslmode) of each path; the first of each group is the baseline.
    let mut paths: Vec<(&str, u16, &str)> =
        vec![("direct", cluster.port(), "disable"), ("ghostwire proxy", proxy_ports[0], "disable")];
    if let Some((_, port)) = &bouncer {
        paths.push(("PgBouncer (session mode)", *port, "disable"));
    }
    paths.push(("direct, TLS", cluster.port(), "require"));
    paths.push(("ghostwire proxy, TLS", proxy_ports[1], "require"));
    if let Some((_, port)) = &tls_bouncer {
        paths.push(("PgBouncer, TLS", *port, "require"));
    }
    let mut tps: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    for _ in 0..runs {
        for (i, (_, port, sslmode)) in paths.iter().enumerate() {
            tps[i].push(pgbench_tps(&pgbench, *port, seconds, sslmode).await);
        }
    }
    shutdown.cancel();
    // PgBouncer runs under runuser when we are root: killing the child leaves it running.
    for name in ["plain", "tls"] {
        if let Ok(pid) = std::fs::read_to_string(dir.path().join(format!("pgbouncer-{name}.pid"))) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                // SAFETY: signalling a process this bench started.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
    }
    println!("proxy benchmark: pgbench -S -c 8 -j 2, {seconds} s per run, median of {runs}");
    println!("{:<28} {:>10} {:>8}", "", "tps", "ratio");
    let mut base = 1.0;
    for ((name, _, _), v) in paths.iter().zip(&tps) {
        let m = median(v.clone());
        if name.starts_with("direct") {
            base = m;
        }
        println!(
            "{name:<28} {m:>10.0} {:>7.2}x   (runs: {})",
            m / base,
            v.iter().map(|t| format!("{t:.0}")).collect::<Vec<_>>().join(" ")
        );
    }
    println!("target: ghostwire proxy at least PgBouncer's throughput, in plain text and with TLS");
}
