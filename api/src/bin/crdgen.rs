//! Writes the CRD YAML for every Sagamesh resource.
//!
//! `crdgen` writes into `crds/` at the workspace root and into the Helm chart's
//! `charts/sagamesh/files/crds/`; `crdgen DIR` into DIR only; `crdgen -` prints everything to
//! stdout as one multi-document stream.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = sagamesh_api::crdgen::crd_files()?;
    let target = std::env::args().nth(1);
    if target.as_deref() == Some("-") {
        for (_, yaml) in &files {
            println!("---\n{yaml}");
        }
        return Ok(());
    }
    let dir = target.map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("crds")
    });
    std::fs::create_dir_all(&dir)?;
    for (name, yaml) in files {
        let path = dir.join(&name);
        std::fs::write(&path, yaml).map_err(|e| format!("writing {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
