//! The agent process: [`Agent::start`] opens the store, binds the mirror, the metrics/health endpoints and (with a
//! cluster secret) the mesh's gossip and transfer endpoints, and serves; [`Agent::addrs`] says where (ports the OS
//! picked for a 0 included, also written to `ready_file` once ready); [`Agent::shutdown`] shuts down in order:
//! readiness off, stop accepting, drain in-flight responses under the grace timeout, stop downloads and background
//! tasks (gossip announces the leave), close the QUIC endpoint, flush the index.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use http::{StatusCode, header};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, HostsConfig};
use crate::containerd::Containerd;
use crate::containerd::hosts::{self, HostEntry};
use crate::mesh::Mesh;
use crate::metrics::Metrics;
use crate::mirror::{self, MirrorState};
use crate::resolver::{Others, Resolver, ResolverConfig};
use crate::store::{Store, StoreError};
use crate::upstream::Upstream;

/// Why the agent could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The store could not be opened.
    #[error("opening the store in {path}: {source}")]
    Store {
        /// The data directory.
        path: std::path::PathBuf,
        /// The error.
        source: StoreError,
    },
    /// A listener could not be bound.
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The HTTP client could not be built.
    #[error("building the upstream client: {0}")]
    Client(#[from] reqwest::Error),
    /// A server failed.
    #[error("serving: {0}")]
    Serve(std::io::Error),
    /// The mesh could not start.
    #[error("starting the mesh: {0}")]
    Mesh(#[from] crate::mesh::MeshError),
    /// The admin socket could not be served.
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
}

#[derive(Debug)]
struct HealthState {
    ready: AtomicBool,
    registry: Registry,
}

/// Where a started agent listens (what the OS picked for a port 0), as written to `ready_file`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Addrs {
    /// The mirror.
    pub mirror: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub metrics: SocketAddr,
    /// The gossip listener (TCP), with a mesh.
    pub gossip: Option<SocketAddr>,
    /// The transfer endpoint (UDP), with a mesh.
    pub transfer: Option<SocketAddr>,
}

/// A running agent: every listener bound, serving until [`Agent::shutdown`].
#[derive(Debug)]
pub struct Agent {
    addrs: Addrs,
    health: Arc<HealthState>,
    store: Arc<Store>,
    mesh: Option<Arc<Mesh>>,
    tasks: TaskTracker,
    cancel: CancellationToken,
    stop_accepting: CancellationToken,
    mirror_task: tokio::task::JoinHandle<()>,
    health_task: tokio::task::JoinHandle<()>,
    shutdown_grace: std::time::Duration,
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()> + Send) -> Result<(), AgentError> {
    let agent = Agent::start(cfg).await?;
    shutdown.await;
    agent.shutdown().await;
    Ok(())
}

impl Agent {
    /// Opens the store, binds the mirror, the metrics/health endpoints and (with a cluster secret) the mesh's
    /// listeners, and starts serving. Readiness follows once the mesh has joined (see [`Agent::addrs`] for where
    /// it listens; with `ready_file`, the addresses are written there once ready).
    pub async fn start(cfg: Config) -> Result<Self, AgentError> {
        let started = std::time::Instant::now();
        // libp2p enables both of rustls' providers; the process uses one (a second call keeps the first).
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let data_dir = cfg.data_dir.clone();
        let (store, rec) = tokio::task::spawn_blocking(move || Store::open(&data_dir))
            .await
            .expect("the store-opening task does not panic")
            .map_err(|source| AgentError::Store { path: cfg.data_dir.clone(), source })?;
        tracing::info!(
            blobs = rec.blobs,
            dangling_records = rec.dangling_records,
            orphan_files = rec.orphan_files,
            partials = rec.partials,
            "store opened and reconciled"
        );
        let store = Arc::new(store);
        let mirror_listener = TcpListener::bind(cfg.listen).await.map_err(|source| AgentError::Bind {
            what: "the mirror",
            addr: cfg.listen,
            source,
        })?;
        let metrics_listener = TcpListener::bind(cfg.metrics_listen).await.map_err(|source| AgentError::Bind {
            what: "metrics",
            addr: cfg.metrics_listen,
            source,
        })?;

        let metrics = Metrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let upstream = Arc::new(Upstream::new(cfg.upstream.clone(), metrics.upstream.clone())?);
        let mut cfg = cfg;
        if let (Some(m), Some(node)) = (&mut cfg.mesh, &cfg.node_name) {
            let bound = matches!(m.binding, crate::config::MemberBinding::Kubernetes { .. });
            if m.zone_from_node {
                m.zone = zone_of_node(node).await.unwrap_or_else(|| "default".to_owned());
            } else if bound
                && let Some(label) = zone_of_node(node).await
                && label != m.zone
            {
                // Bound to its Node, a member's zone is the Node's label: the others would refuse any other.
                tracing::warn!(node, configured = %m.zone, label = %label, "`zone` differs from the Node's zone label; \
                    with member_binding = kubernetes the label is the zone");
                m.zone = label;
            }
        }
        let mesh = match &cfg.mesh {
            Some(m) => Some(Mesh::start(m, &cfg.data_dir, metrics.clone(), &tasks, &cancel).await?),
            None => None,
        };
        let containerd = cfg.containerd.clone().map(|c| Containerd::new(c, metrics.containerd.clone(), tasks.clone()));
        let resolver = Resolver::new(
            store.clone(),
            upstream,
            ResolverConfig {
                tag_ttl: cfg.tag_ttl,
                auth_ttl: cfg.auth_ttl,
                gc_high_bytes: cfg.gc_high_bytes,
                min_free_space: cfg.min_free_space,
                gc_low_bytes: cfg.gc_low_bytes,
                abandon_after: crate::resolver::ABANDON_AFTER,
            },
            metrics.clone(),
            tasks.clone(),
            cancel.child_token(),
            Others { mesh: mesh.clone(), containerd: containerd.clone() },
        );
        if let Some(m) = &mesh {
            m.serve(resolver.clone(), &tasks, cancel.child_token());
        }
        if let Some(c) = &containerd {
            let (tx, mut rx) = tokio::sync::mpsc::channel(64);
            tasks.spawn(c.clone().follow(tx, cancel.child_token()));
            let r = resolver.clone();
            tasks.spawn(async move {
                while let Some(batch) = rx.recv().await {
                    r.containerd_changed(batch).await;
                }
            });
        }
        resolver.maybe_gc();
        let (r, stop) = (resolver.clone(), cancel.child_token());
        tasks.spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(3600));
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = every.tick() => r.expire_records().await,
                }
            }
        });
        if let Err(e) = resolver.announce_stored().await {
            tracing::warn!(error = %e, "could not list the store for the mesh: peers learn of its blobs later");
        }

        let health = Arc::new(HealthState { ready: AtomicBool::new(false), registry });
        let stop_accepting = CancellationToken::new();
        let addrs = Addrs {
            mirror: mirror_listener.local_addr().map_err(AgentError::Serve)?,
            metrics: metrics_listener.local_addr().map_err(AgentError::Serve)?,
            gossip: mesh.as_ref().map(|m| m.gossip_addr()),
            transfer: mesh.as_ref().map(|m| m.transfer_addr()),
        };
        if let Some(h) = &mut cfg.hosts {
            // Derived from a `listen` on port 0 (an explicit `mirror_url` cannot name port 0): the port bound.
            if h.mirror_url.ends_with(":0") {
                let ip =
                    if addrs.mirror.ip().is_unspecified() { Ipv4Addr::LOCALHOST.into() } else { addrs.mirror.ip() };
                h.mirror_url = format!("http://{}", SocketAddr::new(ip, addrs.mirror.port()));
            }
        }
        if let Some(h) = &cfg.hosts {
            write_hosts(&cfg, h);
        }
        let admin_state = Arc::new(crate::admin::AdminState {
            started,
            node: cfg.node_name.clone(),
            zone: cfg.mesh.as_ref().map_or_else(|| "default".to_owned(), |m| m.zone.clone()),
            mirror: addrs.mirror,
            resolver: resolver.clone(),
            mesh: mesh.clone(),
            metrics: metrics.clone(),
            budget: cfg.gc_high_bytes,
        });
        if let Some(path) = &cfg.admin_socket {
            crate::admin::serve(path, admin_state.clone(), &tasks, cancel.child_token())?;
        }
        if (cfg.image_caches || cfg.prefetch_rollouts)
            && let Some(m) = &mesh
        {
            match crate::kubernetes::client().await {
                Ok(client) => {
                    if cfg.image_caches {
                        let st = admin_state.clone();
                        crate::admin::imagecache::spawn(client.clone(), st, m.clone(), &tasks, cancel.child_token());
                    }
                    if cfg.prefetch_rollouts {
                        let st = admin_state.clone();
                        crate::admin::rollouts::spawn(client, st, m.clone(), &tasks, cancel.child_token());
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no Kubernetes API: ImageCache objects and rollouts are not followed");
                }
            }
        }
        let mirror_app = mirror::router(MirrorState { resolver, metrics });
        let mirror_server =
            mirror::server::serve(mirror_listener, mirror_app, cfg.client_limits, stop_accepting.clone());
        // The health and metrics endpoints see a scraper and the kubelet's probes: a few connections suffice, and a
        // scraper's kept-alive connection must outlive its scrape interval (the header deadline is also the idle
        // one), or scrapes race the server closing it.
        let health_limits = mirror::server::Limits {
            max_connections: 64,
            header_timeout: cfg.client_limits.header_timeout.max(std::time::Duration::from_secs(120)),
            ..cfg.client_limits
        };
        let health_server = mirror::server::serve(
            metrics_listener,
            health_router(health.clone()),
            health_limits,
            stop_accepting.clone(),
        );
        // Ready once another member is seen, or after a while alone (the first node of a cluster).
        let join_wait = cfg.mesh.as_ref().map(|m| (mesh.clone(), m.dead_after));
        let (h, ready_file) = (health.clone(), cfg.ready_file.clone());
        tasks.spawn(async move {
            let joined = match join_wait {
                Some((Some(mesh), wait)) => Some(mesh.joined(wait).await),
                _ => None,
            };
            if let Some(path) = &ready_file
                && let Err(e) = write_ready_file(path, &addrs)
            {
                tracing::error!(path = %path.display(), error = %e, "could not write the ready file");
            }
            h.ready.store(true, Ordering::Release);
            tracing::info!(mirror = %addrs.mirror, metrics = %addrs.metrics, ?joined, "shoal agent ready");
        });
        Ok(Self {
            addrs,
            health,
            store,
            mesh,
            tasks,
            cancel,
            stop_accepting,
            mirror_task: tokio::spawn(mirror_server),
            health_task: tokio::spawn(health_server),
            shutdown_grace: cfg.shutdown_grace,
        })
    }

    /// Where it listens.
    pub fn addrs(&self) -> Addrs {
        self.addrs
    }

    /// Whether it is ready (`/readyz`).
    pub fn is_ready(&self) -> bool {
        self.health.ready.load(Ordering::Acquire)
    }

    /// Shuts down in order: readiness off, stop accepting, drain in-flight responses under the grace timeout,
    /// stop downloads and background tasks (gossip announces the leave), close the QUIC endpoint, flush the index.
    pub async fn shutdown(self) {
        tracing::info!(grace = ?self.shutdown_grace, "shutting down: draining in-flight responses");
        self.health.ready.store(false, Ordering::Release);
        self.stop_accepting.cancel();
        let drained = tokio::time::timeout(self.shutdown_grace, async {
            let _ = self.mirror_task.await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!("grace period over: dropping the responses still in flight");
        }
        self.cancel.cancel();
        if let Some(mesh) = &self.mesh {
            mesh.close().await;
        }
        self.tasks.close();
        self.tasks.wait().await;
        self.health_task.abort();
        let store = self.store;
        let flushed = tokio::task::spawn_blocking(move || store.flush()).await;
        if let Ok(Err(e)) = flushed {
            tracing::error!(error = %e, "flushing the index failed");
        }
        tracing::info!("shoal agent stopped");
    }
}

/// Writes the addresses as JSON, atomically (a reader never sees half a file).
fn write_ready_file(path: &std::path::Path, addrs: &Addrs) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(addrs).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, path)
}

/// The node's zone from its label; `None` (logged) when it has none or the API server cannot say (the agent must
/// start even when the API server is down: it serves image pulls).
async fn zone_of_node(node: &str) -> Option<String> {
    let lookup = async { crate::kubernetes::node_zone(crate::kubernetes::client().await?, node).await };
    match tokio::time::timeout(std::time::Duration::from_secs(10), lookup).await {
        Ok(Ok(Some(zone))) => {
            tracing::info!(node, zone, "zone from the node's label");
            Some(zone)
        }
        Ok(Ok(None)) => {
            tracing::info!(node, label = crate::kubernetes::ZONE_LABEL, "the node has no zone label");
            None
        }
        Ok(Err(e)) => {
            tracing::warn!(node, error = %e, "cannot read the node's zone label (set `zone` to override)");
            None
        }
        Err(_) => {
            tracing::warn!(node, "the API server did not answer within 10s: no zone label (set `zone` to override)");
            None
        }
    }
}

/// Points containerd at this mirror: a hosts file per configured registry (and `_default` when unlisted
/// registries are proxied), after checking containerd's config for settings that would bypass them. A failure is
/// logged, not fatal: the agent still serves its peers and any client configured by hand.
fn write_hosts(cfg: &Config, h: &HostsConfig) {
    for warning in hosts::preflight(&h.containerd_config, &h.dir) {
        tracing::warn!(config = %h.containerd_config.display(), "{warning}");
    }
    let mut entries: Vec<HostEntry> = cfg
        .upstream
        .registries
        .iter()
        .map(|(host, r)| HostEntry {
            registry: host.as_str().to_owned(),
            server: Some(r.endpoint.as_str().trim_end_matches('/').to_owned()),
        })
        .collect();
    if cfg.upstream.allow_unlisted {
        entries.push(HostEntry { registry: "_default".to_owned(), server: None });
    }
    for e in &entries {
        match hosts::write(&h.dir, e, &h.mirror_url, h.dial_timeout) {
            Ok(path) => tracing::info!(path = %path.display(), mirror = %h.mirror_url, "containerd hosts file written"),
            Err(err) => {
                tracing::error!(registry = %e.registry, error = %err, "could not write containerd's hosts file")
            }
        }
    }
}

fn health_router(state: Arc<HealthState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .with_state(state)
}

async fn readyz(State(s): State<Arc<HealthState>>) -> impl IntoResponse {
    if s.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics_handler(State(s): State<Arc<HealthState>>) -> impl IntoResponse {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &s.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            out,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
