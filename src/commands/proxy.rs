//! `ghostwire proxy`.

use std::path::PathBuf;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::CommandError;
use crate::cli::ClientTls;
use crate::connect::Secret;
use crate::connect::tls_server::Acceptor;
use crate::control;
use crate::proxy::{ClientLeg, ClientTlsMode, Proxy, ProxyOptions};

/// Cancels `token` on SIGINT or SIGTERM.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot watch SIGTERM: {e}");
                let _ = tokio::signal::ctrl_c().await;
                token.cancel();
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        token.cancel();
    });
}

/// Reloads the proxy's certificate on each SIGHUP.
fn reload_on_sighup(proxy: Proxy) {
    tokio::spawn(async move {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot watch SIGHUP (certificates will not be reloaded): {e}");
                return;
            }
        };
        while hup.recv().await.is_some() {
            match proxy.reload_certificate() {
                Ok(true) => tracing::info!("SIGHUP: reloaded the TLS certificate and key; new sessions use them"),
                Ok(false) => tracing::info!("SIGHUP: no TLS certificate to reload"),
                Err(e) => tracing::error!("SIGHUP: could not reload the TLS certificate, keeping the old one: {e}"),
            }
        }
    });
}

/// The proxy's TLS towards clients, as given on the command line.
pub struct Tls {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub client: Option<ClientTls>,
}

impl Tls {
    fn leg(&self) -> Result<ClientLeg, CommandError> {
        let acceptor = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some(Acceptor::new(cert, key).map_err(CommandError::refused)?),
            _ => None,
        };
        let mode = match (self.client, &acceptor) {
            (Some(ClientTls::Disable), _) => ClientTlsMode::Disable,
            (Some(ClientTls::Allow), _) => ClientTlsMode::Allow,
            (Some(ClientTls::Require), _) => ClientTlsMode::Require,
            (None, Some(_)) => ClientTlsMode::Allow,
            (None, None) => ClientTlsMode::Disable,
        };
        ClientLeg::new(mode, acceptor).map_err(CommandError::refused)
    }
}

/// Where the proxy listens and relays to.
pub struct Args<'a> {
    pub listen: &'a str,
    pub upstream: &'a str,
    pub control: Option<&'a str>,
    pub token: Option<Secret>,
    /// Prepare stale statements again and replay (see proxy/tracker).
    pub recover_statements: bool,
    /// `--route` rules, as given.
    pub routes: Vec<String>,
}

pub async fn run(args: Args<'_>, tls: Tls, max_message_len: u32, grace: Duration) -> Result<(), CommandError> {
    let options = ProxyOptions {
        upstream: args.upstream.to_owned(),
        max_message_len,
        client_tls: tls.leg()?,
        recover_statements: args.recover_statements,
        routes: args
            .routes
            .iter()
            .map(|r| crate::proxy::route::Route::parse(r))
            .collect::<Result<_, _>>()
            .map_err(CommandError::refused)?,
    };
    let proxy = Proxy::with_options(options).map_err(CommandError::refused)?;
    let ctl = match args.control {
        Some(addr) => Some(listen_control(addr, args.token.as_ref()).await?),
        None => None,
    };
    let listen = args.listen;
    let listener =
        TcpListener::bind(listen).await.map_err(|e| CommandError::failed(format!("cannot listen on {listen}: {e}")))?;
    control::metrics();
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    reload_on_sighup(proxy.clone());
    let mut control_shown = String::new();
    if let Some(ctl) = ctl {
        control_shown =
            format!("; control API on http://{}", ctl.local_addr().map(|a| a.to_string()).unwrap_or_default());
        tokio::spawn(control::serve(ctl, proxy.control(), args.token, shutdown.clone()));
    }
    let shown = listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| listen.to_owned());
    let status = proxy.status();
    say!(
        "ghostwire proxy listening on {shown} (client TLS: {}), relaying to {} (sslmode {}){control_shown}",
        status.client_tls,
        status.upstream,
        status.upstream_sslmode
    );
    proxy.serve(listener, shutdown, grace).await;
    say!("ghostwire proxy stopped");
    Ok(())
}

/// Binds a control API listener, refusing one reachable beyond loopback without a token.
pub async fn listen_control(addr: &str, token: Option<&Secret>) -> Result<TcpListener, CommandError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| CommandError::failed(format!("cannot listen on {addr} for the control API: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| CommandError::failed(format!("cannot listen on {addr} for the control API: {e}")))?;
    control::check_exposure(bound, token).map_err(CommandError::refused)?;
    Ok(listener)
}
