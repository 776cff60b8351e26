//! A mesh cluster for end-to-end tests: a real `docker-registry` upstream behind the counting [`Proxy`], a
//! cluster secret, and agents on their own 127.0.0.x addresses.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use crate::{Agent, AgentBuilder, Proxy, Registry, wait_for};

/// Upstream, a proxy in front of it, and a cluster secret.
#[derive(Debug)]
pub struct Cluster {
    /// The upstream registry.
    pub registry: Registry,
    /// The counting proxy in front of it (the host agents are configured with).
    pub proxy: Proxy,
    /// A directory for the cluster's files.
    pub dir: tempfile::TempDir,
    /// The cluster secret file.
    pub secret: PathBuf,
}

impl Cluster {
    /// A public upstream.
    pub async fn start() -> Result<Self> {
        Self::with(Registry::start().await?).await
    }

    /// This upstream.
    pub async fn with(registry: Registry) -> Result<Self> {
        let proxy = Proxy::start(registry.addr()).await?;
        let dir = tempfile::Builder::new().prefix("shoal-cluster").tempdir()?;
        let secret = write_secret(&dir, "secret", &format!("{:032x}", rand::random::<u128>()))?;
        Ok(Self { registry, proxy, dir, secret })
    }

    /// An agent in the mesh on `127.0.0.<n>`, bootstrapping from `peers`.
    pub fn agent(&self, n: u8, peers: &[&Agent]) -> AgentBuilder {
        let bootstrap: Vec<_> = peers.iter().filter_map(|a| a.gossip_addr).collect();
        Agent::builder().registry(&self.proxy.host()).mesh(&self.secret, Ipv4Addr::new(127, 0, 0, n), &bootstrap)
    }

    /// Starts agents on `127.0.0.<n>` for each `n` in `hosts`, all at once, each listening for gossip on `port` and
    /// bootstrapping from every one's address (what a headless Service's DNS name gives), with production timing
    /// (a probe per second); `with` adds other settings to each builder.
    pub async fn start_at_once(
        &self,
        hosts: &[u8],
        port: u16,
        with: impl Fn(AgentBuilder) -> AgentBuilder,
    ) -> Result<Vec<Agent>> {
        let addrs: Vec<std::net::SocketAddr> =
            hosts.iter().map(|&n| std::net::SocketAddr::new(Ipv4Addr::new(127, 0, 0, n).into(), port)).collect();
        let starts = hosts.iter().map(|&n| {
            let b = Agent::builder()
                .registry(&self.proxy.host())
                .setting("gossip_interval", "\"1s\"")
                .setting("suspect_after", "\"500ms\"")
                .setting("dead_after", "\"5s\"");
            with(b.mesh(&self.secret, Ipv4Addr::new(127, 0, 0, n), &addrs).gossip_port(port)).start()
        });
        futures_util::future::join_all(starts).await.into_iter().collect()
    }

    /// A blob's URL on an agent's mirror.
    pub fn blob_url(&self, agent: &Agent, repo: &str, digest: &str) -> String {
        format!("{}/v2/{repo}/blobs/{digest}?ns={}", agent.url(), self.proxy.host())
    }

    /// Stops the proxy and the registry.
    pub async fn stop_upstream(&mut self) {
        self.proxy.stop();
        self.registry.stop().await;
    }
}

/// Writes a secret file.
pub fn write_secret(dir: &tempfile::TempDir, name: &str, value: &str) -> Result<PathBuf> {
    let p = dir.path().join(name);
    std::fs::write(&p, value)?;
    Ok(p)
}

/// Alive peers an agent sees (-1 if it cannot be asked).
pub async fn alive(agent: &Agent) -> f64 {
    agent.metric("shoal_peers", &["state=\"alive\""]).await.unwrap_or(-1.0)
}

/// Waits until every agent sees `n` alive peers.
pub async fn wait_alive(agents: &[&Agent], n: f64, within: Duration) -> Result<()> {
    wait_for(&format!("every agent to see {n} alive peers"), within, async || {
        for a in agents {
            if alive(a).await != n {
                return false;
            }
        }
        true
    })
    .await
}

/// Waits until the homes, together, know at least `n` digests.
pub async fn wait_directory(agents: &[&Agent], n: f64) -> Result<()> {
    wait_for("the homes to learn the holdings", Duration::from_secs(10), async || {
        let mut sum = 0.0;
        for a in agents {
            sum += a.metric("shoal_directory_digests", &[]).await.unwrap_or(0.0);
        }
        sum >= n
    })
    .await
}
