//! Proxy overhead: `cargo bench --bench proxy`.
//!
//! pgbench select-only (`-S`, 8 clients, 2 threads) on a throwaway cluster, directly,
//! through `ghostwire proxy`, and through PgBouncer in session mode (when installed:
//! `apt-get install pgbouncer`), in one run, in plain text and with TLS from the client
//! (`sslmode=require`; the proxies terminate it with the same certificate, their server
//! leg is plain text); each path is measured `GHOSTWIRE_BENCH_RUNS` times (default 3,
//! interleaved) for `GHOSTWIRE_BENCH_SECONDS` (default 10) and the median is printed with
//! its ratio to direct (direct TLS for the TLS rows). Target: at least PgBouncer's
//! throughput in both. Then the same with prepared statements (`-M prepared`), through the
//! proxy as it runs and with its statement recovery off (`--no-statement-recovery`):
//! what following every Parse, Bind and Describe costs (target: at most 3%), in throughput
//! and in the proxy's own CPU time per transaction (this process's, where the proxies run).
//! `GHOSTWIRE_BENCH_ONLY=prepared` runs only the paths whose name has that text.

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

/// CPU time this process (the proxies run in it) has used, in µs.
fn cpu_us() -> f64 {
    // SAFETY: getrusage writes into the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    us(u.ru_utime) + us(u.ru_stime)
}

/// (transactions per second, CPU µs this process spent per transaction).
async fn pgbench_tps(bin: &std::path::Path, port: u16, seconds: u32, sslmode: &str, mode: &str) -> (f64, f64) {
    let cpu = cpu_us();
    let out = Command::new(bin)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-n", "-S", "-c", "8", "-j", "2"])
        .args(["-M", mode])
        .args(["-T", &seconds.to_string(), "postgres"])
        .env("PGSSLMODE", sslmode)
        .output()
        .await
        .expect("pgbench");
    let cpu = cpu_us() - cpu;
    let text = String::from_utf8_lossy(&out.stdout);
    let tps: f64 = text
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("pgbench failed: {text}{}", String::from_utf8_lossy(&out.stderr)));
    (tps, cpu / (tps * f64::from(seconds)).max(1.0))
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
    for (leg, recover_statements) in [(plain_leg.clone(), true), (tls_leg, true), (plain_leg, false)] {
        let options = ProxyOptions {
            upstream: upstream.clone(),
            max_message_len: ghostwire_proto::MAX_MESSAGE_LEN,
            client_tls: leg,
            recover_statements,
            routes: Vec::new(),
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
    // (name, port, sslmode, protocol) of each path; the first of each group is the baseline.
    let mut paths: Vec<(&str, u16, &str, &str)> =
        vec![("direct", cluster.port(), "disable", "simple"), ("ghostwire proxy", proxy_ports[0], "disable", "simple")];
    if let Some((_, port)) = &bouncer {
        paths.push(("PgBouncer (session mode)", *port, "disable", "simple"));
    }
    paths.push(("direct, TLS", cluster.port(), "require", "simple"));
    paths.push(("ghostwire proxy, TLS", proxy_ports[1], "require", "simple"));
    if let Some((_, port)) = &tls_bouncer {
        paths.push(("PgBouncer, TLS", *port, "require", "simple"));
    }
    paths.push(("direct, prepared", cluster.port(), "disable", "prepared"));
    paths.push(("ghostwire proxy, prepared", proxy_ports[0], "disable", "prepared"));
    paths.push(("  without statement recovery", proxy_ports[2], "disable", "prepared"));
    if let Some((_, port)) = &bouncer {
        paths.push(("PgBouncer, prepared", *port, "disable", "prepared"));
    }
    // GHOSTWIRE_BENCH_ONLY=prepared: only the paths whose name has it (with their baseline).
    if let Ok(only) = std::env::var("GHOSTWIRE_BENCH_ONLY") {
        paths.retain(|p| p.0.contains(only.as_str()) || p.0.starts_with("  "));
    }
    let mut tps: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    for _ in 0..runs {
        for (i, (_, port, sslmode, mode)) in paths.iter().enumerate() {
            let (t, c) = pgbench_tps(&pgbench, *port, seconds, sslmode, mode).await;
            tps[i].push(t);
            cpu[i].push(c);
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
    println!("{:<28} {:>10} {:>8} {:>14}", "", "tps", "ratio", "proxy µs/tx");
    let mut base = 1.0;
    let mut medians = Vec::new();
    for (((name, _, _, _), v), c) in paths.iter().zip(&tps).zip(&cpu) {
        let m = median(v.clone());
        let c = median(c.clone());
        medians.push((*name, m, c));
        if name.starts_with("direct") {
            base = m;
        }
        let own =
            if name.starts_with("direct") || name.starts_with("PgBouncer") { "-".into() } else { format!("{c:.1}") };
        println!(
            "{name:<28} {m:>10.0} {:>7.2}x {own:>14}   (runs: {})",
            m / base,
            v.iter().map(|t| format!("{t:.0}")).collect::<Vec<_>>().join(" ")
        );
    }
    println!("target: ghostwire proxy at least PgBouncer's throughput, in plain text and with TLS");
    let of = |n: &str| medians.iter().find(|(name, _, _)| *name == n).map(|(_, m, _)| *m).unwrap_or(f64::NAN);
    let cpu_of = |n: &str| medians.iter().find(|(name, _, _)| *name == n).map(|(_, _, c)| *c).unwrap_or(f64::NAN);
    // Paired runs (each run of the two back to back) give the cost with less of the noise.
    let with = &tps[paths.iter().position(|p| p.0 == "ghostwire proxy, prepared").unwrap_or(0)];
    let without = &tps[paths.iter().position(|p| p.0 == "  without statement recovery").unwrap_or(0)];
    let paired = median(with.iter().zip(without).map(|(a, b)| a / b).collect());
    println!(
        "statement recovery costs {:.1}% of -M prepared throughput (medians), {:.1}% (median of paired runs); target: at most 3%",
        (1.0 - of("ghostwire proxy, prepared") / of("  without statement recovery")) * 100.0,
        (1.0 - paired) * 100.0
    );
    // The proxy's own CPU per transaction: what the bookkeeping adds, without the noise of
    // two cores shared by pgbench, the server and the proxy.
    println!(
        "statement recovery adds {:.1}% to the proxy's CPU time per -M prepared transaction ({:.1} against {:.1} µs)",
        (cpu_of("ghostwire proxy, prepared") / cpu_of("  without statement recovery") - 1.0) * 100.0,
        cpu_of("ghostwire proxy, prepared"),
        cpu_of("  without statement recovery")
    );
}
