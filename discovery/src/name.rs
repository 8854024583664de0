//! Destination names: how an authority (`orders`, `orders.shop`,
//! `orders.shop.svc.cluster.local`, each with or without `:port`) maps to a service.

use sagamesh_api::names::is_dns_label;
use std::fmt;

/// A service: namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ServiceKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.name, self.namespace)
    }
}

/// A port of a service, by number (as in an authority) or by ServicePort name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

impl fmt::Display for PortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortRef::Number(n) => write!(f, "{n}"),
            PortRef::Name(n) => f.write_str(n),
        }
    }
}

/// A destination: a service and the port the caller named, if any (else the first port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub service: ServiceKey,
    pub port: Option<PortRef>,
}

impl Target {
    pub fn new(service: ServiceKey, port: Option<PortRef>) -> Self {
        Target { service, port }
    }
}

/// Why an authority is not a mesh name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a service name (expected name, name.namespace or name.namespace.svc.<cluster domain>, optionally with :port)"
)]
pub struct NameError(pub String);

/// Parses an authority into a target. Case-insensitive; a trailing dot is allowed.
pub fn parse_authority(
    authority: &str,
    default_namespace: &str,
    cluster_domain: &str,
) -> Result<Target, NameError> {
    let err = || NameError(authority.to_string());
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, Some(p.parse::<u16>().map_err(|_| err())?)),
        None => (authority, None),
    };
    if port == Some(0) {
        return Err(err());
    }
    // Runs on every request: allocate only for the names that are kept (and for upper case).
    let host = host.trim_end_matches('.');
    let lower;
    let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
        lower = host.to_ascii_lowercase();
        lower.as_str()
    } else {
        host
    };
    let domain = cluster_domain.trim_matches('.');
    let host = host
        .strip_suffix(domain)
        .and_then(|h| h.strip_suffix(".svc."))
        .or_else(|| host.strip_suffix(".svc"))
        .unwrap_or(host);
    let mut labels = host.split('.');
    let (name, namespace) = match (labels.next(), labels.next(), labels.next()) {
        (Some(name), None, _) => (name, default_namespace),
        (Some(name), Some(ns), None) => (name, ns),
        _ => return Err(err()),
    };
    if !is_dns_label(name) || !is_dns_label(namespace) {
        return Err(err());
    }
    Ok(Target {
        service: ServiceKey::new(namespace, name),
        port: port.map(PortRef::Number),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ns: &str, name: &str, port: Option<u16>) -> Target {
        Target {
            service: ServiceKey::new(ns, name),
            port: port.map(PortRef::Number),
        }
    }

    #[test]
    fn accepts_the_documented_forms() {
        let p = |a| parse_authority(a, "default", "cluster.local");
        assert_eq!(p("orders"), Ok(t("default", "orders", None)));
        assert_eq!(p("orders:8080"), Ok(t("default", "orders", Some(8080))));
        assert_eq!(p("orders.shop"), Ok(t("shop", "orders", None)));
        assert_eq!(p("orders.shop:80"), Ok(t("shop", "orders", Some(80))));
        assert_eq!(
            p("orders.shop.svc.cluster.local"),
            Ok(t("shop", "orders", None))
        );
        assert_eq!(
            p("Orders.Shop.svc.cluster.local.:9000"),
            Ok(t("shop", "orders", Some(9000)))
        );
        assert_eq!(p("orders.shop.svc"), Ok(t("shop", "orders", None)));
    }

    #[test]
    fn refuses_garbage() {
        let p = |a| parse_authority(a, "default", "cluster.local");
        for bad in [
            "",
            ":80",
            "orders:",
            "orders:x",
            "orders:0",
            "orders:70000",
            "a.b.c",
            "-a",
            "a_b",
            "127.0.0.1:80",
            "orders.shop.svc.other.domain",
        ] {
            assert!(p(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
