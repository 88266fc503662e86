//! A link spec rendered into the node's client config, with a deterministic link id.

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::api::LinkSpec;
use crate::slim::LinkConfig;

/// Prefix of every link id the operator creates.
pub const LINK_ID_PREFIX: &str = "slimop-";

/// How long one attempt of a node to open a link's connection may take (SLIM's default: no
/// limit). A node opens connections inside the command that asks for them and retries a failed
/// attempt every 2 s for as long as it takes (SLIM's default backoff, unbounded), answering nothing
/// else meanwhile; bounding each attempt keeps a dropped SYN from holding one attempt for minutes
/// after the endpoint is up. Suspected, not reproduced, as the node-tier failure where every command
/// to a node timed out for 90 s while the gateway it linked to was starting. Not part of the link's
/// identity, so link ids did not change with it.
pub const CONNECT_TIMEOUT: &str = "5s";

/// TLS material resolved from Secrets (PEM text). Holds private keys: never log it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ResolvedTls {
    pub ca_pem: Option<String>,
    pub client_cert_pem: Option<String>,
    pub client_key_pem: Option<String>,
}

impl std::fmt::Debug for ResolvedTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResolvedTls")
            .field("ca", &self.ca_pem.is_some())
            .field("client_cert", &self.client_cert_pem.is_some())
            .field("client_key", &"<redacted>")
            .finish()
    }
}

#[derive(Serialize)]
struct ClientConfig<'a> {
    endpoint: &'a str,
    tls: TlsConfig<'a>,
    #[serde(skip_serializing_if = "str::is_empty")]
    link_id: &'a str,
    connection_type: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    connect_timeout: &'a str,
}

#[derive(Serialize)]
struct TlsConfig<'a> {
    insecure: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    insecure_skip_verify: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_source: Option<PemCa<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<PemPair<'a>>,
}

#[derive(Serialize)]
struct PemCa<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    data: &'a str,
}

#[derive(Serialize)]
struct PemPair<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    cert: &'a str,
    key: &'a str,
}

/// Renders the link: the node's client config JSON (with `link_id` inside it, or the node would
/// invent one) and an id derived from everything else, so equal links share one id and a changed
/// link (new endpoint, rotated certificate) gets a new one.
pub fn render_link(spec: &LinkSpec, tls: &ResolvedTls) -> LinkConfig {
    let insecure = match &spec.tls {
        Some(settings) => settings.insecure,
        None => spec.endpoint.starts_with("http://"),
    };
    let skip_verify = spec.tls.as_ref().is_some_and(|t| t.insecure_skip_verify);
    let tls_config = TlsConfig {
        insecure,
        insecure_skip_verify: skip_verify && !insecure,
        ca_source: tls.ca_pem.as_deref().filter(|_| !insecure).map(|data| PemCa { kind: "pem", data }),
        source: match (&tls.client_cert_pem, &tls.client_key_pem) {
            (Some(cert), Some(key)) if !insecure => Some(PemPair { kind: "pem", cert, key }),
            _ => None,
        },
    };
    let endpoint = spec.endpoint.trim_end_matches('/');
    let mut config = ClientConfig {
        endpoint,
        tls: tls_config,
        link_id: "",
        connection_type: spec.connection_type.as_str(),
        connect_timeout: "",
    };
    let identity = serde_json::to_vec(&config).unwrap_or_default();
    let link_id = format!("{LINK_ID_PREFIX}{}", &hex::encode(Sha256::digest(&identity))[..16]);
    config.link_id = &link_id;
    config.connect_timeout = CONNECT_TIMEOUT;
    let config_data = serde_json::to_string(&config).unwrap_or_default();
    LinkConfig { link_id, config_data }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ConnectionType, LinkTls};

    fn spec(endpoint: &str) -> LinkSpec {
        LinkSpec { endpoint: endpoint.into(), connection_type: ConnectionType::Remote, tls: None, controller: None }
    }

    const PINNED_ID: &str = "slimop-9fa688f3dda41a53";

    #[test]
    fn config_data_repeats_the_link_id() {
        let link = render_link(&spec("http://slim-b:46357"), &ResolvedTls::default());
        let json: serde_json::Value = serde_json::from_str(&link.config_data).expect("json");
        assert_eq!(json["link_id"], link.link_id.as_str());
        assert_eq!(json["endpoint"], "http://slim-b:46357");
        assert_eq!(json["connection_type"], "remote");
        assert_eq!(json["tls"]["insecure"], true);
        assert_eq!(json["connect_timeout"], CONNECT_TIMEOUT, "the node gives up on a connection in time");
        assert!(link.link_id.starts_with(LINK_ID_PREFIX) && link.link_id.len() == LINK_ID_PREFIX.len() + 16);
        // The id of this link before the connect timeout was added: upgrades keep every link.
        assert_eq!(link.link_id, PINNED_ID);
    }

    #[test]
    fn equal_links_share_an_id_and_different_ones_do_not() {
        let a = render_link(&spec("http://slim-b:46357"), &ResolvedTls::default());
        let b = render_link(&spec("http://slim-b:46357/"), &ResolvedTls::default());
        assert_eq!(a, b);
        let mut peer = spec("http://slim-b:46357");
        peer.connection_type = ConnectionType::Peer;
        assert_ne!(render_link(&peer, &ResolvedTls::default()).link_id, a.link_id);
        assert_ne!(render_link(&spec("http://slim-c:46357"), &ResolvedTls::default()).link_id, a.link_id);
    }

    #[test]
    fn tls_material_goes_into_the_config_and_changes_the_id() {
        let mut secure = spec("https://slim-b:46357");
        secure.tls = Some(LinkTls::default());
        let plain = render_link(&secure, &ResolvedTls::default());
        let tls = ResolvedTls {
            ca_pem: Some("CA".into()),
            client_cert_pem: Some("CERT".into()),
            client_key_pem: Some("KEY".into()),
        };
        let with_certs = render_link(&secure, &tls);
        assert_ne!(plain.link_id, with_certs.link_id);
        let json: serde_json::Value = serde_json::from_str(&with_certs.config_data).expect("json");
        assert_eq!(json["tls"]["insecure"], false);
        assert_eq!(json["tls"]["ca_source"], serde_json::json!({"type": "pem", "data": "CA"}));
        assert_eq!(json["tls"]["source"], serde_json::json!({"type": "pem", "cert": "CERT", "key": "KEY"}));
        assert!(!format!("{tls:?}").contains("KEY"), "debug output must not show key material");
    }
}
