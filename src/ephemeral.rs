//! A throwaway PostgreSQL cluster for tests, benchmarks and `ghostwire demo`.
//!
//! [`Cluster::start`] runs `initdb` in a temporary folder and starts `postgres` on a free
//! loopback port with `wal_level=logical`, replication slots and senders enabled, and
//! settings chosen for speed over durability. When the process runs as root (initdb
//! refuses root) the server runs as the `postgres` user.
//!
//! Nothing outlives its owner:
//! * dropping a [`Cluster`] stops the server (fast shutdown) and removes its folder,
//!   also while a test panics;
//! * the postmaster is started with `PR_SET_PDEATHSIG`, from a keeper thread that lives
//!   exactly as long as the server, so a SIGKILLed test process takes its server with it;
//! * [`Cluster::shared`] (one cluster per process, a fresh database per test in about
//!   0.1 s) is stopped by an `atexit` hook, and folders left behind by dead processes are
//!   swept the next time a cluster starts.

use std::ffi::CString;
use std::fs;
use std::io::{self, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio_postgres::NoTls;

/// Prefix of the temporary folders, followed by the owning process id.
const DIR_PREFIX: &str = "ghostwire-pg-";
/// How long a server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum EphemeralError {
    #[error(
        "no PostgreSQL server binaries found (looked at $GHOSTWIRE_PG_BINDIR, `pg_config --bindir`, \
         /usr/lib/postgresql/*/bin and PATH for initdb, pg_ctl and postgres); install them, e.g. \
         `apt-get install postgresql` on Debian/Ubuntu or `brew install postgresql` on macOS, or set \
         GHOSTWIRE_PG_BINDIR to the folder that holds initdb"
    )]
    BinariesNotFound,
    #[error(
        "running as root, but there is no `postgres` user to run the server as (initdb refuses \
         root); create one (`useradd --system postgres`) or run as an ordinary user"
    )]
    NoPostgresUser,
    #[error("{action}: {source}")]
    Io {
        action: String,
        #[source]
        source: io::Error,
    },
    #[error("initdb failed ({status}); its output:\n{output}")]
    Initdb { status: ExitStatus, output: String },
    #[error("the PostgreSQL server did not start ({reason}); the end of its log:\n{log}")]
    Start { reason: String, log: String },
    #[error("could not connect to the throwaway cluster: {}", crate::connect::describe(.0))]
    Connect(#[from] tokio_postgres::Error),
}

/// A new, empty folder for a cluster's data, owned by `user` and private to it.
fn new_dir(kind: &str, user: Option<RunAs>) -> Result<PathBuf, EphemeralError> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "{DIR_PREFIX}{}-{kind}{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io_err("make the cluster folder private"))?;
    chown(&dir, user)?;
    Ok(dir)
}

fn io_err(action: impl Into<String>) -> impl FnOnce(io::Error) -> EphemeralError {
    let action = action.into();
    move |source| EphemeralError::Io { action, source }
}

/// How clients other than the superuser `postgres` authenticate over TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostAuth {
    #[default]
    Trust,
    Md5,
    ScramSha256,
}

impl HostAuth {
    fn hba_method(self) -> &'static str {
        match self {
            HostAuth::Trust => "trust",
            HostAuth::Md5 => "md5",
            HostAuth::ScramSha256 => "scram-sha-256",
        }
    }
}

/// Options for [`Cluster::start`].
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Authentication for roles other than `postgres` over TCP (`postgres` is always trusted,
    /// so the harness can set things up).
    pub host_auth: HostAuth,
    /// Also require `host_auth` for the `postgres` superuser.
    pub auth_superuser: bool,
    /// Extra `postgresql.conf` settings, applied after the defaults.
    pub settings: Vec<(String, String)>,
}

impl ClusterOptions {
    pub fn with_setting(mut self, name: &str, value: impl ToString) -> Self {
        self.settings.push((name.to_owned(), value.to_string()));
        self
    }
}

/// Settings every throwaway cluster gets: logical decoding, and speed over durability.
const BASE_SETTINGS: &[(&str, &str)] = &[
    ("wal_level", "logical"),
    ("max_replication_slots", "20"),
    ("max_wal_senders", "20"),
    ("max_connections", "300"),
    ("fsync", "off"),
    ("synchronous_commit", "off"),
    ("full_page_writes", "off"),
    ("shared_buffers", "256MB"),
    ("maintenance_work_mem", "256MB"),
    ("max_wal_size", "8GB"),
    ("checkpoint_timeout", "30min"),
    ("log_min_messages", "warning"),
    ("log_line_prefix", "'%m [%p] %d '"),
    ("lc_messages", "'C'"),
    ("timezone", "'UTC'"),
];

/// The server binaries of one PostgreSQL installation.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub bindir: PathBuf,
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
        if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
            let mut versions: Vec<(u32, PathBuf)> = entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let v = e.file_name().to_str()?.parse::<u32>().ok()?;
                    Some((v, e.path().join("bin")))
                })
                .collect();
            versions.sort_by_key(|v| std::cmp::Reverse(v.0));
            candidates.extend(versions.into_iter().map(|(_, p)| p));
        }
        if let Some(path) = std::env::var_os("PATH") {
            candidates.extend(std::env::split_paths(&path));
        }
        candidates
            .into_iter()
            .find(|d| complete(d))
            .map(|bindir| Binaries { bindir })
            .ok_or(EphemeralError::BinariesNotFound)
    }

    pub fn path(&self, program: &str) -> PathBuf {
        self.bindir.join(program)
    }
}

/// The user the server processes run as: the current one, or `postgres` when we are root.
#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

fn run_as() -> Result<Option<RunAs>, EphemeralError> {
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
fn configure(cmd: &mut Command, user: Option<RunAs>, die_with_parent: bool) {
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

fn chown(path: &Path, user: Option<RunAs>) -> Result<(), EphemeralError> {
    if let Some(u) = user {
        std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid))
            .map_err(io_err(format!("chown {}", path.display())))?;
    }
    Ok(())
}

fn free_port() -> Result<u16, EphemeralError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io_err("find a free TCP port"))?;
    Ok(listener.local_addr().map_err(io_err("find a free TCP port"))?.port())
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    pid > 0 && (unsafe { libc::kill(pid, 0) } == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

/// Removes folders of clusters whose owning process is gone (their servers died with it).
fn sweep_stale_dirs() {
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
struct Postmaster {
    pid: i32,
    exited: mpsc::Receiver<io::Result<ExitStatus>>,
    keeper: Option<JoinHandle<()>>,
}

impl Postmaster {
    fn spawn(mut cmd: Command) -> Result<Self, EphemeralError> {
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

    fn has_exited(&self) -> Option<String> {
        match self.exited.try_recv() {
            Ok(Ok(status)) => Some(status.to_string()),
            Ok(Err(e)) => Some(e.to_string()),
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => Some("exited".into()),
        }
    }

    /// Sends `signal` and waits for the server to exit; escalates to SIGKILL after `grace`.
    fn stop(&mut self, signal: i32, grace: Duration) {
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

/// A running throwaway cluster. Dropping it stops the server and removes its folder.
pub struct Cluster {
    binaries: Binaries,
    dir: PathBuf,
    port: u16,
    user: Option<RunAs>,
    postmaster: Mutex<Option<Postmaster>>,
    next_db: AtomicU64,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("dir", &self.dir).field("port", &self.port).finish()
    }
}

static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();

extern "C" fn stop_shared_at_exit() {
    if let Some(Ok(cluster)) = SHARED.get() {
        cluster.shutdown();
    }
}

impl Cluster {
    /// Creates and starts a new cluster.
    pub fn start(options: ClusterOptions) -> Result<Cluster, EphemeralError> {
        sweep_stale_dirs();
        let binaries = Binaries::find()?;
        let user = run_as()?;
        let dir = new_dir("", user)?;
        let mut cluster =
            Cluster { binaries, dir, port: 0, user, postmaster: Mutex::new(None), next_db: AtomicU64::new(0) };
        cluster.initdb(&options)?;
        cluster.launch_on_a_free_port()?;
        Ok(cluster)
    }

    /// Starts the server on a free port. A port found free can be taken before the server
    /// binds it: tries a few.
    fn launch_on_a_free_port(&mut self) -> Result<(), EphemeralError> {
        let mut last = None;
        for _ in 0..5 {
            self.port = free_port()?;
            match self.launch() {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(EphemeralError::Start { reason: "no attempt".into(), log: String::new() }))
    }

    /// A streaming standby of this cluster (`pg_basebackup -R`), running in hot standby on a
    /// port of its own.
    pub fn start_standby(&self) -> Result<Cluster, EphemeralError> {
        let dir = new_dir("standby", self.user)?;
        let mut standby = Cluster {
            binaries: self.binaries.clone(),
            dir,
            port: 0,
            user: self.user,
            postmaster: Mutex::new(None),
            next_db: AtomicU64::new(0),
        };
        let mut cmd = Command::new(self.binaries.path("pg_basebackup"));
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
            "-D",
        ])
        .arg(standby.data_dir())
        .stdin(Stdio::null());
        configure(&mut cmd, self.user, false);
        let out = cmd.output().map_err(io_err("run pg_basebackup"))?;
        if !out.status.success() {
            let output = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            return Err(EphemeralError::Start { reason: "pg_basebackup failed".into(), log: output });
        }
        append(&standby.data_dir().join("postgresql.conf"), "hot_standby = on\nhot_standby_feedback = on\n")?;
        standby.launch_on_a_free_port()?;
        Ok(standby)
    }

    /// The process-wide shared cluster with default options, started on first use and
    /// stopped when the process exits. Use [`Cluster::fresh_database`] for isolation.
    pub fn shared() -> Result<&'static Cluster, EphemeralError> {
        let result = SHARED.get_or_init(|| {
            let cluster = Cluster::start(ClusterOptions::default()).map_err(|e| e.to_string())?;
            // SAFETY: registering a plain extern "C" function with no captured state.
            unsafe { libc::atexit(stop_shared_at_exit) };
            Ok(cluster)
        });
        result.as_ref().map_err(|e| EphemeralError::Start { reason: e.clone(), log: String::new() })
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    fn initdb(&self, options: &ClusterOptions) -> Result<(), EphemeralError> {
        let mut cmd = Command::new(self.binaries.path("initdb"));
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"])
            .env("LC_ALL", "C")
            .stdin(Stdio::null());
        configure(&mut cmd, self.user, false);
        let out = cmd.output().map_err(io_err("run initdb"))?;
        if !out.status.success() {
            let output = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            return Err(EphemeralError::Initdb { status: out.status, output });
        }
        let mut conf = String::from("\n# ghostwire throwaway cluster\n");
        for (k, v) in BASE_SETTINGS {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        for (k, v) in &options.settings {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        append(&self.data_dir().join("postgresql.conf"), &conf)?;
        let method = options.host_auth.hba_method();
        let superuser = if options.auth_superuser { method } else { "trust" };
        let hba = format!(
            "local all all trust\n\
             local replication all trust\n\
             host all postgres 127.0.0.1/32 {superuser}\n\
             host replication postgres 127.0.0.1/32 {superuser}\n\
             host all all 127.0.0.1/32 {method}\n\
             host replication all 127.0.0.1/32 {method}\n"
        );
        fs::write(self.data_dir().join("pg_hba.conf"), hba).map_err(io_err("write pg_hba.conf"))
    }

    fn launch(&self) -> Result<(), EphemeralError> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(io_err("open the server log"))?;
        chown(&self.log_path(), self.user)?;
        let log2 = log.try_clone().map_err(io_err("open the server log"))?;
        let mut cmd = Command::new(self.binaries.path("postgres"));
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1", "-k"])
            .arg(&self.dir)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        configure(&mut cmd, self.user, true);
        let pm = Postmaster::spawn(cmd)?;
        let pid_file = self.data_dir().join("postmaster.pid");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = pm.has_exited() {
                return Err(EphemeralError::Start { reason: format!("postgres {status}"), log: self.log_tail() });
            }
            // pg_ctl's own readiness test: the postmaster writes "ready" (or "standby") as the
            // 8th line of its pid file.
            if fs::read_to_string(&pid_file)
                .is_ok_and(|s| s.lines().nth(7).is_some_and(|l| matches!(l.trim(), "ready" | "standby")))
            {
                break;
            }
            if Instant::now() > deadline {
                let mut pm = pm;
                pm.stop(libc::SIGQUIT, Duration::from_secs(5));
                return Err(EphemeralError::Start { reason: "timed out".into(), log: self.log_tail() });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        *self.postmaster.lock().unwrap_or_else(|p| p.into_inner()) = Some(pm);
        Ok(())
    }

    /// The last lines of the server log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Stops the server (fast shutdown) without removing the folder; see [`Cluster::restart`].
    pub fn stop(&self) {
        if let Some(mut pm) = self.postmaster.lock().unwrap_or_else(|p| p.into_inner()).take() {
            pm.stop(libc::SIGINT, Duration::from_secs(30));
        }
    }

    /// Stops the server abruptly (as a crash would) and starts it again on the same port.
    pub fn restart(&self) -> Result<(), EphemeralError> {
        if let Some(mut pm) = self.postmaster.lock().unwrap_or_else(|p| p.into_inner()).take() {
            pm.stop(libc::SIGQUIT, Duration::from_secs(30));
        }
        self.launch()
    }

    fn shutdown(&self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A new empty folder beside the cluster's data (removed with it), owned by the server's
    /// user: for `CREATE TABLESPACE … LOCATION`.
    pub fn new_folder(&self, name: &str) -> Result<PathBuf, EphemeralError> {
        let dir = self.dir.join(name);
        fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
        chown(&dir, self.user)?;
        Ok(dir)
    }

    pub fn binaries(&self) -> &Binaries {
        &self.binaries
    }

    /// A libpq URL for `database` as the superuser `postgres`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// A libpq URL for `database` as `user` with `password`.
    pub fn url_as(&self, user: &str, password: &str, database: &str) -> String {
        format!("postgres://{user}:{password}@127.0.0.1:{}/{database}", self.port)
    }

    /// Connects as the superuser; the connection is driven by a spawned task.
    pub async fn connect(&self, database: &str) -> Result<tokio_postgres::Client, EphemeralError> {
        let (client, conn) = tokio_postgres::connect(&self.url(database), NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("throwaway cluster connection closed: {e}");
            }
        });
        Ok(client)
    }

    /// Creates an empty database with a unique name and returns its URL.
    pub async fn fresh_database(&self) -> Result<String, EphemeralError> {
        let name = format!("gw_{}", self.next_db.fetch_add(1, Ordering::Relaxed));
        let client = self.connect("postgres").await?;
        client.batch_execute(&format!("CREATE DATABASE {name}")).await?;
        Ok(self.url(&name))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn append(path: &Path, text: &str) -> Result<(), EphemeralError> {
    let mut f = fs::OpenOptions::new().append(true).open(path).map_err(io_err(format!("open {}", path.display())))?;
    f.write_all(text.as_bytes()).map_err(io_err(format!("write {}", path.display())))
}
