//! `sagamesh-sidecar`: the Sagamesh data plane. See `--help` for flags and their environment
//! variables.

use anyhow::Context;
use clap::Parser;
use sagamesh_sidecar::Sidecar;
use sagamesh_sidecar::config::Config;

// mimalloc instead of glibc's malloc: a proxied request makes some 20 small allocations
// (hyper's buffers, headers, futures), and under callgrind glibc's malloc/free were about 16%
// of the sidecar's instructions per request. See docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    sagamesh_server::logging::init(config.log_format);
    let runtime = config.runtime().context("starting the tokio runtime")?;
    runtime.block_on(run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let sidecar = Sidecar::start(config)
        .await
        .context("starting the sidecar")?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        r = tokio::signal::ctrl_c() => {
            r.context("waiting for Ctrl-C")?;
            tracing::info!("SIGINT: draining");
        }
    }
    sidecar.shutdown().await;
    Ok(())
}
