//! `ghostwire proxy --route RULE`: sessions whose startup names a matching application,
//! user or database get a search_path set at startup (a version schema first, say), so a
//! new deploy only changes its `application_name`.
//!
//! A rule is `KEY=PATTERN:SEARCH_PATH`, KEY one of `application_name`, `user`, `database`,
//! PATTERN with `*` for any run of characters: `application_name=web-v2*:app_v2,public`.
//! The first matching rule wins; the search_path goes into the startup packet as its own
//! parameter, which PostgreSQL applies after (so over) any `-c search_path` in `options`.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKey {
    ApplicationName,
    User,
    Database,
}

#[derive(Debug)]
pub struct Route {
    pub rule: String,
    key: RouteKey,
    pattern: String,
    pub search_path: String,
    /// Sessions it routed since the proxy started.
    pub routed: AtomicU64,
}

impl Clone for Route {
    fn clone(&self) -> Route {
        Route {
            rule: self.rule.clone(),
            key: self.key,
            pattern: self.pattern.clone(),
            search_path: self.search_path.clone(),
            routed: AtomicU64::new(self.routed.load(Ordering::Relaxed)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "--route {rule:?}: {why}; write KEY=PATTERN:SEARCH_PATH, KEY one of application_name, user, database, e.g. \
     application_name=web-v2*:app_v2,public"
)]
pub struct RouteError {
    rule: String,
    why: &'static str,
}

impl Route {
    pub fn parse(rule: &str) -> Result<Route, RouteError> {
        let bad = |why| RouteError { rule: rule.to_owned(), why };
        let (matcher, search_path) = rule.split_once(':').ok_or_else(|| bad("no ':' before the search_path"))?;
        let (key, pattern) = matcher.split_once('=').ok_or_else(|| bad("no '=' between the key and the pattern"))?;
        let key = match key.trim() {
            "application_name" => RouteKey::ApplicationName,
            "user" => RouteKey::User,
            "database" => RouteKey::Database,
            _ => return Err(bad("unknown key")),
        };
        if search_path.trim().is_empty() || search_path.contains('\0') || pattern.contains('\0') {
            return Err(bad("an empty search_path"));
        }
        Ok(Route {
            rule: rule.to_owned(),
            key,
            pattern: pattern.to_owned(),
            search_path: search_path.trim().to_owned(),
            routed: AtomicU64::new(0),
        })
    }

    fn matches(&self, params: &[(&str, &str)]) -> bool {
        let name = match self.key {
            RouteKey::ApplicationName => "application_name",
            RouteKey::User => "user",
            // libpq's default database is the user name.
            RouteKey::Database => "database",
        };
        let value = params.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        let value = match (self.key, value) {
            (RouteKey::Database, None) => params.iter().find(|(k, _)| *k == "user").map(|(_, v)| *v),
            (_, v) => v,
        };
        value.is_some_and(|v| glob(&self.pattern, v))
    }
}

/// `*` matches any run of characters; everything else itself.
fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// The first route that matches a startup's parameters: its index and the startup packet
/// with the search_path set.
pub fn apply(routes: &[Route], version: u32, params: &[(&str, &str)]) -> Option<(usize, Vec<u8>)> {
    let (i, route) = routes.iter().enumerate().find(|(_, r)| r.matches(params))?;
    route.routed.fetch_add(1, Ordering::Relaxed);
    let mut out: Vec<(&str, &str)> = params.iter().copied().filter(|(k, _)| *k != "search_path").collect();
    out.push(("search_path", &route.search_path));
    Some((i, ghostwire_proto::startup_message(version, &out)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_match() {
        let r = Route::parse("application_name=web-v2*:app_v2, public").unwrap();
        assert_eq!(r.search_path, "app_v2, public");
        assert!(r.matches(&[("user", "app"), ("application_name", "web-v2-7")]));
        assert!(!r.matches(&[("user", "app"), ("application_name", "web-v1")]));
        assert!(!r.matches(&[("user", "app")]));
        let d = Route::parse("database=shop:v2,public").unwrap();
        assert!(d.matches(&[("user", "shop")]), "the database defaults to the user name");
        for bad in ["application_name=x", "name=x:y", "user:x", "user=x: "] {
            assert!(Route::parse(bad).is_err(), "{bad}");
        }
        assert!(
            glob("a*b*c", "aXbYc") && glob("*", "") && glob("a*", "a") && !glob("a*b", "ab-") && !glob("ab*ba", "aba")
        );
    }

    #[test]
    fn the_startup_gets_the_search_path() {
        let routes = [Route::parse("user=app:v2,public").unwrap()];
        let params = [("user", "app"), ("search_path", "old"), ("options", "-c search_path=x")];
        let (i, packet) = apply(&routes, 196608, &params).unwrap();
        assert_eq!(i, 0);
        let Some((ghostwire_proto::StartupPacket::Startup { params, .. }, _)) =
            ghostwire_proto::parse_startup(&packet).unwrap()
        else {
            panic!("a startup packet")
        };
        assert_eq!(params, [("user", "app"), ("options", "-c search_path=x"), ("search_path", "v2,public")]);
        assert!(apply(&routes, 196608, &[("user", "other")]).is_none());
    }
}
