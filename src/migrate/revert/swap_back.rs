//! The revert's swap: the forward swap run backwards, in one transaction under the new
//! table's ACCESS EXCLUSIVE lock (`lock_timeout`, retried by the caller).
//!
//! Before the move: reverse capture off the new table; the views that the forward swap
//! created again (their columns changed) dropped; the foreign keys of other tables that
//! reference the table dropped; the new table's own foreign keys dropped (it is kept, and
//! a kept table must not stop a write to the tables it referenced); its extended statistics
//! dropped; serial sequences released. The move: the new table to `ghostwire_<id>_new`, the
//! old one back under the table's name. After: the sequences owned by the old table again
//! and every identity sequence past every value the new table handed out; the foreign keys
//! (the old table's own and those referencing it) added NOT VALID and validated after the
//! commit; the views back on their original definitions; the old table's triggers as they
//! were; publications; statistics.

use tokio_postgres::Client;

use crate::catalog::ConstraintKind;
use crate::migrate::spec::Spec;
use crate::migrate::swap::{self, Script};
use crate::sql::{QualifiedName, ident, literal};

/// The schema that keeps the new table after a revert.
pub fn kept_schema(id: i64) -> String {
    format!("ghostwire_{id}_new")
}

/// Where the new table is once reverted.
pub fn kept_table(spec: &Spec) -> QualifiedName {
    QualifiedName::new(kept_schema(spec.migration_id), &spec.original.name)
}

/// The old table's own foreign keys: dropped from it at the forward swap (a kept table must
/// not stop writes to the tables it references), added back by a revert.
pub fn own_foreign_keys(spec: &Spec) -> impl Iterator<Item = &crate::catalog::Constraint> {
    spec.table.constraints.iter().filter(|c| c.kind == ConstraintKind::ForeignKey)
}

pub fn script(spec: &Spec) -> Script {
    let t = &spec.table;
    let table_sql = spec.original.sql();
    let kept = kept_table(spec);
    let mut s = Script::default();
    let recreate = swap::views_to_recreate(spec);
    let cascaded = swap::views_dropped_by_cascade(spec);
    let b = &mut s.before_move;
    b.push(super::capture::drop_triggers_sql(spec.migration_id, &spec.original));
    for v in t.views.iter().rev().filter(|v| recreate.contains(&v.name)) {
        b.push(format!("DROP VIEW IF EXISTS {}", v.name.sql()));
    }
    for fk in &t.referencing_foreign_keys {
        b.push(format!("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}", fk.table.sql(), ident(&fk.name)));
    }
    for fk in &spec.foreign_keys {
        b.push(format!("ALTER TABLE {table_sql} DROP CONSTRAINT IF EXISTS {}", ident(&fk.name)));
    }
    for st in &t.statistics {
        b.push(format!("DROP STATISTICS IF EXISTS {}", st.name.sql()));
    }
    let serials: Vec<_> =
        t.owned_sequences.iter().filter(|q| !q.identity && !spec.dropped_columns.contains(&q.column)).collect();
    for q in &serials {
        b.push(format!("ALTER SEQUENCE {} OWNED BY NONE", q.name.sql()));
    }

    s.moves.push(format!("CREATE SCHEMA {}", ident(&kept.schema)));
    s.moves.push(format!("ALTER TABLE {table_sql} SET SCHEMA {}", ident(&kept.schema)));
    s.moves.push(format!("ALTER TABLE {} SET SCHEMA {}", spec.archived().sql(), ident(&spec.original.schema)));
    s.moves.push(format!("DROP SCHEMA {}", ident(&spec.archive_schema)));

    let a = &mut s.after_move;
    for q in &serials {
        a.push(format!("ALTER SEQUENCE {} OWNED BY {table_sql}.{}", q.name.sql(), ident(&q.column)));
    }
    for c in own_foreign_keys(spec) {
        let definition = c.definition.strip_suffix(" NOT VALID").unwrap_or(&c.definition);
        a.push(format!("ALTER TABLE {table_sql} ADD CONSTRAINT {} {definition} NOT VALID", ident(&c.name)));
        if let Some(comment) = &c.comment {
            a.push(format!("COMMENT ON CONSTRAINT {} ON {table_sql} IS {}", ident(&c.name), literal(comment)));
        }
        if c.validated {
            s.validations.push(crate::migrate::validate::Validation::new(
                format!("foreign key {} on {}", c.name, spec.original),
                table_sql.clone(),
                &c.name,
            ));
        }
    }
    swap::add_referencing_foreign_keys(t, a, &mut s.validations);
    for v in &t.views {
        if recreate.contains(&v.name) || cascaded.contains(&v.name) {
            a.extend(swap::create_view(v));
        } else {
            a.push(format!(
                "CREATE OR REPLACE VIEW {}{} AS {}",
                v.name.sql(),
                swap::view_options(v),
                v.definition.trim_end_matches(';')
            ));
        }
    }
    if t.triggers.iter().any(|tr| tr.enabled != "D") {
        a.push(format!("ALTER TABLE {table_sql} ENABLE TRIGGER USER"));
        for tr in &t.triggers {
            a.extend(swap::enable_state(&table_sql, tr));
        }
    }
    for p in &t.publications {
        a.push(format!("ALTER PUBLICATION {} DROP TABLE {}", ident(&p.publication), kept.sql()));
        let columns = p.columns.as_ref().map(|c| format!(" ({})", crate::sql::ident_list(c))).unwrap_or_default();
        let filter = p.row_filter.as_ref().map(|f| format!(" WHERE ({f})")).unwrap_or_default();
        a.push(format!("ALTER PUBLICATION {} ADD TABLE {table_sql}{columns}{filter}", ident(&p.publication)));
    }
    for st in &t.statistics {
        s.optional.push(st.definition.clone());
    }
    s
}

/// Every identity sequence of the old table set past the values its counterpart on the new
/// table handed out (serial sequences are shared, so already past them).
/// `query`: `swap::IDENTITY_SEQUENCES_SQL`, prepared.
pub async fn identity_sequences(
    client: &Client,
    query: &tokio_postgres::Statement,
    spec: &Spec,
) -> Result<(), tokio_postgres::Error> {
    let old = spec.original.sql();
    let kept = kept_table(spec).sql();
    let rows = client.query(query, &[&old, &kept]).await?;
    for r in rows {
        if let (Some(old_seq), Some(new_seq)) = (r.get::<_, Option<String>>(0), r.get::<_, Option<String>>(1)) {
            // Both are PostgreSQL's own quoted names of the sequences.
            client
                .query(
                    &format!(
                        "SELECT setval({}::regclass, n.last_value, n.is_called) FROM {new_seq} n, {old_seq} o
                          WHERE n.last_value > o.last_value OR (n.last_value = o.last_value AND n.is_called)",
                        literal(&old_seq)
                    ),
                    &[],
                )
                .await?;
        }
    }
    Ok(())
}
