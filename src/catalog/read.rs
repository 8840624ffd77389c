//! The catalog queries behind [`inspect`]. Read-only; one REPEATABLE READ transaction.

use tokio_postgres::{Client, GenericClient, IsolationLevel, Row};

use super::dependents::*;
use super::*;
use crate::sql::ident;

/// Finds the table `schema.name` (or `name` through this connection's search_path, as the
/// server would resolve it in the user's statement).
pub async fn resolve(
    client: &impl GenericClient,
    schema: Option<&str>,
    name: &str,
) -> Result<(u32, QualifiedName), CatalogError> {
    let text = match schema {
        Some(s) => format!("{}.{}", ident(s), ident(name)),
        None => ident(name),
    };
    let shown = match schema {
        Some(s) => QualifiedName::new(s, name).to_string(),
        None => crate::sql::display_ident(name),
    };
    let row = client
        .query_opt(
            "SELECT c.oid, n.nspname::text, c.relname::text, c.relkind::text
               FROM pg_catalog.pg_class c
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE c.oid = pg_catalog.to_regclass($1)",
            &[&text],
        )
        .await?
        .ok_or(CatalogError::TableNotFound(shown))?;
    let qualified = QualifiedName::new(row.get::<_, String>(1), row.get::<_, String>(2));
    let kind: String = row.get(3);
    match kind.as_str() {
        "r" | "p" => Ok((row.get(0), qualified)),
        other => Err(CatalogError::NotATable { name: qualified.to_string(), kind: relkind_name(other).into() }),
    }
}

fn relkind_name(kind: &str) -> &'static str {
    match kind {
        "v" => "view",
        "m" => "materialized view",
        "i" | "I" => "index",
        "S" => "sequence",
        "f" => "foreign table",
        "c" => "composite type",
        "t" => "TOAST table",
        _ => "relation of another kind",
    }
}

/// Reads the full definition of the table with `oid`.
pub async fn inspect(client: &mut Client, oid: u32) -> Result<TableDef, CatalogError> {
    let tx = client.build_transaction().isolation_level(IsolationLevel::RepeatableRead).read_only(true).start().await?;
    // Every name in pg_get_*def output comes out schema-qualified.
    tx.batch_execute("SET LOCAL search_path = pg_catalog").await?;
    let def = read_all(&tx, oid).await?;
    tx.commit().await?;
    Ok(def)
}

async fn read_all(tx: &tokio_postgres::Transaction<'_>, oid: u32) -> Result<TableDef, CatalogError> {
    let t = tx
        .query_opt(
            "SELECT n.nspname::text, c.relname::text, c.relkind::text, c.relispartition,
                    c.relpersistence::text, pg_get_userbyid(c.relowner)::text, ts.spcname::text,
                    am.amname::text, c.relrowsecurity, c.relforcerowsecurity, c.relreplident::text,
                    obj_description(c.oid, 'pg_class'), coalesce(c.reloptions, '{}'),
                    coalesce(tt.reloptions, '{}'), c.reltuples::float8,
                    pg_table_size(c.oid), pg_indexes_size(c.oid), pg_total_relation_size(c.oid),
                    (c.relkind <> 'p' AND EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhparent = c.oid))
                    OR EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
                                WHERE i.inhrelid = c.oid AND p.relkind <> 'p'),
                    current_setting('server_version_num')::int, pg_relation_size(c.oid)
               FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               LEFT JOIN pg_tablespace ts ON ts.oid = c.reltablespace
               LEFT JOIN pg_am am ON am.oid = c.relam
               LEFT JOIN pg_class tt ON tt.oid = c.reltoastrelid
              WHERE c.oid = $1",
            &[&oid],
        )
        .await?
        .ok_or_else(|| CatalogError::TableNotFound(format!("with oid {oid}")))?;
    let name = QualifiedName::new(t.get::<_, String>(0), t.get::<_, String>(1));
    let kind = match t.get::<_, String>(2).as_str() {
        "r" => TableKind::Ordinary,
        "p" => TableKind::Partitioned,
        other => return Err(CatalogError::NotATable { name: name.to_string(), kind: relkind_name(other).into() }),
    };
    let version: i32 = t.get(19);
    let columns = read_columns(tx, oid).await?;
    let indexes = read_indexes(tx, oid).await?;
    let key = choose_key(&indexes, &columns);
    let table_bytes: i64 = t.get(15);
    let reltuples: f64 = t.get(14);
    let heap_bytes: i64 = t.get(20);
    let estimated_rows = if reltuples >= 0.0 { reltuples as i64 } else { estimate_rows(heap_bytes, &columns) };
    Ok(TableDef {
        oid,
        kind,
        is_partition: t.get(3),
        has_inheritance: t.get(18),
        persistence: match t.get::<_, String>(4).as_str() {
            "u" => Persistence::Unlogged,
            "t" => Persistence::Temporary,
            _ => Persistence::Permanent,
        },
        owner: t.get(5),
        tablespace: t.get(6),
        access_method: t.get(7),
        row_security: t.get(8),
        force_row_security: t.get(9),
        replica_identity: match t.get::<_, String>(10).as_str() {
            "n" => ReplicaIdentity::Nothing,
            "f" => ReplicaIdentity::Full,
            "i" => ReplicaIdentity::Index(
                indexes.iter().find(|i| i.is_replica_identity).map(|i| i.name.clone()).unwrap_or_default(),
            ),
            _ => ReplicaIdentity::Default,
        },
        comment: t.get(11),
        reloptions: t.get(12),
        toast_reloptions: t.get(13),
        estimated_rows,
        table_bytes,
        index_bytes: t.get(16),
        total_bytes: t.get(17),
        server_version_num: version,
        constraints: read_constraints(tx, oid).await?,
        referencing_foreign_keys: read_incoming_fks(tx, oid).await?,
        triggers: read_triggers(tx, oid).await?,
        rules: read_rules(tx, oid).await?,
        views: read_views(tx, oid).await?,
        policies: read_policies(tx, oid).await?,
        grants: read_grants(tx, &[oid]).await?.into_iter().map(|(_, g)| g).collect(),
        publications: read_publications(tx, oid, version).await?,
        statistics: read_statistics(tx, oid).await?,
        owned_sequences: read_owned_sequences(tx, oid).await?,
        row_type_users: read_row_type_users(tx, oid).await?,
        name,
        columns,
        indexes,
        key,
    })
}

/// Rows from the heap size and a rough row width, for tables never analyzed.
fn estimate_rows(heap_bytes: i64, columns: &[Column]) -> i64 {
    let width: i64 = 28 + columns.len() as i64 * 12;
    heap_bytes / width
}

async fn read_columns(tx: &tokio_postgres::Transaction<'_>, oid: u32) -> Result<Vec<Column>, CatalogError> {
    let rows = tx
        .query(
            "SELECT a.attnum, a.attname::text, format_type(a.atttypid, a.atttypmod), a.atttypid,
                    a.atttypmod,
                    CASE WHEN a.attcollation <> 0 AND a.attcollation <> ty.typcollation
                         THEN quote_ident(cn.nspname) || '.' || quote_ident(co.collname) END,
                    CASE WHEN a.attgenerated = '' THEN pg_get_expr(d.adbin, d.adrelid) END,
                    a.attnotnull,
                    CASE WHEN a.attgenerated <> '' THEN pg_get_expr(d.adbin, d.adrelid) END,
                    a.attidentity::text, col_description(a.attrelid, a.attnum),
                    nullif(a.attstattarget::int, -1), coalesce(a.attoptions, '{}')::text[]
               FROM pg_attribute a
               JOIN pg_type ty ON ty.oid = a.atttypid
               LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
               LEFT JOIN pg_collation co ON co.oid = a.attcollation
               LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
              WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum",
            &[&oid],
        )
        .await?;
    let grants = tx
        .query(
            "SELECT a.attnum, CASE WHEN x.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(x.grantee)::text END,
                    x.privilege_type, x.is_grantable, pg_get_userbyid(x.grantor)::text
               FROM pg_attribute a, aclexplode(a.attacl) x
              WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attacl IS NOT NULL
              ORDER BY 1, 2, 3",
            &[&oid],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let attnum: i16 = r.get(0);
            Column {
                attnum,
                name: r.get(1),
                type_name: r.get(2),
                type_oid: r.get(3),
                typmod: r.get(4),
                collation: r.get(5),
                default: r.get(6),
                not_null: r.get(7),
                generated: r.get(8),
                identity: match r.get::<_, String>(9).as_str() {
                    "a" => Some(IdentityKind::Always),
                    "d" => Some(IdentityKind::ByDefault),
                    _ => None,
                },
                comment: r.get(10),
                statistics_target: r.get(11),
                options: r.get(12),
                grants: grants.iter().filter(|g| g.get::<_, i16>(0) == attnum).map(|g| grant_from(g, 1)).collect(),
            }
        })
        .collect())
}

pub(super) fn grant_from(row: &Row, first: usize) -> Grant {
    Grant {
        grantee: row.get(first),
        privilege: row.get(first + 1),
        grantable: row.get(first + 2),
        grantor: row.get(first + 3),
    }
}

async fn read_indexes(tx: &tokio_postgres::Transaction<'_>, oid: u32) -> Result<Vec<Index>, CatalogError> {
    let rows = tx
        .query(
            "SELECT ic.relname::text, pg_get_indexdef(i.indexrelid), i.indisprimary, i.indisunique,
                    i.indimmediate, con.conname::text,
                    (i.indkey::int2[])[0:i.indnkeyatts - 1], i.indpred IS NOT NULL, i.indisclustered,
                    i.indisreplident, ts.spcname::text, obj_description(i.indexrelid, 'pg_class'),
                    pg_relation_size(i.indexrelid), i.indisvalid AND i.indisready,
                    coalesce((SELECT array_agg(a.attnum ORDER BY a.attnum) FROM pg_attribute a
                               WHERE a.attrelid = i.indexrelid AND a.attstattarget::int > 0), '{}'),
                    coalesce((SELECT array_agg(a.attstattarget::int ORDER BY a.attnum) FROM pg_attribute a
                               WHERE a.attrelid = i.indexrelid AND a.attstattarget::int > 0), '{}')
               FROM pg_index i
               JOIN pg_class ic ON ic.oid = i.indexrelid
               LEFT JOIN pg_constraint con
                      ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid AND con.contype IN ('p', 'u', 'x')
               LEFT JOIN pg_tablespace ts ON ts.oid = ic.reltablespace
              WHERE i.indrelid = $1
              ORDER BY ic.relname",
            &[&oid],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Index {
            name: r.get(0),
            definition: r.get(1),
            is_primary: r.get(2),
            is_unique: r.get(3),
            is_immediate: r.get(4),
            is_valid: r.get(13),
            constraint: r.get(5),
            attnums: r.get(6),
            has_predicate: r.get(7),
            is_clustered: r.get(8),
            is_replica_identity: r.get(9),
            tablespace: r.get(10),
            comment: r.get(11),
            bytes: r.get(12),
            column_statistics: r.get::<_, Vec<i16>>(14).into_iter().zip(r.get::<_, Vec<i32>>(15)).collect(),
        })
        .collect())
}

/// The primary key, else the narrowest unique, valid, immediate index without predicate or
/// expressions whose columns are all NOT NULL.
fn choose_key(indexes: &[Index], columns: &[Column]) -> Option<Key> {
    let named = |idx: &Index, kind| {
        let cols: Option<Vec<&Column>> = idx.attnums.iter().map(|n| columns.iter().find(|c| c.attnum == *n)).collect();
        cols.map(|cols| Key {
            kind,
            index_name: idx.name.clone(),
            columns: cols.iter().map(|c| c.name.clone()).collect(),
            attnums: idx.attnums.clone(),
        })
    };
    if let Some(pk) = indexes.iter().find(|i| i.is_primary && i.is_valid) {
        return named(pk, KeyKind::PrimaryKey);
    }
    indexes
        .iter()
        .filter(|i| i.is_unique && i.is_immediate && i.is_valid && !i.has_predicate && !i.attnums.is_empty())
        .filter(|i| i.attnums.iter().all(|n| *n > 0 && columns.iter().any(|c| c.attnum == *n && c.not_null)))
        .min_by(|a, b| a.attnums.len().cmp(&b.attnums.len()).then(a.name.cmp(&b.name)))
        .and_then(|i| named(i, KeyKind::UniqueIndex))
}

async fn read_constraints(tx: &tokio_postgres::Transaction<'_>, oid: u32) -> Result<Vec<Constraint>, CatalogError> {
    let rows = tx
        .query(
            "SELECT con.conname::text, con.contype::text, pg_get_constraintdef(con.oid), con.convalidated,
                    con.condeferrable, con.condeferred, coalesce(con.conkey, '{}'), rn.nspname::text,
                    rc.relname::text, obj_description(con.oid, 'pg_constraint')
               FROM pg_constraint con
               LEFT JOIN pg_class rc ON rc.oid = con.confrelid
               LEFT JOIN pg_namespace rn ON rn.oid = rc.relnamespace
              WHERE con.conrelid = $1
              ORDER BY con.conname",
            &[&oid],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Constraint {
            name: r.get(0),
            kind: match r.get::<_, String>(1).as_str() {
                "c" => ConstraintKind::Check,
                "f" => ConstraintKind::ForeignKey,
                "p" => ConstraintKind::PrimaryKey,
                "u" => ConstraintKind::Unique,
                "x" => ConstraintKind::Exclusion,
                "n" => ConstraintKind::NotNull,
                _ => ConstraintKind::Trigger,
            },
            definition: r.get(2),
            validated: r.get(3),
            deferrable: r.get(4),
            initially_deferred: r.get(5),
            attnums: r.get(6),
            references: r
                .get::<_, Option<String>>(7)
                .map(|s| QualifiedName::new(s, r.get::<_, Option<String>>(8).unwrap_or_default())),
            comment: r.get(9),
        })
        .collect())
}

async fn read_incoming_fks(
    tx: &tokio_postgres::Transaction<'_>,
    oid: u32,
) -> Result<Vec<IncomingForeignKey>, CatalogError> {
    let rows = tx
        .query(
            "SELECT n.nspname::text, c.relname::text, con.conname::text, pg_get_constraintdef(con.oid),
                    con.convalidated, obj_description(con.oid, 'pg_constraint')
               FROM pg_constraint con
               JOIN pg_class c ON c.oid = con.conrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE con.contype = 'f' AND con.confrelid = $1 AND con.conrelid <> $1 AND con.conparentid = 0
              ORDER BY 1, 2, 3",
            &[&oid],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| IncomingForeignKey {
            table: QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            name: r.get(2),
            definition: r.get(3),
            validated: r.get(4),
            comment: r.get(5),
        })
        .collect())
}
