//! Parsing the user's `ALTER TABLE` with PostgreSQL's own parser (pg_query).
//!
//! ghostwire never runs a deparsed copy of the statement: it keeps the user's text and the
//! byte spans of the table reference and of each subcommand, and splices in another table
//! name where the statement must run against the shadow table.

use std::ops::Range;

use pg_query::NodeEnum;
use pg_query::protobuf::{ObjectType, Token};
use serde::Serialize;
use thiserror::Error;

pub use super::index_statement::ConstraintIndex;

#[derive(Debug, Error, PartialEq)]
pub enum ParseError {
    #[error("the statement does not parse: {message}{}", at.as_ref().map(|a| format!(" at character {}\n{}", a.position, a.excerpt)).unwrap_or_default())]
    Syntax { message: String, at: Option<ErrorLocation> },
    #[error("no statement given: pass one ALTER TABLE statement")]
    Empty,
    #[error(
        "{0} statements given: ghostwire runs exactly one ALTER TABLE statement at a time (several subcommands, separated by commas, are fine)"
    )]
    MultipleStatements(usize),
    #[error(
        "this is a {0}: ghostwire runs ALTER TABLE, CREATE [UNIQUE] INDEX, DROP INDEX and REINDEX INDEX statements"
    )]
    NotAlterTable(String),
    #[error(
        "renaming a table is not an online schema change: run `ALTER TABLE … RENAME TO …` directly (it only takes a brief lock)"
    )]
    RenamesTable,
    #[error(
        "moving a table to another schema is not supported: run `ALTER TABLE … SET SCHEMA …` directly (it only takes a brief lock)"
    )]
    MovesSchema,
    /// An index statement ghostwire does not run as written.
    #[error("{0}")]
    Index(String),
    #[error("could not locate the parts of the statement in its text ({0}); please report this statement")]
    Layout(String),
}

/// Where a syntax error is: 1-based character position and the line with a caret.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorLocation {
    pub position: usize,
    pub excerpt: String,
}

/// The table the statement changes, as written.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TableRef {
    pub schema: Option<String>,
    pub name: String,
    /// Byte span of the (possibly qualified) name in the statement.
    pub span: Range<usize>,
    /// `ALTER TABLE ONLY …`
    pub only: bool,
    /// `ALTER TABLE IF EXISTS …`
    pub if_exists: bool,
}

/// Constraint kinds a subcommand can add.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NewConstraint {
    Check,
    NotNull,
    ForeignKey,
    Unique,
    PrimaryKey,
    Exclusion,
}

/// What one subcommand does, as far as planning is concerned.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Action {
    AddColumn {
        column: String,
        has_default: bool,
        not_null: bool,
        /// Constraints declared on the new column (besides NOT NULL and DEFAULT).
        constraints: Vec<NewConstraint>,
        generated: bool,
        identity: bool,
    },
    DropColumn {
        column: String,
        cascade: bool,
    },
    SetDefault {
        column: String,
    },
    DropDefault {
        column: String,
    },
    AlterType {
        column: String,
        /// Byte span of the `USING` expression, if given.
        using: Option<Range<usize>>,
    },
    SetNotNull {
        column: String,
    },
    DropNotNull {
        column: String,
    },
    SetExpression {
        column: String,
    },
    DropExpression {
        column: String,
    },
    AddConstraint {
        name: Option<String>,
        constraint: NewConstraint,
        not_valid: bool,
        using_index: bool,
        columns: Vec<String>,
        /// For a UNIQUE or PRIMARY KEY constraint built from scratch: its index, as a
        /// `CREATE UNIQUE INDEX` (run concurrently, then attached `USING INDEX`).
        index: Option<ConstraintIndex>,
    },
    /// `CREATE [UNIQUE] INDEX …` (always run concurrently).
    CreateIndex {
        name: Option<String>,
        unique: bool,
        if_not_exists: bool,
        /// The index's column names as PostgreSQL names an unnamed index after them.
        columns: Vec<String>,
        /// Byte span of the statement from `ON` to its end.
        body: Range<usize>,
    },
    /// `DROP INDEX …` (always run concurrently).
    DropIndex {
        schema: Option<String>,
        name: String,
        if_exists: bool,
    },
    /// `REINDEX INDEX …` (always run concurrently).
    Reindex {
        schema: Option<String>,
        name: String,
    },
    ValidateConstraint {
        name: String,
    },
    DropConstraint {
        name: String,
        cascade: bool,
    },
    AlterConstraint {
        name: String,
    },
    RenameColumn {
        from: String,
        to: String,
    },
    RenameConstraint {
        from: String,
        to: String,
    },
    /// Catalog-only changes that need no data movement (statistics, storage, options,
    /// owner, triggers, row security, replica identity, clustering, identity settings).
    Metadata {
        what: String,
        column: Option<String>,
    },
    /// Changes that rewrite the table by their nature (tablespace, persistence, access method).
    Rewrite {
        what: String,
    },
    Unsupported {
        what: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Subcommand {
    /// Byte span of the subcommand in the statement.
    pub span: Range<usize>,
    pub action: Action,
}

/// A parsed single `ALTER TABLE` (or `ALTER TABLE … RENAME COLUMN/CONSTRAINT`) statement.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParsedStatement {
    /// The user's statement, without a trailing semicolon.
    pub text: String,
    pub table: TableRef,
    pub subcommands: Vec<Subcommand>,
}

impl ParsedStatement {
    pub fn subcommand_text(&self, index: usize) -> &str {
        &self.text[self.subcommands[index].span.clone()]
    }

    /// The user's statement with the table reference replaced by `table_sql` (quoted SQL).
    pub fn spliced(&self, table_sql: &str) -> String {
        format!("{}{}{}", &self.text[..self.table.span.start], table_sql, &self.text[self.table.span.end..])
    }

    /// A statement of the same form with only subcommand `index`, against `table_sql`.
    pub fn single(&self, index: usize, table_sql: &str) -> String {
        let head = &self.text[..self.table.span.start];
        format!("{head}{table_sql} {}", self.subcommand_text(index))
    }

    /// A `CREATE INDEX`, `DROP INDEX` or `REINDEX INDEX` (one subcommand standing for the
    /// whole statement).
    pub fn is_index_statement(&self) -> bool {
        matches!(
            self.subcommands.first().map(|s| &s.action),
            Some(Action::CreateIndex { .. } | Action::DropIndex { .. } | Action::Reindex { .. })
        )
    }

    /// The text of a byte span of the statement.
    pub fn slice(&self, span: &Range<usize>) -> &str {
        &self.text[span.clone()]
    }
}

/// Parses `sql`, which must hold exactly one ALTER TABLE statement.
pub fn parse(sql: &str) -> Result<ParsedStatement, ParseError> {
    let result = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).map_err(|e| syntax_error(sql, e))?;
    let stmts = &result.protobuf.stmts;
    match stmts.len() {
        0 => return Err(ParseError::Empty),
        1 => {}
        n => return Err(ParseError::MultipleStatements(n)),
    }
    let raw = &stmts[0];
    let start = raw.stmt_location as usize;
    let end = if raw.stmt_len == 0 { sql.len() } else { start + raw.stmt_len as usize };
    // Keep byte offsets valid: the text starts at 0; trailing whitespace and ';' go.
    let text = sql[..end].trim_end().trim_end_matches(';').trim_end().to_owned();
    let node = raw.stmt.as_ref().and_then(|n| n.node.as_ref()).ok_or(ParseError::Empty)?;
    let tokens = tokens(&text)?;
    match node {
        NodeEnum::AlterTableStmt(stmt) => {
            if stmt.objtype != ObjectType::ObjectTable as i32 {
                return Err(ParseError::NotAlterTable(object_statement(stmt.objtype)));
            }
            let rel = stmt.relation.as_ref().ok_or_else(|| ParseError::Layout("no table".into()))?;
            let (table, rest) = table_ref(&tokens, rel, stmt.missing_ok)?;
            let pieces = split_top_level(&tokens[rest..]);
            if pieces.len() != stmt.cmds.len() {
                return Err(ParseError::Layout(format!(
                    "{} subcommands parsed but {} found in the text",
                    stmt.cmds.len(),
                    pieces.len()
                )));
            }
            let mut subcommands = Vec::with_capacity(pieces.len());
            for (cmd, piece) in stmt.cmds.iter().zip(pieces) {
                let Some(NodeEnum::AlterTableCmd(cmd)) = cmd.node.as_ref() else {
                    return Err(ParseError::Layout("unexpected subcommand node".into()));
                };
                let span = piece[0].start..piece[piece.len() - 1].end;
                subcommands.push(Subcommand { action: super::alter_action::action(cmd, piece), span });
            }
            Ok(ParsedStatement { text, table, subcommands })
        }
        NodeEnum::RenameStmt(stmt) => {
            if stmt.rename_type == ObjectType::ObjectTable as i32 {
                return Err(ParseError::RenamesTable);
            }
            // The grammar leaves relation_type unset for RENAME CONSTRAINT (tables only).
            let on_table = stmt.relation_type == ObjectType::ObjectTable as i32
                || stmt.rename_type == ObjectType::ObjectTabconstraint as i32;
            let Some(rel) = stmt.relation.as_ref().filter(|_| on_table) else {
                return Err(ParseError::NotAlterTable(object_statement(stmt.relation_type)));
            };
            let action = if stmt.rename_type == ObjectType::ObjectColumn as i32 {
                Action::RenameColumn { from: stmt.subname.clone(), to: stmt.newname.clone() }
            } else if stmt.rename_type == ObjectType::ObjectTabconstraint as i32 {
                Action::RenameConstraint { from: stmt.subname.clone(), to: stmt.newname.clone() }
            } else {
                return Err(ParseError::NotAlterTable(object_statement(stmt.rename_type)));
            };
            let (table, rest) = table_ref(&tokens, rel, stmt.missing_ok)?;
            let piece = &tokens[rest..];
            let (Some(first), Some(last)) = (piece.first(), piece.last()) else {
                return Err(ParseError::Layout("empty RENAME".into()));
            };
            let span = first.start..last.end;
            Ok(ParsedStatement { text, table, subcommands: vec![Subcommand { span, action }] })
        }
        NodeEnum::IndexStmt(stmt) => super::index_statement::create(text, &tokens, stmt),
        NodeEnum::DropStmt(stmt) if stmt.remove_type == ObjectType::ObjectIndex as i32 => {
            super::index_statement::drop(text, stmt)
        }
        NodeEnum::ReindexStmt(stmt) => super::index_statement::reindex(text, stmt),
        NodeEnum::AlterObjectSchemaStmt(stmt) if stmt.object_type == ObjectType::ObjectTable as i32 => {
            Err(ParseError::MovesSchema)
        }
        other => Err(ParseError::NotAlterTable(statement_kind(other))),
    }
}

/// A table name as a user types it on the command line (`orders`, `public.orders`,
/// `"Sales"."Order Items"`), parsed by PostgreSQL's grammar: (schema, name).
pub fn table_name(text: &str) -> Result<(Option<String>, String), ParseError> {
    let sql = format!("SELECT FROM {text}");
    let result = pg_query::parse(&sql, pg_query::ParserOptions::DEFAULT)
        .map_err(|_| ParseError::Layout(format!("{text:?} is not a table name")))?;
    let tables: Vec<_> = result
        .protobuf
        .nodes()
        .into_iter()
        .filter_map(|(n, ..)| match n {
            pg_query::NodeRef::RangeVar(r) => Some((r.schemaname.clone(), r.relname.clone())),
            _ => None,
        })
        .collect();
    match tables.as_slice() {
        [(schema, name)] if result.protobuf.stmts.len() == 1 => {
            Ok(((!schema.is_empty()).then(|| schema.clone()), name.clone()))
        }
        _ => Err(ParseError::Layout(format!("{text:?} is not a table name"))),
    }
}

/// Points a `CREATE INDEX … ON table …` definition (as `pg_get_indexdef` gives it) at
/// `table_sql` instead, by splicing the table reference.
pub fn retarget_index(definition: &str, table_sql: &str) -> Result<String, ParseError> {
    let result =
        pg_query::parse(definition, pg_query::ParserOptions::DEFAULT).map_err(|e| syntax_error(definition, e))?;
    let Some(NodeEnum::IndexStmt(stmt)) =
        result.protobuf.stmts.first().and_then(|s| s.stmt.as_ref()).and_then(|n| n.node.as_ref())
    else {
        return Err(ParseError::Layout(format!("not a CREATE INDEX: {definition}")));
    };
    let rel = stmt.relation.as_ref().ok_or_else(|| ParseError::Layout("CREATE INDEX without a table".into()))?;
    let toks = tokens(definition)?;
    let (table, _) = table_ref(&toks, rel, false)?;
    Ok(format!("{}{}{}", &definition[..table.span.start], table_sql, &definition[table.span.end..]))
}

/// A scanner token (comments dropped).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tok {
    pub(crate) start: usize,
    pub(crate) end: usize,
    kind: i32,
}

impl Tok {
    pub(crate) fn is(&self, t: Token) -> bool {
        self.kind == t as i32
    }
}

pub(crate) fn tokens(text: &str) -> Result<Vec<Tok>, ParseError> {
    let scanned = pg_query::scan_tokens(text).map_err(|e| ParseError::Layout(e.to_string()))?;
    Ok(scanned
        .into_iter()
        .filter(|t| t.token != Token::SqlComment as i32 && t.token != Token::CComment as i32)
        .map(|t| Tok { start: t.start as usize, end: t.end as usize, kind: t.token })
        .collect())
}

/// The table reference's span and the index of the first token after it.
pub(super) fn table_ref(
    tokens: &[Tok],
    rel: &pg_query::protobuf::RangeVar,
    if_exists: bool,
) -> Result<(TableRef, usize), ParseError> {
    let loc = rel.location as usize;
    let first = tokens
        .iter()
        .position(|t| t.start == loc)
        .ok_or_else(|| ParseError::Layout(format!("no token at the table name (byte {loc})")))?;
    let mut last = first;
    while last + 2 < tokens.len() && tokens[last + 1].is(Token::Ascii46) {
        last += 2;
    }
    let mut rest = last + 1;
    // The legacy `name *` form (include inheritance children).
    if rest < tokens.len() && tokens[rest].is(Token::Ascii42) {
        rest += 1;
    }
    let only = first > 0 && tokens[first - 1].is(Token::Only);
    Ok((
        TableRef {
            schema: (!rel.schemaname.is_empty()).then(|| rel.schemaname.clone()),
            name: rel.relname.clone(),
            span: tokens[first].start..tokens[last].end,
            only,
            if_exists,
        },
        rest,
    ))
}

/// Splits tokens on commas outside parentheses and brackets.
pub(crate) fn split_top_level(tokens: &[Tok]) -> Vec<&[Tok]> {
    let mut pieces = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, t) in tokens.iter().enumerate() {
        if t.is(Token::Ascii40) || t.is(Token::Ascii91) {
            depth += 1;
        } else if t.is(Token::Ascii41) || t.is(Token::Ascii93) {
            depth -= 1;
        } else if depth == 0 && t.is(Token::Ascii44) {
            pieces.push(&tokens[start..i]);
            start = i + 1;
        }
    }
    if start < tokens.len() {
        pieces.push(&tokens[start..]);
    }
    pieces.retain(|p| !p.is_empty());
    pieces
}

pub(super) fn string_list(nodes: &[pg_query::protobuf::Node]) -> Vec<String> {
    nodes
        .iter()
        .filter_map(|n| match n.node.as_ref() {
            Some(NodeEnum::String(s)) => Some(s.sval.clone()),
            _ => None,
        })
        .collect()
}

fn object_statement(objtype: i32) -> String {
    match ObjectType::try_from(objtype) {
        Ok(ObjectType::ObjectIndex) => "ALTER INDEX statement".into(),
        Ok(ObjectType::ObjectView) => "ALTER VIEW statement".into(),
        Ok(ObjectType::ObjectMatview) => "ALTER MATERIALIZED VIEW statement".into(),
        Ok(ObjectType::ObjectSequence) => "ALTER SEQUENCE statement".into(),
        Ok(ObjectType::ObjectForeignTable) => "ALTER FOREIGN TABLE statement".into(),
        Ok(ObjectType::ObjectType) => "ALTER TYPE statement".into(),
        _ => "statement on another kind of object".into(),
    }
}

pub(crate) fn statement_kind(node: &NodeEnum) -> String {
    let kind = match node {
        NodeEnum::SelectStmt(_) => "SELECT",
        NodeEnum::InsertStmt(_) => "INSERT",
        NodeEnum::UpdateStmt(_) => "UPDATE",
        NodeEnum::AlterTableStmt(_) => "ALTER TABLE",
        NodeEnum::MergeStmt(_) => "MERGE",
        NodeEnum::DeleteStmt(_) => "DELETE",
        NodeEnum::CreateStmt(_) => "CREATE TABLE",
        NodeEnum::IndexStmt(_) => "CREATE INDEX",
        NodeEnum::DropStmt(_) => "DROP",
        NodeEnum::TruncateStmt(_) => "TRUNCATE",
        NodeEnum::AlterObjectSchemaStmt(_) => "ALTER … SET SCHEMA",
        _ => "different kind of",
    };
    format!("{kind} statement")
}

/// A syntax error with its position, found by bisecting over token boundaries: the shortest
/// prefix that fails other than "at end of input" ends at the offending token.
pub(crate) fn syntax_error(sql: &str, err: pg_query::Error) -> ParseError {
    let message = match &err {
        pg_query::Error::Parse(m) => m.clone(),
        other => other.to_string(),
    };
    let Ok(toks) = tokens(sql) else {
        return ParseError::Syntax { message, at: None };
    };
    let fails_inside = |k: usize| -> bool {
        let prefix = &sql[..toks[k - 1].end];
        match pg_query::parse(prefix, pg_query::ParserOptions::DEFAULT) {
            Ok(_) => false,
            Err(pg_query::Error::Parse(m)) => !m.contains("at end of input"),
            Err(_) => true,
        }
    };
    let (mut lo, mut hi) = (1usize, toks.len());
    if hi == 0 || !fails_inside(hi) {
        // Fails only at the very end: point just past the last token.
        let pos = sql.trim_end().len();
        return ParseError::Syntax { message, at: Some(location(sql, pos)) };
    }
    while lo < hi {
        let mid = (lo + hi) / 2;
        if fails_inside(mid) { hi = mid } else { lo = mid + 1 }
    }
    ParseError::Syntax { message, at: Some(location(sql, toks[lo - 1].start)) }
}

fn location(sql: &str, byte: usize) -> ErrorLocation {
    let byte = byte.min(sql.len());
    let position = sql[..byte].chars().count() + 1;
    let line_start = sql[..byte].rfind('\n').map_or(0, |i| i + 1);
    let line_end = sql[byte..].find('\n').map_or(sql.len(), |i| byte + i);
    let caret = " ".repeat(sql[line_start..byte].chars().count());
    ErrorLocation { position, excerpt: format!("  {}\n  {caret}^", &sql[line_start..line_end]) }
}

#[cfg(test)]
#[path = "parse_tests.rs"]
mod tests;
