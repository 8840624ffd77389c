//! The throwaway-cluster harness itself: start, fresh databases, logical replication
//! settings, and no server left behind when the owning process dies.

use std::process::Command;
use std::time::{Duration, Instant};

use ghostwire::ephemeral::{Cluster, ClusterOptions};

#[tokio::test]
async fn starts_with_logical_replication_and_fresh_databases() {
    let cluster = Cluster::shared().expect("cluster");
    let url = cluster.fresh_database().await.expect("db");
    let client =
        ghostwire::connect::connect(&ghostwire::connect::Params::from_conninfo(Some(&url)).unwrap()).await.unwrap();
    let wal: String = client.query_one("SHOW wal_level", &[]).await.unwrap().get(0);
    assert_eq!(wal, "logical");
    let slots: String = client.query_one("SHOW max_replication_slots", &[]).await.unwrap().get(0);
    assert!(slots.parse::<i32>().unwrap() >= 10);
    // A second database is quick once the cluster runs.
    let t = Instant::now();
    let url2 = cluster.fresh_database().await.unwrap();
    assert_ne!(url, url2);
    assert!(t.elapsed() < Duration::from_secs(5), "fresh database took {:?}", t.elapsed());
}

#[tokio::test]
async fn dropping_a_cluster_stops_it_and_removes_its_folder() {
    let cluster = Cluster::start(ClusterOptions::default()).unwrap();
    let port = cluster.port();
    cluster.connect("postgres").await.unwrap();
    drop(cluster);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "server still listening");
}

/// Child mode: when GW_EPHEMERAL_CHILD is set, start a cluster, print its port and hang.
#[test]
fn child_holding_a_cluster() {
    if std::env::var_os("GW_EPHEMERAL_CHILD").is_none() {
        return;
    }
    let cluster = Cluster::start(ClusterOptions::default()).unwrap();
    println!("PORT={}", cluster.port());
    std::thread::sleep(Duration::from_secs(600));
}

#[test]
fn a_killed_owner_takes_its_server_with_it() {
    use std::io::{BufRead, BufReader};
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args(["--exact", "child_holding_a_cluster", "--nocapture", "--test-threads=1"])
        .env("GW_EPHEMERAL_CHILD", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some((_, p)) = line.split_once("PORT=") {
            port = Some(p.trim().parse::<u16>().unwrap());
            break;
        }
    }
    let port = port.expect("child printed its port");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    child.kill().unwrap(); // SIGKILL: no destructor, no atexit
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(Instant::now() < deadline, "server outlived its SIGKILLed owner");
        std::thread::sleep(Duration::from_millis(50));
    }
}
