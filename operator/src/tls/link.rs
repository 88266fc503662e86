//! Link TLS: what a Subscription's link presents to the node it dials (rendered into the node's
//! client config by `plan::render_link`, which is pure).

use kube::Client;

use super::secrets::secret_keys;
use crate::api::LinkTls;
use crate::controller::Error;
use crate::plan::ResolvedTls;

/// The PEM a link's `tls` names (its CA, its client certificate and key), read from the
/// Secrets in `namespace`, for the node's client config.
pub async fn resolve(client: &Client, namespace: &str, tls: &LinkTls) -> Result<ResolvedTls, Error> {
    let text = |name: &str, key: &str, bytes: Vec<u8>| {
        String::from_utf8(bytes)
            .map_err(|_| Error::Secret { name: name.to_owned(), reason: format!("key {key:?} is not UTF-8 PEM text") })
    };
    let mut resolved = ResolvedTls::default();
    if let Some(reference) = &tls.ca_secret_ref {
        let [ca] = secret_keys(client, namespace, &reference.name, [reference.key.as_str()]).await?;
        resolved.ca_pem = Some(text(&reference.name, &reference.key, ca)?);
    }
    if let Some(reference) = &tls.client_cert_secret_ref {
        let [cert, key] = secret_keys(client, namespace, &reference.name, ["tls.crt", "tls.key"]).await?;
        resolved.client_cert_pem = Some(text(&reference.name, "tls.crt", cert)?);
        resolved.client_key_pem = Some(text(&reference.name, "tls.key", key)?);
    }
    Ok(resolved)
}
