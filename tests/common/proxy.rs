//! An in-process ghostwire proxy (with its control API) in front of a test cluster.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ghostwire::control;
use ghostwire::proxy::{ClientLeg, Proxy, ProxyOptions, Status};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub struct TestProxy {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:port` of the control API.
    pub control: String,
    pub proxy: Proxy,
    shutdown: CancellationToken,
}

impl TestProxy {
    /// A proxy relaying to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> TestProxy {
        TestProxy::start_with(upstream, ClientLeg::default()).await
    }

    /// A proxy relaying to `upstream` (a URL, keyword string or `host:port`) with TLS
    /// towards clients as `client_tls` says.
    pub async fn start_with(upstream: &str, client_tls: ClientLeg) -> TestProxy {
        TestProxy::start_with_routes(upstream, client_tls, &[]).await
    }

    /// The same, with `--route` rules.
    #[allow(dead_code)]
    pub async fn start_with_routes(upstream: &str, client_tls: ClientLeg, routes: &[&str]) -> TestProxy {
        let options = ProxyOptions {
            upstream: upstream.to_owned(),
            max_message_len: ghostwire_proto::MAX_MESSAGE_LEN,
            client_tls,
            routes: routes.iter().map(|r| ghostwire::proxy::route::Route::parse(r).expect("a rule")).collect(),
            recover_statements: true,
        };
        let proxy = Proxy::with_options(options).expect("proxy");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ctl = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let control = format!("http://{}", ctl.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        tokio::spawn(control::serve(ctl, proxy.control(), None, shutdown.clone()));
        let p = proxy.clone();
        let s = shutdown.clone();
        tokio::spawn(async move { p.serve(listener, s, Duration::from_secs(5)).await });
        TestProxy { addr, control, proxy, shutdown }
    }

    /// `url` with its host and port replaced by the proxy's.
    pub fn url_for(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").unwrap();
        let (auth, path) = rest.split_once('@').map(|(a, p)| (format!("{a}@"), p)).unwrap_or((String::new(), rest));
        let db = path.split_once('/').map(|(_, d)| d).unwrap_or("");
        format!("{scheme}://{auth}{}/{db}", self.addr)
    }

    pub fn status(&self) -> Status {
        self.proxy.status()
    }

    pub async fn post(&self, path: &str) -> (u16, serde_json::Value) {
        let (status, body) = control::call(&self.control, None, "POST", path, Duration::from_secs(30)).await.unwrap();
        (status, serde_json::from_str(&body).unwrap_or(serde_json::Value::Null))
    }

    /// Waits until `check` holds for the proxy's status (or panics after 20 s).
    pub async fn wait_until(&self, what: &str, check: impl Fn(&Status) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !check(&self.status()) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {:?}", self.status());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The rows of `orders`.
pub const ORDER_ROWS: i32 = 200;

/// The table the prepared-statement tests read and change through a proxy: `orders (id int
/// PRIMARY KEY, amount int, note varchar(20), extra int)`, amount ten times id, note 'n' || id.
pub async fn orders(db: &super::TestDb) {
    db.exec(&format!(
        "CREATE TABLE orders (id int PRIMARY KEY, amount int NOT NULL, note varchar(20), extra int);
         INSERT INTO orders SELECT g, g * 10, 'n' || g, g FROM generate_series(1, {ORDER_ROWS}) g;"
    ))
    .await;
}
