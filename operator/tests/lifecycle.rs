//! The operator process ends non-zero, saying why on stderr, when a part cannot start: here an
//! address it must listen on is already taken (a listener the test holds). Before, it stayed up
//! doing nothing.

mod common;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use common::{free_port, operator_setup};
use sagamesh_testing::test_bed;

/// Runs the operator with `taken` held by a listener of this test as the address named by
/// `flag`, and checks it exits non-zero within a few seconds naming the address on stderr.
fn exits_when_taken(kubeconfig: &Path, ns: &str, flag: &str, what: &str) -> anyhow::Result<()> {
    let holder = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let taken = holder.local_addr()?;
    let addr = |flag_name: &str| -> anyhow::Result<String> {
        Ok(if flag_name == flag {
            taken.to_string()
        } else {
            SocketAddr::from((Ipv4Addr::LOCALHOST, free_port())).to_string()
        })
    };
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sagamesh-operator"));
    cmd.arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--discovery-addr", &addr("--discovery-addr")?])
        .args(["--admin-addr", &addr("--admin-addr")?])
        .args(["--watch-namespace", ns, "--lease-namespace", ns])
        .args(["--identity", "lifecycle", "--no-sagas"])
        .env("RUST_LOG", "info")
        .env_remove("POD_NAME")
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if flag == "--webhook-addr" {
        cmd.args(["--webhook-addr", &taken.to_string()]).args([
            "--webhook-configuration",
            &format!("sagamesh-injector-{ns}"),
        ]);
    }
    let mut child = cmd.spawn().context("starting sagamesh-operator")?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("{what}: the operator still runs 20s after starting on a taken address");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let elapsed = started.elapsed();
    let mut stderr = String::new();
    use std::io::Read as _;
    child
        .stderr
        .take()
        .context("stderr")?
        .read_to_string(&mut stderr)?;
    ensure!(
        !status.success(),
        "{what}: exited with {status}; stderr:\n{stderr}"
    );
    ensure!(
        stderr.contains(&taken.to_string()) && stderr.contains(what),
        "{what}: stderr does not name the {what} address {taken}:\n{stderr}"
    );
    eprintln!("{what}: exited with {status} after {elapsed:?}");
    drop(holder);
    Ok(())
}

#[tokio::test]
async fn a_taken_address_ends_the_operator_non_zero() {
    let Some(bed) = test_bed("a_taken_address_ends_the_operator_non_zero").await else {
        return;
    };
    let bed2 = bed.clone();
    bed.with_namespace("op-lifecycle", move |client, ns| async move {
        let kubeconfig = operator_setup(&bed2, &client, &ns).await?;
        tokio::task::spawn_blocking(move || {
            exits_when_taken(&kubeconfig, &ns, "--discovery-addr", "discovery")?;
            exits_when_taken(&kubeconfig, &ns, "--admin-addr", "admin")?;
            exits_when_taken(&kubeconfig, &ns, "--webhook-addr", "webhook")
        })
        .await?
    })
    .await;
}
