//! The topology the namespace scenarios run on: a bridge; the upstream namespace with `docker-registry` and the
//! testbed's counting proxy in front of it (the address agents and clients know as the registry); one namespace
//! per node with a `shoal agent` in it, all in one mesh. Pulls run inside a node's namespace with the testbed's
//! HTTP client, trying the node's agent first and upstream second, as containerd does with the `hosts.toml` the
//! agent writes, and retrying a failed pull as the kubelet does.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use shoal_testbed::client::{self, Corrupt, Endpoint};
use shoal_testbed::image::{Artifact, Compression, Format, Image, push};
use shoal_testbed::netns::{Bridge, Netns, Rate};
use shoal_testbed::{Agent, AgentBuilder, NsProxy, ProxyStats, Registry, cluster, wait_for};
use tokio::task::JoinHandle;

use crate::report::Report;

/// The repository every scenario pushes to.
pub const REPO: &str = "chaos/app";
const UPSTREAM_NS: u8 = 1;
const FIRST_NODE: u8 = 11;
/// The port of the proxy in front of upstream (in the upstream namespace).
pub const PROXY_PORT: u16 = 5000;
const REGISTRY_PORT: u16 = 5001;
/// One pull attempt that takes longer than this is abandoned (and retried). Generous: a node whose agent left
/// pulls straight from upstream, sharing its capped link with every other such node.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(300);
/// Attempts of one pull (the kubelet retries a failed pull, with back-off, for as long as the pod waits; a node
/// whose own agent is killed mid-pull more than once needs more than two).
pub const ATTEMPTS: u32 = 5;

/// The links of a bed.
#[derive(Debug, Clone, Copy)]
pub struct Links {
    /// Upstream's link.
    pub upstream: Option<Rate>,
    /// Every node's link.
    pub node: Option<Rate>,
}

/// One node: its namespace and its agent.
#[derive(Debug)]
pub struct Node {
    /// The agent (declared first: it stops before its namespace goes).
    pub agent: Agent,
    /// The namespace.
    pub ns: Netns,
    /// Whether its agent left for good ([`Bed::leave`]); the namespace stays, so its pulls can still go upstream.
    pub left: bool,
}

/// The running topology. Field order is drop order: agents, then the upstream, then namespaces, then the bridge.
#[derive(Debug)]
pub struct Bed {
    /// The nodes, in the order they were added.
    pub nodes: Vec<Node>,
    proxy: NsProxy,
    /// The upstream registry.
    pub registry: Registry,
    /// The upstream namespace.
    pub up: Netns,
    bridge: Bridge,
    _secret_dir: tempfile::TempDir,
    secret: PathBuf,
    /// `ip:port` of the proxy in front of the registry: the registry's name for agents and clients.
    pub upstream_host: String,
    links: Links,
    next_ns: u8,
}

/// What one pull did.
#[derive(Debug)]
pub struct PullRecord {
    /// Which node pulled.
    pub node: usize,
    /// The tag or digest.
    pub reference: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last attempt's outcome: bytes received, or why it failed.
    pub outcome: Result<u64, String>,
    /// Whether a complete body that did not match its digest reached the client.
    pub corrupt: bool,
    /// Why earlier attempts failed.
    pub retried_because: Vec<String>,
    /// From the first request to the end of the last attempt.
    pub elapsed: Duration,
}

impl Bed {
    /// Creates the bridge `<prefix>br` on `10.77.<subnet>.0/24`, the upstream, and `nodes` agents in one mesh,
    /// each configured by `with` (its index).
    pub async fn start(
        prefix: &str,
        subnet: u8,
        nodes: usize,
        links: Links,
        with: impl Fn(usize, AgentBuilder) -> AgentBuilder,
    ) -> Result<Self> {
        let bridge = Bridge::create_on(prefix, subnet)?;
        let up = bridge.netns(UPSTREAM_NS, links.upstream)?;
        let registry = Registry::start_in(&up, REGISTRY_PORT, None).await?;
        let listen = SocketAddr::new(up.ip().into(), PROXY_PORT);
        let proxy = NsProxy::start(&up, listen, registry.addr()).await?;
        let secret_dir = tempfile::Builder::new().prefix("shoal-chaos").tempdir()?;
        let secret = cluster::write_secret(&secret_dir, "secret", &format!("{:032x}", rand::random::<u128>()))?;
        let mut bed = Self {
            nodes: Vec::new(),
            proxy,
            registry,
            up,
            bridge,
            _secret_dir: secret_dir,
            secret,
            upstream_host: listen.to_string(),
            links,
            next_ns: FIRST_NODE,
        };
        for i in 0..nodes {
            bed.add_node(|b| with(i, b)).await?;
        }
        bed.wait_converged(Duration::from_secs(30)).await?;
        Ok(bed)
    }

    /// The counters of the proxy in front of upstream.
    pub fn upstream_stats(&self) -> &ProxyStats {
        self.proxy.stats()
    }

    /// Builds an image of `layers` (sizes in bytes, contents from `seed`) and pushes it as `REPO:tag`.
    pub fn push(&self, tag: &str, layers: &[usize], seed: u64) -> Result<Artifact> {
        let image = Artifact::Image(Image::random(layers, seed, "amd64", Compression::None)?);
        push(&image, &self.registry.host(), REPO, tag, None, Format::Oci)?;
        Ok(image)
    }

    /// Starts one more node (its agent bootstrapping from every running one) and returns its index. Does not wait
    /// for the mesh to see it.
    pub async fn add_node(&mut self, with: impl FnOnce(AgentBuilder) -> AgentBuilder) -> Result<usize> {
        let ns = self.bridge.netns(self.next_ns, self.links.node)?;
        self.next_ns += 1;
        let boot: Vec<SocketAddr> = self.nodes.iter().filter(|n| !n.left).filter_map(|n| n.agent.gossip_addr).collect();
        let builder = Agent::builder().registry(&self.upstream_host).mesh(&self.secret, ns.ip(), &boot).netns(&ns);
        let agent = with(builder).start().await?;
        self.nodes.push(Node { agent, ns, left: false });
        Ok(self.nodes.len() - 1)
    }

    /// Node `i`'s agent leaves for good: SIGTERM (a drained node) or SIGKILL (a node that vanished).
    pub async fn leave(&mut self, i: usize, graceful: bool) -> Result<()> {
        let node = &mut self.nodes[i];
        node.left = true;
        if graceful {
            node.agent.terminate(Duration::from_secs(20)).await?;
        } else {
            node.agent.kill().await;
        }
        Ok(())
    }

    /// The nodes whose agent has not left.
    pub fn staying(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|i| !self.nodes[*i].left)
    }

    /// Waits until every node's agent sees every other one alive; returns how long that took.
    pub async fn wait_converged(&self, within: Duration) -> Result<Duration> {
        let start = Instant::now();
        let agents: Vec<&Agent> = self.nodes.iter().filter(|n| !n.left).map(|n| &n.agent).collect();
        let others = agents.len().saturating_sub(1) as f64;
        cluster::wait_alive(&agents, others, within).await?;
        Ok(start.elapsed())
    }

    /// The addresses of every node.
    pub fn ips(&self) -> Vec<Ipv4Addr> {
        self.nodes.iter().map(|n| n.ns.ip()).collect()
    }

    /// Where node `i` pulls from: its agent (the mirror, on the namespace's loopback), then upstream itself.
    pub fn endpoints(&self, i: usize) -> Vec<Endpoint> {
        vec![
            Endpoint { base: self.nodes[i].agent.url(), ns: Some(self.upstream_host.clone()) },
            Endpoint { base: format!("http://{}", self.upstream_host), ns: None },
        ]
    }

    /// Starts a pull of `REPO:<reference>` on node `i` (retrying a failed one as the kubelet does).
    pub fn pull(&self, i: usize, reference: &str) -> JoinHandle<Result<PullRecord>> {
        let eps = self.endpoints(i);
        let reference = reference.to_owned();
        self.nodes[i].ns.spawn(move || async move {
            let http = reqwest::Client::builder().no_proxy().connect_timeout(Duration::from_secs(2)).build()?;
            Ok(pull_retrying(&http, i, &eps, &reference).await)
        })
    }

    /// Starts a pull of `reference` on each of `nodes`.
    pub fn burst(
        &self,
        nodes: impl IntoIterator<Item = usize>,
        reference: &str,
    ) -> Vec<JoinHandle<Result<PullRecord>>> {
        nodes.into_iter().map(|i| self.pull(i, reference)).collect()
    }

    /// SIGKILLs node `i`'s agent.
    pub async fn kill(&mut self, i: usize) {
        self.nodes[i].agent.kill().await;
    }

    /// Starts node `i`'s agent again (same config, ports and data); returns the time until it was ready.
    pub async fn restart(&mut self, i: usize) -> Result<Duration> {
        let start = Instant::now();
        self.nodes[i].agent.restart().await?;
        Ok(start.elapsed())
    }

    /// The scenario's end: every agent must still run and never have panicked; each is stopped (SIGTERM) and its
    /// store checked.
    pub async fn finish(mut self, report: &mut Report) {
        for node in &mut self.nodes {
            stop_and_check(node, report).await;
        }
    }
}

/// Stops a node's agent and checks what it left: it must have been running, exit cleanly, never have panicked, and
/// leave a store whose index agrees with its files.
async fn stop_and_check(node: &mut Node, report: &mut Report) {
    let name = node.ns.name().to_owned();
    if node.left {
        // Stopped by the scenario; its store is still checked.
    } else if !node.agent.running() {
        report.crashed.push(format!("{name}: the agent was not running at the end"));
    } else {
        match node.agent.terminate(Duration::from_secs(20)).await {
            Ok(status) if status.success() => {}
            Ok(status) => report.crashed.push(format!("{name}: the agent exited with {status} on SIGTERM")),
            Err(e) => report.crashed.push(format!("{name}: {e:#}")),
        }
    }
    if node.agent.log().contains("panicked") {
        report.crashed.push(format!("{name}: the agent panicked (see its log)"));
    }
    match shoal_agent::store::Store::check(&node.agent.data_dir()) {
        Ok(c) => {
            report.stored_blobs += c.blobs;
            report.store_problems.extend(c.problems.into_iter().map(|p| format!("{name}: {p}")));
        }
        Err(e) => report.store_problems.push(format!("{name}: the store could not be checked: {e}")),
    }
}

async fn pull_retrying(http: &reqwest::Client, node: usize, eps: &[Endpoint], reference: &str) -> PullRecord {
    let start = Instant::now();
    let mut attempts = 0;
    let mut retried_because = Vec::new();
    loop {
        attempts += 1;
        let outcome = match tokio::time::timeout(PULL_TIMEOUT, client::pull_via(http, eps, REPO, reference)).await {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!("not finished within {PULL_TIMEOUT:?}")),
        };
        let corrupt = outcome.as_ref().err().is_some_and(|e| e.downcast_ref::<Corrupt>().is_some());
        if outcome.is_ok() || corrupt || attempts == ATTEMPTS {
            return PullRecord {
                node,
                reference: reference.to_owned(),
                attempts,
                outcome: outcome.map(|p| p.bytes).map_err(|e| format!("{e:#}")),
                corrupt,
                retried_because,
                elapsed: start.elapsed(),
            };
        }
        if let Err(e) = outcome {
            retried_because.push(format!("{e:#}"));
        }
        // The kubelet's back-off, shortened.
        tokio::time::sleep(Duration::from_secs(u64::from(attempts))).await;
    }
}

/// Waits for pulls, turning a pull task that failed to run into a failed record.
pub async fn collect(handles: Vec<JoinHandle<Result<PullRecord>>>) -> Vec<PullRecord> {
    let mut out = Vec::new();
    for h in handles {
        let record = match h.await.context("pull task").and_then(|r| r) {
            Ok(r) => r,
            Err(e) => PullRecord {
                node: usize::MAX,
                reference: String::new(),
                attempts: 0,
                outcome: Err(format!("the pull did not run: {e:#}")),
                corrupt: false,
                retried_because: Vec::new(),
                elapsed: Duration::ZERO,
            },
        };
        out.push(record);
    }
    out
}

/// Whether every one of `handles` finished.
pub fn all_done<T>(handles: &[JoinHandle<T>]) -> bool {
    handles.iter().all(JoinHandle::is_finished)
}

/// Waits until `metric` summed over `agents` reaches `at_least`.
pub async fn wait_metric(agents: &[&Agent], metric: &str, labels: &[&str], at_least: f64) -> Result<()> {
    wait_for(&format!("{metric} to reach {at_least}"), Duration::from_secs(30), async || {
        let mut sum = 0.0;
        for a in agents {
            sum += a.metric(metric, labels).await.unwrap_or(0.0);
        }
        sum >= at_least
    })
    .await
}
