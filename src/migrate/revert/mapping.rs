//! The reverse mapping, derived from the spec: how a row of the new table becomes a row of
//! the old one. Columns go back by name (a renamed one to its old name), a changed type is
//! cast back, a column the migration added is left out, and a column it dropped keeps its
//! value in rows the old table already has (rows written since get its default, or NULL).

use crate::migrate::spec::Spec;
use crate::sql::ident;

/// Where one column of the old table gets its value from during a revert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Back {
    /// From the new table's column of that name, cast to the old type when it changed.
    From { new: String, cast: bool },
    /// Dropped by the migration: old rows keep their value, rows written since take the
    /// column's default (or NULL).
    Kept,
    /// The migration computed it (a USING expression): it cannot be computed back, so it is
    /// handled like a dropped column.
    Computed,
    /// A stored generated column: the old table computes it.
    Generated,
}

/// One column of the old table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub old: String,
    pub old_type: String,
    pub back: Back,
}

/// One key column: its name and type in both tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub old: String,
    pub old_type: String,
    pub new: String,
    pub new_type: String,
    pub collation: Option<String>,
    pub retyped: bool,
}

/// The whole mapping.
#[derive(Debug, Clone)]
pub struct Mapping {
    pub columns: Vec<Column>,
    pub key: Vec<Key>,
    /// Writing an identity column GENERATED ALWAYS of the old table.
    pub overriding: bool,
}

impl Mapping {
    /// The mapping of `spec`'s migration, or why a revert cannot work at all (the key
    /// itself was computed by an expression).
    pub fn of(spec: &Spec) -> Result<Mapping, String> {
        let mut key = Vec::new();
        for k in &spec.key {
            let plain =
                k.to_shadow == ident(&k.name) || k.to_shadow.starts_with(&format!("CAST({} AS ", ident(&k.name)));
            if !plain {
                return Err(format!(
                    "the key column {} was computed by an expression ({}), which cannot be computed back",
                    crate::sql::display_ident(&k.name),
                    k.to_shadow
                ));
            }
            key.push(Key {
                old: k.name.clone(),
                old_type: k.type_sql.clone(),
                new: k.shadow_name.clone(),
                new_type: k.shadow_type_sql.clone(),
                collation: k.collation.clone(),
                retyped: spec.retyped_columns.contains(&k.name),
            });
        }
        let mut columns = Vec::new();
        let mut overriding = false;
        for c in &spec.table.columns {
            let from = spec.columns.iter().find(|m| m.source.as_deref() == Some(ident(&c.name).as_str()));
            let back = if c.generated.is_some() {
                Back::Generated
            } else if let Some(m) = from {
                Back::From { new: m.shadow.clone(), cast: spec.retyped_columns.contains(&c.name) }
            } else if spec.dropped_columns.contains(&c.name) {
                Back::Kept
            } else {
                Back::Computed
            };
            if matches!(back, Back::From { .. }) && c.identity == Some(crate::catalog::IdentityKind::Always) {
                overriding = true;
            }
            columns.push(Column { old: c.name.clone(), old_type: type_sql(c), back });
        }
        Ok(Mapping { columns, key, overriding })
    }

    /// What a revert brings back and what it cannot, one line per column that is not
    /// simply copied back, then what could make it fail.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        for c in &self.columns {
            let name = crate::sql::display_ident(&c.old);
            match &c.back {
                Back::From { new, cast } if new != &c.old || *cast => {
                    let renamed = if new != &c.old { format!(" from {}", crate::sql::display_ident(new)) } else { String::new() };
                    let cast = if *cast { format!(", cast back to {}", c.old_type) } else { String::new() };
                    out.push(format!("{name}: copied back{renamed}{cast}"));
                }
                Back::From { .. } | Back::Generated => {}
                Back::Kept => out.push(format!(
                    "{name}: dropped by the migration; rows that existed keep their value, rows inserted since get its default (or NULL)"
                )),
                Back::Computed => out.push(format!(
                    "{name}: computed by the migration's USING expression, which cannot be computed back; rows that existed keep their old value, rows inserted since get its default (or NULL)"
                )),
            }
        }
        if self.columns.iter().any(|c| matches!(c.back, Back::From { cast: true, .. }))
            || self.key.iter().any(|k| k.retyped)
        {
            out.push(
                "a value written since the swap that does not fit the old type stops the revert before its swap, with the row named".into(),
            );
        }
        out.push(
            "a row written since the swap that breaks a constraint of the old table stops the revert the same way"
                .into(),
        );
        out
    }

    /// The old key columns, quoted, comma separated.
    pub fn old_key_list(&self) -> String {
        self.key.iter().map(|k| ident(&k.old)).collect::<Vec<_>>().join(", ")
    }

    /// The new key columns, quoted, comma separated.
    pub fn new_key_list(&self) -> String {
        self.key.iter().map(|k| ident(&k.new)).collect::<Vec<_>>().join(", ")
    }

    /// The copied columns: (quoted old column list, expressions over the new row `n`).
    pub fn copy_lists(&self) -> (String, String) {
        let copied: Vec<(&Column, &String, bool)> = self
            .columns
            .iter()
            .filter_map(|c| match &c.back {
                Back::From { new, cast } => Some((c, new, *cast)),
                _ => None,
            })
            .collect();
        let targets = copied.iter().map(|(c, _, _)| ident(&c.old)).collect::<Vec<_>>().join(", ");
        let sources =
            copied
                .iter()
                .map(|(c, new, cast)| {
                    if *cast {
                        format!("CAST(n.{} AS {})", ident(new), c.old_type)
                    } else {
                        format!("n.{}", ident(new))
                    }
                })
                .collect::<Vec<_>>()
                .join(", ");
        (targets, sources)
    }

    /// The columns of the old table a revert writes over on a row it already has (all the
    /// copied ones but the key).
    pub fn updated_columns(&self) -> Vec<String> {
        self.columns
            .iter()
            .filter(|c| matches!(c.back, Back::From { .. }) && !self.key.iter().any(|k| k.old == c.old))
            .map(|c| c.old.clone())
            .collect()
    }

    /// The columns cast back, as (old name, new name, old type).
    pub fn cast_columns(&self) -> Vec<(String, String, String)> {
        self.columns
            .iter()
            .filter_map(|c| match &c.back {
                Back::From { new, cast: true } => Some((c.old.clone(), new.clone(), c.old_type.clone())),
                _ => None,
            })
            .collect()
    }
}

/// A column's type as SQL, with its type modifier (`format_type` output is valid SQL).
fn type_sql(c: &crate::catalog::Column) -> String {
    c.type_name.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_names_the_columns_that_are_not_simply_copied() {
        let m = Mapping {
            columns: vec![
                Column {
                    old: "id".into(),
                    old_type: "integer".into(),
                    back: Back::From { new: "id".into(), cast: true },
                },
                Column {
                    old: "qty".into(),
                    old_type: "integer".into(),
                    back: Back::From { new: "amount".into(), cast: false },
                },
                Column { old: "note".into(), old_type: "text".into(), back: Back::Kept },
                Column {
                    old: "same".into(),
                    old_type: "text".into(),
                    back: Back::From { new: "same".into(), cast: false },
                },
            ],
            key: vec![],
            overriding: false,
        };
        let d = m.describe();
        assert!(d[0].contains("id: copied back, cast back to integer"), "{d:?}");
        assert!(d[1].contains("qty: copied back from amount"), "{d:?}");
        assert!(d[2].starts_with("note: dropped"), "{d:?}");
        assert!(d.iter().all(|l| !l.starts_with("same")), "{d:?}");
        let (targets, sources) = m.copy_lists();
        assert_eq!(targets, r#""id", "qty", "same""#);
        assert_eq!(sources, r#"CAST(n."id" AS integer), n."amount", n."same""#);
        assert_eq!(m.updated_columns(), vec!["id", "qty", "same"]);
    }
}
