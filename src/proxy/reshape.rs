//! Keeping a prepared statement's result shape when its table changed under it (a swap, an
//! instant ADD or DROP COLUMN): the statement is prepared again as a query that returns the
//! shape the client was told, computed by the server from the new one: a widened column
//! cast back (PostgreSQL itself raises 22003 for a value the old type cannot hold, and the
//! whole statement fails atomically, a write included), a dropped column as NULL, an added
//! one left out. Types that are not widenings of each other are incompatible: the client
//! gets the server's error, as it would without the proxy. Pure functions, no I/O.

use ghostwire_proto::Field;

/// Builtin type OIDs.
const INT2: u32 = 21;
const INT4: u32 = 23;
const INT8: u32 = 20;
const FLOAT4: u32 = 700;
const FLOAT8: u32 = 701;
const NUMERIC: u32 = 1700;
const TEXT: u32 = 25;
const VARCHAR: u32 = 1043;
const BPCHAR: u32 = 1042;

/// How a prepared statement can go on after its result changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reshape {
    /// The client's shape and the new one are the same: prepare the original text again.
    Same,
    /// A query that returns the client's shape.
    Rewrite(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Incompatible {
    #[error("column {column} changed from type {old} to {new}, which is not a widening ghostwire can cast back")]
    Type { column: String, old: u32, new: u32 },
    #[error("the statement returns rows where it did not, or no longer does")]
    NoRows,
}

/// The SQL name of a type the cast-back uses (None for others: only the same type passes).
fn type_name(oid: u32) -> Option<&'static str> {
    Some(match oid {
        INT2 => "pg_catalog.int2",
        INT4 => "pg_catalog.int4",
        INT8 => "pg_catalog.int8",
        FLOAT4 => "pg_catalog.float4",
        FLOAT8 => "pg_catalog.float8",
        NUMERIC => "pg_catalog.numeric",
        TEXT => "pg_catalog.text",
        VARCHAR => "pg_catalog.varchar",
        BPCHAR => "pg_catalog.bpchar",
        _ => return None,
    })
}

fn family(oid: u32) -> Option<u8> {
    match oid {
        INT2 | INT4 | INT8 => Some(0),
        FLOAT4 | FLOAT8 => Some(1),
        NUMERIC => Some(2),
        TEXT | VARCHAR | BPCHAR => Some(3),
        _ => None,
    }
}

/// What the client gets in place of an old column from the new one.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    /// The new column as it is (the same type; or numeric, text-like of another length:
    /// the value is the same, only the declared length differs).
    As(usize),
    /// The new column cast to the old type (without its length: a value is never cut).
    Cast(usize, &'static str),
    /// NULL (the column is gone).
    Null,
}

fn source(old: &Field, new: &Field, index: usize) -> Result<Source, Incompatible> {
    if old.type_oid == new.type_oid {
        return Ok(Source::As(index));
    }
    // A column that became char(n) reads padded to its length; cast back, it would lose the
    // padding a fresh statement shows.
    let padded = new.type_oid == BPCHAR;
    match (family(old.type_oid), family(new.type_oid), type_name(old.type_oid)) {
        (Some(a), Some(b), Some(name)) if a == b && !padded => Ok(Source::Cast(index, name)),
        _ => Err(Incompatible::Type { column: old.name.clone(), old: old.type_oid, new: new.type_oid }),
    }
}

/// Pairs each old column with the new one it became: the same table column (a rename in
/// place keeps it), else the first unused new column of the same name.
fn pair(old: &[Field], new: &[Field]) -> Vec<Option<usize>> {
    let mut used = vec![false; new.len()];
    let mut out = Vec::with_capacity(old.len());
    for o in old {
        let same_column = new.iter().enumerate().position(|(i, n)| {
            !used[i] && o.table_oid != 0 && n.table_oid == o.table_oid && n.attnum == o.attnum && o.attnum > 0
        });
        let found = same_column.or_else(|| new.iter().enumerate().position(|(i, n)| !used[i] && n.name == o.name));
        if let Some(i) = found {
            used[i] = true;
        }
        out.push(found);
    }
    out
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// How `query`, whose result was `old` when the client described it and is `new` now, can be
/// prepared again so that the client gets what it expects.
pub fn reshape(query: &str, old: &[Field], new: &[Field]) -> Result<Reshape, Incompatible> {
    if new.is_empty() != old.is_empty() {
        return Err(Incompatible::NoRows);
    }
    let pairs = pair(old, new);
    let sources: Vec<Source> = old
        .iter()
        .zip(&pairs)
        .map(|(o, p)| match p {
            Some(i) => source(o, &new[*i], *i),
            None => Ok(Source::Null),
        })
        .collect::<Result<_, _>>()?;
    let unchanged = old.len() == new.len()
        && sources.iter().enumerate().all(|(i, s)| *s == Source::As(i))
        && old.iter().zip(new).all(|(o, n)| o.name == n.name && o.typmod == n.typmod);
    if unchanged {
        return Ok(Reshape::Same);
    }
    let body = query.trim_end_matches(|c: char| c == ';' || c.is_whitespace());
    let aliases: Vec<String> = (1..=new.len()).map(|i| format!("c{i}")).collect();
    let columns: Vec<String> = old
        .iter()
        .zip(&sources)
        .map(|(o, s)| match s {
            Source::As(i) => format!("c{} AS {}", i + 1, quote(&o.name)),
            Source::Cast(i, t) => format!("c{}::{t} AS {}", i + 1, quote(&o.name)),
            Source::Null => match type_name(o.type_oid) {
                Some(t) => format!("NULL::{t} AS {}", quote(&o.name)),
                None => format!("NULL AS {}", quote(&o.name)),
            },
        })
        .collect();
    Ok(Reshape::Rewrite(format!(
        "WITH ghostwire_reshaped({}) AS (\n{body}\n) SELECT {} FROM ghostwire_reshaped",
        aliases.join(", "),
        columns.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(name: &str, type_oid: u32, typmod: i32, attnum: i16) -> Field {
        Field { name: name.into(), table_oid: 16384, attnum, type_oid, type_len: -1, typmod, format: 0 }
    }

    #[test]
    fn same_shape_needs_no_rewrite() {
        let old = [field("id", INT4, -1, 1), field("note", TEXT, -1, 2)];
        assert_eq!(reshape("SELECT * FROM t", &old, &old), Ok(Reshape::Same));
    }

    #[test]
    fn widened_dropped_and_added_columns() {
        let old = [field("id", INT4, -1, 1), field("note", VARCHAR, 14, 2), field("gone", 3802, -1, 3)];
        // After a swap: a new table oid, new attnums, id widened, note now text, a new column.
        let new = [
            Field { table_oid: 99999, ..field("id", INT8, -1, 1) },
            Field { table_oid: 99999, ..field("note", TEXT, -1, 2) },
            Field { table_oid: 99999, ..field("added", INT4, -1, 4) },
        ];
        let Reshape::Rewrite(sql) = reshape("SELECT * FROM t WHERE id = $1;  ", &old, &new).unwrap() else {
            panic!("expected a rewrite")
        };
        assert_eq!(
            sql,
            "WITH ghostwire_reshaped(c1, c2, c3) AS (\nSELECT * FROM t WHERE id = $1\n) SELECT c1::pg_catalog.int4 AS \"id\", \
             c2::pg_catalog.varchar AS \"note\", NULL AS \"gone\" FROM ghostwire_reshaped"
        );
    }

    #[test]
    fn a_rename_in_place_follows_the_column() {
        let old = [field("username", TEXT, -1, 2)];
        let new = [field("email", TEXT, -1, 2)];
        let Reshape::Rewrite(sql) = reshape("SELECT username FROM u", &old, &new).unwrap() else { panic!() };
        assert!(sql.ends_with("SELECT c1 AS \"username\" FROM ghostwire_reshaped"), "{sql}");
    }

    #[test]
    fn unrelated_types_are_incompatible() {
        let old = [field("v", INT4, -1, 1)];
        assert!(matches!(reshape("SELECT v FROM t", &old, &[field("v", TEXT, -1, 1)]), Err(Incompatible::Type { .. })));
        assert!(matches!(reshape("SELECT v FROM t", &old, &[field("v", 3802, -1, 1)]), Err(Incompatible::Type { .. })));
        assert_eq!(reshape("UPDATE t SET v = 1", &old, &[]), Err(Incompatible::NoRows));
        let text = [field("v", TEXT, -1, 1)];
        assert!(matches!(
            reshape("SELECT v FROM t", &text, &[field("v", BPCHAR, 14, 1)]),
            Err(Incompatible::Type { .. })
        ));
        assert!(matches!(reshape("SELECT v FROM t", &[field("v", BPCHAR, 14, 1)], &text), Ok(Reshape::Rewrite(_))));
    }

    const TYPES: [u32; 11] = [INT2, INT4, INT8, FLOAT4, FLOAT8, NUMERIC, TEXT, VARCHAR, BPCHAR, 16, 3802];

    fn arbitrary_field() -> impl Strategy<Value = Field> {
        (
            "[^\u{0}]{1,30}",
            prop::sample::select(&[0u32, 16384, 16390][..]),
            -2i16..6,
            prop::sample::select(&TYPES[..]),
            -1i32..40,
        )
            .prop_map(|(name, table_oid, attnum, type_oid, typmod)| Field {
                // As a server names a column: no NUL, at most NAMEDATALEN - 1 bytes.
                name: name.char_indices().take_while(|(i, c)| i + c.len_utf8() <= 63).map(|(_, c)| c).collect(),
                table_oid,
                attnum,
                type_oid,
                type_len: -1,
                typmod,
                format: 0,
            })
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Whatever the two shapes, the answer is the same text, an error, or a query the
        /// server parses whose columns are the old shape's, in order and named as they were.
        #[test]
        fn any_two_shapes(old in prop::collection::vec(arbitrary_field(), 0..6), new in prop::collection::vec(arbitrary_field(), 0..6), tail in "[ ;\n]{0,3}") {
            let query = format!("SELECT * FROM t WHERE a = $1{tail}");
            match reshape(&query, &old, &new) {
                Ok(Reshape::Same) => prop_assert_eq!(&old, &new),
                Ok(Reshape::Rewrite(sql)) => {
                    let parsed = pg_query::parse(&sql, pg_query::ParserOptions::DEFAULT).map_err(|e| TestCaseError::fail(format!("{sql}: {e}")))?;
                    let select = match parsed.protobuf.stmts[0].stmt.as_ref().and_then(|s| s.node.as_ref()) {
                        Some(pg_query::NodeEnum::SelectStmt(s)) => s.clone(),
                        other => return Err(TestCaseError::fail(format!("not a SELECT: {other:?}"))),
                    };
                    let names: Vec<String> = select.target_list.iter().filter_map(|t| match t.node.as_ref() {
                        Some(pg_query::NodeEnum::ResTarget(r)) => Some(r.name.clone()),
                        _ => None,
                    }).collect();
                    let expected: Vec<String> = old.iter().map(|f| f.name.clone()).collect();
                    prop_assert_eq!(names, expected);
                }
                Err(_) => {}
            }
        }
    }
}
