//! `shop-service`: see the library docs for the four roles.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    sagamesh_examples::serve(sagamesh_examples::Args::parse()).await
}
