//! Proxy overhead: `cargo bench --bench proxy`.
//!
//! pgbench select-only (`-S`, 8 clients, 2 threads) on a throwaway cluster, directly,
//! through `ghostwire proxy`, and through PgBouncer in session mode (when installed:
//! `apt-get install pgbouncer`), in one run; each path is measured `GHOSTWIRE_BENCH_RUNS`
//! times (default 3, interleaved) for `GHOSTWIRE_BENCH_SECONDS` (default 10) and the median
//! is printed with its ratio to direct. Target: at least PgBouncer's throughput.

use std::process::Stdio;
use std::time::Duration;

use ghostwire::control;
use ghostwire::ephemeral::{Cluster, ClusterOptions};
use ghostwire::proxy::Proxy;
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts PgBouncer (session mode, trust) in front of `pg_port`; None if it is not installed.
async fn start_pgbouncer(pg_port: u16, dir: &std::path::Path) -> Option<(tokio::process::Child, u16)> {
    let binary = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    let port = free_port();
    let d = dir.display();
    std::fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n").ok()?;
    std::fs::write(
        dir.join("pgbouncer.ini"),
        format!(
            "[databases]\n* = host=127.0.0.1 port={pg_port}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
             auth_type = trust\nauth_file = {d}/users.txt\npool_mode = session\nmax_client_conn = 200\n\
             default_pool_size = 50\nunix_socket_dir =\nlogfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\n"
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
        .arg(dir.join("pgbouncer.ini"))
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

async fn pgbench_tps(bin: &std::path::Path, port: u16, seconds: u32) -> f64 {
    let out = Command::new(bin)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-n", "-S", "-c", "8", "-j", "2"])
        .args(["-T", &seconds.to_string(), "postgres"])
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
    let cluster = Cluster::start(ClusterOptions::default()).expect("a throwaway cluster");
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

    let proxy = Proxy::new(&format!("127.0.0.1:{}", cluster.port()), ghostwire_proto::MAX_MESSAGE_LEN).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_port = listener.local_addr().unwrap().port();
    let shutdown = CancellationToken::new();
    control::metrics();
    let p = proxy.clone();
    let s = shutdown.clone();
    tokio::spawn(async move { p.serve(listener, s, Duration::from_secs(1)).await });

    let dir = tempfile::tempdir().unwrap();
    let bouncer = start_pgbouncer(cluster.port(), dir.path()).await;
    if bouncer.is_none() {
        println!("(PgBouncer not found: apt-get install pgbouncer to compare with it)");
    }
    let (mut direct, mut ours, mut theirs) = (vec![], vec![], vec![]);
    for _ in 0..runs {
        direct.push(pgbench_tps(&pgbench, cluster.port(), seconds).await);
        ours.push(pgbench_tps(&pgbench, proxy_port, seconds).await);
        if let Some((_, port)) = &bouncer {
            theirs.push(pgbench_tps(&pgbench, *port, seconds).await);
        }
    }
    shutdown.cancel();
    let base = median(direct.clone());
    println!("proxy benchmark: pgbench -S -c 8 -j 2, {seconds} s per run, median of {runs}");
    println!("{:<28} {:>10} {:>8}", "", "tps", "ratio");
    let show = |name: &str, v: &Vec<f64>| {
        if !v.is_empty() {
            let m = median(v.clone());
            println!(
                "{name:<28} {m:>10.0} {:>7.2}x   (runs: {})",
                m / base,
                v.iter().map(|t| format!("{t:.0}")).collect::<Vec<_>>().join(" ")
            );
        }
    };
    show("direct", &direct);
    show("ghostwire proxy", &ours);
    show("PgBouncer (session mode)", &theirs);
    println!("target: ghostwire proxy at least PgBouncer's throughput");
}
