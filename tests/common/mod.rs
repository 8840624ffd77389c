//! Helpers shared by the integration tests: a fresh database on the shared throwaway
//! cluster, and a connected client.
#![allow(dead_code)]

use ghostwire::ephemeral::Cluster;
use tokio_postgres::{Client, NoTls};

/// A fresh, empty database on the process-wide throwaway cluster.
pub struct TestDb {
    pub url: String,
    pub client: Client,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let cluster = Cluster::shared().expect("start the throwaway PostgreSQL cluster");
        let url = cluster.fresh_database().await.expect("create a fresh database");
        let client = connect(&url).await;
        TestDb { url, client }
    }

    pub async fn exec(&self, sql: &str) {
        if let Err(e) = self.client.batch_execute(sql).await {
            panic!("setup SQL failed: {e:?}\n{sql}");
        }
    }

    pub async fn connect(&self) -> Client {
        connect(&self.url).await
    }
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A role name unique to this database (roles are cluster-wide; tests run in parallel).
pub fn role(db: &TestDb, base: &str) -> String {
    let db_name = db.url.rsplit('/').next().unwrap_or("db");
    format!("{base}_{db_name}")
}
