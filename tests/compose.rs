//! docker-compose.yml cannot run here (no Docker engine): check what it must contain, and
//! that the proxy's command is one ghostwire accepts.

use clap::Parser;
use ghostwire::cli::{Cli, Command};
use yaml_rust2::{Yaml, YamlLoader};

fn strings(y: &Yaml) -> Vec<String> {
    match y {
        Yaml::Array(a) => a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
        Yaml::String(s) => s.split_whitespace().map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

#[test]
fn compose_file_runs_postgres_with_logical_decoding_and_the_proxy_in_front() {
    let root = env!("CARGO_MANIFEST_DIR");
    let text = std::fs::read_to_string(format!("{root}/docker-compose.yml")).unwrap();
    let doc = &YamlLoader::load_from_str(&text).unwrap()[0];
    let services = &doc["services"];

    let pg = &services["postgres"];
    assert!(pg["image"].as_str().unwrap().starts_with("postgres:"));
    let command = strings(&pg["command"]).join(" ");
    for setting in ["wal_level=logical", "max_replication_slots=", "max_wal_senders="] {
        assert!(command.contains(setting), "postgres command lacks {setting}: {command}");
    }
    let env = &pg["environment"];
    let (user, password, db) = (
        env["POSTGRES_USER"].as_str().unwrap(),
        env["POSTGRES_PASSWORD"].as_str().unwrap(),
        env["POSTGRES_DB"].as_str().unwrap(),
    );
    assert!(strings(&pg["ports"]).contains(&"5432:5432".to_owned()));

    let proxy = &services["ghostwire-proxy"];
    assert_eq!(proxy["build"].as_str(), Some("."));
    assert!(std::path::Path::new(&format!("{root}/Dockerfile")).exists());
    assert!(proxy["depends_on"]["postgres"]["condition"].as_str() == Some("service_healthy"));
    let ports = strings(&proxy["ports"]);
    assert!(ports.contains(&"6432:6432".to_owned()) && ports.contains(&"6433:6433".to_owned()), "{ports:?}");
    // The command is a valid ghostwire command line, pointing at the postgres service.
    let mut argv = vec!["ghostwire".to_owned()];
    argv.extend(strings(&proxy["command"]));
    match Cli::try_parse_from(&argv).unwrap().command {
        Command::Proxy { listen, upstream, control, .. } => {
            assert_eq!(listen, "0.0.0.0:6432");
            assert_eq!(upstream, "postgres:5432");
            assert_eq!(control.as_deref(), Some("0.0.0.0:6433"));
            assert!(ghostwire::proxy::Proxy::new(&upstream, 1 << 20).is_ok());
        }
        other => panic!("not a proxy command: {other:?}"),
    }

    // README.md tells users the ports and credentials.
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    for needle in ["docker compose up", "6432", "6433", &format!("postgres://{user}:{password}@localhost:6432/{db}")] {
        assert!(readme.contains(needle), "README.md does not mention {needle}");
    }
}
