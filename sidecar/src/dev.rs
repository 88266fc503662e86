//! Local development without SPIRE: the agent runs against an in-process Workload API that issues
//! short-lived JWT-SVIDs and X.509-SVIDs from a local key, so a newcomer can watch the files rotate.

use std::path::PathBuf;
use std::time::Duration;

use tracing::info;

use crate::agent::{AgentError, run_daemon};
use crate::config::{Config, HealthChecks, JwtBundleFormat, JwtSvidConfig};
use crate::workload::fake::{AgentState, FakeAgent};

#[derive(Clone, Debug)]
pub struct DevOptions {
    pub dir: PathBuf,
    pub trust_domain: String,
    pub spiffe_id: String,
    pub audience: String,
    pub ttl: Duration,
    pub health_port: u16,
    /// Serve the Workload API to local apps on this socket (SLIM's `spire` identity).
    pub workload_api_socket: Option<PathBuf>,
}

impl Default for DevOptions {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("svids"),
            trust_domain: "example.org".into(),
            spiffe_id: "spiffe://example.org/dev".into(),
            audience: "slim".into(),
            ttl: Duration::from_secs(60),
            health_port: 8081,
            workload_api_socket: None,
        }
    }
}

impl DevOptions {
    /// Refuses what the local Workload API could not issue (it would otherwise fail mid-way).
    pub fn validate(&self) -> Result<(), AgentError> {
        let td = &self.trust_domain;
        let td_ok = !td.is_empty()
            && td.len() <= 255
            && td.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'));
        if !td_ok {
            return Err(AgentError::Dev(format!(
                "trust domain {td:?}: use lowercase letters, digits, '.', '-' and '_' (e.g. example.org)"
            )));
        }
        let path = self.spiffe_id.strip_prefix(&format!("spiffe://{td}")).unwrap_or_default();
        let segments: Vec<&str> = path.strip_prefix('/').map(|p| p.split('/').collect()).unwrap_or_default();
        let path_ok = !segments.is_empty()
            && segments.iter().all(|s| {
                !s.is_empty()
                    && *s != "."
                    && *s != ".."
                    && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
            });
        if !path_ok {
            return Err(AgentError::Dev(format!(
                "SPIFFE ID {:?}: must be spiffe://{td}/<path> (letters, digits, '.', '-', '_' in each segment)",
                self.spiffe_id
            )));
        }
        if self.audience.trim().is_empty() {
            return Err(AgentError::Dev("the audience must not be empty".into()));
        }
        if self.ttl < Duration::from_secs(2) {
            return Err(AgentError::Dev(format!("ttl {:?}: at least 2 s", self.ttl)));
        }
        // SLIM's spire provider refreshes its token first at a fixed 30 s.
        if self.workload_api_socket.is_some() && self.ttl < Duration::from_secs(45) {
            return Err(AgentError::Dev(format!(
                "ttl {:?}: at least 45 s with --workload-api-socket (SLIM apps refresh their first token after 30 s)",
                self.ttl
            )));
        }
        Ok(())
    }
}

/// The config the dev mode runs with (the same files as an injected pod gets).
pub fn dev_config(options: &DevOptions, socket: &std::path::Path) -> Config {
    Config {
        agent_address: socket.display().to_string(),
        cert_dir: options.dir.clone(),
        x509: Some(("tls.crt".into(), "tls.key".into(), "svid_bundle.pem".into())),
        jwt_bundle_file_name: "key.jwt".into(),
        jwt_svids: vec![JwtSvidConfig {
            audience: options.audience.clone(),
            extra_audiences: Vec::new(),
            file_name: "jwt_svid.token".into(),
        }],
        jwt_bundle_file_mode: 0o644,
        health_checks: HealthChecks {
            listener_enabled: options.health_port != 0,
            bind_port: options.health_port,
            ..Config::default().health_checks
        },
        jwt_bundle_format: JwtBundleFormat::Jwks,
        jwt_svid_write_mode: crate::output::WriteMode::InPlace,
        workload_api_socket: options.workload_api_socket.clone(),
        ..Config::default()
    }
}

/// Serves a local Workload API and runs the agent against it until `shutdown`.
pub async fn run(options: DevOptions, shutdown: impl std::future::Future<Output = ()>) -> Result<(), AgentError> {
    options.validate()?;
    std::fs::create_dir_all(&options.dir).map_err(|source| {
        AgentError::Output(crate::output::OutputError::Io { action: "creating", path: options.dir.clone(), source })
    })?;
    let runtime_dir = tempfile::tempdir().map_err(|source| {
        AgentError::Output(crate::output::OutputError::Io { action: "creating", path: PathBuf::from("tmp"), source })
    })?;
    let socket = runtime_dir.path().join("agent.sock");
    let mut state = AgentState::new(&options.trust_domain);
    state.jwt_ttl = options.ttl;
    // As a SPIRE server with jwt_issuer: SLIM's JWT verifier needs an iss claim.
    state.jwt_issuer = Some(format!("https://{}", options.trust_domain));
    state.x509_ttl = options.ttl;
    state.issue(&options.spiffe_id, "");
    let agent = FakeAgent::start(&socket, state).await.map_err(|source| {
        AgentError::Output(crate::output::OutputError::Io { action: "binding", path: socket.clone(), source })
    })?;
    info!(
        socket = %socket.display(), dir = %options.dir.display(), spiffe_id = %options.spiffe_id, ttl = ?options.ttl,
        "dev mode: local Workload API issuing short-lived SVIDs (no SPIRE)"
    );
    // X.509-SVIDs rotate at half their life, as SPIRE does.
    let rotate_every = options.ttl / 2;
    let rotation = async {
        loop {
            tokio::time::sleep(rotate_every).await;
            agent.update(|state| state.rotate());
            info!("dev mode: X.509-SVID rotated");
        }
    };
    tokio::select! {
        result = run_daemon(dev_config(&options, &socket), shutdown) => result,
        _ = rotation => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bad_input_is_a_clear_error_not_a_panic() {
        let cases = [
            (DevOptions { trust_domain: "Bad Domain".into(), ..Default::default() }, "trust domain \"Bad Domain\""),
            (
                DevOptions { spiffe_id: "spiffe://other.org/x".into(), ..Default::default() },
                "must be spiffe://example.org/<path>",
            ),
            (DevOptions { spiffe_id: "spiffe://example.org".into(), ..Default::default() }, "SPIFFE ID"),
            (DevOptions { spiffe_id: "spiffe://example.org/a//b".into(), ..Default::default() }, "SPIFFE ID"),
            (DevOptions { spiffe_id: "spiffe://example.org/a b".into(), ..Default::default() }, "SPIFFE ID"),
            (DevOptions { audience: " ".into(), ..Default::default() }, "audience"),
            (DevOptions { ttl: Duration::from_millis(500), ..Default::default() }, "ttl"),
            (
                DevOptions {
                    ttl: Duration::from_secs(20),
                    workload_api_socket: Some("/tmp/never.sock".into()),
                    ..Default::default()
                },
                "at least 45 s",
            ),
        ];
        for (options, says) in cases {
            let dir = tempfile::tempdir().expect("dir");
            let options = DevOptions { dir: dir.path().join("svids"), health_port: 0, ..options };
            let error = run(options, std::future::pending()).await.expect_err("refused").to_string();
            assert!(error.starts_with("dev mode: ") && error.contains(says), "{error}");
        }
        assert!(DevOptions::default().validate().is_ok());
    }
}
