//! The checker's report ([`sagamesh_api::manifest_report`]): what `sagamesh-manifest-check
//! --json` prints for the sidecar's `--manifests` discovery.

use std::path::PathBuf;

use sagamesh_api::manifest_report::{CheckedRegistration, FileReport};

use crate::{Loaded, Manifest, load_files};

/// Checks each file on its own and reports its ServiceRegistrations or its problems.
pub fn check_files(files: &[PathBuf]) -> Vec<FileReport> {
    files
        .iter()
        .zip(load_files(files))
        .map(|(file, loaded)| to_report(file.clone(), loaded))
        .collect()
}

fn to_report(file: PathBuf, loaded: Loaded) -> FileReport {
    let problems: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
    let registrations = if problems.is_empty() {
        loaded
            .manifests
            .into_iter()
            .filter_map(|located| match located.manifest {
                Manifest::ServiceRegistration(reg) => Some(CheckedRegistration {
                    line: located.line,
                    // The loader checked that there is one (a DNS label).
                    name: reg.metadata.name.clone().unwrap_or_default(),
                    namespace: reg.metadata.namespace.clone(),
                    spec: reg.spec,
                }),
                Manifest::Saga(_) => None,
            })
            .collect()
    } else {
        Vec::new()
    };
    FileReport {
        file,
        registrations,
        problems,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_with_any_problem_reports_no_registrations() {
        let dir = std::env::temp_dir().join(format!("sagamesh-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let good = dir.join("good.yaml");
        let bad = dir.join("bad.yaml");
        let registration = "apiVersion: sagamesh.io/v1alpha1\nkind: ServiceRegistration\nmetadata: {name: web, namespace: shop}\nspec:\n  endpoints: [{address: 127.0.0.2, port: 8080}]\n  ports: [{name: http, port: 80}]\n";
        std::fs::write(&good, registration).expect("write");
        std::fs::write(
            &bad,
            format!(
                "{registration}---\n{}",
                registration.replace("port: 80}", "port: 0}")
            ),
        )
        .expect("write");
        let missing = dir.join("missing.yaml");

        let reports = check_files(&[good.clone(), bad.clone(), missing.clone()]);
        assert_eq!(reports.len(), 3);
        assert_eq!(reports[0].file, good);
        assert!(reports[0].problems.is_empty(), "{:?}", reports[0]);
        assert_eq!(reports[0].registrations[0].name, "web");
        assert_eq!(
            reports[0].registrations[0].namespace.as_deref(),
            Some("shop")
        );
        assert_eq!(reports[0].registrations[0].line, 1);

        assert!(reports[1].registrations.is_empty(), "{:?}", reports[1]);
        assert_eq!(reports[1].problems.len(), 1, "{:?}", reports[1]);
        assert!(
            reports[1].problems[0].contains("bad.yaml:13: spec.ports[0].port: "),
            "{:?}",
            reports[1].problems
        );
        assert!(
            reports[2].problems[0].contains("cannot read"),
            "{:?}",
            reports[2]
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
