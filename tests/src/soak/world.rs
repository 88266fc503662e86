//! The system under soak, the faults and changes injected into it, and what it looks like now.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use slim_operator::api::{SlimChannel, Subscription};
use slim_operator::slim::{ChannelManagerClient, NodePool, Observed, SlimName};

use super::check::{State, Violation};
use super::{Rng, SoakConfig};
use crate::control_plane::{self, ControlPlane, Credentials};
use crate::operator::OperatorProcess;
use crate::{ChannelManager, HarnessError, SlimApp, SlimNode};

const MEMBERS: usize = 3;
const MAX_SUBSCRIPTIONS: usize = 6;
const MAX_CHANNELS: usize = 3;
const REPLICAS: [&str; 2] = ["replica-a", "replica-b"];
const LEASE: &str = "slim-operator-leader";
const MANAGER_POD: &str = "slim-channel-manager-0";

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> HarnessError + '_ {
    move |error| HarnessError::Setup(format!("soak: {what}: {error}"))
}

/// Everything running, and the names in use.
pub struct World {
    plane: &'static ControlPlane,
    client: Client,
    operator_ns: String,
    namespace: String,
    nodes: Vec<SlimNode>,
    manager: ChannelManager,
    members: Vec<Option<SlimApp>>,
    replicas: Vec<Option<OperatorProcess>>,
    kubeconfigs: Vec<PathBuf>,
    env: Vec<(String, String)>,
    /// Reads the nodes' own lists (a client of its own, not the operators').
    pool: NodePool,
    /// Since when each member has not been connected to its node (a SLIM app re-dials a broken
    /// connection once: it is restarted, as a liveness probe would restart its container).
    disconnected: Vec<Option<std::time::Instant>>,
    serial: u64,
    _dir: tempfile::TempDir,
}

impl World {
    pub async fn start(config: &SoakConfig) -> Result<Self, HarnessError> {
        let plane = control_plane::shared();
        let client = plane.client().await.map_err(setup("admin client"))?;
        control_plane::install_crds(&client).await.map_err(setup("CRDs"))?;
        let operator_ns = plane.namespace(&client, "soak-operator").await.map_err(setup("namespace"))?;
        let namespace = plane.namespace(&client, "soak").await.map_err(setup("namespace"))?;
        let nodes = ["soak-a", "soak-b", "soak-c"].into_iter().map(SlimNode::start).collect::<Result<Vec<_>, _>>()?;
        let manager = ChannelManager::start(&nodes[0])?;
        let members =
            (0..MEMBERS).map(|i| SlimApp::member(&nodes[0], &member(i)).map(Some)).collect::<Result<_, _>>()?;
        let dir = tempfile::tempdir()?;
        let mut kubeconfigs = Vec::new();
        for replica in REPLICAS {
            // Each replica its own user, so the audit log tells their writes apart.
            let cert = plane.client_cert(replica, &["system:masters"]).map_err(setup("certificate"))?;
            let path = dir.path().join(format!("{replica}.kubeconfig"));
            plane.write_kubeconfig(&path, replica, &Credentials::Certificate(cert)).map_err(setup("kubeconfig"))?;
            kubeconfigs.push(path);
        }
        let mut env = crate::operator::fast_election_env(&operator_ns);
        env.extend(
            [
                ("SLIM_OPERATOR_CHANNEL_MANAGER", manager.endpoint()),
                ("SLIM_OPERATOR_CLEANUP_TIMEOUT", format!("{}s", config.cleanup_timeout.as_secs())),
                ("SLIM_OPERATOR_RESYNC_INTERVAL", "60s".to_owned()),
                ("SLIM_OPERATOR_HEAL_CHANNEL_MANAGER", "true".to_owned()),
            ]
            .map(|(k, v)| (k.to_owned(), v)),
        );
        let mut world = Self {
            plane,
            client,
            operator_ns,
            namespace,
            nodes,
            manager,
            members,
            replicas: vec![None, None],
            kubeconfigs,
            env,
            pool: NodePool::default(),
            disconnected: vec![None; MEMBERS],
            serial: 0,
            _dir: dir,
        };
        world.manager_pod().await?;
        for index in 0..REPLICAS.len() {
            world.start_replica(index)?;
        }
        Ok(world)
    }

    /// The channel manager's Pod object (serving on 127.0.0.1): the operators delete it when the
    /// manager lost its node (`--heal-channel-manager`); the world then plays its Deployment.
    async fn manager_pod(&self) -> Result<(), HarnessError> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": MANAGER_POD},
            "spec": {"containers": [{"name": "channel-manager", "image": "ghcr.io/agntcy/slim/channel-manager:3.4.6"}]},
        }))
        .map_err(setup("Pod"))?;
        pods.create(&PostParams::default(), &pod).await.map_err(setup("the manager's Pod"))?;
        let status = json!({"status": {"phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]}});
        pods.patch_status(MANAGER_POD, &PatchParams::default(), &Patch::Merge(status))
            .await
            .map_err(setup("status"))?;
        Ok(())
    }

    /// What Kubernetes would do on its own: restart a member that lost its node (liveness), and a
    /// channel manager whose Pod the operator deleted (its Deployment). Returns what it did.
    pub async fn heal(&mut self, state: &State) -> Result<Vec<&'static str>, HarnessError> {
        let mut done = Vec::new();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        if matches!(pods.get_opt(MANAGER_POD).await, Ok(None)) {
            tokio::task::block_in_place(|| self.manager.restart())?;
            self.manager_pod().await?;
            done.push("channel manager restarted (its Pod deleted by the operator)");
        }
        let Some(Some(listed)) = state.nodes.get(&self.nodes[0].controller_endpoint()) else { return Ok(done) };
        for index in 0..MEMBERS {
            let name = SlimName::parse(&member(index)).map_err(setup("name"))?;
            if listed.instances_of(&name).next().is_some() {
                self.disconnected[index] = None;
                continue;
            }
            let since = *self.disconnected[index].get_or_insert_with(std::time::Instant::now);
            if since.elapsed() > Duration::from_secs(10) {
                self.members[index] = None;
                self.members[index] = Some(SlimApp::member(&self.nodes[0], &member(index))?);
                self.disconnected[index] = None;
                done.push("member restarted (lost its node)");
            }
        }
        Ok(done)
    }

    fn start_replica(&mut self, index: usize) -> Result<(), HarnessError> {
        let mut env = self.env.clone();
        env.push(("POD_NAME".into(), REPLICAS[index].into()));
        self.replicas[index] = Some(OperatorProcess::start(&self.kubeconfigs[index], &env)?);
        Ok(())
    }

    /// One fault, drawn from the schedule; returns its kind.
    pub async fn fault(&mut self, rng: &mut Rng) -> Result<&'static str, HarnessError> {
        let kind = match rng.below(6) {
            0 => {
                let node = rng.below(self.nodes.len() as u64) as usize;
                tokio::task::block_in_place(|| self.nodes[node].restart())?;
                "node restart"
            }
            1 => {
                tokio::task::block_in_place(|| self.manager.restart())?;
                "channel manager restart"
            }
            2 => {
                let Some(leader) = self.leader().await else { return Ok("leader freeze (no leader)") };
                let pid = self.replica_pid(leader);
                let _ = kill(pid, Signal::SIGSTOP);
                // Longer than the lease: the other replica takes over meanwhile.
                tokio::time::sleep(Duration::from_secs(8)).await;
                let _ = kill(pid, Signal::SIGCONT);
                "leader SIGSTOP 8 s, SIGCONT"
            }
            3 => {
                let Some(leader) = self.leader().await else { return Ok("leader kill (no leader)") };
                let _ = kill(self.replica_pid(leader), Signal::SIGKILL);
                self.replicas[leader] = None;
                self.start_replica(leader)?;
                "leader SIGKILL (restarted)"
            }
            4 => {
                let plane = self.plane;
                // A thread of its own: the restart waits for readiness with a runtime of its own.
                let restarted = std::thread::spawn(move || plane.restart_api_server(Duration::from_secs(3)));
                while !restarted.is_finished() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                restarted
                    .join()
                    .map_err(|_| setup::<&str>("API server restart")("panicked"))?
                    .map_err(setup("API server restart"))?;
                "API server restart (3 s down)"
            }
            _ => {
                let index = rng.below(MEMBERS as u64) as usize;
                self.members[index] = None;
                self.members[index] = Some(SlimApp::member(&self.nodes[0], &member(index))?);
                "member restart"
            }
        };
        tracing::info!(kind, "soak: fault");
        Ok(kind)
    }

    fn replica_pid(&self, index: usize) -> Pid {
        Pid::from_raw(self.replicas[index].as_ref().map_or(0, OperatorProcess::pid) as i32)
    }

    /// The replica holding the Lease, if any.
    async fn leader(&self) -> Option<usize> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), &self.operator_ns);
        let holder = leases.get_opt(LEASE).await.ok()??.spec?.holder_identity?;
        REPLICAS.iter().position(|r| *r == holder)
    }

    /// One change of the objects, drawn from the schedule; returns its kind.
    pub async fn change(&mut self, rng: &mut Rng) -> Result<&'static str, HarnessError> {
        let subs: Api<Subscription> = Api::namespaced(self.client.clone(), &self.namespace);
        let channels: Api<SlimChannel> = Api::namespaced(self.client.clone(), &self.namespace);
        let sub_names = live_names(&subs).await;
        let channel_names = live_names(&channels).await;
        self.serial += 1;
        // The kinds that apply now (a delete needs an object, a create room for one).
        let applicable: Vec<u64> = [
            sub_names.len() < MAX_SUBSCRIPTIONS,
            !sub_names.is_empty(),
            !sub_names.is_empty(),
            channel_names.len() < MAX_CHANNELS,
            !channel_names.is_empty(),
            !channel_names.is_empty(),
        ]
        .iter()
        .enumerate()
        .filter(|(_, applies)| **applies)
        .map(|(kind, _)| kind as u64)
        .collect();
        let kind = match rng.pick(&applicable).copied().unwrap_or(0) {
            0 => {
                let name = format!("s{}", self.serial);
                let sub = self.subscription(&name, rng);
                subs.create(&PostParams::default(), &sub).await.map_err(setup("create Subscription"))?;
                "Subscription create"
            }
            1 => {
                let name = rng.pick(&sub_names).cloned().unwrap_or_default();
                let spec = serde_json::to_value(&self.subscription(&name, rng).spec).map_err(setup("spec"))?;
                let patch = json!({"spec": {"nodes": spec["nodes"], "link": spec["link"]}});
                let _ = subs.patch(&name, &PatchParams::default(), &Patch::Merge(patch)).await;
                "Subscription move (nodes, link)"
            }
            2 => {
                let name = rng.pick(&sub_names).cloned().unwrap_or_default();
                let _ = subs.delete(&name, &DeleteParams::default()).await;
                "Subscription delete"
            }
            3 => {
                let name = format!("c{}", self.serial);
                let channel = self.channel(&name, rng);
                channels.create(&PostParams::default(), &channel).await.map_err(setup("create SlimChannel"))?;
                "SlimChannel create"
            }
            4 => {
                let name = rng.pick(&channel_names).cloned().unwrap_or_default();
                let participants = participants(rng);
                let patch = json!({"spec": {"participants": participants}});
                let _ = channels.patch(&name, &PatchParams::default(), &Patch::Merge(patch)).await;
                "SlimChannel participants"
            }
            _ => {
                let name = rng.pick(&channel_names).cloned().unwrap_or_default();
                let _ = channels.delete(&name, &DeleteParams::default()).await;
                "SlimChannel delete"
            }
        };
        tracing::info!(kind, "soak: change");
        Ok(kind)
    }

    /// A Subscription on one or two random nodes, linked to another one.
    fn subscription(&self, name: &str, rng: &mut Rng) -> Subscription {
        let target = rng.below(3) as usize;
        let far = (target + 1 + rng.below(2) as usize) % 3;
        let mut endpoints = vec![self.nodes[target].controller_endpoint()];
        let third = 3 - target - far;
        if rng.below(2) == 0 {
            endpoints.push(self.nodes[third].controller_endpoint());
        }
        serde_json::from_value(json!({
            "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "Subscription", "metadata": {"name": name},
            "spec": {
                "name": format!("org/soak/{name}"),
                "nodes": {"endpoints": endpoints},
                "link": {"endpoint": self.nodes[far].data_endpoint()},
            },
        }))
        .unwrap_or_else(|e| panic!("a Subscription from literals: {e}"))
    }

    fn channel(&self, name: &str, rng: &mut Rng) -> SlimChannel {
        serde_json::from_value(json!({
            "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "SlimChannel", "metadata": {"name": name},
            "spec": {
                "name": format!("org/soak/{name}"),
                "participants": participants(rng),
                "nodes": {"endpoints": [self.nodes[0].controller_endpoint()]},
            },
        }))
        .unwrap_or_else(|e| panic!("a SlimChannel from literals: {e}"))
    }

    /// The objects, and what SLIM's own lists say now.
    pub async fn observe(&self) -> State {
        let subs: Api<Subscription> = Api::namespaced(self.client.clone(), &self.namespace);
        let channels: Api<SlimChannel> = Api::namespaced(self.client.clone(), &self.namespace);
        let subscriptions = subs.list(&ListParams::default()).await.map(|l| l.items).ok();
        let slim_channels = channels.list(&ListParams::default()).await.map(|l| l.items).ok();
        let mut nodes: BTreeMap<String, Option<std::sync::Arc<Observed>>> = BTreeMap::new();
        for node in &self.nodes {
            let endpoint = node.controller_endpoint();
            let listed = self.pool.node(&endpoint).snapshot(Duration::ZERO).await.ok();
            nodes.insert(endpoint, listed);
        }
        let manager = ChannelManagerClient::new(&self.manager.endpoint()).ok();
        let mut members: BTreeMap<String, Option<Vec<String>>> = BTreeMap::new();
        for channel in slim_channels.iter().flatten() {
            let listed = match &manager {
                Some(manager) => manager.list_participants(&channel.spec.name).await.ok(),
                None => None,
            };
            members.insert(channel.spec.name.clone(), listed);
        }
        State { subscriptions, channels: slim_channels, nodes, members }
    }

    /// Writes to the objects by a replica that did not hold the Lease at the time (the API
    /// server's audit log): a write after the other replica's latest Lease write is one.
    pub fn two_writers(&self) -> Result<Vec<Violation>, HarnessError> {
        let writes = self.plane.audited().map_err(setup("audit log"))?;
        let ours: Vec<_> = writes
            .into_iter()
            .filter(|w| REPLICAS.contains(&w.user.as_str()) && w.code < 300)
            .filter(|w| matches!(w.verb.as_str(), "create" | "update" | "patch" | "delete"))
            .filter(|w| w.namespace == self.namespace || (w.namespace == self.operator_ns && w.resource == "leases"))
            .collect();
        let mut holder: Option<&str> = None;
        let mut violations = Vec::new();
        for write in &ours {
            if write.resource == "leases" {
                holder = Some(write.user.as_str());
            } else if matches!(write.resource.as_str(), "subscriptions" | "slimchannels") && holder != Some(&write.user)
            {
                violations.push(Violation::TwoWriters {
                    writer: write.user.clone(),
                    leader: holder.unwrap_or("nobody").to_owned(),
                    what: format!(
                        "{} {}/{} {} at {}",
                        write.verb, write.resource, write.subresource, write.name, write.at
                    ),
                });
            }
        }
        Ok(violations)
    }

    /// Every process's log into `dir` (to look into a violation).
    pub fn keep_logs(&self, dir: &std::path::Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        for (index, replica) in self.replicas.iter().enumerate() {
            if let Some(replica) = replica {
                std::fs::write(dir.join(format!("{}.log", REPLICAS[index])), replica.log())?;
            }
        }
        std::fs::write(dir.join("channel-manager.log"), self.manager.log())?;
        for (index, node) in self.nodes.iter().enumerate() {
            std::fs::write(dir.join(format!("node-{index}.log")), node.log())?;
        }
        for (index, app) in self.members.iter().enumerate() {
            if let Some(app) = app {
                std::fs::write(dir.join(format!("member-{index}.log")), app.output())?;
            }
        }
        Ok(())
    }

    pub async fn stop(mut self) {
        for replica in self.replicas.iter_mut().flatten() {
            replica.terminate(Duration::from_secs(20));
        }
    }
}

fn member(index: usize) -> String {
    format!("org/soak/m{index}")
}

/// One to all of the members.
fn participants(rng: &mut Rng) -> Vec<String> {
    let mut chosen: Vec<String> = (0..MEMBERS).filter(|_| rng.below(2) == 0).map(member).collect();
    if chosen.is_empty() {
        chosen.push(member(rng.below(MEMBERS as u64) as usize));
    }
    chosen
}

/// Names of the objects not being deleted.
async fn live_names<K>(api: &Api<K>) -> Vec<String>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let list = api.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
    list.iter().filter(|o| o.meta().deletion_timestamp.is_none()).filter_map(|o| o.meta().name.clone()).collect()
}
