//! A migration file cut into statements (pg_query's parser-based split), each with the way
//! ghostwire runs it.

use pg_query::NodeEnum;
use pg_query::protobuf::TransactionStmtKind;

use crate::plan::parse::{self, ParseError};

/// How a statement of a file runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Way {
    /// `ALTER TABLE`, `CREATE INDEX`, `DROP INDEX`, `REINDEX INDEX`: through `migrate`
    /// (instant, in place, or a copy; indexes concurrently).
    Migrate,
    /// `UPDATE` / `DELETE`: through `backfill`, in batches.
    Backfill,
    /// Anything else, in its own transaction under a short `lock_timeout`, retried.
    Direct,
    /// A statement PostgreSQL runs only outside a transaction block (`VACUUM`, `CREATE
    /// DATABASE`, …): on its own, under the same `lock_timeout`.
    Outside,
    /// `SET search_path …`: the statements after it run with that search_path.
    SearchPath,
    /// Another `SET`/`RESET`: ghostwire's sessions keep their own timeouts; skipped, said so.
    Setting,
}

impl Way {
    pub fn as_str(self) -> &'static str {
        match self {
            Way::Migrate => "migrate",
            Way::Backfill => "backfill",
            Way::Direct => "direct",
            Way::Outside => "direct, outside a transaction",
            Way::SearchPath => "search_path",
            Way::Setting => "setting (skipped)",
        }
    }
}

/// One statement of a file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Piece {
    /// 1-based, in the file.
    pub number: usize,
    /// The line it starts on.
    pub line: usize,
    pub text: String,
    pub way: Way,
    /// For `SET search_path`: the value.
    #[serde(skip)]
    pub search_path: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{file}: {source}")]
    Parse { file: String, source: ParseError },
    #[error(
        "{file}, line {line}: {what} — apply runs each statement the safe way, in transactions of its own, so it does not hold locks from one statement to the next; remove the transaction control, or pass --single-transaction to run the whole file in one transaction (holding every lock it takes until the end)"
    )]
    TransactionControl { file: String, line: usize, what: String },
    #[error("{0}: the file holds no statement")]
    Empty(String),
}

fn way(node: &NodeEnum, text: &str) -> (Way, Option<String>) {
    match node {
        NodeEnum::UpdateStmt(_) | NodeEnum::DeleteStmt(_) => (Way::Backfill, None),
        NodeEnum::VacuumStmt(_)
        | NodeEnum::CreatedbStmt(_)
        | NodeEnum::DropdbStmt(_)
        | NodeEnum::AlterSystemStmt(_)
        | NodeEnum::CreateTableSpaceStmt(_)
        | NodeEnum::DropTableSpaceStmt(_)
        | NodeEnum::CreateSubscriptionStmt(_)
        | NodeEnum::DropSubscriptionStmt(_) => (Way::Outside, None),
        NodeEnum::VariableSetStmt(v) if v.name.eq_ignore_ascii_case("search_path") => {
            let value = text.split_once(['=']).map(|(_, v)| v).or_else(|| {
                let lower = text.to_ascii_lowercase();
                lower.find(" to ").map(|at| &text[at + 4..])
            });
            (Way::SearchPath, value.map(|v| v.trim().trim_end_matches(';').trim().to_owned()))
        }
        NodeEnum::VariableSetStmt(_) => (Way::Setting, None),
        _ => match parse::parse(text) {
            Ok(_) => (Way::Migrate, None),
            // A table rename or move, or a statement migrate refuses as written: PostgreSQL
            // runs it in a moment, or says why not.
            Err(_) => (Way::Direct, None),
        },
    }
}

/// The statements of `sql` (the contents of `file`), refusing transaction control unless
/// the whole file is to run in one transaction.
pub fn pieces(file: &str, sql: &str, single_transaction: bool) -> Result<Vec<Piece>, FileError> {
    let parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT)
        .map_err(|e| FileError::Parse { file: file.into(), source: parse::syntax_error(sql, e) })?;
    let mut out = Vec::new();
    for raw in &parsed.protobuf.stmts {
        let start = raw.stmt_location as usize;
        let end = if raw.stmt_len == 0 { sql.len() } else { start + raw.stmt_len as usize };
        let text = sql[start..end].trim().trim_end_matches(';').trim().to_owned();
        let Some(node) = raw.stmt.as_ref().and_then(|n| n.node.as_ref()) else { continue };
        let lead = sql[start..end].len() - sql[start..end].trim_start().len();
        let line = 1 + sql[..start + lead].matches('\n').count();
        if let NodeEnum::TransactionStmt(t) = node {
            if single_transaction {
                continue; // the file runs in one transaction of ghostwire's own
            }
            let what = match TransactionStmtKind::try_from(t.kind) {
                Ok(TransactionStmtKind::TransStmtBegin | TransactionStmtKind::TransStmtStart) => "BEGIN",
                Ok(TransactionStmtKind::TransStmtCommit) => "COMMIT",
                Ok(TransactionStmtKind::TransStmtRollback) => "ROLLBACK",
                _ => "transaction control",
            };
            return Err(FileError::TransactionControl { file: file.into(), line, what: format!("{what} found") });
        }
        let (way, search_path) = way(node, &text);
        out.push(Piece { number: out.len() + 1, line, text, way, search_path });
    }
    if out.is_empty() {
        return Err(FileError::Empty(file.into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_statement_its_way() {
        let sql = "-- 0042\nCREATE TABLE t (id int PRIMARY KEY);\nALTER TABLE t ADD COLUMN a int;\n\
                   CREATE INDEX ON t (a);\nUPDATE t SET a = 1 WHERE a IS NULL;\nVACUUM t;\n\
                   SET search_path = app, public;\nSET statement_timeout = 0;\nALTER TABLE t RENAME TO u;\n\
                   COMMENT ON TABLE u IS 'x'";
        let p = pieces("f.sql", sql, false).unwrap();
        let ways: Vec<Way> = p.iter().map(|p| p.way).collect();
        use Way::*;
        assert_eq!(ways, [Direct, Migrate, Migrate, Backfill, Outside, SearchPath, Setting, Direct, Direct]);
        assert_eq!(p[0].line, 2);
        assert_eq!(p[0].text, "CREATE TABLE t (id int PRIMARY KEY)");
        assert_eq!(p[5].search_path.as_deref(), Some("app, public"));
        assert_eq!(p[8].line, 10);
    }

    #[test]
    fn transaction_control_is_refused_unless_one_transaction() {
        let sql = "BEGIN;\nALTER TABLE t ADD COLUMN a int;\nCOMMIT;";
        let e = pieces("f.sql", sql, false).unwrap_err().to_string();
        assert!(e.contains("f.sql, line 1: BEGIN found") && e.contains("--single-transaction"), "{e}");
        assert_eq!(pieces("f.sql", sql, true).unwrap().len(), 1);
        assert!(pieces("f.sql", "-- nothing", false).is_err());
    }
}
