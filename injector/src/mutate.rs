//! The pod mutation: add the sidecar as a native sidecar (an init container with
//! `restartPolicy: Always`, so it starts before the app and stops after it).
//!
//! - Idempotent: a pod that already has the `sagamesh-sidecar` container is left alone.
//! - Opt out per pod with the annotation (or label) `sagamesh.io/inject: disabled`.
//! - Per-pod overrides by annotation: `sagamesh.io/app-port`, `sagamesh.io/sidecar-cpu-request`,
//!   `sagamesh.io/sidecar-memory-request`, `sagamesh.io/sidecar-memory-limit`,
//!   `sagamesh.io/sidecar-log-level`.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{
        Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
        ObjectFieldSelector, Pod, Probe, ResourceRequirements, SeccompProfile, SecurityContext,
    },
    apimachinery::pkg::{api::resource::Quantity, util::intstr::IntOrString},
};
use serde_json::{Value, json};

pub const SIDECAR_NAME: &str = "sagamesh-sidecar";
pub const INJECT_ANNOTATION: &str = "sagamesh.io/inject";
pub const INJECTED_ANNOTATION: &str = "sagamesh.io/injected";
pub const APP_PORT_ANNOTATION: &str = "sagamesh.io/app-port";
pub const INBOUND_PORT: i32 = 4143;
pub const ADMIN_PORT: i32 = 4191;

/// What every injected sidecar gets (from the chart's values, through the operator's flags).
#[derive(Debug, Clone, PartialEq)]
pub struct InjectConfig {
    pub image: String,
    pub image_pull_policy: String,
    /// `http://<operator service>.<namespace>.svc:8090`
    pub discovery_addr: String,
    /// `{"requests": {"cpu": "10m", ...}, "limits": {...}}`
    pub resources: ResourceRequirements,
    pub log_format: String,
    pub log_level: String,
}

/// Why a pod could not be mutated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MutateError {
    #[error("annotation {annotation}: {reason}")]
    BadAnnotation { annotation: String, reason: String },
}

/// Whether the pod should get a sidecar, and why not.
pub fn skip_reason(pod: &Pod) -> Option<&'static str> {
    let meta = &pod.metadata;
    let disabled = |map: &Option<BTreeMap<String, String>>| {
        map.as_ref()
            .and_then(|m| m.get(INJECT_ANNOTATION))
            .is_some_and(|v| v == "disabled")
    };
    if disabled(&meta.annotations) || disabled(&meta.labels) {
        return Some("opted out (sagamesh.io/inject: disabled)");
    }
    let spec = pod.spec.as_ref()?;
    let has_sidecar = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .any(|c| c.name == SIDECAR_NAME);
    if has_sidecar {
        return Some("already injected");
    }
    if spec.host_network == Some(true) {
        return Some("host network pods are not meshed");
    }
    None
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// The app port the inbound listener forwards to: the annotation, else the first container's
/// first TCP port.
fn app_port(pod: &Pod) -> Result<Option<i32>, MutateError> {
    if let Some(value) = annotation(pod, APP_PORT_ANNOTATION) {
        return match value.parse::<i32>() {
            Ok(port)
                if (1..=65535).contains(&port) && port != INBOUND_PORT && port != ADMIN_PORT =>
            {
                Ok(Some(port))
            }
            _ => Err(MutateError::BadAnnotation {
                annotation: APP_PORT_ANNOTATION.into(),
                reason: format!(
                    "{value:?} is not a port (1-65535, not {INBOUND_PORT} or {ADMIN_PORT})"
                ),
            }),
        };
    }
    Ok(pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.ports.as_ref())
        .and_then(|ports| {
            ports
                .iter()
                .find(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        })
        .map(|p| p.container_port))
}

fn resources(pod: &Pod, base: &ResourceRequirements) -> Result<ResourceRequirements, MutateError> {
    let mut resources = base.clone();
    for (key, section, resource) in [
        ("sagamesh.io/sidecar-cpu-request", "requests", "cpu"),
        ("sagamesh.io/sidecar-memory-request", "requests", "memory"),
        ("sagamesh.io/sidecar-memory-limit", "limits", "memory"),
    ] {
        let Some(value) = annotation(pod, key) else {
            continue;
        };
        let valid = !value.is_empty()
            && value.chars().next().is_some_and(|c| c.is_ascii_digit())
            && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '.');
        if !valid {
            return Err(MutateError::BadAnnotation {
                annotation: key.into(),
                reason: format!("{value:?} is not a quantity"),
            });
        }
        let map = if section == "requests" {
            &mut resources.requests
        } else {
            &mut resources.limits
        };
        map.get_or_insert_with(BTreeMap::new)
            .insert(resource.into(), Quantity(value.into()));
    }
    Ok(resources)
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn probe(path: &str) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(ADMIN_PORT),
            ..Default::default()
        }),
        period_seconds: Some(5),
        ..Default::default()
    }
}

/// The sidecar container for `pod`.
pub fn sidecar_container(pod: &Pod, config: &InjectConfig) -> Result<Container, MutateError> {
    let mut env_vars = vec![
        env("SAGAMESH_DISCOVERY_ADDR", config.discovery_addr.clone()),
        field_env("SAGAMESH_NAMESPACE", "metadata.namespace"),
        field_env("SAGAMESH_POD_NAME", "metadata.name"),
        env(
            "SAGAMESH_CALLER",
            "$(SAGAMESH_POD_NAME).$(SAGAMESH_NAMESPACE)",
        ),
        env("SAGAMESH_OUTBOUND_ADDR", "127.0.0.1:4140"),
        env("SAGAMESH_INBOUND_ADDR", format!("0.0.0.0:{INBOUND_PORT}")),
        env("SAGAMESH_ADMIN_ADDR", format!("0.0.0.0:{ADMIN_PORT}")),
        env("SAGAMESH_LOG_FORMAT", config.log_format.clone()),
        env(
            "RUST_LOG",
            annotation(pod, "sagamesh.io/sidecar-log-level")
                .unwrap_or(&config.log_level)
                .to_string(),
        ),
    ];
    if let Some(port) = app_port(pod)? {
        env_vars.push(env("SAGAMESH_APP_PORT", port.to_string()));
    }
    Ok(Container {
        name: SIDECAR_NAME.into(),
        image: Some(config.image.clone()),
        image_pull_policy: Some(config.image_pull_policy.clone()),
        // A native sidecar: starts before the app containers, stops after them.
        restart_policy: Some("Always".into()),
        env: Some(env_vars),
        ports: Some(vec![
            ContainerPort {
                name: Some("sm-inbound".into()),
                container_port: INBOUND_PORT,
                ..Default::default()
            },
            ContainerPort {
                name: Some("sm-admin".into()),
                container_port: ADMIN_PORT,
                ..Default::default()
            },
        ]),
        startup_probe: Some(Probe {
            failure_threshold: Some(30),
            period_seconds: Some(1),
            ..probe("/ready")
        }),
        readiness_probe: Some(probe("/ready")),
        liveness_probe: Some(probe("/live")),
        resources: Some(resources(pod, &config.resources)?),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The JSON patch (RFC 6902) that injects the sidecar, or `None` when the pod is skipped.
pub fn injection_patch(pod: &Pod, config: &InjectConfig) -> Result<Option<Value>, MutateError> {
    if let Some(reason) = skip_reason(pod) {
        tracing::debug!(pod = ?pod.metadata.name, reason, "not injecting");
        return Ok(None);
    }
    let container = serde_json::to_value(sidecar_container(pod, config)?).unwrap_or(Value::Null);
    let spec = pod.spec.as_ref();
    let mut ops = Vec::new();
    // First among the init containers, so it is up before any other init container needs it.
    if spec.is_some_and(|s| s.init_containers.as_ref().is_some_and(|c| !c.is_empty())) {
        ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": container}));
    } else {
        ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": [container]}));
    }
    if pod.metadata.annotations.is_none() {
        ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": {}}));
    }
    ops.push(json!({"op": "add", "path": "/metadata/annotations/sagamesh.io~1injected", "value": "true"}));
    Ok(Some(Value::Array(ops)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> InjectConfig {
        InjectConfig {
            image: "sagamesh/sidecar:dev".into(),
            image_pull_policy: "IfNotPresent".into(),
            discovery_addr: "http://sagamesh-operator.sagamesh-system.svc:8090".into(),
            resources: serde_json::from_value(
                json!({"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}}),
            )
            .unwrap_or_default(),
            log_format: "json".into(),
            log_level: "info".into(),
        }
    }

    fn pod(value: Value) -> Pod {
        serde_json::from_value(value).unwrap_or_default()
    }

    fn app() -> Value {
        json!({"metadata": {"name": "web"}, "spec": {"containers": [{"name": "app", "image": "app", "ports": [{"containerPort": 8080}]}]}})
    }

    fn patched(pod_json: Value) -> Value {
        let mut doc = pod_json.clone();
        let patch = injection_patch(&pod(pod_json), &config())
            .expect("mutates")
            .expect("injects");
        let patch: json_patch::Patch = serde_json::from_value(patch).expect("valid patch");
        json_patch::patch(&mut doc, &patch).expect("patch applies");
        doc
    }

    #[test]
    fn injects_a_native_sidecar_with_the_app_port() {
        let doc = patched(app());
        let sidecar = &doc["spec"]["initContainers"][0];
        assert_eq!(sidecar["name"], SIDECAR_NAME);
        assert_eq!(sidecar["restartPolicy"], "Always");
        let env = sidecar["env"].as_array().expect("env");
        assert!(
            env.iter()
                .any(|e| e["name"] == "SAGAMESH_APP_PORT" && e["value"] == "8080")
        );
        assert_eq!(
            doc["metadata"]["annotations"]["sagamesh.io/injected"],
            "true"
        );
        assert_eq!(sidecar["resources"]["limits"]["memory"], "64Mi");
        assert_eq!(sidecar["securityContext"]["readOnlyRootFilesystem"], true);
    }

    #[test]
    fn goes_first_among_existing_init_containers() {
        let mut value = app();
        value["spec"]["initContainers"] = json!([{"name": "migrate", "image": "m"}]);
        let doc = patched(value);
        assert_eq!(doc["spec"]["initContainers"][0]["name"], SIDECAR_NAME);
        assert_eq!(doc["spec"]["initContainers"][1]["name"], "migrate");
    }

    #[test]
    fn is_idempotent_and_honours_opt_out() {
        let injected = patched(app());
        assert_eq!(injection_patch(&pod(injected), &config()), Ok(None));
        let mut opted_out = app();
        opted_out["metadata"]["annotations"] = json!({"sagamesh.io/inject": "disabled"});
        assert_eq!(injection_patch(&pod(opted_out), &config()), Ok(None));
        let mut host = app();
        host["spec"]["hostNetwork"] = json!(true);
        assert_eq!(injection_patch(&pod(host), &config()), Ok(None));
    }

    #[test]
    fn annotations_override_per_pod_and_bad_ones_are_refused() {
        let mut value = app();
        value["metadata"]["annotations"] = json!({
            "sagamesh.io/app-port": "9000",
            "sagamesh.io/sidecar-memory-limit": "128Mi",
            "sagamesh.io/sidecar-log-level": "debug"
        });
        let doc = patched(value);
        let sidecar = &doc["spec"]["initContainers"][0];
        let env = sidecar["env"].as_array().expect("env");
        assert!(
            env.iter()
                .any(|e| e["name"] == "SAGAMESH_APP_PORT" && e["value"] == "9000")
        );
        assert!(
            env.iter()
                .any(|e| e["name"] == "RUST_LOG" && e["value"] == "debug")
        );
        assert_eq!(sidecar["resources"]["limits"]["memory"], "128Mi");

        let mut bad = app();
        bad["metadata"]["annotations"] = json!({"sagamesh.io/app-port": "http"});
        let error = injection_patch(&pod(bad), &config()).expect_err("refused");
        assert!(
            error.to_string().contains("sagamesh.io/app-port"),
            "{error}"
        );
    }
}
