//! The user's UPDATE or DELETE, parsed (pg_query) and cut into the pieces a batch is made of.
//!
//! The user's text is kept: a batch is the statement's head (everything before its `WHERE`),
//! then `WHERE` the key range, then the user's condition in parentheses, then, for an
//! UPDATE whose assignments are all plain `col = expr`, a filter that skips rows already so
//! (`col IS DISTINCT FROM (expr)`), which is what makes a rerun write nothing twice.

use pg_query::NodeEnum;
use pg_query::protobuf::Token;

use crate::plan::parse::{ParseError, Tok, split_top_level, syntax_error, tokens};
use crate::sql::{ident, text_params};

/// Why a statement is not taken. Each says what to do instead.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StatementError {
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error("no statement given: pass one UPDATE or DELETE statement")]
    Empty,
    #[error(
        "{0} statements given: backfill runs one UPDATE or DELETE at a time; `ghostwire apply FILE.sql` runs a file of them"
    )]
    Several(usize),
    #[error(
        "this is {}: backfill runs an UPDATE or a DELETE (`ghostwire migrate` takes ALTER TABLE and CREATE INDEX)",
        with_article(.0)
    )]
    NotData(String),
    #[error("RETURNING is not supported: a backfill's batches return nothing; drop the RETURNING clause")]
    Returning,
    #[error("LIMIT is not PostgreSQL syntax for {0}, and backfill already runs in batches: drop the LIMIT")]
    Limit(&'static str),
    #[error("WHERE CURRENT OF needs a cursor, which a batch cannot have")]
    CurrentOf,
    #[error("the WITH clause {0:?} writes ({1}): data-modifying CTEs would run again in every batch")]
    WritingCte(String, &'static str),
    #[error("the statement has parameters ($1 …): write the values into the statement")]
    Parameters,
}

fn with_article(what: &str) -> String {
    let article = if what.starts_with(['A', 'E', 'I', 'O', 'U']) { "an" } else { "a" };
    format!("{article} {what}")
}

/// UPDATE or DELETE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Update,
    Delete,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Update => "UPDATE",
            Kind::Delete => "DELETE",
        }
    }
}

/// `col = expr` of an UPDATE's SET list, as written.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Assignment {
    pub column: String,
    /// The expression's text; None for anything but a plain `col = expr` (`DEFAULT`,
    /// `col[1] = …`, `(a, b) = …`).
    pub expr: Option<String>,
}

/// A parsed UPDATE or DELETE.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Statement {
    /// The statement as given, trimmed of its `;`.
    pub text: String,
    pub kind: Kind,
    pub schema: Option<String>,
    pub table: String,
    /// What the statement calls the table: its alias, or its name.
    pub reference: String,
    /// Everything before the statement's own `WHERE` (all of it when there is none).
    pub head: String,
    /// The user's condition, when there is one.
    pub condition: Option<String>,
    /// The table as written after UPDATE / DELETE FROM: `ONLY "s"."t" AS x`.
    pub target: String,
    /// `WITH …` before the statement, when there is one.
    pub with: Option<String>,
    /// UPDATE … FROM / DELETE … USING: the other tables, as written.
    pub joined: Option<String>,
    /// UPDATE: the SET list.
    pub assignments: Vec<Assignment>,
}

/// An identifier as PostgreSQL reads it: quoted as written, otherwise folded to lower case.
fn unquote(token: &str) -> String {
    match token.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        Some(inner) => inner.replace("\"\"", "\""),
        None => token.to_lowercase(),
    }
}

fn slice(text: &str, toks: &[Tok]) -> String {
    match (toks.first(), toks.last()) {
        (Some(a), Some(b)) => text[a.start..b.end].to_owned(),
        _ => String::new(),
    }
}

/// Positions of the tokens of `kind` outside parentheses and brackets.
fn top_level(toks: &[Tok], kind: Token) -> Vec<usize> {
    let mut depth = 0i32;
    let mut out = Vec::new();
    for (i, t) in toks.iter().enumerate() {
        if t.is(Token::Ascii40) || t.is(Token::Ascii91) {
            depth += 1;
        } else if t.is(Token::Ascii41) || t.is(Token::Ascii93) {
            depth -= 1;
        } else if depth == 0 && t.is(kind) {
            out.push(i);
        }
    }
    out
}

fn writes(node: Option<&NodeEnum>) -> Option<&'static str> {
    match node {
        Some(NodeEnum::InsertStmt(_)) => Some("INSERT"),
        Some(NodeEnum::UpdateStmt(_)) => Some("UPDATE"),
        Some(NodeEnum::DeleteStmt(_)) => Some("DELETE"),
        Some(NodeEnum::MergeStmt(_)) => Some("MERGE"),
        _ => None,
    }
}

fn assignment(text: &str, piece: &[Tok]) -> Assignment {
    let column_token = piece.first().map(|t| &text[t.start..t.end]).unwrap_or_default();
    let column = unquote(column_token);
    let plain = piece.len() >= 3 && piece[1].is(Token::Ascii61) && !piece[0].is(Token::Ascii40);
    let expr = plain.then(|| slice(text, &piece[2..])).filter(|e| !e.eq_ignore_ascii_case("default"));
    Assignment { column, expr }
}

/// Parses `sql`, which must hold one UPDATE or DELETE.
pub fn parse(sql: &str) -> Result<Statement, StatementError> {
    let limit_kind = |sql: &str| {
        let upper = sql.to_ascii_uppercase();
        if upper.trim_start().starts_with("DELETE") { "DELETE" } else { "UPDATE" }
    };
    let result = match pg_query::parse(sql, pg_query::ParserOptions::DEFAULT) {
        Ok(r) => r,
        Err(e) => {
            let has_limit = tokens(sql).is_ok_and(|t| t.iter().any(|t| t.is(Token::Limit)));
            if has_limit {
                return Err(StatementError::Limit(limit_kind(sql)));
            }
            return Err(syntax_error(sql, e).into());
        }
    };
    let stmts = &result.protobuf.stmts;
    match stmts.len() {
        0 => return Err(StatementError::Empty),
        1 => {}
        n => return Err(StatementError::Several(n)),
    }
    let raw = &stmts[0];
    let start = raw.stmt_location as usize;
    let end = if raw.stmt_len == 0 { sql.len() } else { start + raw.stmt_len as usize };
    let text = sql[start..end].trim().trim_end_matches(';').trim_end().to_owned();
    let node = raw.stmt.as_ref().and_then(|n| n.node.as_ref()).ok_or(StatementError::Empty)?;
    let (kind, relation, where_clause, returning, with) = match node {
        NodeEnum::UpdateStmt(u) => {
            (Kind::Update, u.relation.as_ref(), u.where_clause.as_deref(), u.returning_clause.is_some(), &u.with_clause)
        }
        NodeEnum::DeleteStmt(d) => {
            (Kind::Delete, d.relation.as_ref(), d.where_clause.as_deref(), d.returning_clause.is_some(), &d.with_clause)
        }
        other => return Err(StatementError::NotData(crate::plan::parse::statement_kind(other))),
    };
    if returning {
        return Err(StatementError::Returning);
    }
    if matches!(where_clause.and_then(|w| w.node.as_ref()), Some(NodeEnum::CurrentOfExpr(_))) {
        return Err(StatementError::CurrentOf);
    }
    for cte in with.iter().flat_map(|w| &w.ctes) {
        if let Some(NodeEnum::CommonTableExpr(c)) = cte.node.as_ref()
            && let Some(what) = writes(c.ctequery.as_ref().and_then(|q| q.node.as_ref()))
        {
            return Err(StatementError::WritingCte(c.ctename.clone(), what));
        }
    }
    let rel = relation.ok_or(StatementError::Empty)?;
    let toks = tokens(&text)?;
    if toks.iter().any(|t| t.is(Token::Param)) {
        return Err(StatementError::Parameters);
    }
    let layout = |what: &str| StatementError::Parse(ParseError::Layout(what.to_owned()));
    let keyword = match kind {
        Kind::Update => Token::Update,
        Kind::Delete => Token::DeleteP,
    };
    let main = *top_level(&toks, keyword).first().ok_or_else(|| layout("no UPDATE/DELETE keyword"))?;
    let with_text = (main > 0).then(|| slice(&text, &toks[..main]));
    let wheres: Vec<usize> = top_level(&toks, Token::Where).into_iter().filter(|&i| i > main).collect();
    let body_end = wheres.first().copied().unwrap_or(toks.len());
    let head = match wheres.first() {
        Some(&w) => text[..toks[w].start].trim_end().to_owned(),
        None => text.clone(),
    };
    let condition = wheres.first().map(|&w| slice(&text, &toks[w + 1..]));
    // The target: from the table's name to SET / USING / WHERE.
    let target_start = toks.iter().position(|t| t.start == rel.location as usize).ok_or_else(|| layout("table"))?;
    let target_start =
        if target_start > 0 && toks[target_start - 1].is(Token::Only) { target_start - 1 } else { target_start };
    let stop = match kind {
        Kind::Update => Token::Set,
        Kind::Delete => Token::Using,
    };
    let after_target: Vec<usize> =
        top_level(&toks, stop).into_iter().filter(|&i| i > target_start && i < body_end).collect();
    let target_end = after_target.first().copied().unwrap_or(body_end);
    let target = slice(&text, &toks[target_start..target_end]);
    let (assignments, joined) = match kind {
        Kind::Update => {
            let set = target_end;
            let froms: Vec<usize> =
                top_level(&toks, Token::From).into_iter().filter(|&i| i > set && i < body_end).collect();
            let list_end = froms.first().copied().unwrap_or(body_end);
            let list = toks.get(set + 1..list_end).unwrap_or_default();
            let assignments = split_top_level(list).into_iter().map(|p| assignment(&text, p)).collect();
            (assignments, froms.first().map(|&f| slice(&text, &toks[f + 1..body_end])))
        }
        Kind::Delete => (Vec::new(), after_target.first().map(|&u| slice(&text, &toks[u + 1..body_end]))),
    };
    let reference = rel.alias.as_ref().map(|a| a.aliasname.clone()).unwrap_or_else(|| rel.relname.clone());
    Ok(Statement {
        text,
        kind,
        schema: (!rel.schemaname.is_empty()).then(|| rel.schemaname.clone()),
        table: rel.relname.clone(),
        reference,
        head,
        condition,
        target,
        with: with_text,
        joined: joined.filter(|j| !j.is_empty()),
        assignments,
    })
}

/// The key columns as the statement refers to them: `("o"."id")`.
fn key_row(s: &Statement, key: &[String]) -> String {
    let cols: Vec<String> = key.iter().map(|k| format!("{}.{}", ident(&s.reference), ident(k))).collect();
    format!("({})", cols.join(", "))
}

impl Statement {
    /// Whether the SET list is all plain `col = expr`, so already-changed rows can be skipped.
    pub fn skips_unchanged(&self) -> bool {
        self.kind == Kind::Update && !self.assignments.is_empty() && self.assignments.iter().all(|a| a.expr.is_some())
    }

    /// `(a IS DISTINCT FROM (e1) OR b IS DISTINCT FROM (e2))`, when the SET list allows it.
    pub fn unchanged_filter(&self) -> Option<String> {
        if !self.skips_unchanged() {
            return None;
        }
        let parts: Vec<String> = self
            .assignments
            .iter()
            .filter_map(|a| {
                let e = a.expr.as_ref()?;
                Some(format!("{}.{} IS DISTINCT FROM ({e})", ident(&self.reference), ident(&a.column)))
            })
            .collect();
        Some(format!("({})", parts.join(" OR ")))
    }

    /// Assignments whose expression reads the column it sets (`amount = amount + 1`): a
    /// second run of the statement changes those rows again.
    pub fn self_referencing(&self) -> Vec<String> {
        self.assignments
            .iter()
            .filter(|a| {
                a.expr
                    .as_ref()
                    .is_some_and(|e| tokens(e).is_ok_and(|t| t.iter().any(|t| unquote(&e[t.start..t.end]) == a.column)))
            })
            .map(|a| a.column.clone())
            .collect()
    }

    /// The user's condition and the unchanged filter, each in parentheses.
    fn filters(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(c) = &self.condition {
            out.push(format!("({c})"));
        }
        out.extend(self.unchanged_filter());
        out
    }

    /// One batch: the rows whose key is in `(lower, upper]` (`$1…` the lower bound when
    /// `after`, then the upper), as text parameters cast to the key's types.
    pub fn batch_sql(&self, key: &[String], types: &[String], after: bool) -> String {
        let row = key_row(self, key);
        let mut conds = Vec::new();
        let mut next = 1;
        if after {
            conds.push(format!("{row} > {}", text_params(next, types)));
            next += types.len();
        }
        conds.push(format!("{row} <= {}", text_params(next, types)));
        conds.extend(self.filters());
        format!("{} WHERE {}", self.head, conds.join(" AND "))
    }

    /// The whole statement with the unchanged filter (for EXPLAIN).
    pub fn whole_sql(&self) -> String {
        let f = self.filters();
        if f.is_empty() { self.head.clone() } else { format!("{} WHERE {}", self.head, f.join(" AND ")) }
    }

    /// How many rows the statement would change: a `SELECT count(*)` of the same rows.
    pub fn count_sql(&self) -> String {
        let with = self.with.as_ref().map(|w| format!("{w} ")).unwrap_or_default();
        let f = self.filters();
        let cond = if f.is_empty() { "true".to_owned() } else { f.join(" AND ") };
        match &self.joined {
            None => format!("{with}SELECT count(*) FROM {} WHERE {cond}", self.target),
            Some(j) => {
                format!("{with}SELECT count(*) FROM {} WHERE EXISTS (SELECT FROM {j} WHERE {cond})", self.target)
            }
        }
    }
}
