//! README.md's first command: `ghostwire demo` runs a migration under load on a throwaway
//! cluster, and its clients see no errors.

use std::process::Command;

#[test]
fn the_demo_migrates_under_load_without_client_errors() {
    let out =
        Command::new(env!("CARGO_BIN_EXE_ghostwire")).args(["demo", "--rows", "30000"]).output().expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for needle in
        ["[swapped] swapped", "copied 30,", "held", "with 0 error(s)", "The throwaway cluster is removed now."]
    {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
}
