//! The two directions of a session, once it is logged in. Each passes bytes on as they come,
//! message boundaries found by the framer; the client side asks the drain gate before an
//! idle session starts something; the server side reads ReadyForQuery to know when the
//! session is idle again. Both tell the session's [`Tracker`] every whole message: the
//! server side may hold answers back, drop them, deliver others, or ask the client side to
//! send the server messages of the proxy's own (a re-prepare, a replay), which it writes at
//! a message boundary, pausing the client's own messages meanwhile.

use bytes::{Buf, BytesMut};
use ghostwire_proto::{Framer, Item, TransactionStatus};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::Shared;
use super::session::{Session, SessionError};
use super::tracker::{ClientStep, Counts, Outcome};

/// Messages up to this size are held whole (to be inspected); larger ones stream through.
pub const HOLD_LIMIT: usize = 64 * 1024;
const READ_CHUNK: usize = 16 * 1024;

/// What the server side asks of the client side.
#[derive(Debug)]
pub enum Injection {
    /// Send these messages to the server.
    Send(Vec<u8>),
    /// The recovery is over: the client's messages may go on.
    Resume,
}

/// Whether `input` starts with a message longer than the hold limit (that is not all there).
fn large_at(input: &[u8]) -> bool {
    match input.get(1..5) {
        Some(len) => {
            let total = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize + 1;
            total > HOLD_LIMIT && input.len() < total
        }
        None => false,
    }
}

fn needs_sync(tag: u8) -> bool {
    matches!(tag, b'P' | b'B' | b'E' | b'D' | b'C' | b'H')
}

/// Writes `bytes` on (flushed when `flush`: TLS holds written bytes until then).
async fn write(to: &mut (impl AsyncWrite + Unpin), bytes: &[u8], flush: bool) -> Result<(), SessionError> {
    if !bytes.is_empty() {
        to.write_all(bytes).await?;
        if flush {
            to.flush().await?;
        }
    }
    Ok(())
}

/// Writes the first `ready` bytes of `buf` on, counts them, and drops them from `buf`.
async fn forward(
    to: &mut (impl AsyncWrite + Unpin),
    buf: &mut BytesMut,
    ready: usize,
    bytes: &metrics::Counter,
    flush: bool,
) -> Result<(), SessionError> {
    if ready > 0 {
        write(to, &buf[..ready], flush).await?;
        bytes.increment(ready as u64);
        buf.advance(ready);
    }
    Ok(())
}

/// Reads more into `buf`; false when the peer closed.
async fn refill(from: &mut (impl AsyncRead + Unpin), buf: &mut BytesMut) -> Result<bool, SessionError> {
    buf.reserve(READ_CHUNK);
    Ok(from.read_buf(buf).await? > 0)
}

pub async fn client_to_server(
    shared: &Shared,
    session: &Session,
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut buf: BytesMut,
    flush: bool,
    mut injections: mpsc::UnboundedReceiver<Injection>,
) -> Result<(), SessionError> {
    let mut framer = Framer::new(shared.max_message_len, HOLD_LIMIT);
    // Counters looked up once per session, not once per message.
    let bytes = metrics::counter!("ghostwire_proxy_bytes_total", "direction" => "client_to_server");
    let requests = metrics::counter!("ghostwire_proxy_requests_total");
    let mut waiting = false;
    loop {
        let mut ready = 0;
        loop {
            if waiting {
                break;
            }
            // Before a new message from an idle session: ask the gate.
            if framer.at_boundary()
                && let Some(&tag) = buf.get(ready)
            {
                let must_enter = {
                    let f = session.flags();
                    tag != b'X' && !f.busy
                };
                if must_enter {
                    forward(&mut to, &mut buf, ready, &bytes, flush).await?;
                    ready = 0;
                    let drains = match shared.gate.try_enter() {
                        Some(drains) => drains,
                        None => {
                            let (held, drains) = shared.gate.enter().await;
                            if !held.is_zero() {
                                metrics::histogram!("ghostwire_proxy_held_seconds").record(held.as_secs_f64());
                            }
                            drains
                        }
                    };
                    session.flags().busy = true;
                    session.tracker().passed_gate(drains);
                }
            }
            // A message too long to hold is shown to the tracker before the framer starts
            // streaming it (a recovery may make it wait, and it must not be half consumed).
            let large = framer.at_boundary() && large_at(&buf[ready..]);
            let early = large.then(|| session.tracker().on_client_large(&buf[ready..]));
            if early == Some(ClientStep::Wait) {
                waiting = true;
                break;
            }
            let (tag, total, step) = match framer.next(&buf[ready..])? {
                Item::Message { tag, total, .. } => {
                    (tag, total, session.tracker().on_client(&buf[ready..ready + total]))
                }
                Item::LargeStart { tag, available, .. } => (tag, available, early.unwrap_or(ClientStep::Forward)),
                Item::Continue(n) => {
                    ready += n;
                    continue;
                }
                Item::NeedMore => break,
            };
            match step {
                ClientStep::Wait => {
                    waiting = true;
                    break;
                }
                ClientStep::Hold(probes) => {
                    // The statements are checked first; the message waits for the end of it.
                    forward(&mut to, &mut buf, ready, &bytes, flush).await?;
                    ready = 0;
                    write(&mut to, &probes, flush).await?;
                    waiting = true;
                    break;
                }
                ClientStep::Prefix(prefix) => {
                    forward(&mut to, &mut buf, ready, &bytes, flush).await?;
                    ready = 0;
                    write(&mut to, &prefix, flush).await?;
                }
                ClientStep::Forward => {}
            }
            let mut f = session.flags();
            match tag {
                b'Q' | b'S' | b'F' => {
                    f.outstanding += 1;
                    f.unsynced = false;
                    requests.increment(1);
                    shared.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                t if needs_sync(t) => f.unsynced = true,
                _ => {}
            }
            ready += total;
        }
        forward(&mut to, &mut buf, ready, &bytes, flush).await?;
        // Read the client, unless a recovery holds its messages back; the server side's
        // own messages go out whenever a message boundary is reached.
        tokio::select! {
            more = refill(&mut from, &mut buf), if !waiting => {
                if !more? {
                    return Ok(()); // the client went away (mid-message or not): close the server side
                }
            }
            injection = injections.recv(), if framer.at_boundary() => match injection {
                Some(Injection::Send(messages)) => write(&mut to, &messages, flush).await?,
                Some(Injection::Resume) => waiting = false,
                None => return Ok(()),
            },
        }
    }
}

/// Publishes what a session's tracker counted since `last`.
fn publish(shared: &Shared, now: Counts, last: &mut Counts) {
    if now == *last {
        return;
    }
    let add = |name: &'static str, n: u64, was: u64| {
        if n > was {
            metrics::counter!(name).increment(n - was);
        }
    };
    add("ghostwire_proxy_reprepared_total", now.reprepared, last.reprepared);
    add("ghostwire_proxy_replayed_total", now.replayed, last.replayed);
    add("ghostwire_proxy_reshaped_rows_total", now.reshaped_rows, last.reshaped_rows);
    add("ghostwire_proxy_stale_errors_passed_total", now.passed_on, last.passed_on);
    shared.add_counts(now, *last);
    *last = now;
}

pub async fn server_to_client(
    shared: &Shared,
    session: &Session,
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut buf: BytesMut,
    flush: bool,
    injections: mpsc::UnboundedSender<Injection>,
) -> Result<(), SessionError> {
    let mut framer = Framer::new(shared.max_message_len, HOLD_LIMIT);
    let bytes = metrics::counter!("ghostwire_proxy_bytes_total", "direction" => "server_to_client");
    let mut counted = Counts::default();
    loop {
        let mut ready = 0;
        loop {
            let (total, outcome) = match framer.next(&buf[ready..])? {
                Item::Message { total, .. } => (total, session.tracker().on_server(&buf[ready..ready + total])),
                Item::LargeStart { tag, available, .. } => (available, session.tracker().on_server_large(tag)),
                Item::Continue(n) => {
                    ready += n;
                    continue;
                }
                Item::NeedMore => break,
            };
            let Outcome { forward: pass, deliver, inject, ready: visible, resume } = outcome;
            if !deliver.is_empty() || !pass {
                forward(&mut to, &mut buf, ready, &bytes, flush).await?;
                ready = 0;
                write(&mut to, &deliver, flush).await?;
                bytes.increment(deliver.len() as u64);
            }
            if !inject.is_empty() {
                let _ = injections.send(Injection::Send(inject));
            }
            if resume {
                let _ = injections.send(Injection::Resume);
            }
            if let Some(status) = visible {
                went_ready(shared, session, status);
            }
            let noteworthy = !pass || visible.is_some();
            if pass {
                ready += total;
            } else {
                buf.advance(total);
            }
            if noteworthy {
                publish(shared, session.tracker().counts, &mut counted);
            }
        }
        forward(&mut to, &mut buf, ready, &bytes, flush).await?;
        if !refill(&mut from, &mut buf).await? {
            return Ok(()); // the server closed (terminated backend, shutdown): so do we
        }
    }
}

/// A ReadyForQuery the client gets: the session may be idle again (and leave the gate).
fn went_ready(shared: &Shared, session: &Session, status: TransactionStatus) {
    let went_idle = {
        let mut f = session.flags();
        f.outstanding = f.outstanding.saturating_sub(1);
        f.status = Some(status);
        let idle = f.outstanding == 0 && !f.unsynced && status == TransactionStatus::Idle;
        let leave = idle && f.busy;
        if leave {
            f.busy = false;
        }
        leave
    };
    if went_idle {
        shared.gate.leave();
    }
}
