//! What the connected role may do, asked of the server before anything changes: a
//! migration needs the table's owner (or a member of its role), CREATE on the database (for
//! the `ghostwire` schemas) and on the table's schema (the swap moves the new table there),
//! ownership of every object the swap alters (dependent views, tables whose foreign keys
//! point here, publications, extended statistics, owned sequences), REFERENCES on tables
//! this one's foreign keys point to, EXECUTE on its trigger functions. Those stop the run
//! (exit 2) with the GRANT that fixes them. Others only make a run less capable: cancelling
//! an autovacuum in the way, seeing other roles' sessions; they are reported as notes.

use serde::Serialize;
use tokio_postgres::Client;

use super::Strategy;
use crate::catalog::TableDef;
use crate::migrate::Settings;
use crate::sql::display_ident as ident;

/// A privilege the connected role lacks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MissingPrivilege {
    /// What is missing.
    pub missing: String,
    /// What it stops or degrades.
    pub consequence: String,
    /// The statement that grants it (or what to do instead).
    pub fix: String,
    /// The run would fail without it: `migrate` refuses before changing anything.
    pub blocks: bool,
}

fn missing(missing: String, consequence: &str, fix: String, blocks: bool) -> MissingPrivilege {
    MissingPrivilege { missing, consequence: consequence.to_owned(), fix, blocks }
}

/// The role's rights that `plan` itself needs: a temporary table for the probes.
pub async fn can_probe(client: &Client) -> Result<Option<String>, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT current_user::text, has_database_privilege(current_database(), 'TEMP'), current_database()::text",
            &[],
        )
        .await?;
    let (user, temp, db): (String, bool, String) = (row.get(0), row.get(1), row.get(2));
    Ok((!temp).then(|| {
        format!(
            "role {user} may not create temporary tables in database {db}, which ghostwire plan uses to try the \
             statement on an empty copy of the table; GRANT TEMPORARY ON DATABASE {} TO {}",
            ident(&db),
            ident(&user)
        )
    }))
}

/// What the role lacks for running `strategy` on `def`.
pub async fn check(
    client: &Client,
    def: &TableDef,
    strategy: Strategy,
) -> Result<Vec<MissingPrivilege>, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT current_user::text, current_database()::text, r.rolsuper, r.rolbypassrls,
                    has_database_privilege(current_database(), 'CREATE'),
                    pg_has_role(c.relowner, 'USAGE'), pg_get_userbyid(c.relowner)::text,
                    has_schema_privilege(c.relnamespace, 'CREATE'),
                    (SELECT pg_has_role(m.relowner, 'USAGE') FROM pg_class m WHERE m.oid = to_regclass('ghostwire.migrations')),
                    (SELECT pg_get_userbyid(m.relowner)::text FROM pg_class m WHERE m.oid = to_regclass('ghostwire.migrations')),
                    r.rolsuper OR coalesce((SELECT pg_has_role(oid, 'USAGE') FROM pg_roles WHERE rolname = 'pg_signal_autovacuum_worker'), false),
                    r.rolsuper OR pg_has_role('pg_read_all_stats', 'USAGE'),
                    c.relforcerowsecurity
               FROM pg_class c, pg_roles r WHERE c.oid = $1 AND r.rolname = current_user",
            &[&def.oid],
        )
        .await?;
    let user: String = row.get(0);
    let db: String = row.get(1);
    let (superuser, bypass_rls, create_db, owns, owner) = (
        row.get::<_, bool>(2),
        row.get::<_, bool>(3),
        row.get::<_, bool>(4),
        row.get::<_, bool>(5),
        row.get::<_, String>(6),
    );
    let (create_schema, state_owned, state_owner) =
        (row.get::<_, bool>(7), row.get::<_, Option<bool>>(8), row.get::<_, Option<String>>(9));
    let (cancel_autovacuum, read_all_stats, forced_rls) =
        (row.get::<_, bool>(10), row.get::<_, bool>(11), row.get::<_, bool>(12));
    let (u, table, schema) = (ident(&user), def.name.to_string(), ident(&def.name.schema));
    let mut out = Vec::new();
    if !owns {
        out.push(missing(
            format!("ownership of {table} (its owner is {owner})"),
            "ALTER TABLE, the capture triggers and the swap all need the table's owner",
            format!("connect as {owner}, or GRANT {} TO {u}", ident(&owner)),
            true,
        ));
    }
    if strategy == Strategy::Copy {
        if !create_db {
            out.push(missing(
                format!("CREATE on database {db}"),
                "ghostwire keeps its state and the shadow table in schemas of its own",
                format!("GRANT CREATE ON DATABASE {} TO {u}", ident(&db)),
                true,
            ));
        }
        if !create_schema {
            out.push(missing(
                format!("CREATE on schema {}", def.name.schema),
                "the swap moves the new table into the table's schema",
                format!("GRANT CREATE ON SCHEMA {schema} TO {u}"),
                true,
            ));
        }
        if let (Some(false), Some(o)) = (state_owned, &state_owner) {
            out.push(missing(
                format!("ownership of ghostwire's state tables (they belong to {o})"),
                "a run records its phases and checkpoints in schema ghostwire",
                format!("run ghostwire as {o}, or GRANT {} TO {u}", ident(o)),
                true,
            ));
        }
        if forced_rls && !bypass_rls && !superuser {
            out.push(missing(
                format!("BYPASSRLS for {u}"),
                "the table forces row-level security on its owner too, so the copy would not see every row",
                format!("ALTER ROLE {u} BYPASSRLS (as a superuser), or run as a role that has it"),
                true,
            ));
        }
        out.extend(dependents(client, def).await?.into_iter().map(|(what, owner)| {
            missing(
                format!("ownership of {what} (its owner is {owner})"),
                "the swap points it at the new table",
                format!("connect as {owner}, or GRANT {} TO {u}", ident(&owner)),
                true,
            )
        }));
        out.extend(referenced(client, def).await?.into_iter().map(|(what, privilege, fix)| {
            missing(
                format!("{privilege} on {what}"),
                "the new table gets the same foreign keys and triggers",
                fix.replace("{role}", &u),
                true,
            )
        }));
        if !cancel_autovacuum {
            out.push(missing(
                "the right to cancel autovacuum workers".into(),
                "an autovacuum that holds the table when the swap or the capture needs it cannot be cancelled: ghostwire \
                 waits for it instead (reported each time)",
                format!("GRANT pg_signal_autovacuum_worker TO {u} (PostgreSQL 18), or run as a superuser"),
                false,
            ));
        }
        if !read_all_stats {
            out.push(missing(
                "pg_read_all_stats".into(),
                "other roles' sessions holding the table at the cut-over are reported without their queries",
                format!("GRANT pg_read_all_stats TO {u}"),
                false,
            ));
        }
    }
    Ok(out)
}

/// Objects the swap alters that the role does not own: (what, owner).
async fn dependents(client: &Client, def: &TableDef) -> Result<Vec<(String, String)>, tokio_postgres::Error> {
    let views: Vec<String> = def.views.iter().map(|v| v.name.sql()).collect();
    let referencing: Vec<String> = def.referencing_foreign_keys.iter().map(|f| f.table.sql()).collect();
    let publications: Vec<String> = def.publications.iter().map(|p| p.publication.clone()).collect();
    let rows = client
        .query(
            "SELECT 'view ' || c.oid::regclass::text, pg_get_userbyid(c.relowner)::text
               FROM unnest($2::text[]) v JOIN pg_class c ON c.oid = to_regclass(v) WHERE NOT pg_has_role(c.relowner, 'USAGE')
             UNION ALL
             SELECT 'table ' || c.oid::regclass::text || ' (its foreign key references the table)', pg_get_userbyid(c.relowner)::text
               FROM unnest($3::text[]) t JOIN pg_class c ON c.oid = to_regclass(t)
              WHERE c.oid <> $1 AND NOT pg_has_role(c.relowner, 'USAGE')
             UNION ALL
             SELECT 'publication ' || p.pubname, pg_get_userbyid(p.pubowner)::text
               FROM pg_publication p WHERE p.pubname = ANY($4) AND NOT pg_has_role(p.pubowner, 'USAGE')
             UNION ALL
             SELECT 'statistics ' || s.stxnamespace::regnamespace::text || '.' || s.stxname, pg_get_userbyid(s.stxowner)::text
               FROM pg_statistic_ext s WHERE s.stxrelid = $1 AND NOT pg_has_role(s.stxowner, 'USAGE')
             UNION ALL
             SELECT 'sequence ' || s.oid::regclass::text, pg_get_userbyid(s.relowner)::text
               FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
              WHERE d.classid = 'pg_class'::regclass AND d.refobjid = $1 AND d.deptype IN ('a', 'i')
                AND NOT pg_has_role(s.relowner, 'USAGE')",
            &[&def.oid, &views, &referencing, &publications],
        )
        .await?;
    let mut out: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    out.dedup();
    Ok(out)
}

/// Rights the new table's own definition needs: (what, privilege, fix with `{role}`).
async fn referenced(client: &Client, def: &TableDef) -> Result<Vec<(String, String, String)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT 'table ' || c.confrelid::regclass::text, 'REFERENCES',
                    'GRANT REFERENCES ON ' || c.confrelid::regclass::text || ' TO {role}'
               FROM pg_constraint c
              WHERE c.conrelid = $1 AND c.contype = 'f' AND c.confrelid <> $1
                AND NOT has_table_privilege(c.confrelid, 'REFERENCES')
             UNION ALL
             SELECT 'function ' || t.tgfoid::regprocedure::text || ' (trigger ' || t.tgname || ')', 'EXECUTE',
                    'GRANT EXECUTE ON FUNCTION ' || t.tgfoid::regprocedure::text || ' TO {role}'
               FROM pg_trigger t
              WHERE t.tgrelid = $1 AND NOT t.tgisinternal AND NOT has_function_privilege(t.tgfoid, 'EXECUTE')",
            &[&def.oid],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
}

/// What the role lacks for the throttle and critical limits asked for: without it a
/// limit would be judged on what the role can see, not on what is there.
pub async fn check_limits(client: &Client, s: &Settings) -> Result<Vec<MissingPrivilege>, tokio_postgres::Error> {
    let lag = s.max_replica_lag_ms.is_some() || s.critical_replica_lag_ms.is_some();
    let active = s.max_active.is_some() || s.critical_active.is_some();
    if !lag && !active {
        return Ok(Vec::new());
    }
    let row = client
        .query_one(
            "SELECT current_user::text, r.rolsuper OR pg_has_role('pg_read_all_stats', 'USAGE')
               FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await?;
    let (user, can_see): (String, bool) = (row.get(0), row.get(1));
    if can_see {
        return Ok(Vec::new());
    }
    let what = match (lag, active) {
        (true, true) => "--max-replica-lag/--critical-replica-lag and --max-active/--critical-active need",
        (true, false) => "--max-replica-lag and --critical-replica-lag need",
        _ => "--max-active and --critical-active need",
    };
    Ok(vec![missing(
        "pg_read_all_stats".into(),
        &format!("{what} other sessions' state in pg_stat_replication and pg_stat_activity, hidden from this role"),
        format!("GRANT pg_read_all_stats TO {} (or pg_monitor)", ident(&user)),
        true,
    )])
}

/// One paragraph naming every blocking privilege and its fix.
pub fn refusal(missing: &[MissingPrivilege]) -> Option<String> {
    let blocking: Vec<String> =
        missing.iter().filter(|m| m.blocks).map(|m| format!("{} ({}): {}", m.missing, m.consequence, m.fix)).collect();
    (!blocking.is_empty()).then(|| format!("refused before changing anything: the role lacks {}", blocking.join("; ")))
}
