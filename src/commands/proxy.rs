//! `ghostwire proxy`.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::CommandError;
use crate::control;
use crate::proxy::Proxy;

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

pub async fn run(
    listen: &str,
    upstream: &str,
    control_addr: Option<&str>,
    max_message_len: u32,
    grace: Duration,
) -> Result<(), CommandError> {
    let proxy = Proxy::new(upstream, max_message_len).map_err(CommandError::refused)?;
    let listener =
        TcpListener::bind(listen).await.map_err(|e| CommandError::failed(format!("cannot listen on {listen}: {e}")))?;
    control::metrics();
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    let mut control_shown = String::new();
    if let Some(addr) = control_addr {
        let ctl = TcpListener::bind(addr)
            .await
            .map_err(|e| CommandError::failed(format!("cannot listen on {addr} for the control API: {e}")))?;
        control_shown =
            format!("; control API on http://{}", ctl.local_addr().map(|a| a.to_string()).unwrap_or_default());
        tokio::spawn(control::serve(ctl, proxy.control(), shutdown.clone()));
    }
    let shown = listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| listen.to_owned());
    say!("ghostwire proxy listening on {shown}, relaying to {}{control_shown}", proxy.status().upstream);
    proxy.serve(listener, shutdown, grace).await;
    say!("ghostwire proxy stopped");
    Ok(())
}
