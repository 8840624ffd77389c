//! `ghostwire indexes`: invalid indexes left by a failed CREATE INDEX CONCURRENTLY and by a
//! failed REINDEX CONCURRENTLY (its `_ccnew`) are found, and `--drop-invalid` removes them
//! concurrently, asking first.

mod common;

use common::items::ghostwire;
use common::{TestDb, strings};

#[tokio::test]
async fn invalid_indexes_are_listed_and_dropped_concurrently() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, note text);
         INSERT INTO t SELECT g, 'n' || g FROM generate_series(1, 1000) g;
         UPDATE t SET note = 'dup' WHERE id IN (1, 2);",
    )
    .await;
    let failed = db.client.batch_execute("CREATE UNIQUE INDEX CONCURRENTLY t_note_key ON t (note)").await;
    assert!(failed.is_err(), "the duplicate fails the build");
    let failed = db.client.batch_execute("REINDEX INDEX CONCURRENTLY t_note_key").await;
    assert!(failed.is_err(), "the duplicate fails the rebuild");
    let invalid = "SELECT string_agg(indexrelid::regclass::text, ',' ORDER BY 1) FROM pg_index WHERE NOT indisvalid";
    assert_eq!(strings(&db.client, invalid).await, ["t_note_key,t_note_key_ccnew"]);

    let out = ghostwire(&db.url, &["indexes", "--invalid"], None).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("public.t_note_key on public.t") && text.contains("public.t_note_key_ccnew on public.t"),
        "{text}"
    );
    assert!(text.contains("INVALID") && !text.contains("t_pkey"), "{text}");

    let out = ghostwire(&db.url, &["indexes", "--json", "t"], None).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let valid: Vec<(String, bool)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["index"].as_str().unwrap().to_owned(), i["valid"].as_bool().unwrap()))
        .collect();
    assert!(
        valid.contains(&("public.t_pkey".into(), true)) && valid.contains(&("public.t_note_key".into(), false)),
        "{v}"
    );

    // Not on a terminal and no --yes: refused, nothing dropped.
    let out = ghostwire(&db.url, &["indexes", "--drop-invalid"], None).await;
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(strings(&db.client, invalid).await, ["t_note_key,t_note_key_ccnew"]);
    let out = ghostwire(&db.url, &["indexes", "--drop-invalid", "--yes"], None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let none = "SELECT count(*)::text FROM pg_index WHERE NOT indisvalid";
    assert_eq!(strings(&db.client, none).await, ["0"]);
    let left = "SELECT string_agg(indexrelid::regclass::text, ',') FROM pg_index WHERE indrelid = 't'::regclass";
    assert_eq!(strings(&db.client, left).await, ["t_pkey"]);
}
