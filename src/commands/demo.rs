//! `ghostwire demo`: the main job on a throwaway local cluster, for a new user.

use std::time::Instant;

use super::CommandError;
use crate::ephemeral::{Cluster, ClusterOptions};
use crate::plan::{self, report};

/// The sample table: an `orders` table with two secondary indexes.
pub const SAMPLE_TABLE: &str = "
    CREATE TABLE orders (
        id bigserial PRIMARY KEY,
        customer_id int NOT NULL,
        status text NOT NULL DEFAULT 'new',
        amount int NOT NULL,
        note text,
        created_at timestamptz NOT NULL DEFAULT now());
    CREATE INDEX orders_customer_id ON orders (customer_id);
    CREATE INDEX orders_created_at ON orders (created_at);";

/// Fills `orders` with `rows` rows.
pub const SAMPLE_ROWS: &str = "
    INSERT INTO orders (customer_id, status, amount, note, created_at)
    SELECT 1 + g % 5000, (ARRAY['new','paid','shipped'])[1 + g % 3], g % 100000,
           'order ' || g, now() - make_interval(secs => g)
      FROM generate_series(1, $1::bigint) g";

pub async fn run(rows: i64) -> Result<(), CommandError> {
    say!("Starting a throwaway PostgreSQL cluster…");
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(ClusterOptions::default()))
        .await
        .map_err(CommandError::failed)?
        .map_err(CommandError::failed)?;
    let url = cluster.url("postgres");
    say!("  {url}");
    let mut client = cluster.connect("postgres").await.map_err(CommandError::failed)?;
    let started = Instant::now();
    client.batch_execute(SAMPLE_TABLE).await.map_err(CommandError::failed)?;
    client.execute(SAMPLE_ROWS, &[&rows]).await.map_err(CommandError::failed)?;
    client.batch_execute("ANALYZE orders").await.map_err(CommandError::failed)?;
    say!("Created table orders with {} rows in {:.1} s.\n", report::thousands(rows), started.elapsed().as_secs_f64());
    for statement in [
        "ALTER TABLE orders ADD COLUMN priority int DEFAULT 0",
        "ALTER TABLE orders ADD CONSTRAINT orders_amount_nonneg CHECK (amount >= 0)",
        "ALTER TABLE orders ALTER COLUMN amount TYPE bigint",
    ] {
        let p = plan::plan(&mut client, statement).await.map_err(CommandError::failed)?;
        say!("$ ghostwire plan \"{statement}\"");
        say!("{}", plan::render(&p));
    }
    say!("To plan a change on your own database (nothing is changed):");
    say!("  ghostwire plan --database-url postgres://user@host:5432/dbname \"ALTER TABLE …\"");
    say!("\nThe throwaway cluster is removed now.");
    drop(cluster);
    Ok(())
}
