//! The catalog queries for the objects that depend on a table and that the swap carries
//! over: triggers, rules, dependent views, policies, grants, publications, extended
//! statistics, owned sequences and the users of its row type. Run inside [`super::read`]'s
//! transaction.

use super::read::grant_from;
use super::*;

pub(super) async fn read_triggers(
    tx: &tokio_postgres::Transaction<'_>,
    oid: u32,
) -> Result<Vec<Trigger>, CatalogError> {
    let rows = tx
        .query(
            "SELECT t.tgname::text, pg_get_triggerdef(t.oid), t.tgenabled::text, obj_description(t.oid, 'pg_trigger')
               FROM pg_trigger t
              WHERE t.tgrelid = $1 AND NOT t.tgisinternal
              ORDER BY t.tgname",
            &[&oid],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Trigger { name: r.get(0), definition: r.get(1), enabled: r.get(2), comment: r.get(3) })
        .collect())
}

pub(super) async fn read_rules(tx: &tokio_postgres::Transaction<'_>, oid: u32) -> Result<Vec<Rule>, CatalogError> {
    let rows = tx
        .query(
            "SELECT r.rulename::text, pg_get_ruledef(r.oid)
               FROM pg_rewrite r WHERE r.ev_class = $1 AND r.rulename <> '_RETURN' ORDER BY 1",
            &[&oid],
        )
        .await?;
    Ok(rows.iter().map(|r| Rule { name: r.get(0), definition: r.get(1) }).collect())
}

pub(super) async fn read_views(
    tx: &tokio_postgres::Transaction<'_>,
    oid: u32,
) -> Result<Vec<DependentView>, CatalogError> {
    let rows = tx
        .query(
            "WITH RECURSIVE deps(oid, depth) AS (
                 SELECT r.ev_class, 1
                   FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
                  WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
                    AND d.refobjid = $1 AND r.ev_class <> $1
                 UNION ALL
                 SELECT r.ev_class, deps.depth + 1
                   FROM deps
                   JOIN pg_depend d ON d.refclassid = 'pg_class'::regclass AND d.refobjid = deps.oid
                                   AND d.classid = 'pg_rewrite'::regclass
                   JOIN pg_rewrite r ON r.oid = d.objid
                  WHERE r.ev_class <> deps.oid AND deps.depth < 64)
             SELECT v.oid, n.nspname::text, v.relname::text, v.relkind::text, pg_get_viewdef(v.oid),
                    pg_get_userbyid(v.relowner)::text, coalesce(v.reloptions, '{}'),
                    obj_description(v.oid, 'pg_class'), max(deps.depth),
                    ARRAY(SELECT DISTINCT a.attname::text
                            FROM pg_depend d2
                            JOIN pg_rewrite r2 ON r2.oid = d2.objid
                            JOIN pg_attribute a ON a.attrelid = $1 AND a.attnum = d2.refobjsubid
                           WHERE r2.ev_class = v.oid AND d2.classid = 'pg_rewrite'::regclass
                             AND d2.refclassid = 'pg_class'::regclass AND d2.refobjid = $1
                             AND d2.refobjsubid > 0
                           ORDER BY 1)
               FROM deps
               JOIN pg_class v ON v.oid = deps.oid
               JOIN pg_namespace n ON n.oid = v.relnamespace
              GROUP BY v.oid, n.nspname
              ORDER BY max(deps.depth), 2, 3",
            &[&oid],
        )
        .await?;
    let oids: Vec<u32> = rows.iter().map(|r| r.get(0)).collect();
    let grants = read_grants(tx, &oids).await?;
    // Which of these views read which others.
    let edges = tx
        .query(
            "SELECT DISTINCT r.ev_class, n.nspname::text, c.relname::text
               FROM pg_depend d
               JOIN pg_rewrite r ON r.oid = d.objid
               JOIN pg_class c ON c.oid = d.refobjid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
                AND r.ev_class = ANY($1) AND d.refobjid = ANY($1) AND d.refobjid <> r.ev_class
              ORDER BY 2, 3",
            &[&oids],
        )
        .await?;
    let triggers = tx
        .query(
            "SELECT t.tgrelid, t.tgname::text, pg_get_triggerdef(t.oid), t.tgenabled::text,
                    obj_description(t.oid, 'pg_trigger')
               FROM pg_trigger t WHERE t.tgrelid = ANY($1) AND NOT t.tgisinternal ORDER BY 2",
            &[&oids],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let view_oid: u32 = r.get(0);
            DependentView {
                name: QualifiedName::new(r.get::<_, String>(1), r.get::<_, String>(2)),
                kind: if r.get::<_, String>(3) == "m" { ViewKind::Materialized } else { ViewKind::View },
                definition: r.get(4),
                owner: r.get(5),
                options: r.get(6),
                comment: r.get(7),
                depth: r.get(8),
                reads_columns: r.get(9),
                grants: grants.iter().filter(|(o, _)| *o == view_oid).map(|(_, g)| g.clone()).collect(),
                reads_views: edges
                    .iter()
                    .filter(|e| e.get::<_, u32>(0) == view_oid)
                    .map(|e| QualifiedName::new(e.get::<_, String>(1), e.get::<_, String>(2)))
                    .collect(),
                triggers: triggers
                    .iter()
                    .filter(|t| t.get::<_, u32>(0) == view_oid)
                    .map(|t| Trigger { name: t.get(1), definition: t.get(2), enabled: t.get(3), comment: t.get(4) })
                    .collect(),
            }
        })
        .collect())
}

pub(super) async fn read_policies(tx: &tokio_postgres::Transaction<'_>, oid: u32) -> Result<Vec<Policy>, CatalogError> {
    let rows = tx
        .query(
            "SELECT p.polname::text, p.polpermissive, p.polcmd::text,
                    ARRAY(SELECT CASE WHEN r = 0 THEN 'public' ELSE pg_get_userbyid(r)::text END
                            FROM unnest(p.polroles) r ORDER BY 1),
                    pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid)
               FROM pg_policy p WHERE p.polrelid = $1 ORDER BY 1",
            &[&oid],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Policy {
            name: r.get(0),
            permissive: r.get(1),
            command: match r.get::<_, String>(2).as_str() {
                "r" => "SELECT",
                "a" => "INSERT",
                "w" => "UPDATE",
                "d" => "DELETE",
                _ => "ALL",
            }
            .into(),
            roles: r.get(3),
            using: r.get(4),
            with_check: r.get(5),
        })
        .collect())
}

/// Table-level grants of the relations `oids`, each with the oid it belongs to.
pub(super) async fn read_grants(
    tx: &tokio_postgres::Transaction<'_>,
    oids: &[u32],
) -> Result<Vec<(u32, Grant)>, CatalogError> {
    if oids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = tx
        .query(
            "SELECT c.oid, CASE WHEN x.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(x.grantee)::text END,
                    x.privilege_type, x.is_grantable, pg_get_userbyid(x.grantor)::text
               FROM pg_class c, aclexplode(c.relacl) x
              WHERE c.oid = ANY($1) AND c.relacl IS NOT NULL
              ORDER BY 1, 2, 3",
            &[&oids],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), grant_from(r, 1))).collect())
}

pub(super) async fn read_publications(
    tx: &tokio_postgres::Transaction<'_>,
    oid: u32,
    version: i32,
) -> Result<Vec<PublicationMembership>, CatalogError> {
    // Column lists and row filters exist from PostgreSQL 15.
    let sql = if version >= 150000 {
        "SELECT p.pubname::text,
                CASE WHEN pr.prattrs IS NULL THEN NULL ELSE
                  ARRAY(SELECT a.attname::text
                          FROM unnest(pr.prattrs::int2[]) WITH ORDINALITY u(n, ord)
                          JOIN pg_attribute a ON a.attrelid = pr.prrelid AND a.attnum = u.n
                         ORDER BY u.ord) END,
                pg_get_expr(pr.prqual, pr.prrelid)
           FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
          WHERE pr.prrelid = $1 ORDER BY 1"
    } else {
        "SELECT p.pubname::text, NULL::text[], NULL::text
           FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
          WHERE pr.prrelid = $1 ORDER BY 1"
    };
    let rows = tx.query(sql, &[&oid]).await?;
    Ok(rows
        .iter()
        .map(|r| PublicationMembership { publication: r.get(0), columns: r.get(1), row_filter: r.get(2) })
        .collect())
}

pub(super) async fn read_statistics(
    tx: &tokio_postgres::Transaction<'_>,
    oid: u32,
) -> Result<Vec<ExtendedStatistics>, CatalogError> {
    let rows = tx
        .query(
            "SELECT n.nspname::text, s.stxname::text, pg_get_statisticsobjdef(s.oid)
               FROM pg_statistic_ext s JOIN pg_namespace n ON n.oid = s.stxnamespace
              WHERE s.stxrelid = $1 ORDER BY 2",
            &[&oid],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ExtendedStatistics {
            name: QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            definition: r.get(2),
        })
        .collect())
}

pub(super) async fn read_owned_sequences(
    tx: &tokio_postgres::Transaction<'_>,
    oid: u32,
) -> Result<Vec<OwnedSequence>, CatalogError> {
    let rows = tx
        .query(
            "SELECT n.nspname::text, s.relname::text, a.attname::text, d.deptype = 'i'
               FROM pg_depend d
               JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
               JOIN pg_namespace n ON n.oid = s.relnamespace
               JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
              WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
                AND d.refobjid = $1 AND d.deptype IN ('a', 'i')
              ORDER BY 3",
            &[&oid],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| OwnedSequence {
            name: QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            column: r.get(2),
            identity: r.get(3),
        })
        .collect())
}

pub(super) async fn read_row_type_users(
    tx: &tokio_postgres::Transaction<'_>,
    oid: u32,
) -> Result<Vec<String>, CatalogError> {
    let rows = tx
        .query(
            "SELECT DISTINCT pg_describe_object(d.classid, d.objid, d.objsubid)
               FROM pg_class c
               JOIN pg_type t ON t.oid = c.reltype
               JOIN pg_depend d ON d.refclassid = 'pg_type'::regclass
                               AND d.refobjid IN (t.oid, t.typarray) AND d.deptype = 'n'
              WHERE c.oid = $1
              ORDER BY 1",
            &[&oid],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
