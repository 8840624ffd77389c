//! Facts about SQL expressions, from PostgreSQL's parser: the functions they call and the
//! columns they reference.

use pg_query::{NodeEnum, NodeRef};

use super::parse::ParseError;

fn parse_expression(expr: &str) -> Result<pg_query::ParseResult, ParseError> {
    pg_query::parse(&format!("SELECT ({expr})"), pg_query::ParserOptions::DEFAULT)
        .map_err(|e| ParseError::Layout(format!("cannot parse expression {expr:?}: {e}")))
}

/// Functions the expression calls, as (schema, name).
pub fn functions(expr: &str) -> Result<Vec<(Option<String>, String)>, ParseError> {
    let parsed = parse_expression(expr)?;
    let mut out = Vec::new();
    for (node, ..) in parsed.protobuf.nodes() {
        if let NodeRef::FuncCall(f) = node {
            let parts: Vec<String> = f
                .funcname
                .iter()
                .filter_map(|n| match n.node.as_ref() {
                    Some(NodeEnum::String(s)) => Some(s.sval.clone()),
                    _ => None,
                })
                .collect();
            match parts.as_slice() {
                [name] => out.push((None, name.clone())),
                [schema, name] => out.push((Some(schema.clone()), name.clone())),
                _ => {}
            }
        }
    }
    Ok(out)
}

/// Column names the expression references (the last part of each column reference), in no
/// particular order.
pub fn column_refs(expr: &str) -> Result<Vec<String>, ParseError> {
    let parsed = parse_expression(expr)?;
    let mut out = Vec::new();
    for (node, ..) in parsed.protobuf.nodes() {
        if let NodeRef::ColumnRef(c) = node
            && let Some(NodeEnum::String(s)) = c.fields.last().and_then(|n| n.node.as_ref())
            && !out.contains(&s.sval)
        {
            out.push(s.sval.clone());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_functions_and_columns() {
        let f = functions("coalesce(a, 0) + pg_catalog.length(b) * random()").unwrap();
        assert!(f.contains(&(None, "random".into())));
        assert!(f.contains(&(Some("pg_catalog".into()), "length".into())));
        let mut c = column_refs("t.a::bigint + \"B\" * 2 + length(c)").unwrap();
        c.sort();
        assert_eq!(c, ["B", "a", "c"]);
    }
}
