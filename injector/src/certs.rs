//! The webhook's serving certificate, made and rotated by the operator: a private CA and a
//! serving certificate for the webhook Service's DNS names, kept in a Secret (so every replica
//! serves the same one), renewed when it has less than [`RENEW_BEFORE`] left, with the CA bundle
//! patched into the MutatingWebhookConfiguration.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::{
    ByteString,
    api::{admissionregistration::v1::MutatingWebhookConfiguration, core::v1::Secret},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};

/// How long a generated certificate is valid.
pub const VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Renew when less than this is left.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

const CA_KEY: &str = "ca.crt";
const CERT_KEY: &str = "tls.crt";
const KEY_KEY: &str = "tls.key";
const EXPIRES_KEY: &str = "expires";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating the certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// A CA and a serving certificate signed by it, PEM-encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookCert {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// Seconds since the Unix epoch when the serving certificate expires.
    pub expires: i64,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Generates a new CA and serving certificate for `dns_names` (IP addresses allowed too).
pub fn generate(dns_names: &[String], validity: Duration) -> Result<WebhookCert, CertError> {
    let now = time::OffsetDateTime::now_utc();
    let until = now + validity;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "sagamesh-webhook-ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = now;
    ca_params.not_after = until;
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(
        DnType::CommonName,
        dns_names.first().cloned().unwrap_or_default(),
    );
    params.subject_alt_names = dns_names
        .iter()
        .map(|name| match name.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => name.clone().try_into().map(SanType::DnsName),
        })
        .collect::<Result<_, _>>()?;
    params.not_before = now;
    params.not_after = until;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(WebhookCert {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        expires: unix_now() + validity.as_secs() as i64,
    })
}

/// A rustls server configuration for the certificate.
pub fn server_config(cert: &WebhookCert) -> Result<Arc<rustls::ServerConfig>, CertError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Tls(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes())
        .map_err(|e| CertError::Tls(format!("private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| CertError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| CertError::Tls(e.to_string()))?;
    Ok(Arc::new(config))
}

fn from_secret(secret: &Secret) -> Option<WebhookCert> {
    let data = secret.data.as_ref()?;
    let text = |key: &str| {
        data.get(key)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    };
    Some(WebhookCert {
        ca_pem: text(CA_KEY)?,
        cert_pem: text(CERT_KEY)?,
        key_pem: text(KEY_KEY)?,
        expires: text(EXPIRES_KEY)?.parse().ok()?,
    })
}

fn to_secret(name: &str, cert: &WebhookCert, resource_version: Option<String>) -> Secret {
    let data: BTreeMap<String, ByteString> = [
        (CA_KEY, cert.ca_pem.clone()),
        (CERT_KEY, cert.cert_pem.clone()),
        (KEY_KEY, cert.key_pem.clone()),
        (EXPIRES_KEY, cert.expires.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
    .collect();
    let mut secret = Secret {
        data: Some(data),
        type_: Some("kubernetes.io/tls".into()),
        ..Default::default()
    };
    secret.metadata.name = Some(name.into());
    secret.metadata.resource_version = resource_version;
    secret.metadata.labels =
        Some([("app.kubernetes.io/name".to_string(), "sagamesh".to_string())].into());
    secret
}

/// Reads the certificate from the Secret, or makes (and stores) a new one when it is missing,
/// expiring, or for other names. Returns it and whether it changed. A replica that loses the
/// race to write reads the winner's.
pub async fn ensure_secret(
    client: &Client,
    namespace: &str,
    name: &str,
    dns_names: &[String],
) -> Result<(WebhookCert, bool), CertError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for _ in 0..3 {
        let existing = api.get_opt(name).await?;
        let current = existing.as_ref().and_then(from_secret);
        if let Some(cert) = &current
            && cert.expires - unix_now() > RENEW_BEFORE.as_secs() as i64
        {
            return Ok((cert.clone(), false));
        }
        let cert = generate(dns_names, VALIDITY)?;
        let result = match &existing {
            Some(secret) => api
                .replace(
                    name,
                    &PostParams::default(),
                    &to_secret(name, &cert, secret.metadata.resource_version.clone()),
                )
                .await
                .map(|_| ()),
            None => api
                .create(&PostParams::default(), &to_secret(name, &cert, None))
                .await
                .map(|_| ()),
        };
        match result {
            Ok(()) => {
                tracing::info!(secret = name, "webhook certificate written");
                return Ok((cert, true));
            }
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(CertError::Tls(
        "could not settle the webhook certificate Secret (conflicts)".into(),
    ))
}

/// Writes the CA bundle into every webhook of the configuration.
pub async fn patch_ca_bundle(
    client: &Client,
    configuration: &str,
    ca_pem: &str,
) -> Result<(), CertError> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let current = api.get(configuration).await?;
    let bundle = ByteString(ca_pem.as_bytes().to_vec());
    let webhooks: Vec<serde_json::Value> = current
        .webhooks
        .iter()
        .flatten()
        .map(|w| serde_json::json!({"name": w.name, "clientConfig": {"caBundle": bundle}}))
        .collect();
    if current
        .webhooks
        .iter()
        .flatten()
        .all(|w| w.client_config.ca_bundle.as_ref() == Some(&bundle))
    {
        return Ok(());
    }
    let patch = serde_json::json!({"webhooks": webhooks});
    api.patch(
        configuration,
        &PatchParams::apply("sagamesh-operator").force(),
        &Patch::Apply(&serde_json::json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": configuration},
            "webhooks": patch["webhooks"],
        })),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificates_load_into_rustls() {
        let cert = generate(
            &["webhook.sagamesh.svc".into(), "127.0.0.1".into()],
            VALIDITY,
        )
        .expect("generates");
        assert!(cert.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(cert.expires > unix_now() + 300 * 24 * 3600);
        server_config(&cert).expect("rustls accepts it");
        let secret = to_secret("s", &cert, None);
        assert_eq!(from_secret(&secret), Some(cert));
    }
}
