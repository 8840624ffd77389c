//! The HTTP control surface (`--control ADDR`): a small HTTP/1.1 server for typed commands,
//! status and `/metrics`, and the client the engine uses to drive proxies.
//!
//! Requests and responses are small JSON documents; bodies are capped at 64 kB. With a
//! token (`--control-token`), every request must carry `Authorization: Bearer TOKEN`; an
//! address beyond loopback is refused without one ([`check_exposure`]).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::connect::Secret;

const MAX_BODY: usize = 64 * 1024;
/// The shortest token accepted: long enough not to be guessed.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, Error)]
pub enum ExposureError {
    #[error(
        "the control API at {0} would be reachable beyond this machine without a token: pass --control-token TOKEN \
         (or set GHOSTWIRE_CONTROL_TOKEN), or listen on 127.0.0.1"
    )]
    NeedsToken(String),
    #[error("--control-token must have at least {MIN_TOKEN_LEN} characters")]
    ShortToken,
}

/// Refuses a control API that anyone on the network could drive.
pub fn check_exposure(bound: std::net::SocketAddr, token: Option<&Secret>) -> Result<(), ExposureError> {
    match token {
        Some(t) if t.expose().chars().count() < MIN_TOKEN_LEN => Err(ExposureError::ShortToken),
        Some(_) => Ok(()),
        None if bound.ip().is_loopback() => Ok(()),
        None => Err(ExposureError::NeedsToken(bound.to_string())),
    }
}

/// Compares in time independent of where the inputs differ.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len() && given.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

fn authorized(req: &hyper::Request<Incoming>, token: Option<&Secret>) -> bool {
    let Some(token) = token else { return true };
    req.headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| same_secret(given.trim().as_bytes(), token.expose().as_bytes()))
}

/// A request, reduced to what handlers need.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: HashMap<String, String>,
    pub body: Bytes,
}

impl Request {
    /// A numeric parameter from the query string or the JSON body.
    pub fn number(&self, name: &str) -> Option<u64> {
        if let Some(v) = self.query.get(name) {
            return v.parse().ok();
        }
        let json: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        json.get(name)?.as_u64()
    }
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn json(status: u16, value: &impl serde::Serialize) -> Response {
        Response {
            status,
            content_type: "application/json",
            body: serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
        }
    }

    pub fn text(status: u16, body: String) -> Response {
        Response { status, content_type: "text/plain; version=0.0.4", body }
    }

    pub fn not_found() -> Response {
        Response::json(404, &serde_json::json!({"error": "no such endpoint"}))
    }
}

pub type Handler = Arc<dyn Fn(Request) -> Pin<Box<dyn Future<Output = Response> + Send>> + Send + Sync>;

fn query_map(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or_default()
        .split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (!k.is_empty()).then(|| (k.to_owned(), v.to_owned()))
        })
        .collect()
}

async fn serve_one(
    handler: Handler,
    token: Option<Arc<Secret>>,
    req: hyper::Request<Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let query = query_map(req.uri().query());
    let response = if !authorized(&req, token.as_deref()) {
        Response::json(401, &serde_json::json!({"error": "missing or wrong bearer token (--control-token)"}))
    } else {
        match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(body) => handler(Request { method, path, query, body: body.to_bytes() }).await,
            Err(_) => Response::json(413, &serde_json::json!({"error": "request body too large"})),
        }
    };
    let mut out = hyper::Response::new(Full::new(Bytes::from(response.body)));
    *out.status_mut() =
        hyper::StatusCode::from_u16(response.status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = hyper::header::HeaderValue::from_str(response.content_type) {
        out.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    Ok(out)
}

/// Serves `handler` on `listener` until `shutdown`; with `token`, only to requests that carry it.
pub async fn serve(listener: TcpListener, handler: Handler, token: Option<Secret>, shutdown: CancellationToken) {
    let token = token.map(Arc::new);
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("control API: accept failed: {e}");
                    continue;
                }
            },
        };
        let handler = Arc::clone(&handler);
        let shutdown = shutdown.clone();
        let token = token.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| serve_one(Arc::clone(&handler), token.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                result = conn => if let Err(e) = result { tracing::debug!("control API connection: {e}") },
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

/// The process-wide Prometheus recorder for the `metrics` macros; `/metrics` renders it.
pub fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::debug!("a metrics recorder was already installed");
        }
        // Histogram samples pile up until drained: by a scrape, or by this upkeep (a proxy
        // nobody scrapes would otherwise grow by every query it held).
        let upkeep = handle.clone();
        let spawned = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || {
            loop {
                std::thread::sleep(std::time::Duration::from_secs(5));
                upkeep.run_upkeep();
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the metrics upkeep thread: {e}");
        }
        handle
    })
}

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("invalid control address {0:?}: expected host:port or http://host:port")]
    Address(String),
    #[error("cannot reach {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("{addr} did not answer in time")]
    Timeout { addr: String },
    #[error("talking to {addr}: {source}")]
    Http { addr: String, source: hyper::Error },
}

/// `http://host:port/…` or `host:port` → `host:port`.
pub fn authority(base: &str) -> Result<String, ClientError> {
    let rest = base.strip_prefix("http://").unwrap_or(base);
    let host_port = rest.split('/').next().unwrap_or_default();
    if host_port.is_empty() || !host_port.contains(':') {
        return Err(ClientError::Address(base.to_owned()));
    }
    Ok(host_port.to_owned())
}

/// Sends one request without a body to the control API at `base`; returns the status and
/// the body.
pub async fn call(
    base: &str,
    token: Option<&Secret>,
    method: &str,
    path_and_query: &str,
    timeout: Duration,
) -> Result<(u16, String), ClientError> {
    send(base, token, method, path_and_query, Bytes::new(), timeout).await
}

/// Sends one request with `body` (JSON) to the control API at `base`, with `token` as a
/// bearer token.
pub async fn send(
    base: &str,
    token: Option<&Secret>,
    method: &str,
    path_and_query: &str,
    body: Bytes,
    timeout: Duration,
) -> Result<(u16, String), ClientError> {
    let addr = authority(base)?;
    let work = async {
        let stream =
            TcpStream::connect(&addr).await.map_err(|source| ClientError::Connect { addr: addr.clone(), source })?;
        stream.set_nodelay(true).ok();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ClientError::Http { addr: addr.clone(), source })?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(hyper::header::HOST, addr.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some(t) = token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {}", t.expose()));
        }
        let req = req.body(Full::new(body)).map_err(|_| ClientError::Address(base.to_owned()))?;
        let res = sender.send_request(req).await.map_err(|source| ClientError::Http { addr: addr.clone(), source })?;
        let status = res.status().as_u16();
        let body =
            res.into_body().collect().await.map_err(|source| ClientError::Http { addr: addr.clone(), source })?;
        Ok((status, String::from_utf8_lossy(&body.to_bytes()).into_owned()))
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| ClientError::Timeout { addr: addr.clone() })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_queries() {
        assert_eq!(authority("http://127.0.0.1:6433/").unwrap(), "127.0.0.1:6433");
        assert_eq!(authority("localhost:9").unwrap(), "localhost:9");
        assert!(authority("http://nohost").is_err());
        let q = query_map(Some("deadline_ms=250&x"));
        assert_eq!(q.get("deadline_ms").map(String::as_str), Some("250"));
        assert!(q.contains_key("x"));
    }

    #[test]
    fn exposure_needs_a_long_enough_token() {
        let lo: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
        let any: std::net::SocketAddr = "0.0.0.0:9".parse().unwrap();
        let good = Secret::new("0123456789abcdef");
        assert!(check_exposure(lo, None).is_ok());
        assert!(matches!(check_exposure(any, None), Err(ExposureError::NeedsToken(_))));
        assert!(check_exposure(any, Some(&good)).is_ok());
        assert!(matches!(check_exposure(lo, Some(&Secret::new("short"))), Err(ExposureError::ShortToken)));
        assert!(same_secret(b"abc", b"abc") && !same_secret(b"abc", b"abd") && !same_secret(b"ab", b"abc"));
    }
}
