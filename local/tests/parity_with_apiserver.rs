//! Local mode refuses what the API server refuses: the same valid fixtures load, and each of
//! the invalid manifests the API-server tests use is refused locally, naming the same field.

use std::path::Path;

use sagamesh_manifest::load_str;
use sagamesh_testing::fixtures::{
    full_registration_with_endpoints, full_registration_with_selector, full_saga,
    invalid_registrations, invalid_sagas,
};

fn yaml(value: &serde_json::Value) -> String {
    serde_saphyr::to_string(value).expect("fixture serializes")
}

#[test]
fn the_full_valid_fixtures_load() {
    for fixture in [
        full_registration_with_endpoints(),
        full_registration_with_selector(),
        full_saga(),
    ] {
        let loaded = load_str(Path::new("fixture.yaml"), &yaml(&fixture));
        assert!(loaded.errors.is_empty(), "{:#?}", loaded.errors);
        assert_eq!(loaded.manifests.len(), 1);
    }
}

#[test]
fn every_invalid_fixture_is_refused_naming_the_field() {
    let mut failures = Vec::new();
    for case in invalid_registrations().into_iter().chain(invalid_sagas()) {
        let loaded = load_str(Path::new("case.yaml"), &yaml(&case.manifest));
        // The first expectation is the field (or, for rules across fields, the CEL message).
        let wanted = case.expect[0];
        let named = loaded
            .errors
            .iter()
            .any(|e| e.field.starts_with(wanted) || e.message.contains(wanted));
        if !loaded.manifests.is_empty() || !named {
            failures.push(format!(
                "{}: wanted {wanted:?}, got {:?}",
                case.what, loaded.errors
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn the_local_examples_are_valid() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/local");
    let loaded = sagamesh_manifest::load_dir(&dir);
    assert!(loaded.errors.is_empty(), "{:#?}", loaded.errors);
    assert_eq!(loaded.manifests.len(), 4, "three registrations and a saga");
}
