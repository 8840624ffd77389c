//! A `ghostwire migrate|resume` child process with its control API, for the operations
//! tests: its output is collected as it comes, its `/status` polled until a condition holds.

use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ghostwire::control;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// How long any awaited condition may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(90);

pub struct Running {
    pub addr: String,
    url: String,
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stdout_task: JoinHandle<()>,
    stderr_task: JoinHandle<String>,
}

/// What the process printed and how it ended.
pub struct Ended {
    pub status: ExitStatus,
    pub stdout: Vec<String>,
    pub stderr: String,
}

impl Ended {
    pub fn output(&self) -> String {
        format!("stdout:\n{}\nstderr:\n{}", self.stdout.join("\n"), self.stderr)
    }
}

impl Running {
    /// Runs `ghostwire SUBCOMMAND --control 127.0.0.1:0 REST…` and waits for its control API.
    pub async fn start(url: &str, args: &[&str]) -> Running {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ghostwire"));
        cmd.arg(args[0]).args(["--control", "127.0.0.1:0"]).args(&args[1..]);
        cmd.env("DATABASE_URL", url).env_remove("GHOSTWIRE_FAILPOINT");
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        let mut child = cmd.spawn().expect("start ghostwire");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let collected = Arc::clone(&stdout);
        let stdout_task = tokio::spawn(async move {
            let mut addr_tx = Some(addr_tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(at) = line.find("control API on http://") {
                    let rest = &line[at + "control API on http://".len()..];
                    let addr: String = rest.chars().take_while(|c| !c.is_whitespace() && *c != '"').collect();
                    if let Some(tx) = addr_tx.take() {
                        let _ = tx.send(addr);
                    }
                }
                collected.lock().unwrap().push(line);
            }
        });
        let mut stderr = child.stderr.take().expect("piped stderr");
        let stderr_task = tokio::spawn(async move {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s).await;
            s
        });
        let mut running = Running { addr: String::new(), url: url.to_owned(), child, stdout, stdout_task, stderr_task };
        match tokio::time::timeout(PATIENCE, addr_rx).await {
            Ok(Ok(addr)) => running.addr = addr,
            _ => {
                let ended = running.wait().await;
                panic!("ghostwire never announced its control API:\n{}", ended.output());
            }
        }
        running
    }

    /// `GET /status`: `{"progress": …, "settings": …}`.
    pub async fn status(&self) -> Value {
        let (code, body) =
            control::call(&self.addr, None, "GET", "/status", Duration::from_secs(10)).await.expect("GET /status");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("/status is JSON")
    }

    pub async fn progress(&self) -> Value {
        self.status().await["progress"].clone()
    }

    pub async fn get(&self, path: &str) -> String {
        let (code, body) = control::call(&self.addr, None, "GET", path, Duration::from_secs(10)).await.expect("GET");
        assert_eq!(code, 200, "{body}");
        body
    }

    /// Polls the progress until `check` holds; returns it. Fails the test after `PATIENCE`,
    /// or at once if the process ended first.
    pub async fn wait_until(&mut self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                let ended = self.wait_finished().await;
                panic!("ghostwire ended while waiting for {what}:\n{}", ended.output());
            }
            if let Ok((200, body)) = control::call(&self.addr, None, "GET", "/status", Duration::from_secs(10)).await {
                let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                if check(&v["progress"]) {
                    return v["progress"].clone();
                }
                assert!(Instant::now() < deadline, "timed out waiting for {what}: {v}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Runs `ghostwire ARGS… --control ADDR` and returns its stdout; it must succeed.
    pub async fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_ghostwire"))
            .args(args)
            .args(["--control", &self.addr])
            .env("DATABASE_URL", &self.url)
            .output()
            .await
            .expect("run ghostwire");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "ghostwire {args:?} failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        stdout
    }

    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// Waits for the process to end (within `PATIENCE`).
    pub async fn wait(mut self) -> Ended {
        match tokio::time::timeout(PATIENCE, self.child.wait()).await {
            Ok(_) => self.wait_finished().await,
            Err(_) => {
                let _ = self.child.kill().await;
                let ended = self.wait_finished().await;
                panic!("ghostwire did not end within {PATIENCE:?}:\n{}", ended.output());
            }
        }
    }

    async fn wait_finished(&mut self) -> Ended {
        let status = self.child.wait().await.expect("wait for ghostwire");
        let _ = (&mut self.stdout_task).await;
        let stderr = (&mut self.stderr_task).await.unwrap_or_default();
        Ended { status, stdout: self.stdout(), stderr }
    }
}
