//! The streaming replication protocol's messages, carried in CopyData ('d') during
//! CopyBoth: XLogData and primary keepalives from the server, standby status updates from
//! the client; and LSNs in PostgreSQL's text form (`16/B374D848`).

use crate::ProtoError;

/// A message the server sends inside CopyData while streaming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerCopy<'a> {
    /// 'w': WAL data (for a logical slot, one output plugin message) starting at `start`.
    XLogData { start: u64, wal_end: u64, timestamp: i64, data: &'a [u8] },
    /// 'k': the server's WAL end; `reply` asks for a status update at once.
    Keepalive { wal_end: u64, timestamp: i64, reply: bool },
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let bytes: [u8; 8] = b.get(at..at.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// Decodes the body of a CopyData message from the server.
pub fn server_copy(body: &[u8]) -> Result<ServerCopy<'_>, ProtoError> {
    match body.first() {
        Some(b'w') => {
            let bad = ProtoError::Malformed { what: "XLogData" };
            let (start, wal_end, ts) = (u64_at(body, 1), u64_at(body, 9), u64_at(body, 17));
            match (start, wal_end, ts) {
                (Some(start), Some(wal_end), Some(ts)) => {
                    Ok(ServerCopy::XLogData { start, wal_end, timestamp: ts as i64, data: &body[25..] })
                }
                _ => Err(bad),
            }
        }
        Some(b'k') => {
            let bad = ProtoError::Malformed { what: "primary keepalive" };
            if body.len() != 18 {
                return Err(bad);
            }
            let (wal_end, ts) = (u64_at(body, 1).ok_or(bad.clone())?, u64_at(body, 9).ok_or(bad)?);
            Ok(ServerCopy::Keepalive { wal_end, timestamp: ts as i64, reply: body[17] == 1 })
        }
        _ => Err(ProtoError::Malformed { what: "replication CopyData" }),
    }
}

/// The body of a standby status update ('r'): WAL written, flushed and applied up to
/// these positions (a logical slot's `confirmed_flush_lsn` follows `flush`), the client's
/// clock (microseconds since 2000-01-01), and whether the server should answer at once.
pub fn standby_status_update(write: u64, flush: u64, apply: u64, timestamp: i64, reply: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(34);
    b.push(b'r');
    b.extend(write.to_be_bytes());
    b.extend(flush.to_be_bytes());
    b.extend(apply.to_be_bytes());
    b.extend(timestamp.to_be_bytes());
    b.push(u8::from(reply));
    b
}

/// An LSN in PostgreSQL's text form.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// Parses `X/Y` (hexadecimal halves), as `pg_lsn` prints it.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    let (hi, lo) = (u32::from_str_radix(hi, 16).ok()?, u32::from_str_radix(lo, 16).ok()?);
    Some((u64::from(hi) << 32) | u64::from(lo))
}

/// Microseconds since 2000-01-01 00:00 UTC, the protocol's clock, for `now`.
pub fn pg_timestamp(now: std::time::SystemTime) -> i64 {
    const PG_EPOCH_FROM_UNIX_SECS: u64 = 946_684_800;
    let since = now.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    since.as_micros() as i64 - (PG_EPOCH_FROM_UNIX_SECS as i64) * 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_round_trip_in_text() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(format_lsn(0), "0/0");
        assert_eq!(parse_lsn("nope"), None);
    }

    #[test]
    fn reads_wal_data_and_keepalives() {
        let mut k = vec![b'k'];
        k.extend(99u64.to_be_bytes());
        k.extend(5i64.to_be_bytes());
        k.push(1);
        assert_eq!(server_copy(&k).unwrap(), ServerCopy::Keepalive { wal_end: 99, timestamp: 5, reply: true });
        assert!(server_copy(&k[..17]).is_err());
        let mut w = vec![b'w'];
        w.extend(1u64.to_be_bytes());
        w.extend(2u64.to_be_bytes());
        w.extend(3i64.to_be_bytes());
        w.extend(b"B...");
        assert!(matches!(server_copy(&w).unwrap(), ServerCopy::XLogData { start: 1, data: b"B...", .. }));
        assert!(server_copy(&w[..20]).is_err());
        assert_eq!(standby_status_update(1, 2, 3, 4, false).len(), 34);
    }
}
