//! The statements of the swap, generated from the spec (no database access).
//!
//! Inside the cut-over transaction, under the ACCESS EXCLUSIVE lock:
//! before the move: drop the capture triggers, drop the views that must be recreated, drop
//! foreign keys on other tables that reference the table, drop extended statistics, release
//! serial sequences from the old table; the move itself: the old table to the archive
//! schema, the shadow into the table's schema (every index, constraint and sequence name is
//! kept); after the move: sequences, foreign keys (NOT VALID), views, triggers, rules, row
//! security, owner, publications, replica identity, comments, the autovacuum setting,
//! statistics, clustering. After
//! commit the foreign keys are validated without blocking writes.

use super::capture;
use super::spec::Spec;
use super::validate::Validation;
use crate::catalog::{DependentView, ReplicaIdentity, Trigger};
use crate::sql::{QualifiedName, ident, literal};

/// The identity columns of `$1` with their sequences and those of the same columns of `$2`
/// (by name), for setting one's sequences past the other's: run under the lock of a swap or
/// a revert, prepared before it.
pub const IDENTITY_SEQUENCES_SQL: &str =
    "SELECT pg_get_serial_sequence($1, a.attname), pg_get_serial_sequence($2, a.attname)
       FROM pg_catalog.pg_attribute a
      WHERE a.attrelid = $1::text::regclass AND a.attidentity <> '' AND NOT a.attisdropped";

/// The swap, in order.
#[derive(Debug, Clone, Default)]
pub struct Script {
    pub before_move: Vec<String>,
    pub moves: Vec<String>,
    pub after_move: Vec<String>,
    /// Statements that may fail without stopping the swap (extended statistics on
    /// columns that are gone): each runs under a savepoint, failures are reported.
    pub optional: Vec<String>,
    /// Run after commit, without blocking writes.
    pub validations: Vec<Validation>,
}

pub(super) fn enable_state(table_sql: &str, trigger: &Trigger) -> Option<String> {
    let how = match trigger.enabled.as_str() {
        "D" => "DISABLE TRIGGER",
        "R" => "ENABLE REPLICA TRIGGER",
        "A" => "ENABLE ALWAYS TRIGGER",
        _ => return None,
    };
    Some(format!("ALTER TABLE {table_sql} {how} {}", ident(&trigger.name)))
}

fn role(name: &str) -> String {
    if name.eq_ignore_ascii_case("public") { "PUBLIC".into() } else { ident(name) }
}

/// Views to drop and create again (their columns change, or they read such views); the rest
/// are repointed in place with CREATE OR REPLACE VIEW, which keeps their grants and triggers.
pub fn views_to_recreate(spec: &Spec) -> Vec<QualifiedName> {
    let changed: Vec<&String> = spec.retyped_columns.iter().chain(spec.dropped_columns.iter()).collect();
    let mut out: Vec<QualifiedName> = Vec::new();
    for v in &spec.table.views {
        let direct = v.reads_columns.iter().any(|c| changed.contains(&c));
        let through = v.reads_views.iter().any(|r| out.contains(r));
        if direct || through {
            out.push(v.name.clone());
        }
    }
    out
}

/// Views whose columns the change drops with CASCADE: dropped, not recreated, like
/// PostgreSQL would.
pub(super) fn views_dropped_by_cascade(spec: &Spec) -> Vec<QualifiedName> {
    let mut out: Vec<QualifiedName> = Vec::new();
    for v in &spec.table.views {
        let direct = v.reads_columns.iter().any(|c| spec.dropped_columns.contains(c));
        let through = v.reads_views.iter().any(|r| out.contains(r));
        if direct || through {
            out.push(v.name.clone());
        }
    }
    out
}

pub(super) fn view_options(v: &DependentView) -> String {
    if v.options.is_empty() { String::new() } else { format!(" WITH ({})", v.options.join(", ")) }
}

pub(super) fn create_view(v: &DependentView) -> Vec<String> {
    let name = v.name.sql();
    let mut out = vec![
        format!("CREATE VIEW {name}{} AS {}", view_options(v), v.definition.trim_end_matches(';')),
        format!("ALTER VIEW {name} OWNER TO {}", ident(&v.owner)),
    ];
    for g in &v.grants {
        let option = if g.grantable { " WITH GRANT OPTION" } else { "" };
        out.push(format!("GRANT {} ON {name} TO {}{option}", g.privilege, role(&g.grantee)));
    }
    if let Some(c) = &v.comment {
        out.push(format!("COMMENT ON VIEW {name} IS {}", literal(c)));
    }
    for t in &v.triggers {
        out.push(t.definition.clone());
        out.extend(enable_state(&name, t));
        if let Some(c) = &t.comment {
            out.push(format!("COMMENT ON TRIGGER {} ON {name} IS {}", ident(&t.name), literal(c)));
        }
    }
    out
}

/// The foreign keys of other tables that reference the table, added again NOT VALID (to
/// whichever table has its name now), validated after the commit where they were valid.
pub(super) fn add_referencing_foreign_keys(
    t: &crate::catalog::TableDef,
    a: &mut Vec<String>,
    validations: &mut Vec<Validation>,
) {
    for fk in &t.referencing_foreign_keys {
        let definition = fk.definition.strip_suffix(" NOT VALID").unwrap_or(&fk.definition);
        a.push(format!("ALTER TABLE {} ADD CONSTRAINT {} {definition} NOT VALID", fk.table.sql(), ident(&fk.name)));
        if let Some(c) = &fk.comment {
            a.push(format!("COMMENT ON CONSTRAINT {} ON {} IS {}", ident(&fk.name), fk.table.sql(), literal(c)));
        }
        if fk.validated {
            validations.push(Validation::new(
                format!("foreign key {} on {}", fk.name, fk.table),
                fk.table.sql(),
                &fk.name,
            ));
        }
    }
}

pub fn script(spec: &Spec) -> Script {
    let t = &spec.table;
    let table_sql = spec.original.sql();
    let mut s = Script::default();
    let recreate = views_to_recreate(spec);
    let cascaded = views_dropped_by_cascade(spec);

    s.before_move.push(capture::drop_triggers_sql(spec.migration_id, &spec.original));
    for v in t.views.iter().rev().filter(|v| recreate.contains(&v.name)) {
        s.before_move.push(format!("DROP VIEW {}", v.name.sql()));
    }
    for fk in &t.referencing_foreign_keys {
        s.before_move.push(format!("ALTER TABLE {} DROP CONSTRAINT {}", fk.table.sql(), ident(&fk.name)));
    }
    for st in &t.statistics {
        s.before_move.push(format!("DROP STATISTICS {}", st.name.sql()));
    }
    let kept_serials: Vec<_> =
        t.owned_sequences.iter().filter(|q| !q.identity && !spec.dropped_columns.contains(&q.column)).collect();
    for q in &kept_serials {
        s.before_move.push(format!("ALTER SEQUENCE {} OWNED BY NONE", q.name.sql()));
    }

    s.moves.push(format!("CREATE SCHEMA {}", ident(&spec.archive_schema)));
    s.moves.push(format!("ALTER TABLE {table_sql} SET SCHEMA {}", ident(&spec.archive_schema)));
    s.moves.push(format!("ALTER TABLE {} SET SCHEMA {}", spec.shadow().sql(), ident(&spec.original.schema)));
    s.moves.push(format!("DROP SCHEMA {}", ident(&spec.work_schema)));

    let a = &mut s.after_move;
    // The kept old table must not stop a write to the tables it references (a parent row
    // deleted once the new table's rows are gone); a revert adds them back.
    for c in t.constraints.iter().filter(|c| c.kind == crate::catalog::ConstraintKind::ForeignKey) {
        a.push(format!("ALTER TABLE {} DROP CONSTRAINT {}", spec.archived().sql(), ident(&c.name)));
    }
    for q in &kept_serials {
        a.push(format!("ALTER SEQUENCE {} OWNED BY {table_sql}.{}", q.name.sql(), ident(&q.column)));
    }
    for (name, definition) in &spec.deferred_checks {
        a.push(format!("ALTER TABLE {table_sql} ADD CONSTRAINT {} {definition} NOT VALID", ident(name)));
    }
    for fk in &spec.foreign_keys {
        a.push(format!("ALTER TABLE {table_sql} ADD CONSTRAINT {} {} NOT VALID", ident(&fk.name), fk.definition));
        if let Some(c) = &fk.comment {
            a.push(format!("COMMENT ON CONSTRAINT {} ON {table_sql} IS {}", ident(&fk.name), literal(c)));
        }
        if fk.validate {
            s.validations.push(Validation::new(
                format!("foreign key {} on {}", fk.name, spec.original),
                table_sql.clone(),
                &fk.name,
            ));
        }
    }
    add_referencing_foreign_keys(t, a, &mut s.validations);
    for v in t.views.iter().filter(|v| !cascaded.contains(&v.name)) {
        if recreate.contains(&v.name) {
            a.extend(create_view(v));
        } else {
            a.push(format!(
                "CREATE OR REPLACE VIEW {}{} AS {}",
                v.name.sql(),
                view_options(v),
                v.definition.trim_end_matches(';')
            ));
        }
    }
    for tr in &t.triggers {
        a.push(tr.definition.clone());
        a.extend(enable_state(&table_sql, tr));
        if let Some(c) = &tr.comment {
            a.push(format!("COMMENT ON TRIGGER {} ON {table_sql} IS {}", ident(&tr.name), literal(c)));
        }
    }
    for r in &t.rules {
        a.push(r.definition.trim_end_matches(';').to_owned());
    }
    if t.row_security {
        a.push(format!("ALTER TABLE {table_sql} ENABLE ROW LEVEL SECURITY"));
    }
    if t.force_row_security {
        a.push(format!("ALTER TABLE {table_sql} FORCE ROW LEVEL SECURITY"));
    }
    for p in &t.policies {
        let kind = if p.permissive { "PERMISSIVE" } else { "RESTRICTIVE" };
        let roles: Vec<String> = p.roles.iter().map(|r| role(r)).collect();
        let mut sql = format!(
            "CREATE POLICY {} ON {table_sql} AS {kind} FOR {} TO {}",
            ident(&p.name),
            p.command,
            roles.join(", ")
        );
        if let Some(u) = &p.using {
            sql.push_str(&format!(" USING ({u})"));
        }
        if let Some(w) = &p.with_check {
            sql.push_str(&format!(" WITH CHECK ({w})"));
        }
        a.push(sql);
    }
    a.push(format!("ALTER TABLE {table_sql} OWNER TO {}", ident(&t.owner)));
    for p in &t.publications {
        a.push(format!("ALTER PUBLICATION {} DROP TABLE {}", ident(&p.publication), spec.archived().sql()));
        let columns = p.columns.as_ref().map(|c| format!(" ({})", crate::sql::ident_list(c))).unwrap_or_default();
        let filter = p.row_filter.as_ref().map(|f| format!(" WHERE ({f})")).unwrap_or_default();
        a.push(format!("ALTER PUBLICATION {} ADD TABLE {table_sql}{columns}{filter}", ident(&p.publication)));
    }
    match &t.replica_identity {
        ReplicaIdentity::Default => {}
        ReplicaIdentity::Nothing => a.push(format!("ALTER TABLE {table_sql} REPLICA IDENTITY NOTHING")),
        ReplicaIdentity::Full => a.push(format!("ALTER TABLE {table_sql} REPLICA IDENTITY FULL")),
        ReplicaIdentity::Index(i) => {
            a.push(format!("ALTER TABLE {table_sql} REPLICA IDENTITY USING INDEX {}", ident(i)))
        }
    }
    if let Some(c) = &t.comment {
        a.push(format!("COMMENT ON TABLE {table_sql} IS {}", literal(c)));
    }
    if super::shadow::pauses_autovacuum(t) {
        // Autovacuum was off on the shadow; the original's setting, if it had one, comes back.
        a.push(format!("ALTER TABLE {table_sql} RESET (autovacuum_enabled, toast.autovacuum_enabled)"));
        let autovacuum = |o: &&String| super::shadow::is_autovacuum_setting(o);
        let set: Vec<String> = (t.reloptions.iter().filter(autovacuum).cloned())
            .chain(t.toast_reloptions.iter().filter(autovacuum).map(|o| format!("toast.{o}")))
            .collect();
        if !set.is_empty() {
            a.push(format!("ALTER TABLE {table_sql} SET ({})", set.join(", ")));
        }
    }
    let new_indexes: Vec<&String> =
        spec.deferred_indexes.iter().map(|d| &d.name).chain(std::iter::once(&spec.key_index)).collect();
    for i in t.indexes.iter().filter(|i| new_indexes.contains(&&i.name)) {
        if let Some(c) = &i.comment {
            a.push(format!("COMMENT ON INDEX {}.{} IS {}", ident(&spec.original.schema), ident(&i.name), literal(c)));
        }
        if i.is_clustered {
            a.push(format!("ALTER TABLE {table_sql} CLUSTER ON {}", ident(&i.name)));
        }
        for (n, target) in &i.column_statistics {
            a.push(format!(
                "ALTER INDEX {}.{} ALTER COLUMN {n} SET STATISTICS {target}",
                ident(&spec.original.schema),
                ident(&i.name)
            ));
        }
    }
    for st in &t.statistics {
        s.optional.push(st.definition.clone());
    }
    s
}
