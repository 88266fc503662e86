//! The operator binary with its SPIFFE issuer on, as the chart installs it (minus the Pod), on
//! the shared control plane; and clients of the issuer presenting a given token.

use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::Api;
use slim_identity_agent::config::IssuerSource;
use slim_identity_agent::issuer::IssuerClient;

use crate::chart_install::{ChartInstall, install_as_the_chart};
use crate::control_plane::{self, ControlPlane, install_crds};
use crate::free_port;
use crate::operator::OperatorProcess;

/// The operator binary with the issuer on, as the chart installs it.
pub struct Issuer {
    pub plane: &'static ControlPlane,
    pub admin: Client,
    pub install: ChartInstall,
    pub operator: OperatorProcess,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

/// The chart installed with the issuer on (its RBAC, its ServiceAccount), the operator not yet
/// started: what a test arranges in the cluster first (e.g. the keys Secret) goes here.
pub struct Installed {
    pub plane: &'static ControlPlane,
    pub admin: Client,
    pub install: ChartInstall,
}

impl Installed {
    pub async fn new(values: &[&str]) -> Self {
        crate::init_logging();
        let plane = control_plane::shared();
        let admin = plane.client().await.expect("admin client");
        install_crds(&admin).await.expect("CRDs");
        let mut values = values.to_vec();
        values.push("identityIssuer.enabled=true");
        let install = install_as_the_chart(plane, &admin, &values).await;
        Self { plane, admin, install }
    }

    /// Starts the operator binary with the issuer on a free loopback port; waits for `/readyz`.
    pub fn start(self) -> Issuer {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port().expect("port")).parse().expect("addr");
        let operator = start_operator(&self.install, addr);
        operator.wait_readyz(200, Duration::from_secs(60)).expect("operator ready");
        let Self { plane, admin, install } = self;
        Issuer { plane, admin, install, operator, addr, dir: tempfile::tempdir().expect("tempdir") }
    }
}

impl Issuer {
    pub async fn start(values: &[&str]) -> Self {
        Installed::new(values).await.start()
    }

    pub fn env(&self, name: &str) -> String {
        self.install.env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap_or_default()
    }

    pub fn apps(&self) -> &str {
        &self.install.apps_ns
    }

    /// The issuer's serving CA (the webhook certificate's, from its Secret) and the name in it.
    pub async fn tls(&self) -> (String, String) {
        let secrets: Api<Secret> = Api::namespaced(self.admin.clone(), &self.install.operator_ns);
        let secret = secrets.get(&self.env("SLIM_OPERATOR_WEBHOOK_SECRET")).await.expect("webhook Secret");
        let ca = secret.data.and_then(|d| d.get("ca.crt").cloned()).expect("ca.crt");
        let name = format!("{}.{}.svc", self.env("SLIM_OPERATOR_WEBHOOK_SERVICE"), self.install.operator_ns);
        (String::from_utf8(ca.0).expect("PEM"), name)
    }

    /// An issuer client presenting `token`.
    pub async fn client(&self, token: &str, name: &str) -> IssuerClient {
        let (ca, server_name) = self.tls().await;
        let dir = self.dir.path().join(format!("client-{name}"));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("token"), token).expect("token");
        std::fs::write(dir.join("ca.crt"), ca).expect("ca");
        let source = IssuerSource {
            url: format!("https://{}", self.addr),
            token_file: dir.join("token"),
            ca_file: dir.join("ca.crt"),
            server_name,
        };
        IssuerClient::new(&source).expect("issuer client")
    }

    pub fn metrics(&self) -> String {
        self.operator.get("/metrics").map(|(_, body)| body).unwrap_or_default()
    }
}

pub fn start_operator(install: &ChartInstall, issuer: SocketAddr) -> OperatorProcess {
    let mut env = install.env.clone();
    env.retain(|(k, _)| k != "SLIM_OPERATOR_ISSUER_ADDR");
    env.push(("SLIM_OPERATOR_ISSUER_ADDR".into(), issuer.to_string()));
    OperatorProcess::start(&install.kubeconfig, &env).expect("operator")
}
