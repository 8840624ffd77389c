//! Reading the few messages a proxy must understand.

use crate::{ProtoError, be_i32};

/// The transaction status a ReadyForQuery ('Z') reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionStatus {
    /// 'I': not in a transaction block.
    Idle,
    /// 'T': in a transaction block.
    InTransaction,
    /// 'E': in a failed transaction block.
    Failed,
}

/// The status byte of a ReadyForQuery body.
pub fn ready_for_query(body: &[u8]) -> Result<TransactionStatus, ProtoError> {
    match body {
        [b'I'] => Ok(TransactionStatus::Idle),
        [b'T'] => Ok(TransactionStatus::InTransaction),
        [b'E'] => Ok(TransactionStatus::Failed),
        _ => Err(ProtoError::Malformed { what: "ReadyForQuery" }),
    }
}

/// (process id, secret key) of a BackendKeyData ('K') body.
pub fn backend_key_data(body: &[u8]) -> Result<(i32, &[u8]), ProtoError> {
    let pid = be_i32(body, 0).ok_or(ProtoError::Malformed { what: "BackendKeyData" })?;
    let key = body.get(4..).unwrap_or_default();
    if key.len() < 4 || key.len() > 256 {
        return Err(ProtoError::Malformed { what: "BackendKeyData key" });
    }
    Ok((pid, key))
}

/// The fields of an ErrorResponse or NoticeResponse body: (field code, value).
pub fn error_fields(body: &[u8]) -> Result<Vec<(u8, &str)>, ProtoError> {
    let bad = ProtoError::Malformed { what: "ErrorResponse" };
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        match rest.split_first() {
            Some((0, [])) => return Ok(out),
            Some((&code, tail)) if code != 0 => {
                let end = tail.iter().position(|&c| c == 0).ok_or(bad.clone())?;
                out.push((code, std::str::from_utf8(&tail[..end]).map_err(|_| bad.clone())?));
                rest = &tail[end + 1..];
            }
            _ => return Err(bad),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_status_keys_and_errors() {
        assert_eq!(ready_for_query(b"T").unwrap(), TransactionStatus::InTransaction);
        assert!(ready_for_query(b"").is_err() && ready_for_query(b"IX").is_err());
        assert_eq!(backend_key_data(&[0, 0, 1, 0, 9, 9, 9, 9]).unwrap(), (256, &[9u8, 9, 9, 9][..]));
        assert!(backend_key_data(&[0, 0, 1]).is_err());
        assert_eq!(error_fields(b"SERROR\0C57014\0\0").unwrap(), vec![(b'S', "ERROR"), (b'C', "57014")]);
        assert!(error_fields(b"SERROR").is_err());
    }
}
