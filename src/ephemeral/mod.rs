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

mod options;
mod process;

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use thiserror::Error;

pub use options::{ClusterOptions, HostAuth, ServerTls};
pub use process::Binaries;
use process::{Postmaster, RunAs, chown, configure, free_port, run_as, sweep_stale_dirs};

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
    #[error("could not connect to the throwaway cluster: {0}")]
    Reach(String),
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
        let basebackup = self
            .binaries
            .client_for_server("pg_basebackup")
            .map_err(|reason| EphemeralError::Start { reason, log: String::new() })?;
        let mut cmd = Command::new(basebackup);
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
            // Straight to the process's stderr, past the test harness's capture: every test
            // run says which PostgreSQL it ran on.
            let b = &cluster.binaries;
            let _ = writeln!(
                io::stderr().lock(),
                "ghostwire: throwaway cluster on PostgreSQL {} ({})",
                b.version,
                b.bindir.display()
            );
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
        append(&self.data_dir().join("postgresql.conf"), &options.conf())?;
        if let Some(tls) = &options.tls {
            let ca = options.client_ca_pem.as_ref().map(|pem| ("root.crt", pem));
            for (file, pem) in [("server.crt", &tls.cert_pem), ("server.key", &tls.key_pem)].into_iter().chain(ca) {
                let path = self.data_dir().join(file);
                fs::write(&path, pem).map_err(io_err(format!("write {file}")))?;
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                    .map_err(io_err(format!("make {file} private")))?;
                chown(&path, self.user)?;
            }
        }
        fs::write(self.data_dir().join("pg_hba.conf"), options.hba()).map_err(io_err("write pg_hba.conf"))
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

    /// The server's major version (14 … 18).
    pub fn major(&self) -> u32 {
        self.binaries.major
    }

    /// A libpq URL for `database` as the superuser `postgres`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// A libpq URL for `database` as `user` with `password`.
    pub fn url_as(&self, user: &str, password: &str, database: &str) -> String {
        format!("postgres://{user}:{password}@127.0.0.1:{}/{database}", self.port)
    }

    /// The folder of the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// A keyword/value connection string for `database` as the superuser over the Unix
    /// socket (trusted whatever the TCP rules are), ignoring the PG* environment's TLS.
    pub fn socket_conninfo(&self, database: &str) -> String {
        let quote = |s: &str| format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"));
        format!(
            "host={} port={} user=postgres dbname={} sslmode=disable",
            quote(&self.dir.display().to_string()),
            self.port,
            quote(database)
        )
    }

    /// Connects as the superuser over the Unix socket; the connection is driven by a
    /// spawned task.
    pub async fn connect(&self, database: &str) -> Result<tokio_postgres::Client, EphemeralError> {
        let params = crate::connect::Params::from_conninfo(Some(&self.socket_conninfo(database)))
            .map_err(|e| EphemeralError::Reach(e.to_string()))?;
        crate::connect::connect(&params).await.map_err(|e| EphemeralError::Reach(e.to_string()))
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
