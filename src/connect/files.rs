//! The files libpq reads besides the connection string: the password file (`~/.pgpass`,
//! `PGPASSFILE`, `passfile`) and the connection service file (`pg_service.conf`).

use std::fs;
use std::path::{Path, PathBuf};

use super::conninfo::{Conninfo, ConninfoError};

/// One field of a `.pgpass` line matches: `*` matches anything.
fn field_matches(pattern: &str, value: &str) -> bool {
    pattern == "*" || pattern == value
}

/// The fields of a `.pgpass` line (`\:` and `\\` escaped), or None for a comment or a line
/// with fewer than five fields.
fn pgpass_fields(line: &str) -> Option<Vec<String>> {
    if line.starts_with('#') || line.trim().is_empty() {
        return None;
    }
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    fields.last_mut()?.push(n);
                }
            }
            // The fifth field is the password: colons there are its own.
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields.last_mut()?.push(c),
        }
    }
    (fields.len() == 5).then_some(fields)
}

/// What a connection attempt looks up in the password file.
#[derive(Debug, Clone)]
pub struct PassKey<'a> {
    pub host: &'a str,
    pub port: u16,
    pub dbname: &'a str,
    pub user: &'a str,
}

/// The password for `key` from the password file at `path`, as libpq finds it: the first
/// matching line wins; a file readable by group or others is ignored with a warning.
pub fn pgpass_lookup(path: &Path, key: &PassKey<'_>) -> Option<String> {
    let meta = fs::metadata(path).ok()?;
    if !meta.is_file() {
        tracing::warn!("password file {} is not a plain file; ignoring it", path.display());
        return None;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                "password file {} has group or world access; permissions should be u=rw (0600) or less \
                 (chmod 0600 {}); ignoring it",
                path.display(),
                path.display()
            );
            return None;
        }
    }
    let text = fs::read_to_string(path).ok()?;
    let port = key.port.to_string();
    text.lines().map(|l| l.trim_end_matches('\r')).filter_map(pgpass_fields).find_map(|f| {
        (field_matches(&f[0], key.host)
            && field_matches(&f[1], &port)
            && field_matches(&f[2], key.dbname)
            && field_matches(&f[3], key.user))
        .then(|| f[4].clone())
    })
}

/// The keyword/value pairs of service `name` in the INI-style service file `text`, or None
/// when the file has no such section.
pub fn service_section(text: &str, name: &str, file: &Path) -> Result<Option<Conninfo>, ConninfoError> {
    let mut found: Option<Conninfo> = None;
    let mut in_section = false;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[') {
            let section = section.strip_suffix(']').ok_or_else(|| {
                ConninfoError::Uri(format!("syntax error in service file {}, line {}", file.display(), n + 1))
            })?;
            if found.is_some() && in_section {
                break;
            }
            in_section = section.trim() == name;
            if in_section {
                found = Some(Conninfo::default());
            }
            continue;
        }
        if !in_section {
            continue;
        }
        let (k, v) = line.split_once('=').ok_or_else(|| {
            ConninfoError::Uri(format!("syntax error in service file {}, line {}", file.display(), n + 1))
        })?;
        let k = k.trim();
        if k == "service" {
            return Err(ConninfoError::Uri(format!(
                "nested \"service\" specifications are not supported in service file {}, line {}",
                file.display(),
                n + 1
            )));
        }
        if let Some(c) = found.as_mut() {
            c.set(k, v.trim())?;
        }
    }
    Ok(found)
}

/// Looks service `name` up in each file in turn (the user's file, then the system one).
pub fn find_service(name: &str, files: &[PathBuf]) -> Result<Conninfo, ConninfoError> {
    for file in files {
        let Ok(text) = fs::read_to_string(file) else { continue };
        if let Some(found) = service_section(&text, name, file)? {
            return Ok(found);
        }
    }
    let looked: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    Err(ConninfoError::Uri(format!(
        "definition of service \"{name}\" not found (looked in {})",
        if looked.is_empty() { "no file".to_owned() } else { looked.join(", ") }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    fn key<'a>(host: &'a str, port: u16, dbname: &'a str, user: &'a str) -> PassKey<'a> {
        PassKey { host, port, dbname, user }
    }

    #[test]
    fn pgpass_matches_first_line_with_wildcards_and_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgpass");
        let mut f = fs::File::create(&path).unwrap();
        writeln!(f, "# comment\ndb.example:5432:app:alice:first\n*:*:*:alice:a\\:b\\\\c:d\nshort:line").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(pgpass_lookup(&path, &key("db.example", 5432, "app", "alice")).as_deref(), Some("first"));
        assert_eq!(pgpass_lookup(&path, &key("other", 6000, "x", "alice")).as_deref(), Some("a:b\\c:d"));
        assert_eq!(pgpass_lookup(&path, &key("other", 6000, "x", "bob")), None);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(pgpass_lookup(&path, &key("db.example", 5432, "app", "alice")), None, "world-readable: ignored");
    }

    #[test]
    fn service_files() {
        let text = "# services\n[other]\nhost=x\n\n[prod]\nhost = db.prod\nport=6432\n dbname = app \n[next]\nhost=y\n";
        let f = Path::new("pg_service.conf");
        let s = service_section(text, "prod", f).unwrap().unwrap();
        assert_eq!(s.get("host"), Some("db.prod"));
        assert_eq!(s.get("port"), Some("6432"));
        assert_eq!(s.get("dbname"), Some("app"));
        assert_eq!(service_section(text, "missing", f).unwrap(), None);
        assert!(service_section("[a]\nbogus=1\n", "a", f).is_err());
        assert!(service_section("[a]\nservice=b\n", "a", f).is_err());
        let dir = tempfile::tempdir().unwrap();
        let (user, system) = (dir.path().join("user.conf"), dir.path().join("system.conf"));
        fs::write(&system, "[prod]\nhost=sys\n").unwrap();
        assert_eq!(find_service("prod", &[user.clone(), system.clone()]).unwrap().get("host"), Some("sys"));
        fs::write(&user, "[prod]\nhost=mine\n").unwrap();
        assert_eq!(find_service("prod", &[user, system]).unwrap().get("host"), Some("mine"));
        assert!(find_service("nope", &[]).unwrap_err().to_string().contains("\"nope\" not found"));
    }
}
