//! The authentication exchange as a relay sees it: which request the server made, the SASL
//! mechanisms it offered and the one the client chose; and a FATAL ErrorResponse for a
//! proxy that must refuse a login itself.

use crate::{ProtoError, be_i32};

/// SASL mechanism names PostgreSQL offers.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// What an Authentication ('R') message asks of the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthRequest<'a> {
    Ok,
    /// A password message must follow (cleartext 3, MD5 5).
    Password,
    /// SASL (10): the mechanisms the server offers; a SASLInitialResponse must follow.
    Sasl(Vec<&'a str>),
    /// SASLContinue (11): a SASLResponse must follow.
    SaslContinue,
    /// SASLFinal (12): nothing follows from the client.
    SaslFinal,
    /// GSS (7), GSSContinue (8) or SSPI (9): the client answers with GSS data.
    Gss,
    /// Anything else (the server ends the exchange or the client gives up).
    Other(i32),
}

impl AuthRequest<'_> {
    /// The client must send a message before the server goes on.
    pub fn needs_answer(&self) -> bool {
        matches!(self, AuthRequest::Password | AuthRequest::Sasl(_) | AuthRequest::SaslContinue | AuthRequest::Gss)
    }
}

/// Reads an Authentication ('R') body.
pub fn auth_request(body: &[u8]) -> Result<AuthRequest<'_>, ProtoError> {
    let code = be_i32(body, 0).ok_or(ProtoError::Malformed { what: "Authentication" })?;
    Ok(match code {
        0 => AuthRequest::Ok,
        3 | 5 => AuthRequest::Password,
        7..=9 => AuthRequest::Gss,
        10 => {
            let bad = ProtoError::Malformed { what: "AuthenticationSASL" };
            let mut names = Vec::new();
            let mut rest = body.get(4..).unwrap_or_default();
            loop {
                let end = rest.iter().position(|&c| c == 0).ok_or(bad.clone())?;
                if end == 0 {
                    break;
                }
                names.push(std::str::from_utf8(&rest[..end]).map_err(|_| bad.clone())?);
                rest = &rest[end + 1..];
            }
            AuthRequest::Sasl(names)
        }
        11 => AuthRequest::SaslContinue,
        12 => AuthRequest::SaslFinal,
        other => AuthRequest::Other(other),
    })
}

/// A whole AuthenticationSASL message offering `mechanisms`.
pub fn sasl_request(mechanisms: &[&str]) -> Vec<u8> {
    let mut body = 10i32.to_be_bytes().to_vec();
    for m in mechanisms {
        body.extend(m.bytes().filter(|&b| b != 0));
        body.push(0);
    }
    body.push(0);
    let mut out = vec![b'R'];
    out.extend(((body.len() + 4) as u32).to_be_bytes());
    out.extend(body);
    out
}

/// The mechanism a SASLInitialResponse ('p' after AuthenticationSASL) body names.
pub fn sasl_initial_mechanism(body: &[u8]) -> Result<&str, ProtoError> {
    let bad = ProtoError::Malformed { what: "SASLInitialResponse" };
    let end = body.iter().position(|&c| c == 0).ok_or(bad.clone())?;
    std::str::from_utf8(&body[..end]).map_err(|_| bad)
}

/// A whole ErrorResponse message with severity FATAL, SQLSTATE `code` and `message`.
pub fn fatal_error(code: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [(b'S', "FATAL"), (b'V', "FATAL"), (b'C', code), (b'M', message)] {
        body.push(field);
        body.extend(value.bytes().filter(|&b| b != 0));
        body.push(0);
    }
    body.push(0);
    crate::message(b'E', &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error_fields;

    #[test]
    fn reads_requests_and_mechanisms() {
        assert_eq!(auth_request(&[0, 0, 0, 0]).unwrap(), AuthRequest::Ok);
        assert_eq!(auth_request(&[0, 0, 0, 5, 1, 2, 3, 4]).unwrap(), AuthRequest::Password);
        let mut sasl = vec![0, 0, 0, 10];
        sasl.extend(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
        assert_eq!(auth_request(&sasl).unwrap(), AuthRequest::Sasl(vec![SCRAM_SHA_256_PLUS, SCRAM_SHA_256]));
        assert!(auth_request(&sasl[..sasl.len() - 1]).is_err(), "unterminated list");
        let rebuilt = sasl_request(&[SCRAM_SHA_256_PLUS, SCRAM_SHA_256]);
        assert_eq!(&rebuilt[5..], &sasl[..]);
        assert!(auth_request(&[0, 0]).is_err());
        assert!(AuthRequest::SaslContinue.needs_answer() && !AuthRequest::SaslFinal.needs_answer());
        let mut initial = b"SCRAM-SHA-256-PLUS\0".to_vec();
        initial.extend([0, 0, 0, 3, b'p', b'=', b'x']);
        assert_eq!(sasl_initial_mechanism(&initial).unwrap(), SCRAM_SHA_256_PLUS);
        assert!(sasl_initial_mechanism(b"no nul").is_err());
    }

    #[test]
    fn builds_a_fatal_error() {
        let m = fatal_error("28000", "no\0 entry");
        assert_eq!(m[0], b'E');
        assert_eq!(u32::from_be_bytes([m[1], m[2], m[3], m[4]]) as usize, m.len() - 1);
        let fields = error_fields(&m[5..]).unwrap();
        assert!(fields.contains(&(b'C', "28000")) && fields.contains(&(b'M', "no entry")));
    }
}
