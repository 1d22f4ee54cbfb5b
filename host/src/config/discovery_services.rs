//! The discovery services the `service` registry talks to. Talos has two ways to
//! name them, and so do we: the legacy `cluster.discovery.registries.service`
//! (one service, `endpoint` or Talos's default) and `DiscoveryServiceConfig`
//! documents, one per service, named. The documents win; a legacy endpoint or a
//! disabled service registry beside them is a conflict.

use std::collections::{BTreeMap, BTreeSet};

use super::endpoint_url::check_endpoint_url;
use super::file::{RawDiscoveryService, RawRegistry};
use super::{ConfigError, err};

/// Talos's default discovery service.
pub const DEFAULT_ENDPOINT: &str = "https://discovery.talos.dev/";

/// One discovery service, by name: what the service plugin gets in its config.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DiscoveryService {
    pub name: String,
    pub endpoint: String,
}

/// The services the `service` registry uses, or `None` when it is off.
pub(super) fn resolve(
    registries: &BTreeMap<String, RawRegistry>,
    documents: Vec<RawDiscoveryService>,
) -> Result<Option<Vec<DiscoveryService>>, ConfigError> {
    let legacy = registries.get("service");
    if documents.is_empty() {
        return Ok(legacy.filter(|r| !r.disabled).map(|r| {
            // An empty endpoint is unset, as in Talos (where it means the default).
            let endpoint = r.endpoint.clone().filter(|e| !e.is_empty());
            vec![DiscoveryService {
                name: "legacy".into(),
                endpoint: endpoint.unwrap_or_else(|| DEFAULT_ENDPOINT.into()),
            }]
        }));
    }
    if let Some(legacy) = legacy {
        let field = if legacy.disabled {
            "disabled"
        } else {
            "endpoint"
        };
        if legacy.disabled || legacy.endpoint.as_deref().is_some_and(|e| !e.is_empty()) {
            return Err(err(
                format!("cluster.discovery.registries.service.{field}"),
                "conflicts with the DiscoveryServiceConfig documents (name the services in \
                 the documents only, or drop the documents)",
            ));
        }
    }
    let mut names = BTreeSet::new();
    let mut services = Vec::new();
    for (i, doc) in documents.into_iter().enumerate() {
        let at = |field: &str| match doc.name.is_empty() {
            true => format!("DiscoveryServiceConfig[{i}].{field}"),
            false => format!("DiscoveryServiceConfig {:?}.{field}", doc.name),
        };
        if doc.name.is_empty() {
            return Err(err(at("name"), "name is required"));
        }
        if !names.insert(doc.name.clone()) {
            return Err(err(at("name"), "names must be unique"));
        }
        if doc.endpoint.is_empty() {
            return Err(err(at("endpoint"), "endpoint is required"));
        }
        check_endpoint_url(&doc.endpoint)
            .map_err(|message| err(at("endpoint"), format!("{:?}: {message}", doc.endpoint)))?;
        services.push(DiscoveryService {
            name: doc.name,
            endpoint: doc.endpoint,
        });
    }
    Ok(Some(services))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(name: &str, endpoint: &str) -> RawDiscoveryService {
        RawDiscoveryService {
            api_version: Some("v1alpha1".into()),
            kind: "DiscoveryServiceConfig".into(),
            name: name.into(),
            endpoint: endpoint.into(),
        }
    }

    fn registry(disabled: bool, endpoint: Option<&str>) -> BTreeMap<String, RawRegistry> {
        BTreeMap::from([(
            "service".to_string(),
            RawRegistry {
                disabled,
                endpoint: endpoint.map(Into::into),
            },
        )])
    }

    fn service(name: &str, endpoint: &str) -> DiscoveryService {
        DiscoveryService {
            name: name.into(),
            endpoint: endpoint.into(),
        }
    }

    #[test]
    fn the_legacy_registry_is_one_service_named_legacy() {
        assert_eq!(resolve(&BTreeMap::new(), vec![]).unwrap(), None);
        assert_eq!(resolve(&registry(true, None), vec![]).unwrap(), None);
        assert_eq!(
            resolve(&registry(false, None), vec![]).unwrap(),
            Some(vec![service("legacy", DEFAULT_ENDPOINT)])
        );
        assert_eq!(
            resolve(&registry(false, Some("")), vec![]).unwrap(),
            Some(vec![service("legacy", DEFAULT_ENDPOINT)]),
            "empty is unset"
        );
        assert_eq!(
            resolve(&registry(false, Some("http://127.0.0.1:3000")), vec![]).unwrap(),
            Some(vec![service("legacy", "http://127.0.0.1:3000")])
        );
    }

    #[test]
    fn documents_name_the_services() {
        let services = resolve(
            &registry(false, None),
            vec![
                doc("b", "https://b.example/"),
                doc("a", "http://a.example:3000"),
            ],
        )
        .unwrap();
        assert_eq!(
            services,
            Some(vec![
                service("b", "https://b.example/"),
                service("a", "http://a.example:3000")
            ])
        );
    }

    #[test]
    fn bad_documents_are_named() {
        let none = BTreeMap::new();
        for (docs, registries, want) in [
            (
                vec![doc("", "https://x/")],
                &none,
                "DiscoveryServiceConfig[0].name: name is required",
            ),
            (
                vec![doc("a", "")],
                &none,
                "DiscoveryServiceConfig \"a\".endpoint: endpoint is required",
            ),
            (
                vec![doc("a", "ftp://x/")],
                &none,
                "DiscoveryServiceConfig \"a\".endpoint: \"ftp://x/\": endpoint scheme must be http://, https:// or grpc://",
            ),
            (
                vec![doc("a", "https://x/"), doc("a", "https://y/")],
                &none,
                "DiscoveryServiceConfig \"a\".name: names must be unique",
            ),
            (
                vec![doc("a", "https://x/")],
                &registry(true, None),
                "cluster.discovery.registries.service.disabled: conflicts with",
            ),
            (
                vec![doc("a", "https://x/")],
                &registry(false, Some("https://y/")),
                "cluster.discovery.registries.service.endpoint: conflicts with",
            ),
        ] {
            let error = resolve(registries, docs).unwrap_err().to_string();
            assert!(error.starts_with(want), "{error}\nwant {want}");
        }
    }
}
