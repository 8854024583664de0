//! The checked-in `crds/*.yaml` must be exactly what the Rust types generate.

use std::path::PathBuf;

#[test]
fn checked_in_crds_match_the_types() {
    for dir in ["../crds", "../charts/sagamesh/files/crds"] {
        check_dir(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(dir));
    }
}

fn check_dir(dir: &std::path::Path) {
    let files = sagamesh_api::crdgen::crd_files().expect("CRDs render");
    assert_eq!(files.len(), 2);
    for (name, generated) in files {
        let path = dir.join(&name);
        let on_disk = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        assert!(
            on_disk == generated,
            "{} differs from what the Rust types generate; run `cargo run -p sagamesh-api --bin crdgen` and commit the result",
            path.display()
        );
    }
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .expect("crds/ exists")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "sagas.sagamesh.io.yaml",
            "serviceregistrations.sagamesh.io.yaml"
        ],
        "crds/ holds exactly the generated files"
    );
}
