//! `CREATE [UNIQUE] INDEX`, `DROP INDEX` and `REINDEX INDEX`, parsed into one subcommand
//! each. ghostwire runs them concurrently whatever the user wrote; the statement it runs
//! keeps the user's text from `ON` on, with `CONCURRENTLY` and the index's name put in.
//!
//! Also here: the names PostgreSQL gives an unnamed index or constraint (its
//! `ChooseIndexColumnNames`, `ChooseIndexNameAddition` and `makeObjectName`, in
//! `src/backend/commands/indexcmds.c` and `src/backend/commands/define.c`), so that a build
//! ghostwire runs under an explicit name ends up named as the plain statement would be.

use std::ops::Range;

use pg_query::NodeEnum;
use pg_query::protobuf::{DropBehavior, MinMaxOp, ReindexObjectType, Token};
use serde::Serialize;
use tokio_postgres::Client;

use super::parse::{Action, ParseError, ParsedStatement, Subcommand, TableRef, Tok};
use crate::sql::{QualifiedName, ident};

/// PostgreSQL's NAMEDATALEN: identifiers are at most 63 bytes.
const NAMEDATALEN: usize = 64;

/// `CREATE [UNIQUE] INDEX [CONCURRENTLY] [IF NOT EXISTS] [name] ON …`.
pub(super) fn create(
    text: String,
    tokens: &[Tok],
    stmt: &pg_query::protobuf::IndexStmt,
) -> Result<ParsedStatement, ParseError> {
    let rel = stmt.relation.as_ref().ok_or_else(|| ParseError::Layout("CREATE INDEX without a table".into()))?;
    let (table, _) = super::parse::table_ref(tokens, rel, false)?;
    // The body is everything from `ON` (the first at the top level) to the end.
    let on =
        tokens.iter().find(|t| t.is(Token::On)).ok_or_else(|| ParseError::Layout("no ON in CREATE INDEX".into()))?;
    let mut columns = index_column_names(&stmt.index_params);
    columns.extend(index_column_names(&stmt.index_including_params));
    let action = Action::CreateIndex {
        name: (!stmt.idxname.is_empty()).then(|| stmt.idxname.clone()),
        unique: stmt.unique,
        if_not_exists: stmt.if_not_exists,
        columns: dedupe_column_names(columns),
        body: on.start..text.len(),
    };
    let span = 0..text.len();
    Ok(ParsedStatement { text, table, subcommands: vec![Subcommand { span, action }] })
}

/// `DROP INDEX [CONCURRENTLY] [IF EXISTS] name`: one index, no CASCADE (a concurrent drop
/// cannot cascade).
pub(super) fn drop(text: String, stmt: &pg_query::protobuf::DropStmt) -> Result<ParsedStatement, ParseError> {
    if stmt.objects.len() != 1 {
        return Err(ParseError::Index(format!(
            "{} indexes in one DROP INDEX: ghostwire drops one index per statement (each concurrently)",
            stmt.objects.len()
        )));
    }
    if stmt.behavior == DropBehavior::DropCascade as i32 {
        return Err(ParseError::Index(
            "DROP INDEX … CASCADE: a concurrent drop cannot cascade; drop what depends on the index first".into(),
        ));
    }
    let names = match stmt.objects[0].node.as_ref() {
        Some(NodeEnum::List(l)) => super::parse::string_list(&l.items),
        _ => Vec::new(),
    };
    let (schema, name) = match names.as_slice() {
        [name] => (None, name.clone()),
        [schema, name] => (Some(schema.clone()), name.clone()),
        _ => return Err(ParseError::Layout("an index name with more than two parts".into())),
    };
    let action = Action::DropIndex { schema, name, if_exists: stmt.missing_ok };
    Ok(one_index(text, action))
}

/// `REINDEX INDEX [CONCURRENTLY] name`.
pub(super) fn reindex(text: String, stmt: &pg_query::protobuf::ReindexStmt) -> Result<ParsedStatement, ParseError> {
    if stmt.kind != ReindexObjectType::ReindexObjectIndex as i32 {
        return Err(ParseError::Index(
            "only REINDEX INDEX is run by ghostwire (one index, concurrently); list the table's indexes with \
             `ghostwire indexes TABLE` and reindex them one by one"
                .into(),
        ));
    }
    let rel = stmt.relation.as_ref().ok_or_else(|| ParseError::Layout("REINDEX without an index".into()))?;
    let schema = (!rel.schemaname.is_empty()).then(|| rel.schemaname.clone());
    let action = Action::Reindex { schema, name: rel.relname.clone() };
    Ok(one_index(text, action))
}

/// A statement naming an index, not its table: the plan finds the table.
fn one_index(text: String, action: Action) -> ParsedStatement {
    let table = TableRef { schema: None, name: String::new(), span: 0..0, only: false, if_exists: false };
    let span = 0..text.len();
    ParsedStatement { text, table, subcommands: vec![Subcommand { span, action }] }
}

/// The statement ghostwire runs for a `CREATE INDEX` whose body (from `ON`) is `body` in
/// `text`: concurrently, under the name `name`.
pub fn create_concurrently(text: &str, unique: bool, name: &str, body: &Range<usize>) -> String {
    let unique = if unique { "UNIQUE " } else { "" };
    format!("CREATE {unique}INDEX CONCURRENTLY {} {}", ident(name), &text[body.clone()])
}

/// The index of a UNIQUE or PRIMARY KEY constraint, built concurrently before the constraint
/// is attached to it `USING INDEX` (which makes the same index the plain statement would).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConstraintIndex {
    pub primary: bool,
    pub keys: Vec<String>,
    pub include: Vec<String>,
    /// Storage parameters, `name = value`, as written.
    pub options: Vec<String>,
    pub nulls_not_distinct: bool,
    pub tablespace: Option<String>,
    pub deferrable: bool,
    pub initially_deferred: bool,
}

impl ConstraintIndex {
    pub(super) fn of(c: &pg_query::protobuf::Constraint, primary: bool) -> ConstraintIndex {
        let options = c
            .options
            .iter()
            .filter_map(|o| match o.node.as_ref() {
                Some(NodeEnum::DefElem(d)) => Some(format!("{} = {}", d.defname, def_value(d.arg.as_deref()))),
                _ => None,
            })
            .collect();
        ConstraintIndex {
            primary,
            keys: super::parse::string_list(&c.keys),
            include: super::parse::string_list(&c.including),
            options,
            nulls_not_distinct: c.nulls_not_distinct,
            tablespace: (!c.indexspace.is_empty()).then(|| c.indexspace.clone()),
            deferrable: c.deferrable,
            initially_deferred: c.initdeferred,
        }
    }

    /// The name PostgreSQL gives the constraint (and its index) when the user gave none.
    pub async fn default_name(&self, client: &Client, table: &QualifiedName) -> Result<String, tokio_postgres::Error> {
        if self.primary {
            return choose_relation_name(client, &table.schema, &table.name, None, "pkey", true).await;
        }
        let mut columns = self.keys.clone();
        columns.extend(self.include.iter().cloned());
        let addition = name_addition(&dedupe_column_names(columns));
        choose_relation_name(client, &table.schema, &table.name, Some(&addition), "key", true).await
    }

    /// `CREATE UNIQUE INDEX CONCURRENTLY name ON table …`.
    pub fn create_sql(&self, table: &QualifiedName, name: &str) -> String {
        let list = |cols: &[String]| cols.iter().map(|c| ident(c)).collect::<Vec<_>>().join(", ");
        let mut sql = format!(
            "CREATE UNIQUE INDEX CONCURRENTLY {} ON {} USING btree ({})",
            ident(name),
            table.sql(),
            list(&self.keys)
        );
        if !self.include.is_empty() {
            sql.push_str(&format!(" INCLUDE ({})", list(&self.include)));
        }
        if self.nulls_not_distinct {
            sql.push_str(" NULLS NOT DISTINCT");
        }
        if !self.options.is_empty() {
            sql.push_str(&format!(" WITH ({})", self.options.join(", ")));
        }
        if let Some(ts) = &self.tablespace {
            sql.push_str(&format!(" TABLESPACE {}", ident(ts)));
        }
        sql
    }

    /// `ADD CONSTRAINT name UNIQUE|PRIMARY KEY USING INDEX name …` (the index keeps its name).
    pub fn attach_sql(&self, name: &str) -> String {
        let kind = if self.primary { "PRIMARY KEY" } else { "UNIQUE" };
        let mut sql = format!("ADD CONSTRAINT {} {kind} USING INDEX {}", ident(name), ident(name));
        if self.deferrable {
            sql.push_str(" DEFERRABLE");
        }
        if self.initially_deferred {
            sql.push_str(" INITIALLY DEFERRED");
        }
        sql
    }
}

/// A storage parameter's value as SQL.
fn def_value(arg: Option<&pg_query::protobuf::Node>) -> String {
    match arg.and_then(|a| a.node.as_ref()) {
        Some(NodeEnum::Integer(i)) => i.ival.to_string(),
        Some(NodeEnum::Float(f)) => f.fval.clone(),
        Some(NodeEnum::Boolean(b)) => b.boolval.to_string(),
        Some(NodeEnum::String(s)) => crate::sql::literal(&s.sval),
        _ => "true".into(),
    }
}

/// The name of each index column as `ChooseIndexColumnNames` sees it: a column's name, an
/// expression's figured name (a function's name, a cast's column), else `expr`.
fn index_column_names(params: &[pg_query::protobuf::Node]) -> Vec<String> {
    params
        .iter()
        .map(|p| match p.node.as_ref() {
            Some(NodeEnum::IndexElem(e)) if !e.indexcolname.is_empty() => e.indexcolname.clone(),
            Some(NodeEnum::IndexElem(e)) if !e.name.is_empty() => e.name.clone(),
            Some(NodeEnum::IndexElem(e)) => {
                e.expr.as_ref().and_then(|x| figure_name(x.node.as_ref()?)).unwrap_or_else(|| "expr".into())
            }
            _ => "expr".into(),
        })
        .collect()
}

/// What `FigureIndexColname` gives an index expression, for the common forms.
fn figure_name(node: &NodeEnum) -> Option<String> {
    match node {
        NodeEnum::ColumnRef(c) => c.fields.iter().rev().find_map(|f| match f.node.as_ref() {
            Some(NodeEnum::String(s)) => Some(s.sval.clone()),
            _ => None,
        }),
        NodeEnum::FuncCall(f) => super::parse::string_list(&f.funcname).pop(),
        NodeEnum::TypeCast(t) => t
            .arg
            .as_ref()
            .and_then(|a| figure_name(a.node.as_ref()?))
            .or_else(|| t.type_name.as_ref().and_then(|n| super::parse::string_list(&n.names).pop())),
        NodeEnum::CoalesceExpr(_) => Some("coalesce".into()),
        NodeEnum::MinMaxExpr(m) => Some(if m.op == MinMaxOp::IsGreatest as i32 { "greatest" } else { "least" }.into()),
        NodeEnum::CaseExpr(_) => Some("case".into()),
        _ => None,
    }
}

/// `ChooseIndexColumnNames`' de-duplication: a repeated name gets `1`, `2`, … appended,
/// clipped to fit in an identifier.
fn dedupe_column_names(names: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for name in names {
        let mut current = name.clone();
        let mut i = 1;
        while out.contains(&current) {
            let suffix = i.to_string();
            current = format!("{}{suffix}", clip(&name, NAMEDATALEN - 1 - suffix.len()));
            i += 1;
        }
        out.push(current);
    }
    out
}

/// `ChooseIndexNameAddition`: the column names joined by `_`, stopping once the result
/// would not fit an identifier anyway.
pub fn name_addition(columns: &[String]) -> String {
    let mut buf = String::new();
    for name in columns {
        if !buf.is_empty() {
            buf.push('_');
        }
        buf.push_str(clip(name, NAMEDATALEN - 1));
        if buf.len() >= NAMEDATALEN {
            break;
        }
    }
    buf
}

/// The longest prefix of `s` of at most `bytes` bytes that ends on a character boundary.
fn clip(s: &str, bytes: usize) -> &str {
    if s.len() <= bytes {
        return s;
    }
    let mut end = bytes;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `makeObjectName`: `name1_name2_label`, the longer of `name1` and `name2` shortened first
/// so that the whole fits in an identifier.
pub fn make_object_name(name1: &str, name2: Option<&str>, label: &str) -> String {
    let mut overhead = label.len() + 1;
    if name2.is_some() {
        overhead += 1;
    }
    let avail = (NAMEDATALEN - 1).saturating_sub(overhead);
    let (mut n1, mut n2) = (name1.len(), name2.map_or(0, str::len));
    while n1 + n2 > avail {
        if n1 > n2 { n1 -= 1 } else { n2 -= 1 }
    }
    let mut name = clip(name1, n1).to_owned();
    if let Some(n) = name2 {
        name.push('_');
        name.push_str(clip(n, n2));
    }
    name.push('_');
    name.push_str(label);
    name
}

/// `ChooseRelationName`: `make_object_name` with `label`, then `label1`, `label2`, … until no
/// relation of `schema` (and, for a constraint's index, no constraint there) has the name.
pub async fn choose_relation_name(
    client: &Client,
    schema: &str,
    name1: &str,
    name2: Option<&str>,
    label: &str,
    constraint: bool,
) -> Result<String, tokio_postgres::Error> {
    let mut pass = 0;
    loop {
        let modlabel = if pass == 0 { label.to_owned() } else { format!("{label}{pass}") };
        let name = make_object_name(name1, name2, &modlabel);
        let taken: bool = client
            .query_one(
                "SELECT EXISTS (SELECT FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                                 WHERE n.nspname = $1 AND c.relname = $2)
                     OR ($3 AND EXISTS (SELECT FROM pg_catalog.pg_constraint c
                                          JOIN pg_catalog.pg_namespace n ON n.oid = c.connamespace
                                         WHERE n.nspname = $1 AND c.conname = $2))",
                &[&schema, &name, &constraint],
            )
            .await?
            .get(0);
        if !taken {
            return Ok(name);
        }
        pass += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_are_shortened_as_postgresql_does() {
        assert_eq!(make_object_name("items", Some("note"), "idx"), "items_note_idx");
        assert_eq!(make_object_name("items", None, "pkey"), "items_pkey");
        let long = "a".repeat(60);
        let name = make_object_name(&long, Some("bb"), "key");
        assert_eq!(name.len(), 63);
        assert!(name.ends_with("_bb_key"), "{name}");
        assert_eq!(name_addition(&["a".into(), "b".into()]), "a_b");
        assert_eq!(dedupe_column_names(vec!["expr".into(), "expr".into(), "x".into()]), ["expr", "expr1", "x"]);
        // A multi-byte name is cut on a character boundary.
        let name = make_object_name(&"é".repeat(40), None, "idx");
        assert!(name.len() <= 63 && name.ends_with("_idx"), "{name}");
    }

    #[test]
    fn a_create_index_runs_concurrently_under_its_name() {
        let p = super::super::parse::parse("create unique index on \"Sales\".items (lower(note), id) where id > 0;")
            .unwrap();
        let Action::CreateIndex { name, unique, columns, body, .. } = &p.subcommands[0].action else { panic!() };
        assert_eq!((name, *unique), (&None, true));
        assert_eq!(columns, &["lower", "id"]);
        assert_eq!(
            create_concurrently(&p.text, true, "items_lower_id_idx", body),
            "CREATE UNIQUE INDEX CONCURRENTLY \"items_lower_id_idx\" on \"Sales\".items (lower(note), id) where id > 0"
        );
        assert!(matches!(
            super::super::parse::parse("DROP INDEX a, b"),
            Err(ParseError::Index(m)) if m.contains("one index per statement")
        ));
        assert!(matches!(
            super::super::parse::parse("REINDEX TABLE items"),
            Err(ParseError::Index(m)) if m.contains("only REINDEX INDEX")
        ));
        let p = super::super::parse::parse("DROP INDEX CONCURRENTLY IF EXISTS s.i").unwrap();
        assert_eq!(
            p.subcommands[0].action,
            Action::DropIndex { schema: Some("s".into()), name: "i".into(), if_exists: true }
        );
    }
}
