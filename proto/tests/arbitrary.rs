//! Property tests: no input makes the protocol code panic, and any valid stream split at
//! any points yields the same messages.

use ghostwire_proto::{
    Framer, Item, auth_request, backend_key_data, error_fields, parse_startup, ready_for_query, sasl_initial_mechanism,
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
