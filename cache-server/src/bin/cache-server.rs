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
        // Listen for signals before the server says it is serving: a SIGTERM sent the moment
        // "serving REAPI" is logged must already shut down cleanly.
        let shutdown = shutdown_signal()?;
        server.serve(listener, metrics_listener, shutdown).await
    })
}

/// Registers for SIGINT and SIGTERM now; the returned future resolves on the first of them.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        }
    })
}
