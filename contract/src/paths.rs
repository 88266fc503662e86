//! Where things are in an injected Pod.

/// spiffe-helper's default agent socket (SPIRE's).
pub const DEFAULT_AGENT_ADDRESS: &str = "/tmp/spire-agent/public/api.sock";

/// Where the projected token volume the injector adds is mounted in the agent.
pub const KUBERNETES_TOKEN_DIR: &str = "/var/run/secrets/slim.agntcy.org";

/// The Workload API socket the agent serves its Pod on (SLIM's `spire` provider connects there).
pub const WORKLOAD_API_SOCKET: &str = "/run/slim-identity/agent.sock";
