//! The peer mesh: membership (gossip), each digest's home and its directory, and piece transfers between
//! members.
//!
//! A node tells each digest's home what it holds ([`Mesh::hold`]: downloads started, blobs committed or evicted);
//! an announcer task batches these to the homes, and when membership changes (homes move) it announces everything
//! again to the new homes. A node that misses a blob asks where to get it ([`Mesh::sources`]): the digest's home
//! answers with a few sources ahead of the asker, and starts the zone's one download itself when nobody has it
//! (from the digest's home zone, or upstream). Pieces come from those sources ([`Mesh::fetch_piece`]); a source
//! whose piece fails its hash is quarantined. Tags are resolved by the tag's home ([`Mesh::resolve_tag`]). The
//! node answers the same requests from peers (the [`Service`] impl) through [`Local`] (the resolver).
mod gossip;
pub mod members;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use libp2p::{PeerId, identity};
use shoal_proto::peer::{self, error::Code, request, response};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::swarm::directory::{self, HolderState, Holding, Located};
pub use members::{Liveness, MemberInfo, MembersView};

use crate::config::MeshConfig;
use crate::metrics::{FailureLabels, Metrics, TransferFailure};
use crate::oci::{Digest, Reference, RegistryHost, RepoName};
use crate::swarm::announcer::Announcer;
use crate::transfer::{FetchError, Service, Transfer, TransferError, VerifiedPiece, respond, respond_error};

/// Announcements sent to one home in one message, at most.
const ANNOUNCE_BATCH: usize = 2000;
/// How often pending announcements are sent.
const ANNOUNCE_EVERY: Duration = Duration::from_millis(200);
/// Everything is announced again this often, repairing homes that lost track (anti-entropy).
const REANNOUNCE_EVERY: Duration = Duration::from_secs(60);
/// Longest wait for a home's answer to a locate (connection included).
const LOCATE_TIMEOUT: Duration = Duration::from_secs(1);
/// Bytes written to a peer per rate-limiter grant.
const UPLOAD_CHUNK: usize = 256 << 10;

/// The mesh could not start.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The node key could not be read or written.
    #[error("node key {path}: {reason}")]
    Key {
        /// The key file.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// The transfer endpoint failed.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// Gossip failed.
    #[error(transparent)]
    Gossip(#[from] gossip::GossipError),
}

/// A piece read for a peer.
#[derive(Debug, Clone)]
pub struct Piece {
    /// Its bytes.
    pub data: Bytes,
    /// Its hash, as recorded when the bytes were written here.
    pub hash: [u8; 32],
    /// The blob's size.
    pub blob_size: u64,
}

/// Why a piece cannot be given.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PieceRefusal {
    /// Not held.
    #[error("not held")]
    NotFound,
    /// Being downloaded; this piece is not there yet.
    #[error("not downloaded yet")]
    NotReady,
    /// Not a piece of this blob.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A local failure.
    #[error("internal: {0}")]
    Internal(String),
}

/// What a member asks a home to fetch on its client's behalf (checked from the wire).
#[derive(Debug, Clone)]
pub struct Order {
    /// The registry the client named.
    pub registry: RegistryHost,
    /// The repository.
    pub repo: RepoName,
    /// A manifest (else a blob).
    pub manifest: bool,
    /// The client's `Authorization`.
    pub auth: Option<http::HeaderValue>,
    /// The client's `Accept`.
    pub accept: Option<http::HeaderValue>,
}

/// Longest forwarded header value accepted.
const MAX_FORWARDED_HEADER: usize = 8 << 10;

impl Order {
    /// Checks a wire order.
    pub fn from_wire(o: peer::FetchOrder) -> Result<Self, String> {
        let registry = RegistryHost::parse(&o.registry).map_err(|e| format!("registry: {e}"))?;
        let repo = RepoName::parse(&o.repository).map_err(|e| format!("repository: {e}"))?;
        let header = |v: Option<Vec<u8>>, what: &str| -> Result<Option<http::HeaderValue>, String> {
            v.map(|b| {
                if b.len() > MAX_FORWARDED_HEADER {
                    return Err(format!("{what}: longer than {MAX_FORWARDED_HEADER} bytes"));
                }
                http::HeaderValue::from_bytes(&b).map_err(|_| format!("{what}: not a header value"))
            })
            .transpose()
        };
        Ok(Self {
            registry,
            repo,
            manifest: o.manifest,
            auth: header(o.authorization, "authorization")?,
            accept: header(o.accept.map(String::into_bytes), "accept")?,
        })
    }

    /// The wire form.
    pub fn to_wire(&self) -> peer::FetchOrder {
        peer::FetchOrder {
            registry: self.registry.to_string(),
            repository: self.repo.to_string(),
            manifest: self.manifest,
            authorization: self.auth.as_ref().map(|a| a.as_bytes().to_vec()),
            accept: self.accept.as_ref().and_then(|a| a.to_str().ok()).map(str::to_owned),
        }
    }
}

/// What a home's own fetch (or copy) of a digest looks like, once its size is known.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// Size.
    pub size: u64,
    /// Media type.
    pub media_type: Option<String>,
    /// Held completely already.
    pub complete: bool,
    /// Fetched without credentials.
    pub public: bool,
    /// This call started the download.
    pub started: bool,
}

/// A tag's answer: the digest and when upstream gave it (so a member's cache does not outlive the home's TTL).
#[derive(Debug, Clone)]
pub struct TagAnswer {
    /// The manifest digest.
    pub digest: Digest,
    /// Seconds since the epoch when upstream answered.
    pub fetched_at: u64,
    /// The manifest's media type.
    pub media_type: Option<String>,
}

/// What this node does for peers (the resolver: its store and running downloads, and its upstream client).
pub trait Local: Send + Sync + 'static {
    /// Reads piece `[offset, offset + len)` of `digest`, waiting up to `wait` for it if it is being downloaded.
    fn piece(
        self: Arc<Self>,
        digest: Digest,
        offset: u64,
        len: u32,
        wait: Duration,
    ) -> BoxFuture<'static, Result<Piece, PieceRefusal>>;

    /// Makes sure this node holds or downloads `digest` (as the home, for the asker's client), and returns once
    /// its size is known. The error is upstream's (or the store's) answer, for the log.
    fn fetch(self: Arc<Self>, digest: Digest, order: Order) -> BoxFuture<'static, Result<Fetched, String>>;

    /// Resolves a tag for the asker's client (as the tag's home).
    fn resolve_tag(self: Arc<Self>, order: Order, tag: String) -> BoxFuture<'static, Result<TagAnswer, String>>;

    /// Whether this node found `registry` unreachable (a refusal then says so: [`Code::UpstreamDown`]).
    fn upstream_down(&self, registry: &RegistryHost) -> bool;

    /// A home found `registry` unreachable: this node treats it as down too.
    fn upstream_reported_down(&self, registry: &RegistryHost, reason: &str);
}

/// The code of a home's refusal of an order for `registry`: says whether upstream is down here.
fn refusal(local: &dyn Local, registry: &RegistryHost) -> Code {
    if local.upstream_down(registry) { Code::UpstreamDown } else { Code::Unavailable }
}

/// One group of sources for a download, tried in order.
#[derive(Debug, Clone)]
pub struct Tier {
    /// The holders and the blob's size.
    pub located: Located,
    /// Partial holders are followed (they are ahead, fed by someone fetching from outside): wait for pieces they
    /// do not have yet. Otherwise take only what they have and move on.
    pub follow: bool,
}

/// The key a tag's home is chosen by: the digest of `registry/repo:tag`.
pub fn tag_key(registry: &RegistryHost, repo: &RepoName, tag: &str) -> Digest {
    use sha2::Digest as _;
    Digest::from_sha256(&sha2::Sha256::digest(format!("{registry}/{repo}:{tag}").as_bytes()))
}

/// A token bucket capping upload bandwidth.
#[derive(Debug)]
struct RateLimiter {
    rate: f64,
    state: tokio::sync::Mutex<(f64, Instant)>,
}

impl RateLimiter {
    async fn take(&self, n: usize) {
        let mut s = self.state.lock().await;
        let now = Instant::now();
        // At most a quarter second of burst.
        s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.rate).min(self.rate / 4.0);
        s.1 = now;
        s.0 -= n as f64;
        if s.0 < 0.0 {
            // Holding the lock while waiting queues the other uploads behind this one: the cap is shared.
            tokio::time::sleep(Duration::from_secs_f64(-s.0 / self.rate)).await;
        }
    }
}

/// The mesh, shared by the resolver and the transfer server.
#[derive(Debug)]
pub struct Mesh {
    me: PeerId,
    cfg: MeshConfig,
    view: watch::Receiver<Arc<MembersView>>,
    transfer: Arc<Transfer>,
    directory: Mutex<directory::Directory>,
    quarantine: Mutex<HashMap<PeerId, Instant>>,
    holdings: mpsc::UnboundedSender<Holding>,
    source: OnceLock<Weak<dyn Local>>,
    /// The membership epoch the directory was last adjusted to, and until when it may still be missing holders
    /// after that change (they re-announce to new homes).
    settling: Mutex<([u8; 32], Instant)>,
    /// Signalled when announcements were applied to the directory.
    directory_changed: tokio::sync::Notify,
    uploads: Arc<Semaphore>,
    limiter: Option<RateLimiter>,
    metrics: Metrics,
}

/// A tag's home: one for the whole cluster (the key's home in its home zone), so upstream is asked once per tag
/// per TTL however many zones pull it.
fn tag_home(view: &MembersView, key: &Digest) -> PeerId {
    view.home_in(&view.home_zone(key), key).unwrap_or(view.me)
}

impl std::fmt::Debug for dyn Local {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Local")
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().expect("mesh locks are never poisoned: no code panics while holding one")
}

/// Loads this node's identity from `path`, creating it on first start.
fn node_key(path: &Path) -> Result<identity::Keypair, MeshError> {
    let err = |reason: String| MeshError::Key { path: path.to_owned(), reason };
    match std::fs::read(path) {
        Ok(b) => identity::Keypair::from_protobuf_encoding(&b).map_err(|e| err(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let kp = identity::Keypair::generate_ed25519();
            let bytes = kp.to_protobuf_encoding().map_err(|e| err(e.to_string()))?;
            let tmp = path.with_extension("tmp");
            {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .write(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(|e| err(e.to_string()))?;
                f.write_all(&bytes).and_then(|()| f.sync_all()).map_err(|e| err(e.to_string()))?;
            }
            std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))?;
            Ok(kp)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

impl Mesh {
    /// Binds the transfer endpoint and the gossip listener and starts the mesh's tasks. Nothing is served to peers
    /// until [`Mesh::set_local`] is called.
    pub fn start(
        cfg: &MeshConfig,
        data_dir: &Path,
        metrics: Metrics,
        tasks: &TaskTracker,
        cancel: &CancellationToken,
    ) -> Result<Arc<Self>, MeshError> {
        let keypair = node_key(&data_dir.join("node.key"))?;
        let me = keypair.public().to_peer_id();
        let transfer = Arc::new(Transfer::bind(cfg.transfer_listen, me, &cfg.secret, cfg.peer_stall_timeout)?);
        let bound = transfer.local_addr().map_err(|e| TransferError::Bind { addr: cfg.transfer_listen, source: e })?;
        let transfer_addr = SocketAddr::new(cfg.advertise_ip, bound.port());
        let initial = MembersView::new(me, cfg.zone.clone(), Vec::new());
        let initial_epoch = initial.epoch();
        let (view_tx, view) = watch::channel(Arc::new(initial));
        let gossip = gossip::Gossip::new(cfg, keypair, transfer_addr, view_tx, metrics.clone())?;
        let (holdings, rx) = mpsc::unbounded_channel();
        let limiter = cfg
            .upload_rate
            .map(|r| RateLimiter { rate: r as f64, state: tokio::sync::Mutex::new((0.0, Instant::now())) });
        let mesh = Arc::new(Self {
            me,
            cfg: cfg.clone(),
            view,
            transfer: transfer.clone(),
            directory: Mutex::default(),
            quarantine: Mutex::default(),
            holdings,
            source: OnceLock::new(),
            settling: Mutex::new((initial_epoch, Instant::now())),
            directory_changed: tokio::sync::Notify::new(),
            uploads: Arc::new(Semaphore::new(cfg.max_uploads)),
            limiter,
            metrics,
        });
        tracing::info!(peer_id = %me, zone = %cfg.zone, gossip = %cfg.gossip_listen, transfer = %transfer_addr, "mesh started");
        tasks.spawn(gossip.run(cancel.child_token()));
        tasks.spawn(transfer.serve(mesh.clone(), tasks.clone(), cancel.child_token()));
        tasks.spawn(mesh.clone().announce_loop(rx, cancel.child_token()));
        Ok(mesh)
    }

    /// Sets what serves peers' requests (pieces, fetches as a home, tags).
    pub fn set_local(&self, source: Weak<dyn Local>) {
        let _ = self.source.set(source);
    }

    fn local(&self) -> Option<Arc<dyn Local>> {
        self.source.get().and_then(Weak::upgrade)
    }

    /// This node's id.
    pub fn id(&self) -> PeerId {
        self.me
    }

    /// The current membership.
    pub fn view(&self) -> Arc<MembersView> {
        self.view.borrow().clone()
    }

    /// Waits until at least one other member is alive, or `within` passed. Returns whether one is.
    pub async fn joined(&self, within: Duration) -> bool {
        let mut rx = self.view.clone();
        tokio::time::timeout(within, rx.wait_for(|v| v.members.iter().any(|(_, s)| *s == Liveness::Alive)))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Records what this node holds; the digest's home is told shortly (at once when it is this node).
    pub fn hold(&self, h: Holding) {
        if self.view().home(&h.digest) == self.me {
            let mut dir = lock(&self.directory);
            dir.apply(self.me, &h);
            self.directory_gauges(&dir);
        }
        let _ = self.holdings.send(h);
    }

    /// Asks the digest's home who holds it (complete holders first). `None` when nobody usable does or the home
    /// cannot be asked.
    pub async fn locate(&self, digest: &Digest) -> Option<Located> {
        let view = self.view();
        let home = view.home(digest);
        if home == self.me {
            let usable = |p: &PeerId| view.is_alive(p) && !self.is_quarantined(p);
            return lock(&self.directory).locate(digest, &self.me, usable);
        }
        self.locate_at(home, digest, None, LOCATE_TIMEOUT).await.ok().flatten()
    }

    /// Asks `home` about `digest`; with an order, as a member about to download it (the home fetches it if
    /// nobody has it). `Err` when the home could not be asked (as opposed to "nobody usable holds it").
    async fn locate_at(
        &self,
        home: PeerId,
        digest: &Digest,
        order: Option<&Order>,
        within: Duration,
    ) -> Result<Option<Located>, FetchError> {
        let view = self.view();
        let Some(addr) = view.transfer_addr(&home) else {
            return Err(FetchError::Connect(format!("{home} is not an alive member")));
        };
        let req = request::Kind::Locate(peer::Locate { digest: digest.to_string(), fetch: order.map(Order::to_wire) });
        // A locate is on every miss's path: a home that died but is not dead in the view yet must not hold the
        // client up. Without an order the answer is immediate; with one the home first gets the size (from
        // upstream, possibly): wait for that, but stop as soon as the home stops looking alive.
        let answer = match order {
            None => tokio::time::timeout(
                LOCATE_TIMEOUT.min(self.cfg.peer_stall_timeout),
                self.transfer.call(home, addr, req),
            )
            .await
            .unwrap_or(Err(FetchError::Stall(LOCATE_TIMEOUT))),
            Some(_) => {
                let mut rx = self.view.clone();
                tokio::select! {
                    r = self.transfer.call_within(home, addr, req, within) => r,
                    _ = rx.wait_for(|v| !v.is_alive(&home)) => Err(FetchError::Connect(format!("{home} stopped looking alive"))),
                }
            }
        };
        let usable = |p: &PeerId| *p != self.me && view.is_alive(p) && !self.is_quarantined(p);
        match answer {
            Ok(response::Kind::Located(l)) => {
                let holders: Vec<(PeerId, HolderState)> = l
                    .holders
                    .iter()
                    .filter_map(|h| {
                        let id = PeerId::from_bytes(&h.peer_id).ok()?;
                        usable(&id).then_some((id, HolderState { complete: h.complete, public: h.public }))
                    })
                    .take(directory::MAX_LOCATED)
                    .collect();
                Ok((!holders.is_empty()).then_some(Located { size: l.size, media_type: l.media_type, holders }))
            }
            Ok(_) => {
                self.failure(TransferFailure::protocol);
                Err(FetchError::Protocol("answer to a locate is not a location".into()))
            }
            Err(FetchError::Refused {
                code: code @ (Code::NotFound | Code::Unavailable | Code::UpstreamDown),
                message,
            }) => {
                tracing::debug!(%home, %digest, message, "home has no source");
                if let (Code::UpstreamDown, Some(order), Some(local)) = (code, order, self.local()) {
                    local.upstream_reported_down(&order.registry, &message);
                }
                Ok(None)
            }
            Err(e) => {
                self.count_failure(&e);
                tracing::debug!(%home, error = %e, "home could not be asked");
                Err(e)
            }
        }
    }

    /// Where to download `digest` from, for a client this `order` describes: tiers of sources to try in turn
    /// before upstream. On a member that is not the digest's home: what the home answered (it starts the zone's
    /// one download if nobody has it). On the home: complete holders in the zone; what partial holders have
    /// (after the previous home died); then another zone: the digest's home zone's home (which fetches it for the
    /// cluster), or, in the home zone, complete holders in other zones. Empty: go upstream.
    /// `within` bounds the wait for a home that fetches from upstream first.
    pub async fn sources(&self, digest: &Digest, order: &Order, within: Duration) -> Vec<Tier> {
        let mut view = self.view();
        let mut home = view.home(digest);
        // A home that cannot be reached is asked again once membership moved the digest to another home.
        for attempt in 0..2 {
            if home == self.me {
                break;
            }
            match self.locate_at(home, digest, Some(order), within).await {
                Ok(Some(located)) => return vec![Tier { located, follow: true }],
                Ok(None) => return Vec::new(),
                Err(_) if attempt == 0 => {
                    let mut rx = self.view.clone();
                    let moved =
                        tokio::time::timeout(self.cfg.dead_after * 2, rx.wait_for(|v| v.home(digest) != home)).await;
                    if moved.is_err() {
                        return Vec::new();
                    }
                    view = self.view();
                    home = view.home(digest);
                }
                Err(_) => return Vec::new(),
            }
        }
        if home != self.me {
            return Vec::new();
        }
        let usable = |p: &PeerId| view.is_alive(p) && !self.is_quarantined(p);
        let mut tiers = Vec::new();
        let local = self.settled_locate(digest, usable).await;
        if let Some(loc) = local {
            let (complete, partial): (Vec<_>, Vec<_>) = loc.holders.iter().partition(|(_, s)| s.complete);
            if !complete.is_empty() {
                return vec![Tier { located: Located { holders: complete, ..loc }, follow: false }];
            }
            tiers.push(Tier { located: Located { holders: partial, ..loc }, follow: false });
        }
        let home_zone = view.home_zone(digest);
        if home_zone != view.zone {
            if let Some(h) = view.home_in(&home_zone, digest)
                && let Ok(Some(located)) = self.locate_at(h, digest, Some(order), within).await
            {
                tiers.push(Tier { located, follow: true });
            }
        } else {
            let asks = view
                .zones()
                .into_iter()
                .filter(|z| *z != view.zone)
                .filter_map(|z| view.home_in(&z, digest))
                .map(|h| self.locate_at(h, digest, None, LOCATE_TIMEOUT));
            for mut located in futures_util::future::join_all(asks).await.into_iter().flatten().flatten() {
                // Partial holders elsewhere follow this zone (their zone's home asked here): only complete ones.
                located.holders.retain(|(_, s)| s.complete);
                if !located.holders.is_empty() {
                    tiers.push(Tier { located, follow: false });
                }
            }
        }
        tiers
    }

    /// The digest's home now.
    pub fn home_of(&self, digest: &Digest) -> PeerId {
        self.view.borrow().home(digest)
    }

    /// Resolves once the digest's home is another member than `from` (it died, or a member joined).
    pub async fn home_moved(&self, digest: &Digest, from: PeerId) {
        let mut rx = self.view.clone();
        if rx.wait_for(|v| v.home(digest) != from).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Asks the tag's home (one in the cluster) for the digest a tag names. `None` when this node is the home, or the home cannot
    /// answer (then this node asks upstream itself, and its client gets upstream's own answer).
    pub async fn resolve_tag(&self, order: &Order, tag: &str, within: Duration) -> Option<TagAnswer> {
        let view = self.view();
        let home = tag_home(&view, &tag_key(&order.registry, &order.repo, tag));
        if home == self.me {
            return None;
        }
        let addr = view.transfer_addr(&home)?;
        let req = request::Kind::ResolveTag(peer::ResolveTag { order: Some(order.to_wire()), tag: tag.to_owned() });
        let mut rx = self.view.clone();
        let answer = tokio::select! {
            r = self.transfer.call_within(home, addr, req, within) => r,
            _ = rx.wait_for(|v| !v.is_alive(&home)) => return None,
        };
        match answer {
            Ok(response::Kind::Tag(t)) => match Digest::parse(&t.digest) {
                Ok(digest) if t.media_type.as_ref().is_none_or(|m| m.len() <= 255) => {
                    self.metrics.mesh.tags_from_home.inc();
                    Some(TagAnswer { digest, fetched_at: t.fetched_at, media_type: t.media_type })
                }
                _ => {
                    self.failure(TransferFailure::protocol);
                    None
                }
            },
            Ok(_) => {
                self.failure(TransferFailure::protocol);
                None
            }
            Err(e) => {
                match &e {
                    FetchError::Refused { code: Code::UpstreamDown, message } => {
                        if let Some(local) = self.local() {
                            local.upstream_reported_down(&order.registry, message);
                        }
                    }
                    FetchError::Refused { .. } => {}
                    _ => self.count_failure(&e),
                }
                tracing::debug!(%home, tag, error = %e, "tag home could not answer");
                None
            }
        }
    }

    fn failure(&self, reason: TransferFailure) {
        self.metrics.mesh.failures.get_or_create(&FailureLabels { reason }).inc();
    }

    fn count_failure(&self, e: &FetchError) {
        self.failure(match e {
            FetchError::Connect(_) => TransferFailure::connect,
            FetchError::Stall(_) => TransferFailure::stall,
            FetchError::Protocol(_) => TransferFailure::protocol,
            FetchError::Refused { .. } => TransferFailure::refused,
            FetchError::HashMismatch => TransferFailure::hash_mismatch,
        });
    }

    /// Fetches one piece from `peer`, checked against its hash; a partial holder may wait up to `wait` for it.
    /// A peer whose piece fails the check is quarantined.
    pub async fn fetch_piece(
        &self,
        peer: PeerId,
        digest: &Digest,
        (offset, len): (u64, u32),
        wait: Duration,
    ) -> Result<VerifiedPiece, FetchError> {
        let view = self.view();
        let Some(addr) = view.reachable_addr(&peer) else {
            return Err(FetchError::Connect(format!("{peer} is not a member or is dead")));
        };
        // The holder caps the wait below its stall timeout; so does the asker, so a wait is never a stall.
        let wait = wait.min(self.cfg.peer_stall_timeout / 2);
        match self.transfer.get_piece(peer, addr, digest, (offset, len), wait).await {
            Ok(p) => {
                self.metrics.mesh.bytes_received.inc_by(p.len());
                if view.zone_of(&peer).is_some_and(|z| z != view.zone) {
                    self.metrics.mesh.bytes_received_cross_zone.inc_by(p.len());
                }
                Ok(p)
            }
            Err(e) => {
                // A piece not there yet is not a failure of the peer; the caller waits for it.
                if !matches!(e, FetchError::Refused { code: Code::NotReady, .. }) {
                    self.count_failure(&e);
                }
                if matches!(e, FetchError::HashMismatch) {
                    self.quarantine(peer, "a piece failed its blake3 check");
                }
                Err(e)
            }
        }
    }

    /// Keeps `peer` out of every choice of source or home for the quarantine period.
    pub fn quarantine(&self, peer: PeerId, reason: &str) {
        tracing::warn!(%peer, reason, until = ?self.cfg.peer_quarantine, "peer quarantined");
        let mut q = lock(&self.quarantine);
        q.insert(peer, Instant::now() + self.cfg.peer_quarantine);
        self.metrics.mesh.quarantined.set(q.len() as i64);
    }

    /// Whether `peer` is in quarantine.
    pub fn is_quarantined(&self, peer: &PeerId) -> bool {
        let mut q = lock(&self.quarantine);
        let now = Instant::now();
        let before = q.len();
        q.retain(|_, until| *until > now);
        if q.len() != before {
            self.metrics.mesh.quarantined.set(q.len() as i64);
        }
        q.contains_key(peer)
    }

    /// Says goodbye: closes the transfer endpoint (gossip announces the leave itself when cancelled).
    pub async fn close(&self) {
        self.transfer.close().await;
    }

    async fn announce_loop(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Holding>, cancel: CancellationToken) {
        let mut ann = Announcer::new();
        let mut view = self.view.clone();
        let mut epoch = view.borrow().epoch();
        lock(&self.settling).0 = epoch;
        let mut flush = tokio::time::interval(ANNOUNCE_EVERY);
        let mut full = tokio::time::interval(REANNOUNCE_EVERY);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                h = rx.recv() => {
                    let Some(h) = h else { return };
                    ann.hold(h);
                }
                r = view.changed() => {
                    if r.is_err() { return; }
                    let v = view.borrow_and_update().clone();
                    let e = v.epoch();
                    let me = self.me;
                    let mut dir = lock(&self.directory);
                    dir.prune(|p| *p == me || v.reachable_addr(p).is_some());
                    if e != epoch {
                        // Homes may have moved: what is homed elsewhere now is told to the new home by its holders,
                        // this node included; what stayed put is not announced again.
                        dir.keep_homed(|d| v.home(d) == me);
                        *lock(&self.settling) = (e, Instant::now() + self.settle_time());
                        epoch = e;
                        let moved = ann.view_changed(|d| v.home_instance(d));
                        tracing::debug!(moved, held = ann.held(), "membership changed: re-announcing what moved");
                    }
                    self.directory_gauges(&dir);
                    drop(dir);
                }
                _ = full.tick() => ann.reannounce_all(),
                _ = flush.tick() => {
                    if ann.pending() > 0 {
                        let v = self.view();
                        for (home, batch) in ann.take_batches(|d| v.home_instance(d), ANNOUNCE_BATCH) {
                            if self.send_announcements(&v, home.0, &batch).await {
                                ann.delivered(home, &batch);
                            } else {
                                // Retried with the next flush; a later full announcement covers the rest.
                                ann.undelivered(batch);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Sends one batch of holdings to their home; returns whether it was delivered.
    async fn send_announcements(&self, view: &MembersView, home: PeerId, batch: &[Holding]) -> bool {
        if home == self.me {
            let mut dir = lock(&self.directory);
            for h in batch {
                dir.apply(self.me, h);
            }
            self.directory_gauges(&dir);
            return true;
        }
        let Some(addr) = view.transfer_addr(&home) else { return false };
        let req = request::Kind::Announce(peer::Announce { holdings: batch.iter().map(Holding::to_wire).collect() });
        match self.transfer.call(home, addr, req).await {
            Ok(_) => true,
            Err(e) => {
                self.count_failure(&e);
                tracing::debug!(%home, error = %e, "announcement not delivered");
                false
            }
        }
    }

    fn apply_announcement(&self, peer: PeerId, a: peer::Announce) {
        let mut dir = lock(&self.directory);
        for h in a.holdings.into_iter().take(ANNOUNCE_BATCH) {
            match Holding::from_wire(h) {
                Ok(h) => {
                    if !dir.apply(peer, &h) {
                        tracing::warn!("directory full: announcement dropped");
                        break;
                    }
                }
                Err(e) => tracing::debug!(%peer, error = %e, "bad announcement ignored"),
            }
        }
        self.directory_gauges(&dir);
        drop(dir);
        self.directory_changed.notify_waiters();
    }

    /// How long holders take to re-announce to a new home: they see the change up to a gossip round later, and
    /// batch announcements.
    fn settle_time(&self) -> Duration {
        self.cfg.gossip_interval * 2 + ANNOUNCE_EVERY * 2
    }

    /// What this node's directory knows of `digest` (as its home), waiting while it is still being rebuilt after
    /// homes moved if it knows nobody yet.
    async fn settled_locate(&self, digest: &Digest, usable: impl Fn(&PeerId) -> bool) -> Option<Located> {
        let latest = Instant::now() + self.settle_time();
        loop {
            let changed = self.directory_changed.notified();
            let found = lock(&self.directory).locate(digest, &self.me, &usable);
            let until = self.settling_until().min(latest);
            if found.is_some() || Instant::now() >= until {
                return found;
            }
            let _ = tokio::time::timeout_at(until.into(), changed).await;
        }
    }

    /// Until when the directory may be missing holders: a while after the last membership change, counted from
    /// now if the announcer has not even seen the latest one.
    fn settling_until(&self) -> Instant {
        let (epoch, until) = *lock(&self.settling);
        if self.view().epoch() != epoch { Instant::now() + self.settle_time() } else { until }
    }

    fn directory_gauges(&self, dir: &directory::Directory) {
        self.metrics.mesh.directory_digests.set(dir.len() as i64);
        self.metrics.mesh.directory_holders.set(dir.holders() as i64);
    }

    /// Answers a locate. Without an order: who holds it (complete first). With one, from a member about to
    /// download it: if no usable complete holder is known, this node makes sure it downloads it itself (the one
    /// download for the zone), then hands the asker a few sources ahead of it ([`directory::Directory::sources`])
    /// and records the asker (of this zone) as a partial holder, a source for later askers.
    async fn answer_locate(
        &self,
        asker: PeerId,
        digest: &Digest,
        order: Option<Order>,
    ) -> Result<Located, (Code, String)> {
        let view = self.view();
        let usable = |p: &PeerId| *p == self.me || (view.is_alive(p) && !self.is_quarantined(p));
        let Some(order) = order else {
            return lock(&self.directory)
                .locate(digest, &asker, usable)
                .ok_or_else(|| (Code::NotFound, "no holder known".to_owned()));
        };
        let same_zone = view.zone_of(&asker) == Some(view.zone.as_str());
        // Views disagree for a moment after a change (the asker may see a death first): give this node's view the
        // time to agree. Two nodes that each think the other is the home would wait on each other: past that, the
        // asker goes upstream instead.
        if view.home(digest) != self.me {
            let mut rx = self.view.clone();
            let agreed = tokio::time::timeout(self.settle_time(), rx.wait_for(|v| v.home(digest) == self.me)).await;
            if !matches!(agreed, Ok(Ok(_))) {
                return Err((Code::NotFound, "not the digest's home".to_owned()));
            }
        }
        let view = self.view();
        let usable = |p: &PeerId| *p == self.me || (view.is_alive(p) && !self.is_quarantined(p));
        let needs_origin = lock(&self.directory).needs_origin(digest, &asker, usable);
        if needs_origin {
            let Some(local) = self.local() else { return Err((Code::NotFound, "not serving".to_owned())) };
            let f = local
                .clone()
                .fetch(digest.clone(), order.clone())
                .await
                .map_err(|e| (refusal(&*local, &order.registry), e))?;
            if f.started {
                self.metrics.mesh.home_fetches.inc();
            }
            let mut dir = lock(&self.directory);
            dir.apply(
                self.me,
                &Holding {
                    digest: digest.clone(),
                    size: f.size,
                    media_type: f.media_type,
                    complete: f.complete,
                    public: f.public,
                    removed: false,
                },
            );
        }
        let mut dir = lock(&self.directory);
        let record = same_zone.then_some(order.auth.is_none());
        let loc = dir
            .hand_out(digest, &asker, &self.me, usable, record)
            .ok_or_else(|| (Code::NotFound, "no holder known".to_owned()))?;
        self.directory_gauges(&dir);
        Ok(loc)
    }

    async fn serve_piece(&self, send: &mut quinn::SendStream, p: peer::GetPiece) {
        let Ok(digest) = Digest::parse(&p.digest) else {
            return respond_error(send, Code::BadRequest, "bad digest").await;
        };
        let Some(source) = self.local() else {
            return respond_error(send, Code::NotFound, "not serving").await;
        };
        let wait = Duration::from_millis(u64::from(p.wait_ms)).min(self.cfg.peer_stall_timeout / 2);
        // The wait for a piece being downloaded comes before the upload slot: waiting askers do not hold slots.
        let piece = source.piece(digest, p.offset, p.length, wait).await;
        let Ok(_permit) = self.uploads.clone().try_acquire_owned() else {
            self.metrics.mesh.uploads_refused.inc();
            return respond_error(send, Code::Busy, "upload limit reached").await;
        };
        let piece = match piece {
            Ok(piece) => piece,
            Err(e) => {
                let code = match e {
                    PieceRefusal::NotFound => Code::NotFound,
                    PieceRefusal::NotReady => Code::NotReady,
                    PieceRefusal::BadRequest(_) => Code::BadRequest,
                    PieceRefusal::Internal(_) => Code::Internal,
                };
                return respond_error(send, code, e.to_string()).await;
            }
        };
        let header = peer::PieceHeader {
            length: piece.data.len() as u32,
            blake3: piece.hash.to_vec(),
            blob_size: piece.blob_size,
        };
        let data = piece.data;
        #[cfg(feature = "fault-injection")]
        let (header, data) = crate::fault::piece(header, data);
        let frame = crate::transfer::encode_frame(&peer::Response { kind: Some(response::Kind::Piece(header)) });
        if send.write_all(&frame).await.is_err() {
            return;
        }
        let mut at = 0;
        while at < data.len() {
            // Slices of the read buffer go to quinn as they are: no copy.
            let chunk = data.slice(at..(at + UPLOAD_CHUNK).min(data.len()));
            at += chunk.len();
            if let Some(l) = &self.limiter {
                l.take(chunk.len()).await;
            }
            let n = chunk.len() as u64;
            if send.write_chunk(chunk).await.is_err() {
                return;
            }
            self.metrics.mesh.bytes_sent.inc_by(n);
        }
        let _ = send.finish();
    }
}

impl Service for Mesh {
    fn handle(
        self: Arc<Self>,
        peer: PeerId,
        req: request::Kind,
        mut send: quinn::SendStream,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            match req {
                request::Kind::Announce(a) => {
                    self.apply_announcement(peer, a);
                    respond(&mut send, response::Kind::Announced(peer::AnnounceAck {})).await;
                }
                request::Kind::Locate(l) => {
                    let Ok(digest) = Digest::parse(&l.digest) else {
                        return respond_error(&mut send, Code::BadRequest, "bad digest").await;
                    };
                    let order = match l.fetch.map(Order::from_wire).transpose() {
                        Ok(o) => o,
                        Err(e) => return respond_error(&mut send, Code::BadRequest, e).await,
                    };
                    match self.answer_locate(peer, &digest, order).await {
                        Ok(loc) => {
                            let holders = loc
                                .holders
                                .iter()
                                .map(|(p, s)| peer::Holder {
                                    peer_id: p.to_bytes(),
                                    complete: s.complete,
                                    public: s.public,
                                })
                                .collect();
                            let l = peer::Located { size: loc.size, media_type: loc.media_type, holders };
                            respond(&mut send, response::Kind::Located(l)).await;
                        }
                        Err((code, message)) => respond_error(&mut send, code, message).await,
                    }
                }
                request::Kind::ResolveTag(t) => {
                    let order = match t.order.ok_or_else(|| "no order".to_owned()).and_then(Order::from_wire) {
                        Ok(o) => o,
                        Err(e) => return respond_error(&mut send, Code::BadRequest, e).await,
                    };
                    if !matches!(Reference::parse(&t.tag), Ok(Reference::Tag(_))) {
                        return respond_error(&mut send, Code::BadRequest, "bad tag").await;
                    }
                    if tag_home(&self.view(), &tag_key(&order.registry, &order.repo, &t.tag)) != self.me {
                        return respond_error(&mut send, Code::NotFound, "not the tag's home").await;
                    }
                    let Some(local) = self.local() else {
                        return respond_error(&mut send, Code::NotFound, "not serving").await;
                    };
                    let registry = order.registry.clone();
                    match local.clone().resolve_tag(order, t.tag).await {
                        Ok(a) => {
                            let r = peer::TagResolved {
                                digest: a.digest.to_string(),
                                fetched_at: a.fetched_at,
                                media_type: a.media_type,
                            };
                            respond(&mut send, response::Kind::Tag(r)).await;
                        }
                        Err(e) => respond_error(&mut send, refusal(&*local, &registry), e).await,
                    }
                }
                request::Kind::GetPiece(p) => self.serve_piece(&mut send, p).await,
                request::Kind::Hello(_) => respond_error(&mut send, Code::BadRequest, "already authenticated").await,
            }
        })
    }
}
