use super::*;
use ghostwire_proto::message as whole;

fn fields(cols: &[(&str, u32)]) -> Vec<u8> {
    let mut t = (cols.len() as i16).to_be_bytes().to_vec();
    for (i, (name, oid)) in cols.iter().enumerate() {
        t.extend(name.as_bytes());
        t.push(0);
        t.extend(16384u32.to_be_bytes());
        t.extend((i as i16 + 1).to_be_bytes());
        t.extend(oid.to_be_bytes());
        t.extend((-1i16).to_be_bytes());
        t.extend((-1i32).to_be_bytes());
        t.extend(0i16.to_be_bytes());
    }
    whole(b'T', &t)
}

fn params(oids: &[u32]) -> Vec<u8> {
    let mut t = (oids.len() as i16).to_be_bytes().to_vec();
    for o in oids {
        t.extend(o.to_be_bytes());
    }
    whole(b't', &t)
}

fn bind(portal: &str, statement: &str) -> Vec<u8> {
    bind_with_results(portal, statement, &[1])
}

fn execute(portal: &str) -> Vec<u8> {
    let mut b = format!("{portal}\0").into_bytes();
    b.extend([0, 0, 0, 0]);
    whole(b'E', &b)
}

fn ready(status: u8) -> Vec<u8> {
    whole(b'Z', &[status])
}

fn error(code: &str, routine: &str) -> Vec<u8> {
    whole(b'E', format!("SERROR\0C{code}\0Mcached plan must not change result type\0R{routine}\0\0").as_bytes())
}

fn stale() -> Vec<u8> {
    error("0A000", "RevalidateCachedQuery")
}

/// Feeds a client batch; every message must be forwarded as it is.
fn client(t: &mut Tracker, msgs: &[Vec<u8>]) {
    for m in msgs {
        assert_eq!(t.on_client(m), ClientStep::Forward, "{:?}", m[0] as char);
    }
}

fn server(t: &mut Tracker, m: &[u8]) -> Outcome {
    t.on_server(m)
}

/// `SELECT * FROM t WHERE id = $1` prepared as `s1` and described: one int4 column.
fn prepared() -> Tracker {
    let mut t = Tracker::new();
    client(
        &mut t,
        &[
            proto::parse_message("s1", "SELECT * FROM t WHERE id = $1", &[]),
            proto::describe_message(true, "s1"),
            proto::sync_message(),
        ],
    );
    for m in [whole(b'1', &[]), params(&[23]), fields(&[("id", 23)]), ready(b'I')] {
        assert!(server(&mut t, &m).forward);
    }
    t
}

fn execute_batch() -> Vec<Vec<u8>> {
    vec![bind("", "s1"), execute(""), proto::sync_message()]
}

#[test]
fn a_healthy_batch_flows_with_its_bind_answer_held_only_until_it_comes() {
    let mut t = prepared();
    client(&mut t, &execute_batch());
    let o = server(&mut t, &whole(b'2', &[]));
    assert!(o.forward && o.deliver.is_empty());
    assert!(server(&mut t, &whole(b'D', &[0, 1, 0, 0, 0, 4, 0, 0, 0, 7])).forward);
    assert!(server(&mut t, &whole(b'C', b"SELECT 1\0")).forward);
    let o = server(&mut t, &ready(b'I'));
    assert_eq!((o.forward, o.ready), (true, Some(TransactionStatus::Idle)));
    assert!(!t.disabled());
}

#[test]
fn a_stale_plan_is_prepared_again_as_the_client_knows_it_and_the_batch_replayed() {
    let mut t = prepared();
    let batch = execute_batch();
    client(&mut t, &batch);
    let o = server(&mut t, &stale());
    assert!(!o.forward && o.deliver.is_empty(), "the error is not passed on");
    let probe = o.inject;
    assert!(String::from_utf8_lossy(&probe).contains(PROBE));
    // While the proxy recovers, the client's next messages wait.
    assert_eq!(t.on_client(&proto::sync_message()), ClientStep::Wait);
    assert_eq!(server(&mut t, &ready(b'I')), Outcome::default(), "the failed batch's end is swallowed");
    for m in [whole(b'1', &[]), params(&[23]), fields(&[("id", 20)]), whole(b'3', &[])] {
        assert_eq!(server(&mut t, &m), Outcome::default());
    }
    let o = server(&mut t, &ready(b'I'));
    let reprepare = String::from_utf8_lossy(&o.inject).into_owned();
    assert!(reprepare.contains("WITH ghostwire_reshaped(c1) AS"), "{reprepare}");
    assert!(reprepare.contains("c1::pg_catalog.int4 AS \"id\""), "{reprepare}");
    for m in [whole(b'1', &[]), whole(b'3', &[]), whole(b'1', &[]), whole(b'3', &[])] {
        assert_eq!(server(&mut t, &m), Outcome::default());
    }
    let o = server(&mut t, &ready(b'I'));
    assert_eq!(o.inject, batch.concat(), "the client's batch, replayed");
    assert!(o.resume);
    assert_eq!(t.on_client(&proto::sync_message()), ClientStep::Forward, "the client flows again");
    // The replay's answers are the client's (the Sync the client sent meanwhile is answered last).
    for m in [whole(b'2', &[]), whole(b'D', &[0, 1, 0, 0, 0, 4, 0, 0, 0, 7]), whole(b'C', b"SELECT 1\0")] {
        assert!(server(&mut t, &m).forward);
    }
    assert_eq!(server(&mut t, &ready(b'I')).ready, Some(TransactionStatus::Idle));
    assert_eq!(t.counts, Counts { reprepared: 1, replayed: 1, reshaped_rows: 1, passed_on: 0 });
}

#[test]
fn an_unrelated_type_change_gives_the_client_the_servers_error() {
    let mut t = prepared();
    client(&mut t, &execute_batch());
    let err = stale();
    assert!(!server(&mut t, &err).inject.is_empty());
    server(&mut t, &ready(b'I'));
    for m in [whole(b'1', &[]), params(&[23]), fields(&[("id", 25)]), whole(b'3', &[])] {
        server(&mut t, &m);
    }
    let o = server(&mut t, &ready(b'I'));
    assert_eq!(o.deliver, [err, ready(b'I')].concat());
    assert!(o.resume && o.inject.is_empty());
    assert_eq!(o.ready, Some(TransactionStatus::Idle));
    assert_eq!(t.counts.passed_on, 1);
}

#[test]
fn inside_a_transaction_block_the_error_goes_to_the_client() {
    let mut t = prepared();
    client(&mut t, &[whole(b'Q', b"BEGIN\0")]);
    server(&mut t, &whole(b'C', b"BEGIN\0"));
    server(&mut t, &ready(b'T'));
    client(&mut t, &execute_batch());
    let err = stale();
    let o = server(&mut t, &err);
    assert!(o.forward && o.inject.is_empty());
    assert_eq!(server(&mut t, &ready(b'E')).ready, Some(TransactionStatus::Failed));
    assert_eq!(t.counts.passed_on, 1);
}

#[test]
fn a_batch_that_committed_before_the_error_is_never_replayed() {
    let mut t = prepared();
    let mut batch = vec![proto::parse_message("", "BEGIN", &[]), bind("", ""), execute("")];
    batch.extend([proto::parse_message("", "INSERT INTO t VALUES (1)", &[]), bind("", ""), execute("")]);
    batch.extend([proto::parse_message("", "COMMIT", &[]), bind("", ""), execute("")]);
    batch.extend(execute_batch());
    client(&mut t, &batch);
    for (m, tag) in [(b"BEGIN\0".as_slice(), "BEGIN"), (b"INSERT 0 1\0", "INSERT"), (b"COMMIT\0", "COMMIT")] {
        for m in [whole(b'1', &[]), whole(b'2', &[]), whole(b'C', m)] {
            assert!(server(&mut t, &m).deliver.is_empty(), "{tag}");
        }
    }
    let o = server(&mut t, &stale());
    assert!(o.forward && o.inject.is_empty(), "the INSERT is committed: the error goes to the client");
    assert_eq!(o.deliver.len(), 3 * (5 + 5 + 5) + 6 + 11 + 7, "with the answers held before it");
    assert_eq!(t.counts.passed_on, 1);
}

#[test]
fn a_batch_that_left_a_transaction_block_open_is_not_replayed() {
    let mut t = prepared();
    let mut batch = vec![proto::parse_message("", "BEGIN", &[]), bind("", ""), execute("")];
    batch.extend(execute_batch());
    client(&mut t, &batch);
    for m in [whole(b'1', &[]), whole(b'2', &[]), whole(b'C', b"BEGIN\0")] {
        server(&mut t, &m);
    }
    let err = stale();
    assert!(!server(&mut t, &err).inject.is_empty(), "a probe");
    assert_eq!(server(&mut t, &ready(b'E')), Outcome::default());
    for m in [whole(b'1', &[]), params(&[23]), fields(&[("id", 20)]), whole(b'3', &[])] {
        server(&mut t, &m);
    }
    let o = server(&mut t, &ready(b'E'));
    assert!(o.resume && o.inject.is_empty(), "given up: {o:?}");
    assert!(o.deliver.ends_with(&[err, ready(b'E')].concat()));
    assert_eq!(o.ready, Some(TransactionStatus::Failed));
}

#[test]
fn other_errors_and_a_second_batch_in_flight_are_passed_on() {
    let mut t = prepared();
    client(&mut t, &execute_batch());
    let o = server(&mut t, &error("23505", "_bt_check_unique"));
    assert!(o.forward);
    server(&mut t, &ready(b'I'));
    // Pipelined: a second batch was sent before the first was answered.
    client(&mut t, &execute_batch());
    client(&mut t, &execute_batch());
    assert!(server(&mut t, &stale()).forward);
    assert_eq!(t.counts.passed_on, 1);
}

#[test]
fn describing_a_rewritten_statement_prepares_it_as_written_first() {
    let mut t = a_stale_plan_replayed();
    let step = t.on_client(&proto::describe_message(true, "s1"));
    let ClientStep::Prefix(prefix) = step else { panic!("expected a prefix, got {step:?}") };
    assert!(String::from_utf8_lossy(&prefix).contains("SELECT * FROM t WHERE id = $1"));
    client(&mut t, &[proto::sync_message()]);
    assert_eq!(server(&mut t, &whole(b'3', &[])), Outcome::default());
    assert_eq!(server(&mut t, &whole(b'1', &[])), Outcome::default());
    assert!(server(&mut t, &params(&[23])).forward);
    assert!(server(&mut t, &fields(&[("id", 20)])).forward);
    assert!(server(&mut t, &ready(b'I')).forward);
    // Known by its new shape now: the next execution reshapes nothing.
    client(&mut t, &execute_batch());
    for m in [
        whole(b'2', &[]),
        whole(b'D', &[0, 1, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 7]),
        whole(b'C', b"SELECT 1\0"),
        ready(b'I'),
    ] {
        assert!(server(&mut t, &m).forward);
    }
    assert_eq!(t.counts.reshaped_rows, 1);
}

fn a_stale_plan_replayed() -> Tracker {
    let mut t = prepared();
    client(&mut t, &execute_batch());
    server(&mut t, &stale());
    server(&mut t, &ready(b'I'));
    for m in [whole(b'1', &[]), params(&[23]), fields(&[("id", 20)]), whole(b'3', &[]), ready(b'I')] {
        server(&mut t, &m);
    }
    for m in [whole(b'1', &[]), whole(b'3', &[]), whole(b'1', &[]), whole(b'3', &[]), ready(b'I')] {
        server(&mut t, &m);
    }
    for m in [whole(b'2', &[]), whole(b'D', &[0, 1, 0, 0, 0, 4, 0, 0, 0, 7]), whole(b'C', b"SELECT 1\0"), ready(b'I')] {
        assert!(server(&mut t, &m).forward);
    }
    t
}

#[test]
fn nonsense_turns_the_bookkeeping_off_and_everything_flows() {
    let mut t = Tracker::new();
    let o = server(&mut t, &whole(b'2', &[]));
    assert!(o.forward && t.disabled());
    client(&mut t, &execute_batch());
    assert!(server(&mut t, &stale()).forward);
}

/// The server's answers to a probe of one statement now returning `cols`.
fn probed(cols: &[(&str, u32)]) -> Vec<Vec<u8>> {
    vec![whole(b'1', &[]), params(&[23]), fields(cols), whole(b'3', &[])]
}

fn begin() -> Vec<u8> {
    whole(b'Q', b"BEGIN\0")
}

#[test]
fn after_a_drain_a_changed_statement_is_prepared_again_before_the_session_starts_anything() {
    let mut t = prepared();
    t.passed_gate(1);
    let ClientStep::Hold(probes) = t.on_client(&begin()) else { panic!("the statements are checked first") };
    let text = String::from_utf8_lossy(&probes).into_owned();
    assert!(text.contains("ghostwire_probe_0") && text.contains("SELECT * FROM t WHERE id = $1"), "{text}");
    assert_eq!(t.on_client(&begin()), ClientStep::Wait, "the client's message waits");
    for m in probed(&[("id", 20)]) {
        assert_eq!(server(&mut t, &m), Outcome::default());
    }
    let o = server(&mut t, &ready(b'I'));
    let reprepare = String::from_utf8_lossy(&o.inject).into_owned();
    assert!(reprepare.contains("c1::pg_catalog.int4 AS \"id\"") && !o.resume, "{reprepare}");
    for m in [whole(b'1', &[]), whole(b'3', &[]), whole(b'1', &[]), whole(b'3', &[])] {
        assert_eq!(server(&mut t, &m), Outcome::default());
    }
    let o = server(&mut t, &ready(b'I'));
    assert!(o.resume && o.inject.is_empty(), "{o:?}");
    // The client's transaction runs the rewrite: no error to recover from inside it.
    client(&mut t, &[begin()]);
    assert!(server(&mut t, &whole(b'C', b"BEGIN\0")).forward);
    assert_eq!(server(&mut t, &ready(b'T')).ready, Some(TransactionStatus::InTransaction));
    client(&mut t, &execute_batch());
    for m in [whole(b'2', &[]), whole(b'D', &[0, 1, 0, 0, 0, 4, 0, 0, 0, 7]), whole(b'C', b"SELECT 1\0")] {
        assert!(server(&mut t, &m).forward);
    }
    server(&mut t, &ready(b'T'));
    assert_eq!(t.counts, Counts { reprepared: 1, replayed: 0, reshaped_rows: 1, passed_on: 0 });
    // No new drain, no new check.
    t.passed_gate(1);
    client(&mut t, &[whole(b'Q', b"COMMIT\0")]);
}

#[test]
fn a_statement_that_returns_the_same_is_left_and_one_that_no_longer_prepares_does_not_stop_the_rest() {
    let mut t = prepared();
    client(
        &mut t,
        &[
            proto::parse_message("s0", "SELECT gone FROM t", &[]),
            proto::describe_message(true, "s0"),
            proto::sync_message(),
        ],
    );
    for m in [whole(b'1', &[]), params(&[]), fields(&[("gone", 23)]), ready(b'I')] {
        assert!(server(&mut t, &m).forward);
    }
    t.passed_gate(3);
    let ClientStep::Hold(probes) = t.on_client(&begin()) else { panic!("checked first") };
    assert!(String::from_utf8_lossy(&probes).contains("ghostwire_probe_1"));
    // s0 (first by name) no longer prepares: the server skips s1's probe.
    assert_eq!(server(&mut t, &error("42703", "errorMissingColumn")), Outcome::default());
    let o = server(&mut t, &ready(b'I'));
    let again = String::from_utf8_lossy(&o.inject).into_owned();
    assert!(again.contains("ghostwire_probe_0") && again.contains("SELECT * FROM t"), "s1 probed again: {again}");
    assert!(!again.contains("SELECT gone"), "{again}");
    for m in probed(&[("id", 23)]) {
        assert_eq!(server(&mut t, &m), Outcome::default());
    }
    let o = server(&mut t, &ready(b'I'));
    assert!(o.resume && o.inject.is_empty(), "the same shape: nothing to prepare again ({o:?})");
    client(&mut t, &[begin()]);
    assert_eq!(t.counts, Counts::default());
    assert!(!t.disabled());
}

#[test]
fn without_a_drain_or_inside_a_transaction_nothing_is_checked() {
    let mut t = prepared();
    t.passed_gate(0);
    client(&mut t, &[begin()]);
    server(&mut t, &whole(b'C', b"BEGIN\0"));
    server(&mut t, &ready(b'T'));
    // A drain while the session is inside a transaction block: checked once it is idle.
    t.passed_gate(1);
    client(&mut t, &[whole(b'Q', b"COMMIT\0")]);
    server(&mut t, &whole(b'C', b"COMMIT\0"));
    server(&mut t, &ready(b'I'));
    assert!(matches!(t.on_client(&begin()), ClientStep::Hold(_)));
}

/// A statement Parsed without types, run `runs` times with text values, its portal
/// described on the runs `described` says; then a drain, and its probe answers int8.
fn checked_after_runs(described: &[bool]) -> Outcome {
    let mut t = Tracker::new();
    client(&mut t, &[proto::parse_message("p1", "SELECT * FROM t WHERE id = $1", &[]), proto::sync_message()]);
    for m in [whole(b'1', &[]), ready(b'I')] {
        server(&mut t, &m);
    }
    let mut text_bind = b"\0p1\0".to_vec();
    text_bind.extend([0, 0, 0, 1, 0, 0, 0, 1, b'7', 0, 0]); // no formats (text), one value, text results
    for &describe in described {
        let mut batch = vec![whole(b'B', &text_bind)];
        if describe {
            batch.push(proto::describe_message(false, ""));
        }
        batch.extend([execute(""), proto::sync_message()]);
        client(&mut t, &batch);
        server(&mut t, &whole(b'2', &[]));
        if describe {
            server(&mut t, &fields(&[("id", 23)]));
        }
        for m in [whole(b'D', &[0, 1, 0, 0, 0, 1, b'7']), whole(b'C', b"SELECT 1\0"), ready(b'I')] {
            server(&mut t, &m);
        }
    }
    t.passed_gate(1);
    let ClientStep::Hold(_) = t.on_client(&begin()) else { panic!("checked first") };
    for m in probed(&[("id", 20)]) {
        server(&mut t, &m);
    }
    server(&mut t, &ready(b'I'))
}

#[test]
fn a_statement_never_described_whose_portals_always_are_is_prepared_again_as_written() {
    // As libpq does: Parse without types, then Bind with text values, Describe the portal.
    let o = checked_after_runs(&[true, true]);
    let again = String::from_utf8_lossy(&o.inject).into_owned();
    assert!(again.contains("SELECT * FROM t WHERE id = $1") && !again.contains("ghostwire_reshaped"), "{again}");
    // The probe's parameter type (int4), for values the client sends as text.
    assert!(o.inject.windows(6).any(|w| w == [0, 1, 0, 0, 0, 23]), "{:?}", o.inject);
}

#[test]
fn a_client_that_described_only_its_first_execution_gets_the_shape_it_knows() {
    // As pgjdbc does: the first execution's portal described, the later ones decoded with
    // the fields learned then (an int8 in binary read as an int4 would be a wrong value).
    for runs in [&[true][..], &[true, false, false]] {
        let o = checked_after_runs(runs);
        let again = String::from_utf8_lossy(&o.inject).into_owned();
        assert!(again.contains("ghostwire_reshaped"), "after {runs:?}: {again}");
    }
}

#[test]
fn values_sent_in_binary_for_types_never_described_are_not_prepared_for_new_ones() {
    // Parsed without types and never described; its values go in binary (4 bytes: int4).
    let mut t = Tracker::new();
    client(&mut t, &[proto::parse_message("b1", "SELECT * FROM t WHERE id = $1", &[]), proto::sync_message()]);
    for m in [whole(b'1', &[]), ready(b'I')] {
        server(&mut t, &m);
    }
    let batch = [bind("", "b1"), proto::describe_message(false, ""), execute(""), proto::sync_message()];
    client(&mut t, &batch);
    let o = server(&mut t, &stale());
    assert!(!o.inject.is_empty(), "probed");
    server(&mut t, &ready(b'I'));
    // The server would infer int8 for the parameter now: the client's int4 value would not fit.
    for m in [whole(b'1', &[]), params(&[20]), fields(&[("id", 20)]), whole(b'3', &[])] {
        server(&mut t, &m);
    }
    let o = server(&mut t, &ready(b'I'));
    assert!(o.resume && o.inject.is_empty(), "given up: {o:?}");
    assert!(o.deliver.starts_with(&stale()), "the server's error, as it came");
    assert_eq!(t.counts.passed_on, 1);
}

/// A Bind of one int4 value in binary, its results in the formats given.
fn bind_with_results(portal: &str, statement: &str, results: &[i16]) -> Vec<u8> {
    let mut b = format!("{portal}\0{statement}\0").into_bytes();
    b.extend([0, 1, 0, 1, 0, 1, 0, 0, 0, 4, 0, 0, 0, 7]); // binary, one value
    b.extend((results.len() as i16).to_be_bytes());
    for f in results {
        b.extend(f.to_be_bytes());
    }
    whole(b'B', &b)
}

/// `SELECT * FROM t WHERE id = $1` (two int4 columns) prepared as `w1` and described, then
/// run twice with its portal described each time, its Binds naming the result formats
/// `results`.
fn described_every_run_with_results(results: &[i16]) -> Tracker {
    let mut t = Tracker::new();
    let query = "SELECT * FROM t WHERE id = $1";
    client(
        &mut t,
        &[proto::parse_message("w1", query, &[]), proto::describe_message(true, "w1"), proto::sync_message()],
    );
    let two = fields(&[("id", 23), ("extra", 23)]);
    for m in [whole(b'1', &[]), params(&[23]), two.clone(), ready(b'I')] {
        server(&mut t, &m);
    }
    for _ in 0..2 {
        let batch = [
            bind_with_results("", "w1", results),
            proto::describe_message(false, ""),
            execute(""),
            proto::sync_message(),
        ];
        client(&mut t, &batch);
        for m in [whole(b'2', &[]), two.clone(), whole(b'C', b"SELECT 0\0"), ready(b'I')] {
            server(&mut t, &m);
        }
    }
    t
}

#[test]
fn a_client_whose_binds_name_a_format_per_column_keeps_its_column_count_after_a_drain() {
    // As pgx does: every portal described, but the Bind's result formats were built from
    // the statement's first description, one per column; a dropped column would make the
    // server refuse every Bind ("bind message has 2 result formats but query has 1 columns").
    for (results, reshaped) in [(&[1i16, 1][..], true), (&[1][..], false), (&[][..], false)] {
        let mut t = described_every_run_with_results(results);
        t.passed_gate(1);
        let ClientStep::Hold(_) = t.on_client(&begin()) else { panic!("checked first") };
        for m in probed(&[("id", 23)]) {
            server(&mut t, &m);
        }
        let again = String::from_utf8_lossy(&server(&mut t, &ready(b'I')).inject).into_owned();
        assert_eq!(again.contains("ghostwire_reshaped"), reshaped, "results {results:?}: {again}");
        assert!(again.contains("SELECT * FROM t WHERE id = $1"), "{again}");
    }
}

#[test]
fn a_stale_plan_in_a_batch_whose_bind_names_a_format_per_column_is_rewritten() {
    for (results, reshaped) in [(&[1i16, 1][..], true), (&[1][..], false)] {
        let mut t = described_every_run_with_results(results);
        let batch = [
            bind_with_results("", "w1", results),
            proto::describe_message(false, ""),
            execute(""),
            proto::sync_message(),
        ];
        client(&mut t, &batch);
        assert!(!server(&mut t, &stale()).forward, "recovered by the proxy");
        server(&mut t, &ready(b'I'));
        for m in probed(&[("id", 23)]) {
            server(&mut t, &m);
        }
        let again = String::from_utf8_lossy(&server(&mut t, &ready(b'I')).inject).into_owned();
        assert_eq!(again.contains("ghostwire_reshaped"), reshaped, "results {results:?}: {again}");
    }
}
