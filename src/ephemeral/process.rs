//! The server's processes: finding the binaries, running them as the `postgres` user when
//! we are root, and a postmaster that dies with the test that started it.

use std::ffi::CString;
use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::{DIR_PREFIX, EphemeralError, io_err};

/// The server binaries of one PostgreSQL installation.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub bindir: PathBuf,
    /// `postgres --version`: "17.10", "15.18", "18beta1" …
    pub version: String,
    /// The major version: 14, 15, … 18.
    pub major: u32,
}

/// `postgres (PostgreSQL) 17.10 (…)` → ("17.10", 17).
fn parse_version(output: &str) -> Option<(String, u32)> {
    let text = output.split("(PostgreSQL)").nth(1)?.split_whitespace().next()?.to_owned();
    let major = text.chars().take_while(char::is_ascii_digit).collect::<String>().parse().ok()?;
    Some((text, major))
}

/// The version a PostgreSQL program reports.
fn program_version(program: &Path) -> Option<(String, u32)> {
    let out = Command::new(program).arg("--version").output().ok()?;
    parse_version(&String::from_utf8_lossy(&out.stdout))
}

/// Debian's installations, newest first.
fn debian_bindirs() -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir("/usr/lib/postgresql") else { return Vec::new() };
    let mut versions: Vec<(u32, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .collect();
    versions.sort_by_key(|v| std::cmp::Reverse(v.0));
    versions.into_iter().map(|(_, p)| p).collect()
}

impl Binaries {
    /// Finds initdb, pg_ctl and postgres: `$GHOSTWIRE_PG_BINDIR`, `pg_config --bindir`, the
    /// newest `/usr/lib/postgresql/*/bin`, then `PATH`.
    pub fn find() -> Result<Self, EphemeralError> {
        let complete = |dir: &Path| ["initdb", "postgres", "pg_ctl"].iter().all(|b| dir.join(b).is_file());
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(dir) = std::env::var_os("GHOSTWIRE_PG_BINDIR") {
            candidates.push(dir.into());
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
            && out.status.success()
        {
            candidates.push(String::from_utf8_lossy(&out.stdout).trim().into());
        }
        candidates.extend(debian_bindirs());
        if let Some(path) = std::env::var_os("PATH") {
            candidates.extend(std::env::split_paths(&path));
        }
        let bindir = candidates.into_iter().find(|d| complete(d)).ok_or(EphemeralError::BinariesNotFound)?;
        let (version, major) = program_version(&bindir.join("postgres")).ok_or_else(|| EphemeralError::Start {
            reason: format!("{} --version did not say which PostgreSQL it is", bindir.join("postgres").display()),
            log: String::new(),
        })?;
        Ok(Binaries { bindir, version, major })
    }

    /// A program: from this installation when it has it, else a client program of another
    /// one (the server packages of other majors carry no psql or pgbench; Debian's newest
    /// client, then `PATH`).
    pub fn path(&self, program: &str) -> PathBuf {
        let own = self.bindir.join(program);
        if own.is_file() {
            return own;
        }
        let path = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default();
        debian_bindirs().into_iter().chain(path).map(|d| d.join(program)).find(|p| p.is_file()).unwrap_or(own)
    }

    /// A client program that works with this server: of its major or newer (pg_basebackup,
    /// say, works with servers of its own major or older), or why there is none.
    pub fn client_for_server(&self, program: &str) -> Result<PathBuf, String> {
        let found = self.path(program);
        match program_version(&found) {
            Some((_, major)) if major >= self.major => Ok(found),
            Some((v, _)) => Err(format!(
                "{program} of PostgreSQL {} or newer is not installed (found {v} at {})",
                self.major,
                found.display()
            )),
            None => Err(format!("{program} is not installed for PostgreSQL {}", self.major)),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn versions() {
        assert_eq!(super::parse_version("postgres (PostgreSQL) 17.10\n"), Some(("17.10".into(), 17)));
        assert_eq!(
            super::parse_version("pg_basebackup (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"),
            Some(("15.18".into(), 15))
        );
        assert_eq!(super::parse_version("postgres (PostgreSQL) 18beta1"), Some(("18beta1".into(), 18)));
        assert_eq!(super::parse_version("nonsense"), None);
    }
}

/// The user the server processes run as: the current one, or `postgres` when we are root.
#[derive(Debug, Clone, Copy)]
pub(super) struct RunAs {
    uid: u32,
    gid: u32,
}

pub(super) fn run_as() -> Result<Option<RunAs>, EphemeralError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = CString::new("postgres").map_err(|_| EphemeralError::NoPostgresUser)?;
    // SAFETY: getpwnam returns a pointer into static storage or null; we copy the two ids
    // out immediately, and cluster start-up is not concurrent with other getpw* users here.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err(EphemeralError::NoPostgresUser);
    }
    // SAFETY: pw is non-null and points to a valid passwd record.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok(Some(RunAs { uid, gid }))
}

/// Makes `cmd` run as `user` (when given) and, with `die_with_parent`, receive SIGQUIT (an
/// immediate shutdown, for the postmaster) when the thread that spawned it exits.
pub(super) fn configure(cmd: &mut Command, user: Option<RunAs>, die_with_parent: bool) {
    // SAFETY: the hook runs between fork and exec and only makes async-signal-safe system
    // calls (setgroups, setgid, setuid, prctl, getppid), allocating nothing. The identity is
    // changed first because the kernel clears the parent-death signal on a credential change.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(u) = user {
                if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(u.gid) != 0 || libc::setuid(u.uid) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if die_with_parent {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() == 1 {
                    return Err(io::Error::other("parent exited during start-up"));
                }
            }
            Ok(())
        });
    }
}

pub(super) fn chown(path: &Path, user: Option<RunAs>) -> Result<(), EphemeralError> {
    if let Some(u) = user {
        std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid))
            .map_err(io_err(format!("chown {}", path.display())))?;
    }
    Ok(())
}

pub(super) fn free_port() -> Result<u16, EphemeralError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io_err("find a free TCP port"))?;
    Ok(listener.local_addr().map_err(io_err("find a free TCP port"))?.port())
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    pid > 0 && (unsafe { libc::kill(pid, 0) } == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

/// Removes folders of clusters whose owning process is gone (their servers died with it).
pub(super) fn sweep_stale_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else { continue };
        if !pid_alive(pid) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// The running postmaster, owned by a keeper thread that waits for it to exit.
pub(super) struct Postmaster {
    pid: i32,
    exited: mpsc::Receiver<io::Result<ExitStatus>>,
    keeper: Option<JoinHandle<()>>,
}

impl Postmaster {
    pub(super) fn spawn(mut cmd: Command) -> Result<Self, EphemeralError> {
        let (pid_tx, pid_rx) = mpsc::channel::<io::Result<i32>>();
        let (exit_tx, exit_rx) = mpsc::channel();
        let keeper = std::thread::Builder::new()
            .name("ghostwire-pg-keeper".into())
            .spawn(move || match cmd.spawn() {
                Ok(mut child) => {
                    let pid = child.id() as i32;
                    let _ = pid_tx.send(Ok(pid));
                    let _ = exit_tx.send(child.wait());
                }
                Err(e) => {
                    let _ = pid_tx.send(Err(e));
                }
            })
            .map_err(io_err("start the keeper thread"))?;
        let pid = pid_rx
            .recv()
            .map_err(|_| io::Error::other("keeper thread died"))
            .and_then(|r| r)
            .map_err(io_err("start postgres"))?;
        Ok(Postmaster { pid, exited: exit_rx, keeper: Some(keeper) })
    }

    pub(super) fn has_exited(&self) -> Option<String> {
        match self.exited.try_recv() {
            Ok(Ok(status)) => Some(status.to_string()),
            Ok(Err(e)) => Some(e.to_string()),
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => Some("exited".into()),
        }
    }

    /// Sends `signal` and waits for the server to exit; escalates to SIGKILL after `grace`.
    pub(super) fn stop(&mut self, signal: i32, grace: Duration) {
        let Some(keeper) = self.keeper.take() else { return };
        // SAFETY: pid is our own child, which the keeper has not reaped while it still waits.
        unsafe { libc::kill(self.pid, signal) };
        if self.exited.recv_timeout(grace).is_err() {
            // SAFETY: as above.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
        let _ = keeper.join();
    }
}
