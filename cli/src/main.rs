//! `sagamesh`: Sagamesh without a cluster.
//!
//! - `sagamesh demo`: the whole mesh on 127.0.0.x — control plane, example services with their
//!   sidecars, balanced traffic, a killed instance ejected, an order saga that succeeds and one
//!   that is compensated — and a report.
//! - `sagamesh local --manifests DIR --state DIR`: the local control plane.
//! - `sagamesh saga list|get`: saga status from a local state directory, like `kubectl get`.
//!
//! The demo starts every process from this one binary (hidden `sidecar` and `shop-service`
//! subcommands), so nothing else needs building.

mod demo;
mod local_cmd;
mod saga_cmd;
mod style;

use sagamesh_server::logging::{self, LogFormat};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "sagamesh",
    version,
    about = "Sagamesh without a cluster: local mode, the demo, saga status"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the demo: services, sidecars and the control plane on 127.0.0.x, then a report.
    Demo(demo::DemoArgs),
    /// Run the local control plane over a directory of manifests.
    Local(local_cmd::LocalArgs),
    /// Show sagas kept by a local control plane.
    Saga {
        #[command(subcommand)]
        command: saga_cmd::SagaCommand,
        /// The local control plane's state directory.
        #[arg(
            long,
            global = true,
            env = "SAGAMESH_STATE",
            default_value = ".sagamesh/state"
        )]
        state: PathBuf,
    },
    /// The sidecar (same flags as `sagamesh-sidecar`).
    #[command(hide = true)]
    Sidecar(Box<sagamesh_sidecar::Config>),
    /// An example service (same flags as `shop-service`).
    #[command(hide = true)]
    ShopService(sagamesh_examples::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Sidecar(config) => {
            logging::init(config.log_format);
            let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            runtime.block_on(local_cmd::run_sidecar(*config))
        }
        command => {
            let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            runtime.block_on(async move {
                match command {
                    Command::Demo(args) => demo::run(args).await,
                    Command::Local(args) => {
                        logging::init(if args.log_json {
                            LogFormat::Json
                        } else {
                            LogFormat::Text
                        });
                        local_cmd::run(args).await
                    }
                    Command::Saga { command, state } => saga_cmd::run(command, &state),
                    Command::ShopService(args) => sagamesh_examples::serve(args).await,
                    Command::Sidecar(_) => Ok(()),
                }
            })
        }
    }
}
