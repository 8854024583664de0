//! `sagamesh-sidecar`: the Sagamesh data plane (in progress; see the README status section).

fn main() -> anyhow::Result<()> {
    anyhow::bail!("the sidecar is not implemented yet; see the README status section")
}
