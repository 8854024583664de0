//! Kubernetes' name rules, checked in one place: the discovery server (watched names), mesh
//! authorities, local mode's manifests and the file store's saga names all use these.

/// An RFC 1123 DNS label, as Kubernetes checks namespaces and Service names
/// (`IsDNS1123Label`): 1 to 63 lower-case letters, digits and `-`, starting and ending with a
/// letter or digit.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// An RFC 1123 DNS subdomain, as Kubernetes checks most object names (`IsDNS1123Subdomain`):
/// at most 253 characters, dot-separated parts of lower-case letters, digits and `-`, each
/// starting and ending with a letter or digit.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        for good in ["a", "orders", "a-1", "0", &"x".repeat(63)] {
            assert!(is_dns_label(good), "{good:?}");
        }
        for bad in ["", "Orders", "a.b", "-a", "a-", "a_b", &"x".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad:?}");
        }
    }

    #[test]
    fn subdomains() {
        for good in ["a", "order-1.v2", "a.b.c", &"x".repeat(253)] {
            assert!(is_dns_subdomain(good), "{good:?}");
        }
        for bad in [
            "",
            ".a",
            "a.",
            "a..b",
            "A",
            "a.-b",
            "a-.b",
            "a/b",
            &"x".repeat(254),
        ] {
            assert!(!is_dns_subdomain(bad), "{bad:?}");
        }
    }
}
