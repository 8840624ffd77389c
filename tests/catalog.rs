//! Catalog inspection against real PostgreSQL: every item a swap must carry over.

mod common;

use common::{TestDb, role};
use ghostwire::catalog::{
    self, CatalogError, ConstraintKind, IdentityKind, KeyKind, Persistence, ReplicaIdentity, TableKind, ViewKind,
};

async fn inspect(db: &mut TestDb, schema: Option<&str>, name: &str) -> catalog::TableDef {
    let (oid, _) = catalog::resolve(&db.client, schema, name).await.expect("resolve");
    catalog::inspect(&mut db.client, oid).await.expect("inspect")
}

#[tokio::test]
async fn reads_everything_a_swap_must_carry_over() {
    let mut db = TestDb::new().await;
    let reader = role(&db, "reader");
    let owner = role(&db, "owner");
    let publication_filter = if common::major() >= 15 { r#"(line, qty, "Order ID") WHERE (qty > 5)"# } else { "" };
    db.exec(&format!(
        r#"
        CREATE ROLE {reader}; CREATE ROLE {owner};
        CREATE SCHEMA "Sales";
        CREATE TABLE "Sales".customers (id int PRIMARY KEY);
        CREATE TABLE "Sales"."Order Items" (
            "Order ID" bigint GENERATED ALWAYS AS IDENTITY,
            line int NOT NULL,
            sku text COLLATE "C" NOT NULL DEFAULT 'none',
            qty int NOT NULL CONSTRAINT qty_positive CHECK (qty > 0),
            price numeric(10,2),
            total numeric GENERATED ALWAYS AS (qty * price) STORED,
            customer_id int CONSTRAINT items_customer_fk REFERENCES "Sales".customers(id),
            legacy serial,
            PRIMARY KEY ("Order ID", line)
        ) WITH (fillfactor = 80, autovacuum_enabled = false);
        ALTER TABLE "Sales"."Order Items" ADD CONSTRAINT price_nonneg CHECK (price >= 0) NOT VALID;
        CREATE INDEX items_sku ON "Sales"."Order Items" (sku) WHERE qty > 1;
        CREATE UNIQUE INDEX items_sku_line ON "Sales"."Order Items" (sku, line);
        CREATE TABLE "Sales".shipments (
            id int PRIMARY KEY, order_id bigint, order_line int,
            CONSTRAINT shipments_item_fk FOREIGN KEY (order_id, order_line)
                REFERENCES "Sales"."Order Items" ("Order ID", line));
        CREATE FUNCTION "Sales".touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
        CREATE TRIGGER items_touch BEFORE UPDATE ON "Sales"."Order Items"
            FOR EACH ROW EXECUTE FUNCTION "Sales".touch();
        ALTER TABLE "Sales"."Order Items" DISABLE TRIGGER items_touch;
        CREATE RULE items_no_delete AS ON DELETE TO "Sales"."Order Items" WHERE old.qty > 1000 DO INSTEAD NOTHING;
        CREATE VIEW "Sales".big_items AS SELECT "Order ID", qty FROM "Sales"."Order Items" WHERE qty > 10;
        CREATE VIEW "Sales".big_item_ids AS SELECT "Order ID" FROM "Sales".big_items;
        GRANT SELECT ON "Sales".big_items TO {reader};
        ALTER TABLE "Sales"."Order Items" ENABLE ROW LEVEL SECURITY;
        ALTER TABLE "Sales"."Order Items" FORCE ROW LEVEL SECURITY;
        CREATE POLICY own_lines ON "Sales"."Order Items" FOR SELECT TO {reader} USING (line > 0);
        CREATE POLICY all_lines ON "Sales"."Order Items" AS RESTRICTIVE USING (true) WITH CHECK (qty < 1000000);
        GRANT SELECT, INSERT ON "Sales"."Order Items" TO {reader} WITH GRANT OPTION;
        GRANT UPDATE (qty) ON "Sales"."Order Items" TO {reader};
        CREATE PUBLICATION items_pub FOR TABLE "Sales"."Order Items" {publication_filter};
        ALTER TABLE "Sales"."Order Items" REPLICA IDENTITY USING INDEX items_sku_line;
        COMMENT ON TABLE "Sales"."Order Items" IS 'line items';
        COMMENT ON COLUMN "Sales"."Order Items".qty IS 'how many';
        COMMENT ON INDEX "Sales".items_sku IS 'partial sku index';
        COMMENT ON CONSTRAINT qty_positive ON "Sales"."Order Items" IS 'no zero lines';
        ALTER TABLE "Sales"."Order Items" ALTER COLUMN sku SET STATISTICS 500;
        CREATE STATISTICS "Sales".items_stats (dependencies) ON qty, price FROM "Sales"."Order Items";
        CREATE FUNCTION "Sales".first_item() RETURNS "Sales"."Order Items" LANGUAGE sql
            AS $$ SELECT * FROM "Sales"."Order Items" LIMIT 1 $$;
        ALTER TABLE "Sales"."Order Items" OWNER TO {owner};
        INSERT INTO "Sales".customers VALUES (1);
        "#
    ))
    .await;
    db.exec(
        r#"INSERT INTO "Sales"."Order Items" (line, sku, qty, price, customer_id)
           SELECT g, 's' || g, g, g, 1 FROM generate_series(1, 500) g;
           ANALYZE "Sales"."Order Items";"#,
    )
    .await;
    let t = inspect(&mut db, Some("Sales"), "Order Items").await;

    assert_eq!(t.name.schema, "Sales");
    assert_eq!(t.name.name, "Order Items");
    assert_eq!(t.to_owned().name.to_string(), "\"Sales\".\"Order Items\"");
    assert_eq!(t.kind, TableKind::Ordinary);
    assert!(!t.is_partition && !t.has_inheritance);
    assert_eq!(t.persistence, Persistence::Permanent);
    assert_eq!(t.owner, owner);
    assert_eq!(t.estimated_rows, 500);
    assert!(t.table_bytes > 0 && t.index_bytes > 0 && t.total_bytes >= t.table_bytes + t.index_bytes);

    // Columns: types, collation, defaults, NOT NULL, generated, identity, comments, statistics.
    let names: Vec<&str> = t.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["Order ID", "line", "sku", "qty", "price", "total", "customer_id", "legacy"]);
    let id = t.column("Order ID").unwrap();
    assert_eq!(id.identity, Some(IdentityKind::Always));
    assert_eq!(id.type_name, "bigint");
    let sku = t.column("sku").unwrap();
    assert_eq!(sku.collation.as_deref(), Some("pg_catalog.\"C\""));
    assert_eq!(sku.default.as_deref(), Some("'none'::text"));
    assert!(sku.not_null);
    assert_eq!(sku.statistics_target, Some(500));
    assert_eq!(t.column("price").unwrap().type_name, "numeric(10,2)");
    assert!(!t.column("price").unwrap().not_null);
    let total = t.column("total").unwrap();
    assert_eq!(total.generated.as_deref(), Some("((qty)::numeric * price)"));
    assert_eq!(total.default, None);
    assert_eq!(t.column("qty").unwrap().comment.as_deref(), Some("how many"));
    assert!(t.column("legacy").unwrap().default.as_deref().unwrap().starts_with("nextval("));

    // The key: the composite primary key.
    let key = t.key.as_ref().unwrap();
    assert_eq!(key.kind, KeyKind::PrimaryKey);
    assert_eq!(key.columns, ["Order ID", "line"]);
    assert_eq!(key.index_name, "Order Items_pkey");

    // Indexes with names and definitions.
    let idx = t.index("items_sku").unwrap();
    assert!(idx.has_predicate && !idx.is_unique);
    assert_eq!(idx.comment.as_deref(), Some("partial sku index"));
    assert!(
        idx.definition.contains("ON \"Sales\".\"Order Items\" USING btree (sku) WHERE (qty > 1)"),
        "{}",
        idx.definition
    );
    assert!(t.index("items_sku_line").unwrap().is_replica_identity);
    assert_eq!(t.index("Order Items_pkey").unwrap().constraint.as_deref(), Some("Order Items_pkey"));
    assert_eq!(t.replica_identity, ReplicaIdentity::Index("items_sku_line".into()));

    // Constraints, including a NOT VALID check and an outgoing foreign key.
    let qty = t.constraint("qty_positive").unwrap();
    assert_eq!(qty.kind, ConstraintKind::Check);
    assert_eq!(qty.comment.as_deref(), Some("no zero lines"));
    let price = t.constraint("price_nonneg").unwrap();
    assert!(!price.validated);
    assert!(price.definition.ends_with("NOT VALID"));
    let fk = t.constraint("items_customer_fk").unwrap();
    assert_eq!(fk.kind, ConstraintKind::ForeignKey);
    assert_eq!(fk.references.as_ref().unwrap().name, "customers");
    assert!(fk.definition.contains("REFERENCES \"Sales\".customers(id)"), "{}", fk.definition);

    // Foreign keys from other tables.
    assert_eq!(t.referencing_foreign_keys.len(), 1);
    let inc = &t.referencing_foreign_keys[0];
    assert_eq!((inc.table.name.as_str(), inc.name.as_str()), ("shipments", "shipments_item_fk"));
    assert!(inc.definition.contains("REFERENCES \"Sales\".\"Order Items\"(\"Order ID\", line)"), "{}", inc.definition);

    // Triggers (user ones only, with their enabled state) and rules.
    assert_eq!(t.triggers.len(), 1);
    assert_eq!(t.triggers[0].name, "items_touch");
    assert_eq!(t.triggers[0].enabled, "D");
    assert!(t.triggers[0].definition.contains("EXECUTE FUNCTION \"Sales\".touch()"));
    assert_eq!(t.rules.len(), 1);
    assert!(t.rules[0].definition.contains("DO INSTEAD NOTHING"));

    // Dependent views, in creation order, with the columns they read and their grants.
    let views: Vec<(&str, i32)> = t.views.iter().map(|v| (v.name.name.as_str(), v.depth)).collect();
    assert_eq!(views, [("big_items", 1), ("big_item_ids", 2)]);
    assert_eq!(t.views[0].kind, ViewKind::View);
    assert_eq!(t.views[0].reads_columns, ["Order ID", "qty"]);
    assert!(t.views[1].reads_columns.is_empty());
    assert!(t.views[0].grants.iter().any(|g| g.grantee == reader && g.privilege == "SELECT"));
    assert!(t.views[0].definition.contains("FROM \"Sales\".\"Order Items\""), "{}", t.views[0].definition);

    // Row-level security.
    assert!(t.row_security && t.force_row_security);
    assert_eq!(t.policies.len(), 2);
    let all = t.policies.iter().find(|p| p.name == "all_lines").unwrap();
    assert!(!all.permissive);
    assert_eq!(all.command, "ALL");
    assert_eq!(all.roles, ["public"]);
    assert_eq!(all.with_check.as_deref(), Some("(qty < 1000000)"));
    let own = t.policies.iter().find(|p| p.name == "own_lines").unwrap();
    assert_eq!((own.command.as_str(), own.roles.clone()), ("SELECT", vec![reader.clone()]));

    // Grants: table and column level.
    assert!(t.grants.iter().any(|g| g.grantee == reader && g.privilege == "INSERT" && g.grantable));
    assert!(t.grants.iter().any(|g| g.grantee == owner && g.privilege == "DELETE"));
    let qty_col = t.column("qty").unwrap();
    assert_eq!(qty_col.grants.len(), 1);
    assert_eq!((qty_col.grants[0].grantee.as_str(), qty_col.grants[0].privilege.as_str()), (reader.as_str(), "UPDATE"));

    // Publications with column lists and row filters (PostgreSQL 15 and later).
    assert_eq!(t.publications.len(), 1);
    assert_eq!(t.publications[0].publication, "items_pub");
    if common::major() >= 15 {
        // PostgreSQL keeps column lists in column order, whatever order they were given in.
        assert_eq!(t.publications[0].columns.as_deref().unwrap(), ["Order ID", "line", "qty"]);
        assert_eq!(t.publications[0].row_filter.as_deref(), Some("(qty > 5)"));
    } else {
        assert_eq!((t.publications[0].columns.as_ref(), t.publications[0].row_filter.as_ref()), (None, None));
    }

    // Comments, storage options, statistics, owned sequences, row-type users.
    assert_eq!(t.comment.as_deref(), Some("line items"));
    assert_eq!(t.reloptions, ["fillfactor=80", "autovacuum_enabled=false"]);
    assert_eq!(t.statistics.len(), 1);
    assert!(t.statistics[0].definition.contains("(dependencies) ON qty, price FROM \"Sales\".\"Order Items\""));
    let seqs: Vec<(&str, bool)> = t.owned_sequences.iter().map(|s| (s.column.as_str(), s.identity)).collect();
    assert_eq!(seqs, [("Order ID", true), ("legacy", false)]);
    assert_eq!(t.row_type_users, ["function \"Sales\".first_item()"]);
}

#[tokio::test]
async fn key_falls_back_to_a_unique_index_on_not_null_columns() {
    let mut db = TestDb::new().await;
    db.exec(
        "CREATE TABLE events (
             tenant int NOT NULL, seq int NOT NULL, note text, maybe int, d int NOT NULL);
         CREATE UNIQUE INDEX events_maybe ON events (maybe);              -- nullable: unusable
         CREATE UNIQUE INDEX events_partial ON events (seq) WHERE seq > 0;  -- partial: unusable
         CREATE UNIQUE INDEX events_expr ON events (lower(note));          -- expression: unusable
         ALTER TABLE events ADD CONSTRAINT events_d UNIQUE (d) DEFERRABLE; -- deferrable: unusable
         CREATE UNIQUE INDEX events_tenant_seq ON events (tenant, seq);",
    )
    .await;
    let t = inspect(&mut db, None, "events").await;
    let key = t.key.expect("a usable unique index");
    assert_eq!(key.kind, KeyKind::UniqueIndex);
    assert_eq!(key.index_name, "events_tenant_seq");
    assert_eq!(key.columns, ["tenant", "seq"]);
}

#[tokio::test]
async fn table_without_a_usable_key_has_none() {
    let mut db = TestDb::new().await;
    db.exec("CREATE TABLE loose (a int, b text); CREATE UNIQUE INDEX loose_a ON loose (a);").await;
    let t = inspect(&mut db, None, "loose").await;
    assert!(t.key.is_none());
    assert_eq!(t.estimated_rows, 0);
}

#[tokio::test]
async fn partitioned_tables_and_inheritance_are_recognised() {
    let mut db = TestDb::new().await;
    db.exec(
        "CREATE TABLE measurements (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
         CREATE TABLE measurements_2026 PARTITION OF measurements FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
         CREATE TABLE parent (id int PRIMARY KEY); CREATE TABLE child (extra int) INHERITS (parent);
         CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY);",
    )
    .await;
    let p = inspect(&mut db, None, "measurements").await;
    assert_eq!(p.kind, TableKind::Partitioned);
    assert!(!p.has_inheritance);
    let part = inspect(&mut db, None, "measurements_2026").await;
    assert!(part.is_partition);
    assert!(inspect(&mut db, None, "parent").await.has_inheritance);
    assert!(inspect(&mut db, None, "child").await.has_inheritance);
    assert_eq!(inspect(&mut db, None, "scratch").await.persistence, Persistence::Unlogged);
}

#[tokio::test]
async fn unknown_names_and_non_tables_are_clear_errors() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY); CREATE VIEW v AS SELECT * FROM t; CREATE SEQUENCE s;").await;
    let err = catalog::resolve(&db.client, None, "nope").await.unwrap_err();
    assert!(matches!(err, CatalogError::TableNotFound(ref n) if n == "nope"), "{err}");
    let err = catalog::resolve(&db.client, Some("Sales"), "Order Items").await.unwrap_err();
    assert_eq!(err.to_string().split(" does not exist").next().unwrap(), "table \"Sales\".\"Order Items\"");
    let err = catalog::resolve(&db.client, None, "v").await.unwrap_err();
    assert!(matches!(err, CatalogError::NotATable { ref kind, .. } if kind == "view"), "{err}");
    let err = catalog::resolve(&db.client, None, "s").await.unwrap_err();
    assert!(err.to_string().contains("is a sequence"), "{err}");
    // Unqualified names resolve through the search_path, as the server would.
    let (_, name) = catalog::resolve(&db.client, None, "t").await.unwrap();
    assert_eq!(name.to_string(), "public.t");
}

#[tokio::test]
async fn materialized_views_and_incoming_self_references() {
    let mut db = TestDb::new().await;
    db.exec(
        "CREATE TABLE nodes (id int PRIMARY KEY, parent int REFERENCES nodes(id), label text);
         CREATE MATERIALIZED VIEW node_labels AS SELECT id, label FROM nodes;",
    )
    .await;
    let t = inspect(&mut db, None, "nodes").await;
    assert_eq!(t.views.len(), 1);
    assert_eq!(t.views[0].kind, ViewKind::Materialized);
    // A self-reference is an outgoing constraint, not an incoming one.
    assert!(t.referencing_foreign_keys.is_empty());
    assert!(t.constraints.iter().any(|c| c.kind == ConstraintKind::ForeignKey));
}
