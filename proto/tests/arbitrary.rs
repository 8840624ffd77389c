//! Property tests: no input makes the protocol code panic, and any valid stream split at
//! any points yields the same messages.

use ghostwire_proto::{
    Framer, Item, Parse, Target, auth_request, backend_key_data, bind_body, bind_names, close_message,
    describe_message, error_fields, execute_portal, parameter_description, parse_body, parse_message, parse_startup,
    ready_for_query, row_description, sasl_initial_mechanism, target_body,
};
use proptest::prelude::*;

/// Feeds `input` to a framer in `chunks`, consuming as told; returns (tag, total) per message.
fn frame_all(input: &[u8], cuts: &[usize], hold: usize) -> Result<Vec<(u8, usize)>, ghostwire_proto::ProtoError> {
    let mut f = Framer::new(1 << 20, hold);
    let mut buf: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    let mut fed = 0;
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    points.push(input.len());
    points.sort();
    for p in points {
        buf.extend_from_slice(&input[fed..p.max(fed)]);
        fed = p.max(fed);
        loop {
            match f.next(&buf)? {
                Item::Message { tag, total, body } => {
                    assert_eq!(body.len(), total - 5);
                    out.push((tag, total));
                    buf.drain(..total);
                }
                Item::LargeStart { tag, total, available } => {
                    assert!(available <= buf.len() && available < total);
                    out.push((tag, total));
                    buf.drain(..available);
                }
                Item::Continue(n) => {
                    assert!(n > 0 && n <= buf.len());
                    buf.drain(..n);
                }
                Item::NeedMore => break,
            }
        }
    }
    Ok(out)
}

fn message() -> impl Strategy<Value = (u8, Vec<u8>)> {
    (any::<u8>(), prop::collection::vec(any::<u8>(), 0..300))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600), cuts in prop::collection::vec(any::<usize>(), 0..8)) {
        let _ = frame_all(&bytes, &cuts, 64);
        let _ = parse_startup(&bytes);
        let _ = ready_for_query(&bytes);
        let _ = backend_key_data(&bytes);
        let _ = error_fields(&bytes);
        let _ = auth_request(&bytes);
        let _ = sasl_initial_mechanism(&bytes);
        let _ = parse_body(&bytes);
        let _ = bind_body(&bytes);
        let _ = bind_names(&bytes);
        let _ = target_body(&bytes);
        let _ = execute_portal(&bytes);
        let _ = parameter_description(&bytes);
        let _ = row_description(&bytes);
    }

    #[test]
    fn the_messages_a_relay_writes_read_back(name in "[^\u{0}]{0,40}", query in "[^\u{0}]{0,200}", types in prop::collection::vec(any::<u32>(), 0..40), statement in any::<bool>()) {
        let m = parse_message(&name, &query, &types);
        prop_assert_eq!(m[0], b'P');
        prop_assert_eq!(u32::from_be_bytes([m[1], m[2], m[3], m[4]]) as usize + 1, m.len());
        prop_assert_eq!(parse_body(&m[5..]).unwrap(), Parse { name: &name, query: &query, param_types: types });
        for m in [describe_message(statement, &name), close_message(statement, &name)] {
            prop_assert_eq!(u32::from_be_bytes([m[1], m[2], m[3], m[4]]) as usize + 1, m.len());
            prop_assert_eq!(target_body(&m[5..]).unwrap(), Target { statement, name: &name });
        }
    }

    #[test]
    fn a_bind_with_any_values_reads_back(portal in "[a-z0-9_]{0,20}", statement in "[a-z0-9_]{0,20}", formats in prop::collection::vec(0i16..2, 0..5), values in prop::collection::vec(prop::option::of(prop::collection::vec(any::<u8>(), 0..50)), 0..8), results in prop::collection::vec(0i16..2, 0..5)) {
        let mut b = format!("{portal}\0{statement}\0").into_bytes();
        b.extend((formats.len() as i16).to_be_bytes());
        for f in &formats {
            b.extend(f.to_be_bytes());
        }
        b.extend((values.len() as i16).to_be_bytes());
        for v in &values {
            match v {
                Some(v) => {
                    b.extend((v.len() as i32).to_be_bytes());
                    b.extend(v);
                }
                None => b.extend((-1i32).to_be_bytes()),
            }
        }
        b.extend((results.len() as i16).to_be_bytes());
        for f in &results {
            b.extend(f.to_be_bytes());
        }
        let bind = bind_body(&b).unwrap();
        prop_assert_eq!((bind.portal, bind.statement), (portal.as_str(), statement.as_str()));
        prop_assert_eq!(&bind.param_formats, &formats);
        prop_assert_eq!(&bind.result_formats, &results);
        prop_assert_eq!(bind.param_formats().all_text(), formats.iter().all(|&f| f == 0));
        prop_assert_eq!(bind_names(&b).unwrap(), (portal.as_str(), statement.as_str()));
        // Cut anywhere, it is refused, never misread.
        for cut in 0..b.len() {
            prop_assert!(bind_body(&b[..cut]).is_err());
        }
    }

    #[test]
    fn valid_streams_frame_identically_however_split(msgs in prop::collection::vec(message(), 0..20), cuts in prop::collection::vec(any::<usize>(), 0..12), hold in 5usize..200) {
        let mut input = Vec::new();
        let mut expected = Vec::new();
        for (tag, body) in &msgs {
            input.push(*tag);
            input.extend(((body.len() + 4) as u32).to_be_bytes());
            input.extend(body);
            expected.push((*tag, body.len() + 5));
        }
        prop_assert_eq!(frame_all(&input, &cuts, hold).unwrap(), expected);
    }
}
