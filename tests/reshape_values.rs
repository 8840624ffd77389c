//! The cast-back of a prepared statement whose column type changed (proxy/reshape.rs), over
//! arbitrary values of every pair of types it handles, read by a real server in text and in
//! binary: each value the client's old type can hold arrives as that type would hold it,
//! each one it cannot fails that query alone with 22003, and a value whose type only
//! changed its length arrives exactly as a direct read gives it. The oracle is Rust's own
//! arithmetic and the values as generated, not the server.

mod common;

use common::TestDb;
use ghostwire::proxy::reshape::{Reshape, reshape};
use ghostwire_proto::Field;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::{Client, SimpleQueryMessage};

/// A value as the server sent it, in binary.
struct Raw(Vec<u8>);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Raw, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw.to_vec()))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// What the client, told the old type, must read for one value.
#[derive(Debug, Clone, PartialEq)]
enum Expected {
    Int(i64),
    Float4(f32),
    Float8(f64),
    /// The text as generated (text and binary are the same bytes).
    Text(String),
    /// As a direct read of the new column gives it (a numeric of another typmod).
    Direct,
    Null,
    OutOfRange,
}

fn sample<T: std::fmt::Debug>(strategy: impl Strategy<Value = T>, n: usize) -> Vec<T> {
    let mut runner = TestRunner::default();
    (0..n).map(|_| strategy.new_tree(&mut runner).expect("a value").current()).collect()
}

fn ints(bounds: &[i64], range: std::ops::RangeInclusive<i64>) -> Vec<i64> {
    let mut v: Vec<i64> = bounds.iter().flat_map(|&b| [b - 1, b, b + 1]).filter(|b| range.contains(b)).collect();
    v.extend(sample(range, 120));
    v
}

fn float_text(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "Infinity".into() } else { "-Infinity".into() }
    } else {
        format!("{v:?}")
    }
}

fn int_expected(v: i64, old_max: i64) -> Expected {
    if (-old_max - 1..=old_max).contains(&v) { Expected::Int(v) } else { Expected::OutOfRange }
}

fn float4_expected(v: f64) -> Expected {
    let r = v as f32;
    if (r.is_infinite() && !v.is_infinite()) || (r == 0.0 && v != 0.0) {
        Expected::OutOfRange
    } else {
        Expected::Float4(r)
    }
}

struct Case {
    old: &'static str,
    new: &'static str,
    /// Values of the new type, as text (None: NULL), and what the old type reads of each.
    values: Vec<(Option<String>, Expected)>,
}

fn cases() -> Vec<Case> {
    let (i2, i4) = (i64::from(i16::MAX), i64::from(i32::MAX));
    let int_case = |old: &'static str, new: &'static str, old_max: i64, new_range: std::ops::RangeInclusive<i64>| {
        let values = ints(&[0, i2, -i2 - 1, i4, -i4 - 1, i64::MAX - 1, i64::MIN + 1], new_range)
            .into_iter()
            .map(|v| (Some(v.to_string()), int_expected(v, old_max)))
            .collect();
        Case { old, new, values }
    };
    let mut floats: Vec<f64> =
        vec![0.0, -0.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e-40, 1e-50, 3.5e38, 3.4e38];
    floats.extend([f64::from(f32::MAX), f64::from(f32::MIN_POSITIVE), 5e-324, f64::MAX, 0.1, 1.0 / 3.0]);
    floats.extend(sample(any::<f64>(), 60));
    floats.extend(sample(-1e40f64..1e40, 60));
    let f4s: Vec<f32> =
        sample(any::<f32>(), 100).into_iter().chain([f32::MAX, f32::MIN_POSITIVE, 1e-45, 0.1]).collect();
    let texts: Vec<String> =
        sample("[^\\u{0}]{0,12}", 100).into_iter().chain(["".into(), "ab  ".into(), " x".into()]).collect();
    let numerics: Vec<String> = sample((-99_999_999i64..99_999_999, 0u32..6), 100)
        .into_iter()
        .map(|(m, s)| {
            let d = 10f64.powi(s as i32);
            format!("{:.*}", s as usize, m as f64 / d)
        })
        .collect();
    let null = |mut c: Case| {
        c.values.push((None, Expected::Null));
        c
    };
    vec![
        int_case("int2", "int4", i2, i64::from(i32::MIN)..=i4),
        int_case("int2", "int8", i2, i64::MIN..=i64::MAX),
        int_case("int4", "int8", i4, i64::MIN..=i64::MAX),
        int_case("int8", "int4", i64::MAX, i64::from(i32::MIN)..=i4),
        int_case("int4", "int2", i4, -i2 - 1..=i2),
        Case {
            old: "float4",
            new: "float8",
            values: floats.iter().map(|&v| (Some(float_text(v)), float4_expected(v))).collect(),
        },
        Case {
            old: "float8",
            new: "float4",
            values: f4s.iter().map(|&v| (Some(float_text(f64::from(v))), Expected::Float8(f64::from(v)))).collect(),
        },
        Case {
            old: "numeric(8,2)",
            new: "numeric",
            values: numerics.iter().map(|v| (Some(v.clone()), Expected::Direct)).collect(),
        },
        Case {
            old: "numeric",
            new: "numeric(14,3)",
            values: numerics.iter().map(|v| (Some(v.clone()), Expected::Direct)).collect(),
        },
        Case {
            old: "varchar(5)",
            new: "text",
            values: texts.iter().map(|v| (Some(v.clone()), Expected::Text(v.clone()))).collect(),
        },
        Case {
            old: "text",
            new: "varchar(20)",
            values: texts.iter().map(|v| (Some(v.clone()), Expected::Text(v.clone()))).collect(),
        },
        Case {
            old: "char(4)",
            new: "text",
            values: texts.iter().map(|v| (Some(v.clone()), Expected::Text(v.clone()))).collect(),
        },
        Case {
            old: "varchar(3)",
            new: "varchar(30)",
            values: texts.iter().map(|v| (Some(v.clone()), Expected::Text(v.clone()))).collect(),
        },
    ]
    .into_iter()
    .map(null)
    .collect()
}

/// The column `v` of `table` as a RowDescription names it.
async fn field(c: &Client, table: &str) -> Field {
    let row = c
        .query_one(
            "SELECT a.attrelid::oid, a.attnum, a.atttypid::oid, a.atttypmod FROM pg_attribute a
             WHERE a.attrelid = $1::text::regclass AND a.attname = 'v'",
            &[&table],
        )
        .await
        .unwrap();
    Field {
        name: "v".into(),
        table_oid: row.get(0),
        attnum: row.get(1),
        type_oid: row.get(2),
        type_len: -1,
        typmod: row.get(3),
        format: 0,
    }
}

fn rewrite(query: &str, old: &Field, new: &Field) -> String {
    match reshape(query, std::slice::from_ref(old), std::slice::from_ref(new)) {
        Ok(Reshape::Rewrite(sql)) => sql,
        other => panic!("{query}: expected a rewrite, got {other:?}"),
    }
}

fn check_binary(case: &Case, value: &Option<String>, expected: &Expected, direct: &Option<Vec<u8>>, got: Option<Raw>) {
    let what = format!("{} <- {} binary, value {value:?}", case.old, case.new);
    let bytes = got.map(|r| r.0);
    match expected {
        Expected::Null => assert_eq!(bytes, None, "{what}"),
        Expected::Direct => assert_eq!(&bytes, direct, "{what}"),
        Expected::Text(t) => assert_eq!(bytes.as_deref(), Some(t.as_bytes()), "{what}"),
        Expected::Int(v) => {
            let b = bytes.unwrap_or_else(|| panic!("{what}: NULL"));
            let read = match case.old {
                "int2" => i64::from(i16::from_be_bytes(b[..].try_into().expect("int2"))),
                "int4" => i64::from(i32::from_be_bytes(b[..].try_into().expect("int4"))),
                _ => i64::from_be_bytes(b[..].try_into().expect("int8")),
            };
            assert_eq!(read, *v, "{what}");
        }
        Expected::Float4(v) => {
            let b = bytes.unwrap_or_else(|| panic!("{what}: NULL"));
            let read = f32::from_be_bytes(b[..].try_into().expect("float4"));
            assert!(read.to_bits() == v.to_bits() || (read.is_nan() && v.is_nan()), "{what}: read {read:?}, not {v:?}");
        }
        Expected::Float8(v) => {
            let b = bytes.unwrap_or_else(|| panic!("{what}: NULL"));
            let read = f64::from_be_bytes(b[..].try_into().expect("float8"));
            assert!(read.to_bits() == v.to_bits() || (read.is_nan() && v.is_nan()), "{what}: read {read:?}, not {v:?}");
        }
        Expected::OutOfRange => unreachable!("checked by the caller"),
    }
}

fn check_text(case: &Case, value: &Option<String>, expected: &Expected, direct: &Option<String>, got: Option<&str>) {
    let what = format!("{} <- {} text, value {value:?}", case.old, case.new);
    match expected {
        Expected::Null => assert_eq!(got, None, "{what}"),
        Expected::Direct => assert_eq!(got, direct.as_deref(), "{what}"),
        Expected::Text(t) => assert_eq!(got, Some(t.as_str()), "{what}"),
        Expected::Int(v) => assert_eq!(got.and_then(|g| g.parse::<i64>().ok()), Some(*v), "{what}: {got:?}"),
        Expected::Float4(v) => {
            let read: f32 = got.and_then(|g| g.parse().ok()).unwrap_or_else(|| panic!("{what}: {got:?}"));
            assert!(read.to_bits() == v.to_bits() || (read.is_nan() && v.is_nan()), "{what}: read {got:?}, not {v:?}");
        }
        Expected::Float8(v) => {
            let read: f64 = got.and_then(|g| g.parse().ok()).unwrap_or_else(|| panic!("{what}: {got:?}"));
            assert!(read.to_bits() == v.to_bits() || (read.is_nan() && v.is_nan()), "{what}: read {got:?}, not {v:?}");
        }
        Expected::OutOfRange => unreachable!("checked by the caller"),
    }
}

/// The one value of a simple query's one row.
fn text_value(messages: Vec<SimpleQueryMessage>) -> Option<String> {
    let mut rows = messages.into_iter().filter_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_owned)),
        _ => None,
    });
    rows.next().expect("a row")
}

#[tokio::test]
async fn every_pair_of_types_casts_back_in_text_and_binary() {
    let db = TestDb::new().await;
    let c = db.connect().await;
    let mut checked = 0;
    for (n, case) in cases().iter().enumerate() {
        let table = format!("reshape_{n}");
        c.batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY, v {})", case.old)).await.unwrap();
        let old = field(&c, &table).await;
        c.batch_execute(&format!("ALTER TABLE {table} ALTER COLUMN v TYPE {}", case.new)).await.unwrap();
        let new = field(&c, &table).await;
        let values: Vec<Option<String>> = case.values.iter().map(|(v, _)| v.clone()).collect();
        c.execute(
            &format!(
                "INSERT INTO {table} SELECT i, v::{} FROM unnest($1::text[]) WITH ORDINALITY AS u(v, i)",
                case.new
            ),
            &[&values],
        )
        .await
        .unwrap_or_else(|e| panic!("{}: inserting {values:?}: {e}", case.new));
        let binary = c.prepare(&rewrite(&format!("SELECT v FROM {table} WHERE id = $1"), &old, &new)).await.unwrap();
        for (i, (value, expected)) in case.values.iter().enumerate() {
            let id = i as i64 + 1;
            let direct_row = c.query_one(&format!("SELECT v FROM {table} WHERE id = $1::int8::int4"), &[&id]).await;
            let direct: Option<Vec<u8>> = direct_row.unwrap().get::<_, Option<Raw>>(0).map(|r| r.0);
            let direct_text =
                text_value(c.simple_query(&format!("SELECT v FROM {table} WHERE id = {id}")).await.unwrap());
            let got = c.query_one(&binary, &[&(id as i32)]).await;
            let text_sql = rewrite(&format!("SELECT v FROM {table} WHERE id = {id}"), &old, &new);
            let got_text = c.simple_query(&text_sql).await;
            if *expected == Expected::OutOfRange {
                for err in [got.err(), got_text.err()] {
                    let err = err.unwrap_or_else(|| panic!("{} <- {}: {value:?} fits?", case.old, case.new));
                    assert_eq!(err.code().map(|c| c.code()), Some("22003"), "{value:?}: {err:?}");
                }
                continue;
            }
            let row = got.unwrap_or_else(|e| panic!("{} <- {}, {value:?}: {e:?}", case.old, case.new));
            check_binary(case, value, expected, &direct, row.get(0));
            let text_row = text_value(got_text.unwrap());
            check_text(case, value, expected, &direct_text, text_row.as_deref());
            checked += 1;
        }
    }
    assert!(checked > 1000, "{checked} values checked");
}
