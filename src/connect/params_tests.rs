use std::collections::HashMap;

use super::*;

#[derive(Default)]
struct MapEnv {
    vars: HashMap<String, String>,
    home: Option<PathBuf>,
    existing: Vec<PathBuf>,
}

impl MapEnv {
    fn with(mut self, k: &str, v: &str) -> Self {
        self.vars.insert(k.into(), v.into());
        self
    }
}

impl Env for MapEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.vars.get(name).cloned()
    }
    fn home(&self) -> Option<PathBuf> {
        self.home.clone()
    }
    fn os_user(&self) -> Option<String> {
        Some("osuser".into())
    }
    fn exists(&self, path: &Path) -> bool {
        self.existing.iter().any(|p| p == path)
    }
}

fn env() -> MapEnv {
    MapEnv { home: Some("/home/u".into()), existing: vec!["/var/run/postgresql".into()], ..MapEnv::default() }
}

fn resolve(text: &str, env: &MapEnv) -> Params {
    Params::resolve(Some(text), env).unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn refused(text: &str, env: &MapEnv) -> String {
    Params::resolve(Some(text), env).err().unwrap_or_else(|| panic!("{text} was accepted")).to_string()
}

#[test]
fn defaults_are_libpqs() {
    let p = Params::resolve(None, &env()).unwrap();
    assert_eq!(p.hosts, vec![Host { kind: HostKind::Unix("/var/run/postgresql".into()), addr: None, port: 5432 }]);
    assert_eq!((p.user.as_str(), p.dbname.as_str()), ("osuser", "osuser"));
    assert_eq!(p.tls.mode, SslMode::Prefer);
    assert_eq!(p.tls.root, RootCert::File { path: "/home/u/.postgresql/root.crt".into(), explicit: false });
    assert_eq!(p.tls.cert, PathBuf::from("/home/u/.postgresql/postgresql.crt"));
    assert_eq!(p.passfile, Some(PathBuf::from("/home/u/.pgpass")));
    assert_eq!(p.channel_binding, ChannelBinding::Prefer);
    assert_eq!(p.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
    assert!(p.all_defaults);
    let no_socket_dir = MapEnv { existing: vec![], ..env() };
    assert_eq!(Params::resolve(None, &no_socket_dir).unwrap().hosts[0].kind, HostKind::Tcp("localhost".into()));
}

#[test]
fn environment_fills_what_the_string_leaves_out() {
    let e = env()
        .with("PGHOST", "envhost")
        .with("PGPORT", "6000")
        .with("PGUSER", "envuser")
        .with("PGPASSWORD", "envpass")
        .with("PGDATABASE", "envdb")
        .with("PGSSLMODE", "require")
        .with("PGAPPNAME", "envapp")
        .with("PGCONNECT_TIMEOUT", "7")
        .with("PGSSLROOTCERT", "/ca.pem")
        .with("PGPASSFILE", "/pw")
        .with("PGTARGETSESSIONATTRS", "read-write");
    let p = Params::resolve(None, &e).unwrap();
    assert_eq!(p.hosts[0], Host { kind: HostKind::Tcp("envhost".into()), addr: None, port: 6000 });
    assert_eq!((p.user.as_str(), p.dbname.as_str()), ("envuser", "envdb"));
    assert_eq!(p.password, Some(Secret::new("envpass")));
    assert_eq!(p.tls.mode, SslMode::Require);
    assert_eq!(p.tls.root, RootCert::File { path: "/ca.pem".into(), explicit: true });
    assert_eq!(p.application_name.as_deref(), Some("envapp"));
    assert_eq!(p.connect_timeout, Duration::from_secs(7));
    assert_eq!(p.passfile, Some(PathBuf::from("/pw")));
    assert_eq!(p.target_session_attrs, TargetSessionAttrs::ReadWrite);
    assert!(!p.all_defaults);
    // The string wins over the environment.
    let p = resolve("postgres://u@h:1/d?sslmode=disable", &e);
    assert_eq!((p.hosts[0].name(), p.hosts[0].port, p.user.as_str()), ("h".into(), 1, "u"));
    assert_eq!(p.tls.mode, SslMode::Disable);
    assert_eq!(p.password, Some(Secret::new("envpass")), "PGPASSWORD still applies");
}

#[test]
fn host_lists_ports_and_addresses() {
    let p = resolve("host=a,b,/tmp port=1,2,3 hostaddr=10.0.0.1,,", &env());
    assert_eq!(p.hosts.len(), 3);
    assert_eq!(p.hosts[0], Host { kind: HostKind::Tcp("a".into()), addr: Some("10.0.0.1".parse().unwrap()), port: 1 });
    assert_eq!(p.hosts[2].kind, HostKind::Unix("/tmp".into()));
    let p = resolve("host=a,b port=7", &env());
    assert_eq!(p.hosts.iter().map(|h| h.port).collect::<Vec<_>>(), vec![7, 7]);
    let p = resolve("postgres://a:1,b/d", &env());
    assert_eq!(p.hosts.iter().map(|h| h.port).collect::<Vec<_>>(), vec![1, 5432]);
    let p = resolve("hostaddr=127.0.0.1", &env());
    assert_eq!(p.hosts[0].kind, HostKind::Tcp("127.0.0.1".into()));
    assert!(refused("host=a,b port=1,2,3", &env()).contains("3 port numbers to 2 hosts"));
    assert!(refused("host=a,b hostaddr=1.2.3.4", &env()).contains("2 host names to 1 hostaddr"));
    assert!(refused("host=a port=70000", &env()).contains("invalid port value"));
    assert!(refused("hostaddr=db.example", &env()).contains("numeric IP"));
}

#[test]
fn tls_settings_follow_libpq() {
    let p = resolve("host=h sslrootcert=system", &env());
    assert_eq!((p.tls.mode, &p.tls.root), (SslMode::VerifyFull, &RootCert::System));
    assert!(refused("host=h sslrootcert=system sslmode=require", &env()).contains("weak sslmode \"require\""));
    assert!(refused("host=h sslnegotiation=direct", &env()).contains("sslnegotiation=direct"));
    assert!(resolve("host=h sslnegotiation=direct sslmode=require", &env()).tls.direct);
    assert!(refused("host=h sslmode=verify", &env()).contains("expected disable, allow, prefer, require"));
    assert!(refused("host=h channel_binding=require sslmode=disable", &env()).contains("needs TLS"));
    assert!(refused("host=h sslpassword=x", &env()).contains("not supported"));
    assert!(refused("host=h gssencmode=require", &env()).contains("not supported"));
    assert!(refused("host=h client_encoding=LATIN1", &env()).contains("UTF8"));
    let p = resolve("host=h sslcert=c.pem sslkey=k.pem sslsni=0 ssl_min_protocol_version=TLSv1.3", &env());
    assert_eq!((p.tls.cert_explicit, p.tls.sni, p.tls.min_version), (true, false, TlsVersion::Tls13));
    assert!(
        refused("host=h ssl_min_protocol_version=TLSv1.3 ssl_max_protocol_version=TLSv1.2", &env()).contains("above")
    );
}

#[test]
fn service_file_sits_between_the_string_and_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("services.conf");
    std::fs::write(&file, "[prod]\nhost=svc.example\nport=6432\ndbname=svcdb\nsslmode=verify-full\n").unwrap();
    let e = env().with("PGSERVICEFILE", file.to_str().unwrap()).with("PGPORT", "1111").with("PGUSER", "envuser");
    let p = resolve("service=prod dbname=mine", &e);
    assert_eq!((p.hosts[0].name(), p.hosts[0].port), ("svc.example".into(), 6432));
    assert_eq!((p.dbname.as_str(), p.user.as_str(), p.tls.mode), ("mine", "envuser", SslMode::VerifyFull));
    let p = Params::resolve(None, &e.with("PGSERVICE", "prod")).unwrap();
    assert_eq!(p.dbname, "svcdb");
    assert!(refused("service=nope", &env()).contains("\"nope\" not found"));
}

#[test]
fn sessions_are_named_and_given_settings() {
    let p = resolve("host=h options='-c work_mem=64MB'", &env()).with_setting("row_security", "off").named("gw");
    assert_eq!(p.options.as_deref(), Some("-c work_mem=64MB -c row_security=off"));
    assert_eq!(p.effective_application_name(), Some("gw"));
    let p = resolve("host=h application_name=mine", &env()).with_fallback_name("gw");
    assert_eq!(p.effective_application_name(), Some("mine"));
}

#[test]
fn passwords_never_show() {
    let p = resolve("postgres://u:hunter2@h/d", &env());
    assert!(!format!("{p:?}").contains("hunter2"));
}
