//! The kind example (examples/shop) is accepted by the real API server as written, and the
//! kind end-to-end script is at least well-formed shell.

use std::process::Command;

use anyhow::ensure;
use sagamesh_testing::{repo_root, test_bed};

#[tokio::test]
async fn the_shop_example_is_accepted_by_the_api_server() {
    let Some(bed) = test_bed("the_shop_example_is_accepted_by_the_api_server").await else {
        return;
    };
    bed.install_crds().await.expect("CRDs install");
    let kubectl = bed.clone();
    bed.with_namespace("shop-example", move |_client, ns| async move {
        let dir = repo_root().join("examples/shop");
        let mut files: Vec<_> = std::fs::read_dir(&dir)?
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        ensure!(files.len() >= 4, "examples/shop holds the manifests");
        for file in files {
            let text = std::fs::read_to_string(&file)?;
            if text.contains("kind: Namespace") {
                continue;
            }
            // The same objects, in the test's namespace; the server checks them without storing.
            let text = text.replace("namespace: shop", &format!("namespace: {ns}"));
            let tmp = std::env::temp_dir().join(format!(
                "{ns}-{}",
                file.file_name().unwrap_or_default().to_string_lossy()
            ));
            std::fs::write(&tmp, text)?;
            let out =
                kubectl.kubectl(&["apply", "--dry-run=server", "-f", &tmp.to_string_lossy()])?;
            let _ = std::fs::remove_file(&tmp);
            ensure!(
                out.status.success(),
                "{}: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    })
    .await;
}

#[test]
fn the_kind_script_parses() -> anyhow::Result<()> {
    let out = Command::new("bash")
        .arg("-n")
        .arg(repo_root().join("scripts/e2e-kind.sh"))
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
