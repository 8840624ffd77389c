//! From pgoutput messages to change-log entries, for one table: the key columns found by
//! name in the table's Relation message, old and new key on a key update, a marker on
//! TRUNCATE, fences recognised; a Relation showing the table renamed or its key changed
//! stops the stream.

use ghostwire_proto::pgoutput::{Datum, Logical};

use super::LogicalError;
use crate::migrate::spec::Spec;

/// One change-log entry.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Entry {
    Key(Vec<Option<String>>),
    Truncate,
}

/// From pgoutput messages to log entries, for one table.
pub(super) struct Decoder {
    oid: u32,
    schema: String,
    name: String,
    /// (name, type oid) of each key column.
    key: Vec<(String, u32)>,
    /// Where the key columns are in the stream's tuples (from the Relation message).
    positions: Option<Vec<usize>>,
    pub(super) in_transaction: bool,
    /// The transaction being decoded (from its Begin).
    xid: u32,
    pub(super) last_commit_end: u64,
    pub(super) pending: Vec<Entry>,
    /// The transactions `pending` has entries of: they must be visible to other sessions
    /// before the entries are logged (see `stream::Task::flush`).
    pub(super) pending_xids: Vec<u32>,
}

impl Decoder {
    pub(super) fn new(spec: &Spec) -> Decoder {
        let key = spec
            .key
            .iter()
            .map(|k| (k.name.clone(), spec.table.column(&k.name).map(|c| c.type_oid).unwrap_or(0)))
            .collect();
        Decoder::of(spec.original_oid, &spec.original.schema, &spec.original.name, key)
    }

    fn of(oid: u32, schema: &str, name: &str, key: Vec<(String, u32)>) -> Decoder {
        Decoder {
            oid,
            schema: schema.to_owned(),
            name: name.to_owned(),
            key,
            positions: None,
            in_transaction: false,
            xid: 0,
            last_commit_end: 0,
            pending: Vec::new(),
            pending_xids: Vec::new(),
        }
    }

    fn key_of(&self, tuple: &[Datum<'_>]) -> Result<Vec<Option<String>>, LogicalError> {
        let positions = self
            .positions
            .as_ref()
            .ok_or_else(|| LogicalError::Stream("a change of the table came before its Relation message".into()))?;
        positions
            .iter()
            .map(|&p| match tuple.get(p) {
                Some(Datum::Text(v)) => Ok(Some(String::from_utf8_lossy(v).into_owned())),
                Some(Datum::Null) => Ok(None),
                Some(Datum::Unchanged) => Err(LogicalError::Stream(
                    "a key value came as an unchanged TOASTed value, without the old key: set REPLICA IDENTITY FULL \
                     on the table, or use --capture trigger"
                        .into(),
                )),
                Some(Datum::Binary(_)) => Err(LogicalError::Stream("a key value came in binary".into())),
                None => Err(LogicalError::Stream("a change has fewer columns than its Relation".into())),
            })
            .collect()
    }

    /// The entries waiting and the transactions they come from, taken out.
    pub(super) fn take_pending(&mut self) -> (Vec<Entry>, Vec<u32>) {
        (std::mem::take(&mut self.pending), std::mem::take(&mut self.pending_xids))
    }

    fn push(&mut self, entry: Entry) {
        self.pending.push(entry);
        if self.pending_xids.last() != Some(&self.xid) {
            self.pending_xids.push(self.xid);
        }
    }

    /// Takes one message. Returns a fence token's content when a ghostwire message came.
    pub(super) fn take(&mut self, m: Logical<'_>) -> Result<Option<Vec<u8>>, LogicalError> {
        match m {
            Logical::Begin { xid, .. } => {
                self.in_transaction = true;
                self.xid = xid;
            }
            Logical::Commit { end_lsn, .. } => {
                self.in_transaction = false;
                self.last_commit_end = end_lsn;
            }
            Logical::Relation { oid, namespace, name, columns, .. } if oid == self.oid => {
                if namespace != self.schema || name != self.name {
                    return Err(LogicalError::TableChanged(format!("it is now named {namespace}.{name}")));
                }
                let mut positions = Vec::with_capacity(self.key.len());
                for (key, type_oid) in &self.key {
                    let found = columns.iter().position(|c| c.name == key);
                    match found {
                        Some(p) if columns[p].type_oid == *type_oid => positions.push(p),
                        Some(_) => {
                            return Err(LogicalError::TableChanged(format!("key column {key} changed its type")));
                        }
                        None => return Err(LogicalError::TableChanged(format!("key column {key} is gone"))),
                    }
                }
                self.positions = Some(positions);
            }
            Logical::Insert { relation, new } if relation == self.oid => {
                let k = self.key_of(&new)?;
                self.push(Entry::Key(k));
            }
            Logical::Update { relation, key, old, new } if relation == self.oid => {
                let now = self.key_of(&new)?;
                if let Some(before) = key.as_deref().or(old.as_deref()) {
                    let before = self.key_of(before)?;
                    if before != now {
                        self.push(Entry::Key(before));
                    }
                }
                self.push(Entry::Key(now));
            }
            Logical::Delete { relation, key, old } if relation == self.oid => {
                let tuple = key.or(old).unwrap_or_default();
                let k = self.key_of(&tuple)?;
                self.push(Entry::Key(k));
            }
            Logical::Truncate { relations, .. } if relations.contains(&self.oid) => self.push(Entry::Truncate),
            Logical::Message { prefix: "ghostwire", content, .. } => return Ok(Some(content.to_vec())),
            _ => {}
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ghostwire_proto::pgoutput::RelationColumn;

    fn relation<'a>(name: &'a str, columns: &[(&'a str, u32)]) -> Logical<'a> {
        Logical::Relation {
            oid: 7,
            namespace: "Sales",
            name,
            replica_identity: b'd',
            columns: columns
                .iter()
                .map(|(n, t)| RelationColumn { key: true, name: n, type_oid: *t, type_modifier: -1 })
                .collect(),
        }
    }

    fn decoder() -> Decoder {
        Decoder::of(7, "Sales", "Order Items", vec![("tenant".into(), 23), ("seq".into(), 20)])
    }

    #[test]
    fn keys_come_from_the_relation_s_columns_old_and_new_on_a_key_update() {
        let mut d = decoder();
        d.take(relation("Order Items", &[("seq", 20), ("note", 25), ("tenant", 23)])).unwrap();
        d.take(Logical::Begin { final_lsn: 1, timestamp: 0, xid: 41 }).unwrap();
        let t = |s: &'static str| Datum::Text(s.as_bytes());
        d.take(Logical::Insert { relation: 7, new: vec![t("1"), Datum::Null, t("3")] }).unwrap();
        d.take(Logical::Update {
            relation: 7,
            key: Some(vec![t("1"), Datum::Null, t("3")]),
            old: None,
            new: vec![t("2"), t("x"), t("3")],
        })
        .unwrap();
        // Another table's changes are not ours.
        d.take(Logical::Delete { relation: 8, key: Some(vec![t("9")]), old: None }).unwrap();
        d.take(Logical::Truncate { options: 0, relations: vec![8, 7] }).unwrap();
        let key = |a: &str, b: &str| Entry::Key(vec![Some(a.into()), Some(b.into())]);
        assert_eq!(d.pending, [key("3", "1"), key("3", "1"), key("3", "2"), Entry::Truncate]);
        // Each entry's transaction is kept, once.
        assert_eq!(d.pending_xids, [41]);
        d.take(Logical::Begin { final_lsn: 2, timestamp: 0, xid: 42 }).unwrap();
        d.take(Logical::Delete { relation: 7, key: Some(vec![t("5"), Datum::Null, t("4")]), old: None }).unwrap();
        assert_eq!(d.take_pending().1, [41, 42]);
        assert!(d.pending.is_empty() && d.pending_xids.is_empty());
        // A fence comes back as its token.
        let fence = Logical::Message { transactional: true, lsn: 1, prefix: "ghostwire", content: b"f1" };
        assert_eq!(d.take(fence).unwrap(), Some(b"f1".to_vec()));
    }

    #[test]
    fn a_changed_relation_stops_the_stream() {
        let renamed = decoder().take(relation("Order Lines", &[("seq", 20), ("tenant", 23)]));
        assert!(matches!(renamed, Err(LogicalError::TableChanged(ref w)) if w.contains("Order Lines")), "{renamed:?}");
        let retyped = decoder().take(relation("Order Items", &[("seq", 1700), ("tenant", 23)]));
        assert!(matches!(retyped, Err(LogicalError::TableChanged(ref w)) if w.contains("seq")), "{retyped:?}");
        let gone = decoder().take(relation("Order Items", &[("tenant", 23)]));
        assert!(matches!(gone, Err(LogicalError::TableChanged(ref w)) if w.contains("gone")), "{gone:?}");
        // A change before any Relation is a protocol error, not a guess.
        let early = decoder().take(Logical::Insert { relation: 7, new: vec![] });
        assert!(matches!(early, Err(LogicalError::Stream(_))));
    }
}
