//! `sagamesh-operator`: the Sagamesh control plane. Reconcilers, the discovery API and the saga
//! engine are being built (see the README's status section); today the binary only reports what
//! it would manage.

use clap::Parser;

/// Sagamesh control plane.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Print the CRDs this operator manages, as YAML, and exit.
    #[arg(long)]
    print_crds: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_crds {
        for (_, yaml) in sagamesh_api::crdgen::crd_files()? {
            println!("---\n{yaml}");
        }
        return Ok(());
    }
    anyhow::bail!(
        "the operator's reconcilers are not implemented yet; see the README status section"
    )
}
