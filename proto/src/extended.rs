//! The extended query protocol's messages, as a relay that keeps track of prepared
//! statements reads and writes them: Parse, Bind, Describe, Close and Execute from the
//! client; ParameterDescription and RowDescription from the server; and the few messages a
//! relay sends on its own (Parse, Describe, Close, Sync). Bodies only (after the tag and
//! length), bounds-checked.

use crate::{ProtoError, be_i32, be_u32};

/// A cursor over a message body.
struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn bad(&self) -> ProtoError {
        ProtoError::Malformed { what: self.what }
    }

    fn cstr(&mut self) -> Result<&'a str, ProtoError> {
        let end = self.b.iter().position(|&c| c == 0).ok_or_else(|| self.bad())?;
        let s = std::str::from_utf8(&self.b[..end]).map_err(|_| self.bad())?;
        self.b = &self.b[end + 1..];
        Ok(s)
    }

    fn i16(&mut self) -> Result<i16, ProtoError> {
        let v = self.b.get(..2).ok_or_else(|| self.bad())?;
        self.b = &self.b[2..];
        Ok(i16::from_be_bytes([v[0], v[1]]))
    }

    fn i32(&mut self) -> Result<i32, ProtoError> {
        let v = be_i32(self.b, 0).ok_or_else(|| self.bad())?;
        self.b = &self.b[4..];
        Ok(v)
    }

    fn u32(&mut self) -> Result<u32, ProtoError> {
        let v = be_u32(self.b, 0).ok_or_else(|| self.bad())?;
        self.b = &self.b[4..];
        Ok(v)
    }

    fn count(&mut self) -> Result<usize, ProtoError> {
        usize::try_from(self.i16()?).map_err(|_| self.bad())
    }

    fn skip(&mut self, n: usize) -> Result<(), ProtoError> {
        if self.b.len() < n {
            return Err(self.bad());
        }
        self.b = &self.b[n..];
        Ok(())
    }

    fn byte(&mut self) -> Result<u8, ProtoError> {
        let (&c, rest) = self.b.split_first().ok_or_else(|| self.bad())?;
        self.b = rest;
        Ok(c)
    }
}

/// A Parse ('P') message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parse<'a> {
    /// Empty for the unnamed statement.
    pub name: &'a str,
    pub query: &'a str,
    /// Parameter types the client gave (0: let the server infer it).
    pub param_types: Vec<u32>,
}

pub fn parse_body(body: &[u8]) -> Result<Parse<'_>, ProtoError> {
    let mut r = Reader { b: body, what: "Parse" };
    let name = r.cstr()?;
    let query = r.cstr()?;
    let n = r.count()?;
    let param_types = (0..n).map(|_| r.u32()).collect::<Result<_, _>>()?;
    Ok(Parse { name, query, param_types })
}

/// What a relay needs of a Bind ('B') message: the names and the formats (values skipped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a str,
    pub statement: &'a str,
    /// Parameter format codes (none: all text; one: for all; else one per parameter).
    pub param_formats: Vec<i16>,
    pub result_formats: Vec<i16>,
}

impl Bind<'_> {
    pub fn param_formats(&self) -> ParamFormats {
        ParamFormats(self.param_formats.clone())
    }
}

pub fn bind_body(body: &[u8]) -> Result<Bind<'_>, ProtoError> {
    let mut r = Reader { b: body, what: "Bind" };
    let portal = r.cstr()?;
    let statement = r.cstr()?;
    let n = r.count()?;
    let param_formats = (0..n).map(|_| r.i16()).collect::<Result<Vec<_>, _>>()?;
    let values = r.count()?;
    for _ in 0..values {
        let len = r.i32()?;
        if len > 0 {
            r.skip(len as usize)?;
        } else if len < -1 {
            return Err(r.bad());
        }
    }
    let n = r.count()?;
    let result_formats = (0..n).map(|_| r.i16()).collect::<Result<Vec<_>, _>>()?;
    Ok(Bind { portal, statement, param_formats, result_formats })
}

/// The names at the start of a Bind body (enough when the values are too large to hold).
pub fn bind_names(body: &[u8]) -> Result<(&str, &str), ProtoError> {
    let mut r = Reader { b: body, what: "Bind" };
    Ok((r.cstr()?, r.cstr()?))
}

/// A Bind's parameter format codes: none (all text), one (for all) or one per parameter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParamFormats(Vec<i16>);

impl ParamFormats {
    pub fn new(codes: Vec<i16>) -> ParamFormats {
        ParamFormats(codes)
    }

    /// Every parameter in binary (a single code 1).
    pub fn all_binary() -> ParamFormats {
        ParamFormats(vec![1])
    }

    /// Whether parameter `i` (from 0) is sent in binary.
    pub fn is_binary(&self, i: usize) -> bool {
        match self.0.as_slice() {
            [] => false,
            [all] => *all != 0,
            each => each.get(i).is_some_and(|&f| f != 0),
        }
    }

    /// Whether every parameter is sent as text (then a change in its inferred type is
    /// harmless: the text is parsed as whatever type the parameter has).
    pub fn all_text(&self) -> bool {
        self.0.iter().all(|&f| f == 0)
    }
}

/// A Describe ('D') or Close ('C') message: `S` a statement, `P` a portal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target<'a> {
    pub statement: bool,
    pub name: &'a str,
}

pub fn target_body(body: &[u8]) -> Result<Target<'_>, ProtoError> {
    let mut r = Reader { b: body, what: "Describe or Close" };
    let statement = match r.byte()? {
        b'S' => true,
        b'P' => false,
        _ => return Err(r.bad()),
    };
    Ok(Target { statement, name: r.cstr()? })
}

/// The portal an Execute ('E') message runs.
pub fn execute_portal(body: &[u8]) -> Result<&str, ProtoError> {
    Reader { b: body, what: "Execute" }.cstr()
}

/// ParameterDescription ('t'): the parameters' type OIDs.
pub fn parameter_description(body: &[u8]) -> Result<Vec<u32>, ProtoError> {
    let mut r = Reader { b: body, what: "ParameterDescription" };
    let n = r.count()?;
    (0..n).map(|_| r.u32()).collect()
}

/// One column of a RowDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    /// The table and column it comes from (0 when it is computed).
    pub table_oid: u32,
    pub attnum: i16,
    pub type_oid: u32,
    pub type_len: i16,
    pub typmod: i32,
    pub format: i16,
}

/// RowDescription ('T'): the columns of a result.
pub fn row_description(body: &[u8]) -> Result<Vec<Field>, ProtoError> {
    let mut r = Reader { b: body, what: "RowDescription" };
    let n = r.count()?;
    (0..n)
        .map(|_| {
            Ok(Field {
                name: r.cstr()?.to_owned(),
                table_oid: r.u32()?,
                attnum: r.i16()?,
                type_oid: r.u32()?,
                type_len: r.i16()?,
                typmod: r.i32()?,
                format: r.i16()?,
            })
        })
        .collect()
}

/// A whole message: `tag`, length, `body`.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(tag);
    out.extend(((body.len() + 4) as u32).to_be_bytes());
    out.extend(body);
    out
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend(s.bytes().filter(|&b| b != 0));
    out.push(0);
}

/// A whole Parse message.
pub fn parse_message(name: &str, query: &str, param_types: &[u32]) -> Vec<u8> {
    let mut body = Vec::with_capacity(query.len() + name.len() + 8);
    cstr(&mut body, name);
    cstr(&mut body, query);
    body.extend((param_types.len().min(i16::MAX as usize) as i16).to_be_bytes());
    for t in param_types.iter().take(i16::MAX as usize) {
        body.extend(t.to_be_bytes());
    }
    message(b'P', &body)
}

/// A whole Describe (`statement`: 'S', else 'P') message.
pub fn describe_message(statement: bool, name: &str) -> Vec<u8> {
    let mut body = vec![if statement { b'S' } else { b'P' }];
    cstr(&mut body, name);
    message(b'D', &body)
}

/// A whole Close message.
pub fn close_message(statement: bool, name: &str) -> Vec<u8> {
    let mut body = vec![if statement { b'S' } else { b'P' }];
    cstr(&mut body, name);
    message(b'C', &body)
}

/// A whole Sync message.
pub fn sync_message() -> Vec<u8> {
    message(b'S', &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(m: &[u8]) -> &[u8] {
        &m[5..]
    }

    #[test]
    fn parse_and_the_builders_round_trip() {
        let m = parse_message("s1", "SELECT $1::int", &[23, 0]);
        assert_eq!(m[0], b'P');
        assert_eq!(
            parse_body(body(&m)).unwrap(),
            Parse { name: "s1", query: "SELECT $1::int", param_types: vec![23, 0] }
        );
        assert_eq!(target_body(body(&describe_message(true, "s1"))).unwrap(), Target { statement: true, name: "s1" });
        assert_eq!(target_body(body(&close_message(false, ""))).unwrap(), Target { statement: false, name: "" });
        assert_eq!(sync_message(), vec![b'S', 0, 0, 0, 4]);
        assert!(parse_body(b"s1\0SELECT").is_err());
        assert!(target_body(b"Xname\0").is_err());
    }

    #[test]
    fn bind_skips_the_values() {
        let mut b = b"portal\0stmt\0".to_vec();
        b.extend(1i16.to_be_bytes());
        b.extend(1i16.to_be_bytes()); // all binary
        b.extend(2i16.to_be_bytes());
        b.extend(4i32.to_be_bytes());
        b.extend([0, 0, 0, 7]);
        b.extend((-1i32).to_be_bytes()); // NULL
        b.extend(2i16.to_be_bytes());
        b.extend([0, 1, 0, 0]);
        let bind = bind_body(&b).unwrap();
        assert_eq!((bind.portal, bind.statement), ("portal", "stmt"));
        assert_eq!((bind.param_formats.clone(), bind.result_formats.clone()), (vec![1], vec![1, 0]));
        assert!(!bind.param_formats().all_text());
        assert_eq!(bind_names(&b).unwrap(), ("portal", "stmt"));
        assert!(bind_body(&b[..b.len() - 1]).is_err());
        let mut overlong = b"p\0s\0".to_vec();
        overlong.extend([0, 0, 0, 1, 0, 0, 0, 9, 1]);
        assert!(bind_body(&overlong).is_err(), "a value longer than the message");
    }

    #[test]
    fn descriptions() {
        let mut t = 2i16.to_be_bytes().to_vec();
        for (name, oid, typmod) in [("id", 20u32, -1i32), ("note", 1043, 14)] {
            t.extend(name.as_bytes());
            t.push(0);
            t.extend(16384u32.to_be_bytes());
            t.extend(1i16.to_be_bytes());
            t.extend(oid.to_be_bytes());
            t.extend((-1i16).to_be_bytes());
            t.extend(typmod.to_be_bytes());
            t.extend(0i16.to_be_bytes());
        }
        let fields = row_description(&t).unwrap();
        assert_eq!(fields.len(), 2);
        assert_eq!((fields[1].name.as_str(), fields[1].type_oid, fields[1].typmod), ("note", 1043, 14));
        assert!(row_description(&t[..t.len() - 2]).is_err());
        assert_eq!(parameter_description(&[0, 2, 0, 0, 0, 23, 0, 0, 0, 25]).unwrap(), vec![23, 25]);
        assert!(parameter_description(&[0, 2, 0, 0, 0, 23]).is_err());
        assert_eq!(execute_portal(b"p1\0\0\0\0\0").unwrap(), "p1");
    }
}
