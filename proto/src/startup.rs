//! The untagged packets that open a connection: SSLRequest, GSSENCRequest, CancelRequest,
//! StartupMessage.

use crate::{CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, MAX_STARTUP_LEN, ProtoError, SSL_REQUEST_CODE, be_i32, be_u32};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket<'a> {
    SslRequest,
    GssEncRequest,
    /// Cancel the query running on backend `pid`; the key is 4 bytes in protocol 3.0, up to
    /// 256 in 3.2.
    Cancel {
        pid: i32,
        key: &'a [u8],
    },
    Startup {
        version: u32,
        params: Vec<(&'a str, &'a str)>,
    },
}

/// Parses the packet at the start of `buf`: `Ok(None)` when more bytes are needed, else the
/// packet and its length in bytes.
pub fn parse_startup(buf: &[u8]) -> Result<Option<(StartupPacket<'_>, usize)>, ProtoError> {
    let Some(len) = be_u32(buf, 0) else { return Ok(None) };
    if len < 8 {
        return Err(ProtoError::TooShort { len, min: 8 });
    }
    if len > MAX_STARTUP_LEN {
        return Err(ProtoError::TooLong { len, max: MAX_STARTUP_LEN });
    }
    let len = len as usize;
    let Some(packet) = buf.get(..len) else { return Ok(None) };
    let code = be_i32(packet, 4).ok_or(ProtoError::Malformed { what: "startup packet" })?;
    let parsed = match code {
        SSL_REQUEST_CODE if len == 8 => StartupPacket::SslRequest,
        GSSENC_REQUEST_CODE if len == 8 => StartupPacket::GssEncRequest,
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => return Err(ProtoError::Malformed { what: "encryption request" }),
        CANCEL_REQUEST_CODE => {
            let pid = be_i32(packet, 8).ok_or(ProtoError::Malformed { what: "cancel request" })?;
            let key = packet.get(12..).unwrap_or_default();
            if key.len() < 4 || key.len() > 256 {
                return Err(ProtoError::Malformed { what: "cancel request key" });
            }
            StartupPacket::Cancel { pid, key }
        }
        version if (version >> 16) == 3 => {
            StartupPacket::Startup { version: version as u32, params: params(packet.get(8..).unwrap_or_default())? }
        }
        _ => return Err(ProtoError::Malformed { what: "startup packet (unsupported protocol version)" }),
    };
    Ok(Some((parsed, len)))
}

/// `name\0value\0…\0`
/// A whole StartupMessage (a relay that changes a parameter writes it again).
pub fn startup_message(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (name, value) in params {
        for s in [name, value] {
            body.extend(s.bytes().filter(|&b| b != 0));
            body.push(0);
        }
    }
    body.push(0);
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

fn params(mut b: &[u8]) -> Result<Vec<(&str, &str)>, ProtoError> {
    let bad = ProtoError::Malformed { what: "startup parameters" };
    let mut out = Vec::new();
    loop {
        let end = b.iter().position(|&c| c == 0).ok_or(bad.clone())?;
        if end == 0 {
            return if b.len() == 1 { Ok(out) } else { Err(bad) };
        }
        let name = std::str::from_utf8(&b[..end]).map_err(|_| bad.clone())?;
        b = &b[end + 1..];
        let vend = b.iter().position(|&c| c == 0).ok_or(bad.clone())?;
        let value = std::str::from_utf8(&b[..vend]).map_err(|_| bad.clone())?;
        b = &b[vend + 1..];
        out.push((name, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: i32, payload: &[u8]) -> Vec<u8> {
        let mut v = ((8 + payload.len()) as u32).to_be_bytes().to_vec();
        v.extend(code.to_be_bytes());
        v.extend(payload);
        v
    }

    #[test]
    fn parses_each_kind() {
        assert_eq!(parse_startup(&packet(SSL_REQUEST_CODE, &[])).unwrap(), Some((StartupPacket::SslRequest, 8)));
        assert_eq!(parse_startup(&packet(GSSENC_REQUEST_CODE, &[])).unwrap(), Some((StartupPacket::GssEncRequest, 8)));
        let mut cancel = 42i32.to_be_bytes().to_vec();
        cancel.extend([1, 2, 3, 4]);
        assert_eq!(
            parse_startup(&packet(CANCEL_REQUEST_CODE, &cancel)).unwrap(),
            Some((StartupPacket::Cancel { pid: 42, key: &[1, 2, 3, 4] }, 16))
        );
        let p = packet(196608, b"user\0alice\0database\0db\0\0");
        let (s, n) = parse_startup(&p).unwrap().unwrap();
        assert_eq!(n, p.len());
        assert_eq!(s, StartupPacket::Startup { version: 196608, params: vec![("user", "alice"), ("database", "db")] });
    }

    #[test]
    fn waits_for_more_and_rejects_bad_packets() {
        let p = packet(196608, b"user\0a\0\0");
        assert_eq!(parse_startup(&p[..3]).unwrap(), None);
        assert_eq!(parse_startup(&p[..p.len() - 1]).unwrap(), None);
        assert!(matches!(parse_startup(&[0, 0, 0, 4, 0, 0, 0, 0]), Err(ProtoError::TooShort { .. })));
        assert!(matches!(parse_startup(&[0, 1, 0, 0]), Err(ProtoError::TooLong { .. })));
        assert!(parse_startup(&packet(196608, b"user\0a")).is_err()); // unterminated
        assert!(parse_startup(&packet(131072, b"\0")).is_err()); // protocol 2
        assert!(parse_startup(&packet(CANCEL_REQUEST_CODE, &[0, 0, 0, 1])).is_err()); // no key
    }
}
