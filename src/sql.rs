//! Quoting of identifiers and literals, and schema-qualified names.
//!
//! Every identifier ghostwire writes into SQL goes through [`ident`], which always quotes:
//! a table named `"Order Items"` in schema `"Sales"` must work, and so must one named
//! `user` or `select`. Values travel as query parameters; [`literal`] exists only for the
//! few statements that cannot take parameters (DDL such as `COMMENT ON`).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Key values bound as text: `($first::text::type, …)`, one per type, in key order.
pub fn text_params<S: AsRef<str>>(first: usize, types: &[S]) -> String {
    let p: Vec<String> =
        types.iter().enumerate().map(|(i, t)| format!("${}::text::{}", first + i, t.as_ref())).collect();
    format!("({})", p.join(", "))
}

/// The columns as one text array: `ARRAY["a"::text, "b"::text]` (`prefix` before each).
pub fn text_array<S: AsRef<str>>(prefix: &str, columns: &[S]) -> String {
    let parts: Vec<String> = columns.iter().map(|c| format!("{prefix}{}::text", ident(c.as_ref()))).collect();
    format!("ARRAY[{}]", parts.join(", "))
}

/// `head` followed by each key's text values, as statement parameters.
pub fn with_keys<'a>(
    head: Vec<&'a (dyn tokio_postgres::types::ToSql + Sync)>,
    keys: &[&'a Vec<String>],
) -> Vec<&'a (dyn tokio_postgres::types::ToSql + Sync)> {
    let mut out = head;
    for k in keys {
        out.extend(k.iter().map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync)));
    }
    out
}

/// `name` as a quoted SQL identifier: `Order Items` → `"Order Items"`, `a"b` → `"a""b"`.
pub fn ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// `name` quoted only where PostgreSQL needs it, for messages and reports.
pub fn display_ident(name: &str) -> String {
    let plain = !name.is_empty()
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$')
        && !is_keyword(name);
    if plain { name.to_owned() } else { ident(name) }
}

/// Whether the parser treats `word` as a reserved (or type/function-name) keyword.
fn is_keyword(word: &str) -> bool {
    use pg_query::protobuf::KeywordKind;
    pg_query::scan_tokens(word).is_ok_and(|tokens| {
        tokens.first().is_some_and(|t| {
            t.keyword_kind == KeywordKind::ReservedKeyword as i32
                || t.keyword_kind == KeywordKind::TypeFuncNameKeyword as i32
                || t.keyword_kind == KeywordKind::ColNameKeyword as i32
        })
    })
}

/// `value` as a standard-conforming SQL string literal.
pub fn literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' {
            out.push('\'');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// A comma-separated list of quoted identifiers.
pub fn ident_list<S: AsRef<str>>(names: &[S]) -> String {
    names.iter().map(|n| ident(n.as_ref())).collect::<Vec<_>>().join(", ")
}

/// A schema-qualified relation name, as stored (unquoted).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QualifiedName {
    pub schema: String,
    pub name: String,
}

impl QualifiedName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        QualifiedName { schema: schema.into(), name: name.into() }
    }

    /// `"schema"."name"`, for SQL.
    pub fn sql(&self) -> String {
        format!("{}.{}", ident(&self.schema), ident(&self.name))
    }
}

/// Minimal quoting, for people: `public.orders`, `"Sales"."Order Items"`.
impl fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", display_ident(&self.schema), display_ident(&self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_identifiers_and_literals() {
        assert_eq!(ident("Order Items"), "\"Order Items\"");
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(QualifiedName::new("Sales", "Order Items").sql(), "\"Sales\".\"Order Items\"");
    }

    #[test]
    fn displays_with_minimal_quoting() {
        assert_eq!(display_ident("orders"), "orders");
        assert_eq!(display_ident("Orders"), "\"Orders\"");
        assert_eq!(display_ident("select"), "\"select\"");
        assert_eq!(display_ident("user"), "\"user\"");
        assert_eq!(display_ident("1abc"), "\"1abc\"");
        assert_eq!(QualifiedName::new("public", "order items").to_string(), "public.\"order items\"");
    }
}
