//! libpq connection strings: `postgresql://` URIs and `keyword=value` strings, parsed into
//! keyword/value pairs exactly as libpq reads them (percent-decoding, quoting, host lists,
//! query parameters, unknown keywords refused). Nothing is looked up here: the service
//! file, the environment and the defaults come after ([`super::params`]).

use thiserror::Error;

/// Every keyword libpq 17 accepts. Those ghostwire cannot honour are refused later, with the
/// reason, rather than silently ignored.
pub const KEYWORDS: &[&str] = &[
    "service",
    "user",
    "password",
    "passfile",
    "channel_binding",
    "connect_timeout",
    "dbname",
    "host",
    "hostaddr",
    "port",
    "client_encoding",
    "options",
    "application_name",
    "fallback_application_name",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "sslmode",
    "sslnegotiation",
    "sslcompression",
    "sslcert",
    "sslkey",
    "sslcertmode",
    "sslpassword",
    "sslrootcert",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "requirepeer",
    "require_auth",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "gssencmode",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
    "replication",
    "target_session_attrs",
    "load_balance_hosts",
];

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConninfoError {
    #[error(
        "invalid connection option \"{0}\" (libpq's options are listed at https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-PARAMKEYWORDS)"
    )]
    UnknownKeyword(String),
    #[error("missing \"=\" after \"{0}\" in the connection string")]
    MissingEquals(String),
    #[error("unterminated quoted string in the connection string")]
    UnterminatedQuote,
    #[error("invalid percent-encoded token in the connection URI: \"{0}\"")]
    BadPercent(String),
    #[error("forbidden value %00 in percent-encoded value in the connection URI")]
    NulByte,
    #[error("invalid connection URI: {0}")]
    Uri(String),
}

/// The keyword/value pairs of a connection string, in the order given (a later value of a
/// keyword replaces an earlier one, as in libpq).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Conninfo {
    pairs: Vec<(String, String)>,
}

impl std::fmt::Debug for Conninfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: Vec<(&str, &str)> = self
            .pairs
            .iter()
            .map(|(k, v)| (k.as_str(), if k == "password" || k == "sslpassword" { "<redacted>" } else { v.as_str() }))
            .collect();
        f.debug_struct("Conninfo").field("pairs", &shown).finish()
    }
}

impl Conninfo {
    pub fn get(&self, keyword: &str) -> Option<&str> {
        self.pairs.iter().find(|(k, _)| k == keyword).map(|(_, v)| v.as_str())
    }

    /// Sets `keyword` (replacing an earlier value). The keyword must be one of [`KEYWORDS`].
    pub fn set(&mut self, keyword: &str, value: impl Into<String>) -> Result<(), ConninfoError> {
        let keyword = canonical(keyword)?;
        let value = value.into();
        match self.pairs.iter_mut().find(|(k, _)| k == keyword) {
            Some(pair) => pair.1 = value,
            None => self.pairs.push((keyword.to_owned(), value)),
        }
        Ok(())
    }

    pub fn contains(&self, keyword: &str) -> bool {
        self.get(keyword).is_some()
    }

    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

fn canonical(keyword: &str) -> Result<&'static str, ConninfoError> {
    KEYWORDS.iter().copied().find(|k| *k == keyword).ok_or_else(|| ConninfoError::UnknownKeyword(keyword.to_owned()))
}

/// Parses a connection string: a URI (`postgresql://…` or `postgres://…`), keyword/value
/// pairs, or, as libpq does for a string with neither `=` nor a URI prefix, a database name.
pub fn parse(text: &str) -> Result<Conninfo, ConninfoError> {
    if let Some(rest) = text.strip_prefix("postgresql://").or_else(|| text.strip_prefix("postgres://")) {
        parse_uri(rest)
    } else if text.contains('=') {
        parse_keywords(text)
    } else {
        let mut c = Conninfo::default();
        if !text.trim().is_empty() {
            c.set("dbname", text.trim())?;
        }
        Ok(c)
    }
}

/// `keyword = value …`; values may be single-quoted; a backslash escapes the next character.
fn parse_keywords(text: &str) -> Result<Conninfo, ConninfoError> {
    let mut out = Conninfo::default();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut keyword = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            keyword.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(ConninfoError::MissingEquals(keyword));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => return Err(ConninfoError::UnterminatedQuote),
                    Some('\'') => break,
                    Some('\\') => value.push(chars.next().ok_or(ConninfoError::UnterminatedQuote)?),
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        out.set(&keyword, value)?;
    }
}

fn decode(text: &str) -> Result<String, ConninfoError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let byte = hex
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ConninfoError::BadPercent(text[i..].chars().take(3).collect()))?;
            if byte == 0 {
                return Err(ConninfoError::NulByte);
            }
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ConninfoError::Uri("a percent-encoded value is not UTF-8".into()))
}

/// After the scheme: `[user[:password]@][host[:port][,…]][/dbname][?keyword=value[&…]]`.
fn parse_uri(rest: &str) -> Result<Conninfo, ConninfoError> {
    let mut out = Conninfo::default();
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.find('/') {
        Some(at) => (&before_query[..at], Some(&before_query[at + 1..])),
        None => (before_query, None),
    };
    let hosts = match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                out.set("user", decode(user)?)?;
            }
            if let Some(p) = password {
                out.set("password", decode(p)?)?;
            }
            &authority[at + 1..]
        }
        None => authority,
    };
    if !hosts.is_empty() {
        let (mut host_list, mut port_list) = (Vec::new(), Vec::new());
        for spec in hosts.split(',') {
            let (host, port) = split_host_port(spec)?;
            host_list.push(decode(host)?);
            port_list.push(decode(port.unwrap_or(""))?);
        }
        if host_list.iter().any(|h| !h.is_empty()) {
            out.set("host", host_list.join(","))?;
        }
        if port_list.iter().any(|p| !p.is_empty()) {
            out.set("port", port_list.join(","))?;
        }
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        out.set("dbname", decode(db)?)?;
    }
    for param in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (k, v) = param
            .split_once('=')
            .ok_or_else(|| ConninfoError::Uri(format!("missing value for the query parameter \"{param}\"")))?;
        let (k, v) = (decode(k)?, decode(v)?);
        // libpq accepts JDBC's `ssl=true` as sslmode=require.
        if k == "ssl" && v == "true" {
            out.set("sslmode", "require")?;
            continue;
        }
        out.set(&k, v)?;
    }
    Ok(out)
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`.
fn split_host_port(spec: &str) -> Result<(&str, Option<&str>), ConninfoError> {
    if let Some(inner) = spec.strip_prefix('[') {
        let end = inner
            .find(']')
            .ok_or_else(|| ConninfoError::Uri(format!("missing \"]\" in the IPv6 host address \"{spec}\"")))?;
        let host = &inner[..end];
        if host.is_empty() {
            return Err(ConninfoError::Uri("empty IPv6 host address".into()));
        }
        return match &inner[end + 1..] {
            "" => Ok((host, None)),
            p if p.starts_with(':') => Ok((host, Some(&p[1..]))),
            _ => Err(ConninfoError::Uri(format!("unexpected text after the IPv6 host address \"{spec}\""))),
        };
    }
    Ok(match spec.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (spec, None),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(text: &str) -> Vec<(String, String)> {
        parse(text).unwrap().pairs().map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
    }

    fn kv(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn uris() {
        assert_eq!(
            pairs("postgres://app:s%40cret@db.example:6543/my%20db?sslmode=verify-full&sslrootcert=ca.pem"),
            kv(&[
                ("user", "app"),
                ("password", "s@cret"),
                ("host", "db.example"),
                ("port", "6543"),
                ("dbname", "my db"),
                ("sslmode", "verify-full"),
                ("sslrootcert", "ca.pem")
            ])
        );
        assert_eq!(
            pairs("postgresql://a:1,b,[::1]:3/db?target_session_attrs=primary"),
            kv(&[("host", "a,b,::1"), ("port", "1,,3"), ("dbname", "db"), ("target_session_attrs", "primary")])
        );
        assert_eq!(
            pairs("postgresql:///db?host=/var/run/postgresql"),
            kv(&[("dbname", "db"), ("host", "/var/run/postgresql")])
        );
        assert_eq!(pairs("postgresql://%2Ftmp/db"), kv(&[("host", "/tmp"), ("dbname", "db")]));
        assert_eq!(pairs("postgresql://"), kv(&[]));
        assert_eq!(pairs("postgres://h/d?ssl=true"), kv(&[("host", "h"), ("dbname", "d"), ("sslmode", "require")]));
        assert_eq!(pairs("postgres://u@h"), kv(&[("user", "u"), ("host", "h")]));
    }

    #[test]
    fn uri_errors() {
        assert_eq!(parse("postgres://h/d?bogus=1"), Err(ConninfoError::UnknownKeyword("bogus".into())));
        assert!(matches!(parse("postgres://h/d%zz"), Err(ConninfoError::BadPercent(_))));
        assert_eq!(parse("postgres://h/d%00"), Err(ConninfoError::NulByte));
        assert!(matches!(parse("postgres://[::1/d"), Err(ConninfoError::Uri(_))));
        assert!(matches!(parse("postgres://h/d?sslmode"), Err(ConninfoError::Uri(_))));
    }

    #[test]
    fn keyword_strings() {
        assert_eq!(
            pairs("host=localhost port = 5433 dbname='my db' password='it\\'s' options='-c search_path=a\\\\b'"),
            kv(&[
                ("host", "localhost"),
                ("port", "5433"),
                ("dbname", "my db"),
                ("password", "it's"),
                ("options", "-c search_path=a\\b")
            ])
        );
        assert_eq!(pairs("user=a user=b"), kv(&[("user", "b")]));
        assert_eq!(pairs("  application_name=x\\ y  "), kv(&[("application_name", "x y")]));
        assert_eq!(pairs("mydb"), kv(&[("dbname", "mydb")]));
        assert_eq!(parse("host"), Ok(Conninfo { pairs: kv(&[("dbname", "host")]) }));
        assert_eq!(parse("host localhost port=1"), Err(ConninfoError::MissingEquals("host".into())));
        assert_eq!(parse("host='x"), Err(ConninfoError::UnterminatedQuote));
        assert_eq!(parse("hots=x"), Err(ConninfoError::UnknownKeyword("hots".into())));
    }

    #[test]
    fn passwords_are_redacted_in_debug_output() {
        let c = parse("postgres://u:hunter2@h/d?sslpassword=swordfish").unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2") && !shown.contains("swordfish"), "{shown}");
    }
}
