//! The suite on every other PostgreSQL major installed: the whole suite runs on the default
//! server binaries (Debian's PostgreSQL 15 here); this runs the migrate oracle tests, the
//! cut-over tests, the catalog and carry-over tests, the version-specific tests, the
//! proxy's authentication tests, its prepared-statement recovery, rehearsals, version
//! schemas and logical capture again on each major found under `$GHOSTWIRE_PG_MAJORS`
//! (default `/opt/ghostwire-pg`, where `.ci/pg-majors` installs 14, 16, 17 and 18), by
//! running those test binaries with `GHOSTWIRE_PG_BINDIR` pointing at the major. Nothing
//! installed: it says so and passes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ghostwire::ephemeral::Binaries;

mod common;

/// Test binaries and the tests of each to run (all when empty).
const SUBSETS: &[(&str, &[&str])] = &[
    ("migrate", &[]),
    ("migrate_cutover", &[]),
    ("migrate_objects", &[]),
    ("catalog", &[]),
    ("versions", &[]),
    ("proxy", &["trust_md5_and_scram_authentication_pass_through"]),
    ("proxy_tls", &["every_leg_auth_and_channel_binding_combination"]),
    ("prepared", &[]),
    ("reshape_values", &[]),
    ("rehearse", &[]),
    ("version_schema", &[]),
    ("logical", &[]),
    ("logical_resume", &[]),
    ("logical_refusals", &[]),
    ("revert", &["a_revert_under_writes", "foreign_keys_both_ways", "dropped_and_added_columns"]),
];

/// Majors run at once (each test binary runs its own tests two at a time).
const AT_ONCE: usize = 2;

/// Straight to the process's stderr, past the test harness's capture.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

struct Outcome {
    major: String,
    lines: Vec<String>,
    failures: Vec<String>,
}

fn run_major(bindir: &Path, deps: &Path) -> Outcome {
    let major = Command::new(bindir.join("postgres"))
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|e| format!("{} ({e})", bindir.display()));
    let mut out = Outcome { major, lines: Vec::new(), failures: Vec::new() };
    for (name, filters) in SUBSETS {
        let Some(exe) = common::test_binary(deps, name) else {
            out.failures.push(format!("{name}: test binary not built (run `cargo test --workspace`)"));
            continue;
        };
        let started = Instant::now();
        let mut cmd = Command::new(&exe);
        // Client programs (psql, pgbench) still come from the default installation.
        // No backtraces: the failure's message is what the report keeps.
        cmd.args(filters.iter())
            .args(["--test-threads", "2"])
            .env("GHOSTWIRE_PG_BINDIR", bindir)
            .env("RUST_BACKTRACE", "0");
        match cmd.output() {
            Ok(o) => {
                let stdout = String::from_utf8_lossy(&o.stdout);
                let result = stdout.lines().rfind(|l| l.starts_with("test result:")).unwrap_or("no result").to_owned();
                out.lines.push(format!("  {name:<16} {result} ({:.0?})", started.elapsed()));
                if !o.status.success() {
                    // From the first failure's report on (its message and the list of failures).
                    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
                    let from = lines.iter().position(|l| l.starts_with("---- ")).unwrap_or(0);
                    let tail = lines[from..].iter().take(80).copied().collect::<Vec<_>>().join("\n");
                    out.failures.push(format!(
                        "{name} on {}:\n{tail}\n{}",
                        bindir.display(),
                        String::from_utf8_lossy(&o.stderr)
                    ));
                }
            }
            Err(e) => out.failures.push(format!("{name}: could not run {}: {e}", exe.display())),
        }
    }
    out
}

#[test]
fn the_suite_on_every_other_major() {
    let root = PathBuf::from(std::env::var("GHOSTWIRE_PG_MAJORS").unwrap_or_else(|_| "/opt/ghostwire-pg".into()));
    let default = Binaries::find().expect("the default server binaries");
    let mut majors: Vec<PathBuf> = std::fs::read_dir(&root)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path().join("bin"))
                .filter(|bin| bin.join("postgres").is_file())
                .filter(|bin| bin.canonicalize().ok() != default.bindir.canonicalize().ok())
                .collect()
        })
        .unwrap_or_default();
    majors.sort();
    if majors.is_empty() {
        // In CI they are installed by .ci/run: their absence is a failure there, not a skip.
        assert!(std::env::var_os("CI").is_none(), "no other PostgreSQL major under {} in CI", root.display());
        say(&format!(
            "ghostwire majors: no other PostgreSQL major under {} (install them with .ci/pg-majors); the suite ran on \
             PostgreSQL {} only",
            root.display(),
            default.version
        ));
        return;
    }
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let started = Instant::now();
    let mut failures = Vec::new();
    for batch in majors.chunks(AT_ONCE) {
        let handles: Vec<_> = batch
            .iter()
            .map(|bindir| {
                let (bindir, deps) = (bindir.clone(), deps.clone());
                std::thread::spawn(move || run_major(&bindir, &deps))
            })
            .collect();
        for h in handles {
            let o = h.join().expect("a major's run");
            say(&format!("ghostwire majors: {}", o.major));
            for l in &o.lines {
                say(l);
            }
            failures.extend(o.failures.into_iter().map(|f| format!("[{}] {f}", o.major)));
        }
    }
    say(&format!("ghostwire majors: {} major(s) in {:.0?}", majors.len(), started.elapsed()));
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(started.elapsed() < Duration::from_secs(1800));
}
