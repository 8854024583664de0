//! The sidecar-injection webhook in the operator: serves `sagamesh-injector`'s admission server
//! and keeps its certificate current — made by the operator (a Secret shared by the replicas,
//! renewed before expiry, CA bundle patched into the MutatingWebhookConfiguration), or taken
//! from files cert-manager writes (reloaded when they change).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use kube::Client;
use sagamesh_injector::{
    certs::{self, WebhookCert},
    mutate::InjectConfig,
    server,
};
use sagamesh_server::TlsHandle;
use tokio::{net::TcpListener, sync::watch};

/// Where the serving certificate comes from.
#[derive(Clone, Debug)]
pub enum CertSource {
    /// Made and rotated by the operator, kept in this Secret of `namespace`.
    Operator {
        namespace: String,
        secret: String,
        dns_names: Vec<String>,
    },
    /// `tls.crt` and `tls.key` in this directory (cert-manager's Secret, mounted).
    Files(PathBuf),
}

#[derive(Clone, Debug)]
pub struct WebhookSettings {
    pub addr: SocketAddr,
    /// Name of the MutatingWebhookConfiguration whose CA bundle the operator maintains.
    pub configuration: String,
    pub cert: CertSource,
    pub inject: InjectConfig,
}

/// How often the certificate is checked.
const CHECK_EVERY: Duration = Duration::from_secs(3600);

fn read_files(dir: &std::path::Path) -> Result<WebhookCert, String> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .map_err(|e| format!("{}: {e}", dir.join(name).display()))
    };
    Ok(WebhookCert {
        ca_pem: read("ca.crt").unwrap_or_default(),
        cert_pem: read("tls.crt")?,
        key_pem: read("tls.key")?,
        expires: 0,
    })
}

async fn current_cert(
    client: &Client,
    settings: &WebhookSettings,
) -> Result<(WebhookCert, bool), String> {
    match &settings.cert {
        CertSource::Operator {
            namespace,
            secret,
            dns_names,
        } => {
            let (cert, changed) = certs::ensure_secret(client, namespace, secret, dns_names)
                .await
                .map_err(|e| e.to_string())?;
            // Every replica (re)writes the bundle: whichever serves, the API server trusts it.
            if let Err(e) =
                certs::patch_ca_bundle(client, &settings.configuration, &cert.ca_pem).await
            {
                tracing::warn!(configuration = %settings.configuration, error = %e, "could not patch the webhook CA bundle (will retry)");
            }
            Ok((cert, changed))
        }
        CertSource::Files(dir) => Ok((read_files(dir)?, false)),
    }
}

/// Serves the webhook on `listener` (bound at start-up, so a taken address fails the start)
/// until `shutdown` turns true.
pub async fn run(
    client: Client,
    settings: WebhookSettings,
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    // The certificate first: without it there is nothing to serve.
    let mut attempt = 0u32;
    let (cert, _) = loop {
        match current_cert(&client, &settings).await {
            Ok(cert) => break cert,
            Err(e) => {
                attempt += 1;
                tracing::warn!(error = %e, attempt, "webhook certificate not available yet");
                tokio::time::sleep(Duration::from_secs(u64::from(attempt.min(10)))).await;
                if *shutdown.borrow() {
                    return Ok(());
                }
            }
        }
    };
    let tls = TlsHandle::new(certs::server_config(&cert).map_err(|e| e.to_string())?);
    tracing::info!(addr = %settings.addr, configuration = %settings.configuration, "sidecar-injection webhook serving");
    let rotate = {
        let (client, settings, tls, mut shutdown) = (
            client.clone(),
            settings.clone(),
            tls.clone(),
            shutdown.clone(),
        );
        let mut last = cert;
        async move {
            let every = match settings.cert {
                CertSource::Files(_) => Duration::from_secs(30),
                CertSource::Operator { .. } => CHECK_EVERY,
            };
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                match current_cert(&client, &settings).await {
                    Ok((cert, _)) if cert != last => match certs::server_config(&cert) {
                        Ok(config) => {
                            tls.replace(config);
                            tracing::info!("webhook certificate rotated");
                            last = cert;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "new webhook certificate unusable; keeping the old one")
                        }
                    },
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "checking the webhook certificate"),
                }
            }
        }
    };
    tokio::join!(
        server::serve(listener, tls, settings.inject.clone(), shutdown),
        rotate
    );
    Ok(())
}
