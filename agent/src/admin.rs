//! The admin API (`proto/proto/admin.proto`): a gRPC service on a unix socket, behind the `shoal` CLI.
//!
//! The socket is created mode 0600 and every connection's peer credentials are checked as well: only root and the
//! agent's own user are served (a socket file's mode is not enough on every system, and a stale mode from an
//! earlier run must not let anyone in). A socket path still answered by another process is an error at start
//! (two agents on one data dir); one nobody answers is stale and replaced. Bad arguments get `INVALID_ARGUMENT`
//! with a message naming the argument. The API never takes registry credentials: `pull` uses the agent's own
//! (the registries configured for it), as a pull with no `Authorization` would.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt as _;
use shoal_proto::admin as pb;
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

use crate::mesh::{Liveness, Mesh};
use crate::metrics::Metrics;
use crate::resolver::{EvictError, ResolveError, Resolver};

pub mod cli;
pub mod imagecache;
mod images;
mod pins;
mod preheat;
mod pull;
pub mod rollouts;

pub use pull::{ImageRef, Platform};

/// What the admin API reads from the running agent.
#[derive(Debug)]
pub struct AdminState {
    /// When the agent started.
    pub started: Instant,
    /// The Kubernetes node name, when known.
    pub node: Option<String>,
    /// This node's zone.
    pub zone: String,
    /// Where the mirror listens.
    pub mirror: std::net::SocketAddr,
    /// The resolver (store, downloads, upstream).
    pub resolver: Arc<Resolver>,
    /// The mesh, if any.
    pub mesh: Option<Arc<Mesh>>,
    /// The agent's metrics (the pull's reads count as served bytes).
    pub metrics: Metrics,
    /// `gc_high_bytes`.
    pub budget: u64,
}

/// Why the admin socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Another process answers on the socket.
    #[error("another process serves the admin socket {0} (a second agent on the same data dir?)")]
    InUse(PathBuf),
    /// Creating, binding or securing it failed.
    #[error("admin socket {path}: {what}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The step.
        what: &'static str,
        /// The cause.
        source: std::io::Error,
    },
}

/// Binds the admin socket at `path` (mode 0600) and serves the API until `cancel`; the socket file is removed on
/// the way out.
pub fn serve(
    path: &Path,
    state: Arc<AdminState>,
    tasks: &TaskTracker,
    cancel: CancellationToken,
) -> Result<(), AdminError> {
    let io = |what| move |source| AdminError::Io { path: path.to_owned(), what, source };
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(AdminError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(io("removing the stale socket"))?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io("creating its directory"))?;
    }
    let listener = UnixListener::bind(path).map_err(io("binding"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io("setting mode 0600"))?;
    let owner = std::fs::metadata(path).map_err(io("reading its owner"))?.uid();
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener).filter_map(move |conn| async move {
        match conn {
            Ok(stream) => match stream.peer_cred() {
                Ok(c) if c.uid() == 0 || c.uid() == owner => Some(Ok::<_, std::io::Error>(stream)),
                Ok(c) => {
                    tracing::warn!(uid = c.uid(), pid = ?c.pid(), "admin socket: a connection from another user refused");
                    None
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin socket: peer credentials unreadable; connection refused");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "admin socket: accept failed");
                None
            }
        }
    });
    let service = pb::admin_server::AdminServer::new(Service { state });
    let socket = path.to_owned();
    tasks.spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin socket: the server failed");
        }
        let _ = std::fs::remove_file(&socket);
    });
    tracing::info!(socket = %path.display(), "admin API listening");
    Ok(())
}

/// The service.
#[derive(Debug)]
struct Service {
    state: Arc<AdminState>,
}

impl Service {
    /// An image argument named `arg` and its platform (`os/arch[/variant]`, empty: this node's), checked.
    fn image_arg(&self, arg: &str, image: &str, platform: &str) -> Result<(ImageRef, Platform), Status> {
        let image = ImageRef::parse(image, self.state.resolver.upstream().default_registry())
            .map_err(|e| Status::invalid_argument(format!("{arg}: {e}")))?;
        let platform = if platform.is_empty() {
            Platform::this_node()
        } else {
            Platform::parse(platform).map_err(|e| Status::invalid_argument(format!("platform: {e}")))?
        };
        Ok((image, platform))
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// A progress channel nobody listens to: sends fail at once, so the work never waits on them.
fn unheard<T>() -> mpsc::Sender<T> {
    mpsc::channel(1).0
}

/// Runs a store call off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(internal)?.map_err(internal)
}

/// A resolver's refusal as a gRPC status.
fn resolve_status(what: &str, e: ResolveError) -> Status {
    match e {
        ResolveError::NotFound => Status::not_found(format!("{what}: not found (upstream has no such image)")),
        ResolveError::Unauthorized { .. } => Status::permission_denied(format!(
            "{what}: the registry wants credentials and none are configured for it on this agent"
        )),
        ResolveError::Denied => {
            Status::permission_denied(format!("{what}: the registry refused the agent's credentials"))
        }
        ResolveError::Unavailable(r) | ResolveError::NoSpace(r) => Status::unavailable(format!("{what}: {r}")),
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for Service {
    async fn status(&self, _: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        let st = &self.state;
        let (mut alive, mut suspect, mut dead) = (0, 0, 0);
        let (peer_id, homed) = match &st.mesh {
            Some(m) => {
                for (_, l) in &m.view().members {
                    match l {
                        Liveness::Alive => alive += 1,
                        Liveness::Suspect => suspect += 1,
                        Liveness::Dead => dead += 1,
                    }
                }
                (m.id().to_string(), m.homed_digests() as u64)
            }
            None => (String::new(), 0),
        };
        let store = st.resolver.store();
        let downloads = st
            .resolver
            .downloads_in_flight()
            .into_iter()
            .map(|(d, written, size)| pb::Download { digest: d.to_string(), written, size: size.unwrap_or(0) })
            .collect();
        let up = st.resolver.upstream();
        let registries =
            up.registries().into_iter().map(|h| pb::Registry { down: up.is_down(&h), host: h.to_string() }).collect();
        Ok(Response::new(pb::StatusReply {
            node: st.node.clone().unwrap_or_default(),
            peer_id,
            zone: st.zone.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds: st.started.elapsed().as_secs(),
            members_alive: alive,
            members_suspect: suspect,
            members_dead: dead,
            homed_digests: homed,
            store_bytes: store.bytes(),
            store_blobs: store.blob_count(),
            store_budget_bytes: st.budget,
            downloads,
            registries,
            mirror: st.mirror.to_string(),
            store_pinned_bytes: {
                let store = store.clone();
                blocking(move || store.pinned()).await?.1
            },
        }))
    }

    async fn peers(&self, _: Request<pb::PeersRequest>) -> Result<Response<pb::PeersReply>, Status> {
        let Some(mesh) = &self.state.mesh else { return Ok(Response::new(pb::PeersReply::default())) };
        let peers = mesh
            .view()
            .members
            .iter()
            .map(|(info, l)| {
                let (bytes_sent, bytes_received, heard) = mesh.peer_counters(&info.id);
                pb::Peer {
                    last_heard_ms: heard.map(|d| d.as_millis() as u64),
                    bytes_sent,
                    bytes_received,
                    peer_id: info.id.to_string(),
                    node: info.node.clone().unwrap_or_default(),
                    zone: info.zone.clone(),
                    address: info.transfer_addr.to_string(),
                    state: match l {
                        Liveness::Alive => "alive",
                        Liveness::Suspect => "suspect",
                        Liveness::Dead => "dead",
                    }
                    .to_owned(),
                    quarantined: mesh.is_quarantined(&info.id),
                }
            })
            .collect();
        Ok(Response::new(pb::PeersReply { peers }))
    }

    async fn blobs(&self, req: Request<pb::BlobsRequest>) -> Result<Response<pb::BlobsReply>, Status> {
        let repo = req.into_inner().repo;
        if repo.len() > 512 || repo.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(Status::invalid_argument("repo: longer than 512 bytes, or with spaces or control characters"));
        }
        let store = self.state.resolver.store().clone();
        let (list, only) = blocking(move || {
            let only = if repo.is_empty() { None } else { Some(images::digests_of_repo(&store, &repo)?) };
            Ok((store.list_blobs()?, only))
        })
        .await?;
        let blobs = list
            .into_iter()
            .filter(|(d, _)| only.as_ref().is_none_or(|o| o.contains(d)))
            .map(|(d, m)| pb::Blob {
                digest: d.to_string(),
                size: m.size,
                last_access: m.last_access,
                public: m.public,
                registry: m.registry.map(|r| r.to_string()).unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(pb::BlobsReply { blobs }))
    }

    async fn images(&self, _: Request<pb::ImagesRequest>) -> Result<Response<pb::ImagesReply>, Status> {
        let store = self.state.resolver.store().clone();
        let images = blocking(move || images::list(&store)).await?;
        Ok(Response::new(pb::ImagesReply { images }))
    }

    type PullStream = tokio_stream::wrappers::ReceiverStream<Result<pb::PullEvent, Status>>;

    async fn pull(&self, req: Request<pb::PullRequest>) -> Result<Response<Self::PullStream>, Status> {
        let req = req.into_inner();
        let (image, platform) = self.image_arg("image", &req.image, &req.platform)?;
        let which = if req.all_platforms { None } else { Some(platform) };
        let (tx, rx) = mpsc::channel(64);
        let state = self.state.clone();
        tokio::spawn(async move {
            let result = pull::pull(&state, &image, which.as_ref(), &tx).await;
            let event = result.map(|s| pb::PullEvent { event: Some(pb::pull_event::Event::Done(s)) });
            let _ = tx.send(event).await;
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    type PreheatStream = tokio_stream::wrappers::ReceiverStream<Result<pb::PreheatEvent, Status>>;

    async fn preheat(&self, req: Request<pb::PreheatRequest>) -> Result<Response<Self::PreheatStream>, Status> {
        let req = req.into_inner();
        let Some(mesh) = self.state.mesh.clone() else {
            return Err(Status::failed_precondition(
                "this agent has no mesh: nothing to preheat but itself (`shoal pull`)",
            ));
        };
        let (image, platform) = self.image_arg("image", &req.image, &req.platform)?;
        let known = mesh.view().zones();
        let zones = if req.zones.is_empty() {
            known
        } else {
            for z in &req.zones {
                if !known.contains(z) {
                    return Err(Status::invalid_argument(format!(
                        "zones: no alive member in zone {z:?} (zones: {})",
                        known.join(", ")
                    )));
                }
            }
            req.zones.clone()
        };
        let timeout =
            std::time::Duration::from_secs(u64::from(if req.timeout_seconds == 0 { 600 } else { req.timeout_seconds }));
        let which = if req.all_platforms { None } else { Some(platform) };
        let replicas = req.replicas.max(1) as usize;
        if replicas > preheat::MAX_REPLICAS {
            return Err(Status::invalid_argument(format!("replicas: at most {}", preheat::MAX_REPLICAS)));
        }
        let plan = preheat::Plan { image, platform: which, zones, timeout, pin: req.pin, replicas };
        let (tx, rx) = mpsc::channel(64);
        let state = self.state.clone();
        tokio::spawn(async move {
            let result = preheat::run(&state, &mesh, &plan, &tx).await;
            let _ = tx.send(result.map(|s| pb::PreheatEvent { event: Some(pb::preheat_event::Event::Done(s)) })).await;
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn explain(&self, req: Request<pb::ExplainRequest>) -> Result<Response<pb::ExplainReply>, Status> {
        let req = req.into_inner();
        let st = &self.state;
        let (root, items) = if let Ok(d) = crate::oci::Digest::parse(&req.target) {
            (d.clone(), vec![(d, crate::oci::Kind::Blob)])
        } else {
            let (image, platform) = self.image_arg("target (not a digest)", &req.target, &req.platform)?;
            let (_, root, items) = pull::walk(st, &image, Some(&platform)).await?;
            (root, items.into_iter().map(|(d, k, _)| (d, k)).collect())
        };
        let mut blobs = Vec::with_capacity(items.len());
        for (d, kind) in items {
            let store = st.resolver.store().clone();
            let dd = d.clone();
            let stored = blocking(move || store.blob(&dd)).await?;
            let rec = st.resolver.fetch_record(&d);
            let mut b = pb::BlobFetch {
                digest: d.to_string(),
                manifest: rec
                    .as_ref()
                    .map_or(kind == crate::oci::Kind::Manifest, |r| r.kind == crate::oci::Kind::Manifest),
                stored: stored.is_some(),
                in_containerd: st.resolver.in_containerd(&d),
                recorded: rec.is_some(),
                ..Default::default()
            };
            if let Some(r) = rec {
                b.when = r.when;
                b.seconds = r.seconds;
                b.failure = r.failure.unwrap_or_default();
                b.from_upstream = r.upstream;
                b.from_peers =
                    r.peers.into_iter().map(|(p, n)| pb::PeerBytes { peer_id: p.to_string(), bytes: n }).collect();
                b.restarts = r.restarts;
                b.source_failures = r.source_failures;
            }
            blobs.push(b);
        }
        Ok(Response::new(pb::ExplainReply { digest: root.to_string(), blobs }))
    }

    async fn pin(&self, req: Request<pb::PinRequest>) -> Result<Response<pb::PinReply>, Status> {
        let req = req.into_inner();
        let (image, platform) = self.image_arg("image", &req.image, &req.platform)?;
        let which = if req.all_platforms { None } else { Some(platform) };
        Ok(Response::new(pins::pin(&self.state, &image, which.as_ref()).await?))
    }

    async fn unpin(&self, req: Request<pb::PinRequest>) -> Result<Response<pb::PinReply>, Status> {
        let req = req.into_inner();
        let (image, _) = self.image_arg("image", &req.image, "")?;
        Ok(Response::new(pins::unpin(&self.state, &image).await?))
    }

    async fn pins(&self, _: Request<pb::PinsRequest>) -> Result<Response<pb::PinsReply>, Status> {
        Ok(Response::new(pins::list(&self.state).await?))
    }

    async fn evict(&self, req: Request<pb::EvictRequest>) -> Result<Response<pb::EvictReply>, Status> {
        let d = crate::oci::Digest::parse(&req.into_inner().digest)
            .map_err(|e| Status::invalid_argument(format!("digest: {e}")))?;
        match self.state.resolver.evict(&d).await {
            Ok(freed) => Ok(Response::new(pb::EvictReply { freed })),
            Err(e @ EvictError::NotStored(_)) => Err(Status::not_found(e.to_string())),
            Err(e @ (EvictError::InUse(_) | EvictError::Pinned(..))) => Err(Status::failed_precondition(e.to_string())),
            Err(e @ EvictError::Failed(_)) => Err(internal(e)),
        }
    }

    async fn verify(&self, _: Request<pb::VerifyRequest>) -> Result<Response<pb::VerifyReply>, Status> {
        let v = self.state.resolver.verify().await.map_err(internal)?;
        Ok(Response::new(pb::VerifyReply { blobs: v.blobs, bytes: v.bytes, problems: v.problems }))
    }
}
