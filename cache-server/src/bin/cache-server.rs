//! `cache-server`: the REAPI v2 remote cache. See `cache-server --help`.

use anyhow::Context;
use clap::Parser;
use rba_cache_server::Server;
use rba_cache_server::config::{Cli, to_masked_toml};
use tokio::net::TcpListener;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    rba_cache_server::logging::init(
        tracing_subscriber::EnvFilter::try_new(&cli.log).context("invalid --log filter")?,
        cli.log_format,
    );
    let print_config = cli.print_config;
    let config = cli.into_config()?;
    if print_config {
        print!("{}", to_masked_toml(&config));
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| format!("binding metrics {addr}"))?),
            None => None,
        };
        if let Some(listener) = &metrics_listener {
            tracing::info!(addr = %listener.local_addr()?, "metrics on http://{}/metrics", listener.local_addr()?);
        }
        let server = Server::new(config)?;
        server.serve(listener, metrics_listener, shutdown_signal()).await
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
    }
}
