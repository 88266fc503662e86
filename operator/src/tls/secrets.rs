//! The one place Secret and ConfigMap keys are read for TLS (control connections and links).

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Client;
use kube::api::Api;

use crate::controller::Error;

/// Keys of one Secret, read with one GET, or why not (`SecretUnavailable`).
pub(crate) async fn secret_keys<const N: usize>(
    client: &Client,
    namespace: &str,
    name: &str,
    keys: [&str; N],
) -> Result<[Vec<u8>; N], Error> {
    let error = |reason: String| Error::Secret { name: name.to_owned(), reason };
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(|e| error(format!("cannot read: {e}")))?
        .ok_or_else(|| error("not found".to_owned()))?;
    let data = secret.data.unwrap_or_default();
    let mut values = keys.map(|_| Vec::new());
    for (value, key) in values.iter_mut().zip(keys) {
        *value = data.get(key).ok_or_else(|| error(format!("has no key {key:?}")))?.0.clone();
    }
    Ok(values)
}

pub(crate) async fn config_map_bytes(
    client: &Client,
    namespace: &str,
    name: &str,
    key: &str,
) -> Result<Vec<u8>, Error> {
    let error = |reason: String| Error::ControlTls(format!("ConfigMap {name}: {reason}"));
    let map = Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(|e| error(format!("cannot read: {e}")))?
        .ok_or_else(|| error("not found".to_owned()))?;
    let text = map.data.as_ref().and_then(|d| d.get(key)).ok_or_else(|| error(format!("has no key {key:?}")))?;
    Ok(text.as_bytes().to_vec())
}
