//! The `items` table the crash and operations tests migrate, its oracle, and the ghostwire
//! binary run as a child process.

use tokio::process::Command;

use super::{assert_same_rows, debris, strings};

pub const ROWS: i64 = 6000;
pub const RETYPE: &str = "ALTER TABLE items ALTER COLUMN qty TYPE bigint";
const LONG: &str = "(SELECT string_agg(md5(random()::text || i), '') FROM generate_series(1, 300) i)";

/// `items` (with an index and a few TOASTed values) and its oracle, with `rows` rows each.
pub async fn create(client: &tokio_postgres::Client, rows: i64) {
    client
        .batch_execute(&format!(
            "CREATE TABLE items (id bigint PRIMARY KEY, qty int, note text, payload text);
             CREATE INDEX items_qty ON items (qty);
             CREATE TABLE oracle (id bigint PRIMARY KEY, qty int, note text, payload text);
             INSERT INTO items SELECT g, g, 'n' || g, CASE WHEN g % 200 = 0 THEN {LONG} END FROM generate_series(1, {rows}) g;
             INSERT INTO oracle SELECT * FROM items;"
        ))
        .await
        .unwrap();
}

/// Runs the ghostwire binary to the end (asynchronously: the writers share this runtime).
pub async fn ghostwire(url: &str, args: &[&str], failpoint: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ghostwire"));
    cmd.args(args).env("DATABASE_URL", url).env_remove("GHOSTWIRE_FAILPOINT");
    if let Some(f) = failpoint {
        cmd.env("GHOSTWIRE_FAILPOINT", f);
    }
    cmd.output().await.expect("run ghostwire")
}

/// `items` holds exactly what the oracle holds (after `RETYPE`).
pub async fn assert_matches_oracle(client: &tokio_postgres::Client) {
    assert_same_rows(
        client,
        "SELECT id, qty, note, payload FROM items",
        "SELECT id, qty::bigint, note, payload FROM oracle",
    )
    .await;
}

/// The migration is swapped; `finish` removes every trace of it.
pub async fn assert_swapped_then_finish(url: &str, client: &tokio_postgres::Client) {
    assert_eq!(strings(client, "SELECT phase FROM ghostwire.migrations").await, ["swapped"]);
    let key = "SELECT conname::text FROM pg_constraint WHERE conrelid = 'items'::regclass AND contype = 'p'";
    assert_eq!(strings(client, key).await, ["items_pkey"], "the new table's key is its primary key");
    let out = ghostwire(url, &["finish", "items"], None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(debris(client, 1).await.is_empty(), "{:?}", debris(client, 1).await);
}

/// An immutable function that takes about 0.3 ms a row: a scan of the 6,000 rows of `items`
/// calling it (a CHECK's validation, an index build) takes seconds.
pub const SLOW_FN: &str = "CREATE FUNCTION slow(bigint) RETURNS bigint LANGUAGE plpgsql IMMUTABLE
                            AS $$ BEGIN PERFORM pg_sleep(0.0003); RETURN $1; END $$;";
