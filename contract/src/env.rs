//! Environment variables the injector sets on the agent's container.

/// The agent's flag naming the variable that holds its YAML config (`-config-env NAME`).
pub const CONFIG_ENV_FLAG: &str = "-config-env";

/// The Pod's name, namespace and UID (downward API): the agent binds its issuer requests to them.
pub const POD_NAME_ENV: &str = "SLIM_POD_NAME";
pub const POD_NAMESPACE_ENV: &str = "SLIM_POD_NAMESPACE";
pub const POD_UID_ENV: &str = "SLIM_POD_UID";

/// The Pod's service account (downward API): the SPIFFE ID the issuer gives is built from it.
pub const SERVICE_ACCOUNT_ENV: &str = "SLIM_POD_SERVICE_ACCOUNT";
