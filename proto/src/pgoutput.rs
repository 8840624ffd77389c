//! The logical replication messages of the `pgoutput` plugin (protocol version 1, with
//! `messages`), as PostgreSQL's "Logical Replication Message Formats" describes them: the
//! payload of an XLogData message, decoded without copying. Protocol 2's streaming of
//! transactions in progress is not asked for: the server sends each transaction once it
//! has committed, so nothing decoded here was rolled back.

use crate::ProtoError;

/// A column value in a tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datum<'a> {
    Null,
    /// A TOASTed value the change did not touch (its value is not sent).
    Unchanged,
    Text(&'a [u8]),
    Binary(&'a [u8]),
}

/// A column of a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn<'a> {
    /// Part of the replica identity (flag 1).
    pub key: bool,
    pub name: &'a str,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// One decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Logical<'a> {
    Begin {
        final_lsn: u64,
        timestamp: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: u64,
        end_lsn: u64,
        timestamp: i64,
    },
    Origin {
        lsn: u64,
        name: &'a str,
    },
    Relation {
        oid: u32,
        namespace: &'a str,
        name: &'a str,
        /// `d` default, `n` nothing, `f` full, `i` index.
        replica_identity: u8,
        columns: Vec<RelationColumn<'a>>,
    },
    Type {
        oid: u32,
        namespace: &'a str,
        name: &'a str,
    },
    Insert {
        relation: u32,
        new: Vec<Datum<'a>>,
    },
    /// `key` (K) is sent when the replica identity's columns changed, `old` (O) with REPLICA
    /// IDENTITY FULL; neither when the key stayed as it was.
    Update {
        relation: u32,
        key: Option<Vec<Datum<'a>>>,
        old: Option<Vec<Datum<'a>>>,
        new: Vec<Datum<'a>>,
    },
    /// Exactly one of `key` (K) and `old` (O) is sent.
    Delete {
        relation: u32,
        key: Option<Vec<Datum<'a>>>,
        old: Option<Vec<Datum<'a>>>,
    },
    Truncate {
        /// 1: CASCADE, 2: RESTART IDENTITY.
        options: u8,
        relations: Vec<u32>,
    },
    /// A logical decoding message (`pg_logical_emit_message`).
    Message {
        transactional: bool,
        lsn: u64,
        prefix: &'a str,
        content: &'a [u8],
    },
}

/// A bounds-checked reader over a message body.
struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn bad(&self) -> ProtoError {
        ProtoError::Malformed { what: self.what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.buf.len() < n {
            return Err(self.bad());
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, ProtoError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, ProtoError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, ProtoError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn cstr(&mut self) -> Result<&'a str, ProtoError> {
        let end = self.buf.iter().position(|&c| c == 0).ok_or(self.bad())?;
        let s = std::str::from_utf8(&self.buf[..end]).map_err(|_| self.bad())?;
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    fn tuple(&mut self) -> Result<Vec<Datum<'a>>, ProtoError> {
        let n = self.u16()? as usize;
        // Each column takes at least one byte: a count beyond what is left is malformed
        // (and no allocation follows a forged count).
        if n > self.buf.len() {
            return Err(self.bad());
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(match self.u8()? {
                b'n' => Datum::Null,
                b'u' => Datum::Unchanged,
                kind @ (b't' | b'b') => {
                    let len = self.u32()? as usize;
                    let v = self.take(len)?;
                    if kind == b't' { Datum::Text(v) } else { Datum::Binary(v) }
                }
                _ => return Err(self.bad()),
            });
        }
        Ok(out)
    }

    fn end(self) -> Result<(), ProtoError> {
        if self.buf.is_empty() { Ok(()) } else { Err(self.bad()) }
    }
}

/// Decodes one pgoutput message (the data of an XLogData message).
pub fn decode(body: &[u8]) -> Result<Logical<'_>, ProtoError> {
    let (&tag, rest) = body.split_first().ok_or(ProtoError::Malformed { what: "pgoutput message" })?;
    let what = match tag {
        b'B' => "pgoutput Begin",
        b'C' => "pgoutput Commit",
        b'O' => "pgoutput Origin",
        b'R' => "pgoutput Relation",
        b'Y' => "pgoutput Type",
        b'I' => "pgoutput Insert",
        b'U' => "pgoutput Update",
        b'D' => "pgoutput Delete",
        b'T' => "pgoutput Truncate",
        b'M' => "pgoutput Message",
        _ => return Err(ProtoError::Malformed { what: "pgoutput message tag" }),
    };
    let mut r = Reader { buf: rest, what };
    let message = match tag {
        b'B' => Logical::Begin { final_lsn: r.u64()?, timestamp: r.u64()? as i64, xid: r.u32()? },
        b'C' => Logical::Commit { flags: r.u8()?, commit_lsn: r.u64()?, end_lsn: r.u64()?, timestamp: r.u64()? as i64 },
        b'O' => Logical::Origin { lsn: r.u64()?, name: r.cstr()? },
        b'R' => {
            let (oid, namespace, name, replica_identity) = (r.u32()?, r.cstr()?, r.cstr()?, r.u8()?);
            let n = r.u16()? as usize;
            if n > r.buf.len() {
                return Err(r.bad());
            }
            let mut columns = Vec::with_capacity(n);
            for _ in 0..n {
                let flags = r.u8()?;
                columns.push(RelationColumn {
                    key: flags & 1 == 1,
                    name: r.cstr()?,
                    type_oid: r.u32()?,
                    type_modifier: r.u32()? as i32,
                });
            }
            Logical::Relation { oid, namespace, name, replica_identity, columns }
        }
        b'Y' => Logical::Type { oid: r.u32()?, namespace: r.cstr()?, name: r.cstr()? },
        b'I' => {
            let relation = r.u32()?;
            if r.u8()? != b'N' {
                return Err(r.bad());
            }
            Logical::Insert { relation, new: r.tuple()? }
        }
        b'U' => {
            let relation = r.u32()?;
            let (mut key, mut old) = (None, None);
            let new = loop {
                match r.u8()? {
                    b'K' if key.is_none() && old.is_none() => key = Some(r.tuple()?),
                    b'O' if key.is_none() && old.is_none() => old = Some(r.tuple()?),
                    b'N' => break r.tuple()?,
                    _ => return Err(r.bad()),
                }
            };
            Logical::Update { relation, key, old, new }
        }
        b'D' => {
            let relation = r.u32()?;
            match r.u8()? {
                b'K' => Logical::Delete { relation, key: Some(r.tuple()?), old: None },
                b'O' => Logical::Delete { relation, key: None, old: Some(r.tuple()?) },
                _ => return Err(r.bad()),
            }
        }
        b'T' => {
            let n = r.u32()? as usize;
            let options = r.u8()?;
            if n > r.buf.len() / 4 {
                return Err(r.bad());
            }
            let relations = (0..n).map(|_| r.u32()).collect::<Result<Vec<_>, _>>()?;
            Logical::Truncate { options, relations }
        }
        _ => {
            let flags = r.u8()?;
            let (lsn, prefix) = (r.u64()?, r.cstr()?);
            let len = r.u32()? as usize;
            Logical::Message { transactional: flags & 1 == 1, lsn, prefix, content: r.take(len)? }
        }
    };
    r.end()?;
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(cols: &[Option<&str>]) -> Vec<u8> {
        let mut b = (cols.len() as u16).to_be_bytes().to_vec();
        for c in cols {
            match c {
                None => b.push(b'n'),
                Some("\u{0}u") => b.push(b'u'),
                Some(v) => {
                    b.push(b't');
                    b.extend((v.len() as u32).to_be_bytes());
                    b.extend(v.as_bytes());
                }
            }
        }
        b
    }

    #[test]
    fn decodes_changes_with_their_tuples() {
        let mut m = vec![b'U'];
        m.extend(16384u32.to_be_bytes());
        m.push(b'K');
        m.extend(tuple(&[Some("7"), None]));
        m.push(b'N');
        m.extend(tuple(&[Some("8"), Some("\u{0}u")]));
        assert_eq!(
            decode(&m).unwrap(),
            Logical::Update {
                relation: 16384,
                key: Some(vec![Datum::Text(b"7"), Datum::Null]),
                old: None,
                new: vec![Datum::Text(b"8"), Datum::Unchanged],
            }
        );
        let mut d = vec![b'D'];
        d.extend(5u32.to_be_bytes());
        d.push(b'O');
        d.extend(tuple(&[Some("1")]));
        assert!(matches!(decode(&d).unwrap(), Logical::Delete { key: None, old: Some(_), .. }));
        // A trailing byte, a missing tuple, an unknown tag: errors, never panics.
        d.push(0);
        assert!(decode(&d).is_err());
        assert!(decode(&m[..m.len() - 3]).is_err());
        assert!(decode(b"Z").is_err());
    }

    #[test]
    fn decodes_relations_messages_and_truncates() {
        let mut r = vec![b'R'];
        r.extend(42u32.to_be_bytes());
        r.extend(b"Sales\0Order Items\0d");
        r.extend(2u16.to_be_bytes());
        r.push(1);
        r.extend(b"id\0");
        r.extend(20u32.to_be_bytes());
        r.extend((-1i32).to_be_bytes());
        r.push(0);
        r.extend(b"note\0");
        r.extend(25u32.to_be_bytes());
        r.extend((-1i32).to_be_bytes());
        let Logical::Relation { name, namespace, columns, .. } = decode(&r).unwrap() else { panic!("a relation") };
        assert_eq!((namespace, name), ("Sales", "Order Items"));
        assert!(columns[0].key && !columns[1].key && columns[1].name == "note");
        let mut m = vec![b'M', 1];
        m.extend(7u64.to_be_bytes());
        m.extend(b"ghostwire\0");
        m.extend(3u32.to_be_bytes());
        m.extend(b"f12");
        assert_eq!(
            decode(&m).unwrap(),
            Logical::Message { transactional: true, lsn: 7, prefix: "ghostwire", content: b"f12" }
        );
        let mut t = vec![b'T'];
        t.extend(2u32.to_be_bytes());
        t.push(0);
        t.extend(1u32.to_be_bytes());
        t.extend(2u32.to_be_bytes());
        assert_eq!(decode(&t).unwrap(), Logical::Truncate { options: 0, relations: vec![1, 2] });
        // A forged count asks for no allocation it cannot fill.
        let mut t = vec![b'T'];
        t.extend(u32::MAX.to_be_bytes());
        t.push(0);
        assert!(decode(&t).is_err());
    }
}
