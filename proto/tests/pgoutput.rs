//! Property tests of the replication decoders: no input makes them panic (arbitrary bytes,
//! and arbitrary bytes behind each valid tag, to get past the first check), and changes
//! built from random tuples decode to what was encoded.

use ghostwire_proto::pgoutput::{Datum, Logical, decode};
use ghostwire_proto::{ServerCopy, format_lsn, parse_lsn, server_copy};
use proptest::prelude::*;

fn encode_tuple(cols: &[Option<Option<Vec<u8>>>]) -> Vec<u8> {
    let mut b = (cols.len() as u16).to_be_bytes().to_vec();
    for c in cols {
        match c {
            None => b.push(b'n'),
            Some(None) => b.push(b'u'),
            Some(Some(v)) => {
                b.push(b't');
                b.extend((v.len() as u32).to_be_bytes());
                b.extend(v);
            }
        }
    }
    b
}

fn expected(cols: &[Option<Option<Vec<u8>>>]) -> Vec<Datum<'_>> {
    cols.iter()
        .map(|c| match c {
            None => Datum::Null,
            Some(None) => Datum::Unchanged,
            Some(Some(v)) => Datum::Text(v),
        })
        .collect()
}

fn column() -> impl Strategy<Value = Option<Option<Vec<u8>>>> {
    prop::option::of(prop::option::of(prop::collection::vec(any::<u8>(), 0..20)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn arbitrary_bytes_never_panic(tag in prop::sample::select(b"BCORYIUDTMwkx".to_vec()), bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode(&bytes);
        let _ = server_copy(&bytes);
        let mut tagged = vec![tag];
        tagged.extend(&bytes);
        let _ = decode(&tagged);
        let _ = server_copy(&tagged);
    }

    #[test]
    fn updates_decode_to_what_was_encoded(relation in any::<u32>(), key in prop::option::of(prop::collection::vec(column(), 0..6)), new in prop::collection::vec(column(), 0..6)) {
        let mut m = vec![b'U'];
        m.extend(relation.to_be_bytes());
        if let Some(k) = &key {
            m.push(b'K');
            m.extend(encode_tuple(k));
        }
        m.push(b'N');
        m.extend(encode_tuple(&new));
        let want = Logical::Update { relation, key: key.as_deref().map(expected), old: None, new: expected(&new) };
        prop_assert_eq!(decode(&m).unwrap(), want);
        // Any strict prefix is an error, not a panic or a shorter message.
        for cut in 0..m.len() {
            prop_assert!(decode(&m[..cut]).is_err());
        }
    }

    #[test]
    fn lsns_round_trip(lsn in any::<u64>()) {
        prop_assert_eq!(parse_lsn(&format_lsn(lsn)), Some(lsn));
    }

    #[test]
    fn wal_data_carries_its_payload(start in any::<u64>(), end in any::<u64>(), data in prop::collection::vec(any::<u8>(), 0..64)) {
        let mut w = vec![b'w'];
        w.extend(start.to_be_bytes());
        w.extend(end.to_be_bytes());
        w.extend(0i64.to_be_bytes());
        w.extend(&data);
        prop_assert_eq!(server_copy(&w).unwrap(), ServerCopy::XLogData { start, wal_end: end, timestamp: 0, data: &data });
    }
}
