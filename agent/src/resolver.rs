//! The resolver: the one place that decides where a manifest's or blob's bytes come from, in order: a copy this
//! node has (its store, else containerd's), a download already running on this node, peers that hold it (through
//! the [`Mesh`]), then upstream. Tags resolve against upstream only (`tags.rs`).
//!
//! The parts:
//! - `download.rs`: the single flight per digest: a tracked task that fills a partial file from peers (the
//!   [`PieceScheduler`](crate::swarm::scheduler::PieceScheduler) decides which source gets which piece) and then
//!   upstream, hashing as it writes, and commits it; readers follow its progress.
//! - `body.rs`: response bodies, one reader per source, none sending the last byte of content not yet verified.
//! - `access.rs`: who may be given content fetched under a client's credentials.
//! - `peers.rs`: serving members (pieces, and fetches as a digest's home) through [`Local`](crate::mesh::Local).
//!
//! Access to cached content follows upstream's word: content fetched without a client's credentials is public;
//! content a client's credentials were needed for is served from the cache only after a registry trusted for it
//! accepted that client's credentials for that repository (cached for `auth_ttl`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderValue, header};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

mod access;
mod body;
mod download;
mod from_peers;
mod peers;
mod sink;
mod tags;
mod trade;
mod upkeep;

use access::{Access, Decision, Provenance};
pub use body::{Opened, RESPONSE_BUFFERS, ResponseBudget, Served};
use body::{OpenedSource, PassThrough};
use download::{Download, Progress, wait_progress};
pub use download::{FETCHES_KEPT, FetchRecord, Tally};
use peers::order;
use sink::Room;
pub use upkeep::EvictError;

use crate::containerd::{Change, Containerd, ContentAccess, Held};
use crate::mesh::{Fetched, Holding, Mesh};
use crate::metrics::{LookupKind, LookupLabels, LookupResult, Metrics};
pub use crate::oci::Kind;
use crate::oci::{Digest, Reference, RegistryHost, RepoName};
use crate::store::{BlobMeta, LinkRecord, Store, StoreError, now_secs};
use crate::upstream::{Request, Target, Upstream, UpstreamError};

/// Largest manifest accepted from upstream (the distribution spec suggests 4 MiB).
pub const MAX_MANIFEST_SIZE: u64 = 4 << 20;
/// Tag answers and repository links not refreshed for this long are forgotten (a tag is served stale through an
/// upstream outage for at most this long).
pub const RECORD_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often, in bytes written, a download of unannounced length checks the file system's free space.
const ROOM_CHECK_EVERY: u64 = 8 << 20;

/// Why a manifest or blob cannot be served. Every variant is decided before the first byte is sent.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ResolveError {
    /// Neither the cache nor upstream has it.
    #[error("not found")]
    NotFound,
    /// Upstream wants the client to authenticate; its challenge goes back to the client.
    #[error("authentication required")]
    Unauthorized {
        /// Upstream's `WWW-Authenticate`.
        challenge: Option<HeaderValue>,
    },
    /// Upstream refused the client's credentials.
    #[error("access denied by upstream")]
    Denied,
    /// This agent cannot serve it now (upstream unreachable, registry not allowed, a local failure): the client
    /// should go to the next host.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The store has no room for it: it can be served through without being cached.
    #[error("no room to cache it: {0}")]
    NoSpace(String),
}

impl From<UpstreamError> for ResolveError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::NotFound => Self::NotFound,
            UpstreamError::Unauthorized { challenge } => Self::Unauthorized { challenge },
            UpstreamError::Denied => Self::Denied,
            e @ (UpstreamError::NotAllowed(_) | UpstreamError::Unreachable(_) | UpstreamError::Status(_)) => {
                Self::Unavailable(e.to_string())
            }
        }
    }
}

impl From<StoreError> for ResolveError {
    fn from(e: StoreError) -> Self {
        Self::Unavailable(format!("store: {e}"))
    }
}

/// Who asks, for what repository: the identity that access decisions are made for.
#[derive(Debug, Clone)]
pub struct Client {
    /// The registry (containerd's `ns`).
    pub registry: RegistryHost,
    /// The repository.
    pub repo: RepoName,
    /// The client's `Authorization`, if any.
    pub auth: Option<HeaderValue>,
    /// The client's `Accept`, for manifests.
    pub accept: Option<HeaderValue>,
}

impl Client {
    fn repo_key(&self) -> String {
        format!("{}/{}", self.registry, self.repo)
    }

    /// An upstream request on this client's behalf (its `Accept` and `Authorization`).
    fn request<'a>(&'a self, target: Target<'a>, head: bool) -> Request<'a> {
        Request {
            registry: &self.registry,
            repo: &self.repo,
            target,
            head,
            accept: self.accept.as_ref(),
            client_auth: self.auth.as_ref(),
            offset: 0,
            end: None,
        }
    }
}

/// What to ask upstream for, for a digest of this kind.
fn target<'a>(kind: Kind, digest: &'a Digest, reference: &'a Reference) -> Target<'a> {
    match kind {
        Kind::Blob => Target::Blob(digest),
        Kind::Manifest => Target::Manifest(reference),
    }
}

/// Resolver settings.
#[derive(Debug, Clone)]
pub struct ResolverConfig {
    /// Tag cache TTL.
    pub tag_ttl: Duration,
    /// Trust period of accepted client credentials.
    pub auth_ttl: Duration,
    /// Start GC above this many bytes.
    pub gc_high_bytes: u64,
    /// GC down to this many bytes.
    pub gc_low_bytes: u64,
    /// Free bytes the store's file system keeps after a download: what does not fit is served through.
    pub min_free_space: u64,
    /// A download nobody wants for this long (its clients left, no member asks for its pieces) is abandoned: it
    /// would otherwise go on fetching, and filling the disk, for nobody ([`ABANDON_AFTER`] in the agent).
    pub abandon_after: Duration,
}

/// How long a download may go on with nobody wanting it.
pub const ABANDON_AFTER: Duration = Duration::from_secs(30);

/// The other holders of bytes a resolver uses besides its store and upstream.
#[derive(Debug, Default)]
pub struct Others {
    /// The peer mesh.
    pub mesh: Option<Arc<Mesh>>,
    /// The node's containerd.
    pub containerd: Option<Arc<Containerd>>,
}

/// A copy of a digest this node already has.
#[derive(Debug)]
enum LocalCopy {
    /// In the store.
    Stored(BlobMeta),
    /// In containerd's content store; `public` when containerd's content is the node's to give.
    Containerd { held: Held, public: bool },
}

/// The resolver, shared by every request.
#[derive(Debug)]
pub struct Resolver {
    store: Arc<Store>,
    upstream: Arc<Upstream>,
    cfg: ResolverConfig,
    metrics: Metrics,
    downloads: Mutex<HashMap<Digest, Arc<Download>>>,
    /// The latest downloads' records, newest first (`shoal explain`).
    fetches: Mutex<std::collections::VecDeque<(Digest, FetchRecord)>>,
    /// Tags being resolved: one resolution per tag at a time.
    tag_gates: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    in_use: Arc<Mutex<HashMap<Digest, usize>>>,
    /// Credentials upstream accepted.
    access: Access,
    /// Response buffers, shared by every response.
    budget: ResponseBudget,
    gc_running: AtomicBool,
    /// Bytes that running downloads have yet to write (what the free-space check must leave them).
    reserved: Arc<AtomicU64>,
    /// Downloads this node runs as their digest's home: it brings those blobs into its zone, and its other
    /// exchanges take one piece at a time meanwhile (`resolver/trade.rs`).
    bringing_in: AtomicUsize,
    tasks: TaskTracker,
    cancel: CancellationToken,
    mesh: Option<Arc<Mesh>>,
    containerd: Option<Arc<Containerd>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().expect("resolver locks are never poisoned: no code panics while holding one")
}

/// Runs blocking store work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ResolveError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ResolveError::Unavailable(format!("blocking task failed: {e}")))?
        .map_err(ResolveError::from)
}

/// Keeps a digest out of GC while it is being served.
#[derive(Debug)]
struct InUse {
    digest: Digest,
    map: Arc<Mutex<HashMap<Digest, usize>>>,
}

impl Drop for InUse {
    fn drop(&mut self) {
        let mut m = lock(&self.map);
        if let Some(n) = m.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.digest);
            }
        }
    }
}

impl Resolver {
    /// Creates the resolver. Downloads run as tasks of `tasks` and stop when `cancel` fires. With a mesh, it
    /// looks for peers before upstream (members' requests reach it once the agent hands it to [`Mesh::serve`]).
    pub fn new(
        store: Arc<Store>,
        upstream: Arc<Upstream>,
        cfg: ResolverConfig,
        metrics: Metrics,
        tasks: TaskTracker,
        cancel: CancellationToken,
        others: Others,
    ) -> Arc<Self> {
        let Others { mesh, containerd } = others;
        Arc::new(Self {
            store,
            upstream,
            access: Access::new(cfg.auth_ttl),
            budget: ResponseBudget::new(RESPONSE_BUFFERS),
            cfg,
            metrics,
            downloads: Mutex::default(),
            fetches: Mutex::default(),
            tag_gates: Mutex::default(),
            in_use: Arc::default(),
            gc_running: AtomicBool::new(false),
            reserved: Arc::default(),
            bringing_in: AtomicUsize::new(0),
            tasks,
            cancel,
            mesh,
            containerd,
        })
    }

    /// Tells the mesh about every blob in the store (at start).
    pub async fn announce_stored(&self) -> Result<(), ResolveError> {
        let Some(mesh) = &self.mesh else { return Ok(()) };
        let store = self.store.clone();
        for (digest, meta) in blocking(move || store.list_blobs()).await? {
            mesh.hold(stored(digest, meta));
        }
        Ok(())
    }

    /// Announces what containerd now holds, and withdraws what it no longer holds (unless the store or a
    /// download still has it).
    pub async fn containerd_changed(&self, batch: Vec<Change>) {
        let Some(mesh) = &self.mesh else { return };
        let public = self.containerd.as_ref().is_some_and(|c| c.config().access == ContentAccess::Node);
        for change in batch {
            match change {
                Change::Added(digest, held) => mesh.hold(Holding {
                    digest,
                    size: held.size,
                    media_type: held.media_type,
                    complete: true,
                    public,
                    removed: false,
                }),
                Change::Removed(digest) => {
                    let store = self.store.clone();
                    let d = digest.clone();
                    let meta = blocking(move || store.blob(&d)).await.ok().flatten();
                    let downloading = lock(&self.downloads).contains_key(&digest);
                    match meta {
                        Some(meta) => mesh.hold(stored(digest, meta)),
                        None if !downloading => mesh.hold(removed(digest)),
                        None => {}
                    }
                }
            }
        }
    }

    /// The image containerd has under this client's `registry/repo:tag`, when its content is the node's to give.
    fn containerd_tag(&self, client: &Client, tag: &str) -> Option<(Digest, Option<String>)> {
        let c = self.containerd.as_ref().filter(|c| c.config().access == ContentAccess::Node)?;
        let (digest, media_type) = c.tag(client.registry.as_str(), client.repo.as_str(), tag)?;
        c.held(&digest)?;
        accepts(client.accept.as_ref(), media_type.as_deref()).then_some((digest, media_type))
    }

    fn containerd_holds(&self, digest: &Digest) -> bool {
        self.containerd.as_ref().is_some_and(|c| c.held(digest).is_some())
    }

    /// The budget response bodies read into.
    pub fn response_budget(&self) -> &ResponseBudget {
        &self.budget
    }

    /// The upstream client.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    fn lookup(&self, kind: LookupKind, result: LookupResult) {
        self.metrics.mirror.lookups.get_or_create(&LookupLabels { kind, result }).inc();
    }

    fn guard(&self, digest: &Digest) -> InUse {
        *lock(&self.in_use).entry(digest.clone()).or_default() += 1;
        InUse { digest: digest.clone(), map: self.in_use.clone() }
    }

    /// How long a member waits for a home that fetches something first (its size, from upstream).
    fn home_wait(&self) -> Duration {
        self.upstream.stall_timeout() * 2
    }

    /// Checks that `client` may be given a copy of `digest` of this `provenance` from the cache (see
    /// [`access`]): it is public, or a registry trusted for it accepts the client's credentials for the client's
    /// repository (now, within `auth_ttl`, or, while that registry is unreachable, ever since start).
    async fn authorize(
        &self,
        client: &Client,
        digest: &Digest,
        kind: Kind,
        provenance: &Provenance,
    ) -> Result<(), ResolveError> {
        if provenance.public {
            return Ok(());
        }
        let link_key = format!("{}@{digest}", client.repo_key());
        let store = self.store.clone();
        let lk = link_key.clone();
        let link = blocking(move || store.link(&lk)).await.unwrap_or(None);
        let origin = self.access.origin(client);
        let configured = self.upstream.is_configured(&client.registry);
        match self.access.decide(&origin, provenance, link.map(|l| l.public), configured, Instant::now()) {
            Decision::Allow => return Ok(()),
            Decision::Untrusted => {
                return Err(ResolveError::Unavailable(format!(
                    "{digest} is cached from another registry under credentials; {} is not configured and did not \
                     serve it, so it cannot vouch for this client",
                    client.registry
                )));
            }
            Decision::AskUpstream => {}
        }
        let reference = Reference::Digest(digest.clone());
        let req = client.request(target(kind, digest, &reference), true);
        match self.upstream.send(req).await {
            Ok(_) => {
                self.access.note_accepted(&origin, Instant::now());
                let public = client.auth.is_none();
                let store = self.store.clone();
                blocking(move || store.put_link(&link_key, LinkRecord { public, at: now_secs() })).await?;
                Ok(())
            }
            Err(UpstreamError::Unreachable(_)) if link.is_some() && self.access.accepted_ever(&origin) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The copy of `digest` this node already has (the store's, else containerd's), if `client` may have it.
    async fn local_copy(
        &self,
        client: &Client,
        digest: &Digest,
        kind: Kind,
    ) -> Result<Option<LocalCopy>, ResolveError> {
        let store = self.store.clone();
        let d = digest.clone();
        if let Some(meta) = blocking(move || store.blob(&d)).await? {
            let provenance = Provenance { public: meta.public, registry: meta.registry.clone() };
            self.authorize(client, digest, kind, &provenance).await?;
            return Ok(Some(LocalCopy::Stored(meta)));
        }
        let Some(c) = &self.containerd else { return Ok(None) };
        let Some(held) = c.held(digest) else { return Ok(None) };
        // containerd does not say which registry its content came from: under `Upstream` access, only a configured
        // registry can vouch for it.
        let public = c.config().access == ContentAccess::Node;
        self.authorize(client, digest, kind, &Provenance { public, registry: None }).await?;
        Ok(Some(LocalCopy::Containerd { held, public }))
    }

    /// Opens a blob or a manifest by digest for streaming: from the store, a running download, or a new
    /// download from upstream.
    ///
    /// A `head` request for a blob that is neither stored nor in flight asks upstream for the headers only: a
    /// client checking that a blob exists does not start a download. (Manifests are fetched even for HEAD:
    /// containerd HEADs a tag and GETs the manifest right after, and it must be cached to pull offline.)
    pub async fn open(
        self: &Arc<Self>,
        client: &Client,
        digest: &Digest,
        kind: Kind,
        head: bool,
    ) -> Result<Opened, ResolveError> {
        if !digest.is_sha256() {
            // Not verifiable here: let the client get it from upstream itself.
            return Err(ResolveError::Unavailable(format!("{digest}: only sha256 content is cached")));
        }
        let guard = self.guard(digest);
        match self.local_copy(client, digest, kind).await? {
            Some(LocalCopy::Stored(meta)) => {
                self.lookup(LookupKind::digest, LookupResult::hit);
                let store = self.store.clone();
                let d = digest.clone();
                // Best effort: an LRU timestamp that failed to update is not worth failing a request for.
                drop(tokio::task::spawn_blocking(move || store.touch(&d)));
                return Ok(Opened {
                    digest: digest.clone(),
                    size: Some(meta.size),
                    media_type: meta.media_type,
                    source: OpenedSource::Stored(self.store.blob_path(digest)),
                    _guard: guard,
                });
            }
            Some(LocalCopy::Containerd { held, .. }) => {
                self.lookup(LookupKind::digest, LookupResult::containerd);
                return Ok(Opened {
                    digest: digest.clone(),
                    size: Some(held.size),
                    media_type: held.media_type,
                    source: OpenedSource::Containerd(self.containerd.clone().expect("a copy was found in containerd")),
                    _guard: guard,
                });
            }
            None => {}
        }
        let Some((dl, _)) = self.join_or_start(client, digest, kind, !(head && kind == Kind::Blob)).await? else {
            return self.head_upstream(client, digest, guard).await;
        };
        let mut rx = dl.progress.subscribe();
        // Answered once the first bytes are on disk (or, for an empty blob, once verified): a download that fails
        // before that is an error the client can take elsewhere (containerd moves to the next host), not a 200
        // whose body breaks.
        let p = match wait_progress(&mut rx, |p| (p.header.is_some() && p.written > 0) || p.verified).await {
            Err(ResolveError::NoSpace(reason)) => return self.pass_through(client, digest, kind, &reason, guard).await,
            p => p?,
        };
        let (size, media_type) = p.header.unwrap_or((None, None));
        Ok(Opened {
            digest: digest.clone(),
            size,
            media_type,
            source: OpenedSource::InFlight { rx, final_path: self.store.blob_path(digest), tally: dl.tally.clone() },
            _guard: guard,
        })
    }

    /// Joins the download of `digest` running on this node (after checking the client may have it), or starts
    /// one (if `start`). Returns it and whether this call started it.
    async fn join_or_start(
        self: &Arc<Self>,
        client: &Client,
        digest: &Digest,
        kind: Kind,
        start: bool,
    ) -> Result<Option<(Arc<Download>, bool)>, ResolveError> {
        let origin = self.access.origin(client);
        let found = {
            let mut map = lock(&self.downloads);
            match map.get(digest) {
                Some(dl) => Some((dl.clone(), false)),
                None if !start => None,
                None => {
                    let progress = watch::Sender::new(Progress::starting());
                    let dl = Arc::new(Download::new(origin.clone(), progress, self.cfg.abandon_after));
                    map.insert(digest.clone(), dl.clone());
                    Some((dl, true))
                }
            }
        };
        let Some((dl, started)) = found else { return Ok(None) };
        if started {
            self.lookup(LookupKind::digest, LookupResult::miss);
            let this = self.clone();
            let (client, digest, dl) = (client.clone(), digest.clone(), dl.clone());
            let span = tracing::info_span!(parent: None, "download", %digest, registry = %client.registry, repo = %client.repo);
            self.tasks.spawn(this.run_download(client, digest, kind, dl).instrument(span));
        } else {
            self.lookup(LookupKind::digest, LookupResult::in_flight);
            if dl.origin != origin {
                let provenance =
                    Provenance { public: dl.origin.cred.is_none(), registry: Some(dl.origin.registry.clone()) };
                self.authorize(client, digest, kind, &provenance).await?;
            }
        }
        Ok(Some((dl, started)))
    }

    /// As the digest's home, for a member's client: makes sure this node holds or downloads it, and returns once
    /// the size is known.
    async fn fetch_for_peer(
        self: &Arc<Self>,
        client: &Client,
        digest: &Digest,
        kind: Kind,
    ) -> Result<Fetched, ResolveError> {
        if !digest.is_sha256() {
            return Err(ResolveError::Unavailable(format!("{digest}: only sha256 content is cached")));
        }
        match self.local_copy(client, digest, kind).await? {
            Some(LocalCopy::Stored(meta)) => {
                return Ok(Fetched {
                    size: meta.size,
                    media_type: meta.media_type,
                    complete: true,
                    public: meta.public,
                    started: false,
                });
            }
            Some(LocalCopy::Containerd { held, public }) => {
                return Ok(Fetched {
                    size: held.size,
                    media_type: held.media_type,
                    complete: true,
                    public,
                    started: false,
                });
            }
            None => {}
        }
        let (dl, started) =
            self.join_or_start(client, digest, kind, true).await?.expect("a download is started when none runs");
        let p = wait_progress(&mut dl.progress.subscribe(), |p| p.header.is_some()).await?;
        let (size, media_type) = p.header.unwrap_or((None, None));
        let size = size.ok_or_else(|| ResolveError::Unavailable("upstream sent no size".into()))?;
        Ok(Fetched { size, media_type, complete: p.verified, public: dl.origin.cred.is_none(), started })
    }

    /// Reserves room in the store for a blob of `size` bytes: no larger than the cache's high watermark, and the
    /// file system must keep `min_free_space` free after every running download has written all of its bytes.
    async fn reserve_room(&self, size: u64) -> Result<Room, ResolveError> {
        // Reserved before the check, so two downloads checking at once both count each other.
        let promised = self.reserved.fetch_add(size, Ordering::SeqCst);
        let room = Room { reserved: self.reserved.clone(), size, checked: size };
        if size > self.cfg.gc_high_bytes {
            return Err(ResolveError::NoSpace(format!(
                "{size} bytes are more than the cache keeps ({} bytes, the high watermark of disk_budget)",
                self.cfg.gc_high_bytes
            )));
        }
        let store = self.store.clone();
        let free = blocking(move || store.free_bytes()).await?;
        let needed = promised.saturating_add(size).saturating_add(self.cfg.min_free_space);
        if free < needed {
            return Err(ResolveError::NoSpace(format!(
                "{size} bytes do not fit: {free} bytes free space on the data dir's file system, {promised} promised \
                 to running downloads, min_free_space {}",
                self.cfg.min_free_space
            )));
        }
        Ok(room)
    }

    /// Grows the room of a download whose size upstream did not say by `n` bytes written: the same limits as
    /// [`Resolver::reserve_room`], checked as it grows (free space every [`ROOM_CHECK_EVERY`] bytes).
    async fn grow_room(&self, room: &mut Room, n: u64) -> Result<(), ResolveError> {
        room.size += n;
        let promised = self.reserved.fetch_add(n, Ordering::SeqCst) + n;
        if room.size > self.cfg.gc_high_bytes {
            return Err(ResolveError::Unavailable(format!(
                "a body of unannounced length passed {} bytes, more than the cache keeps",
                self.cfg.gc_high_bytes
            )));
        }
        if room.size - room.checked >= ROOM_CHECK_EVERY {
            room.checked = room.size;
            let store = self.store.clone();
            let free = blocking(move || store.free_bytes()).await?;
            // What this download has written is on disk already: only the others' promises are still to come.
            let others = promised.saturating_sub(room.size);
            if free < others.saturating_add(self.cfg.min_free_space) {
                return Err(ResolveError::Unavailable(format!(
                    "a body of unannounced length reached {} bytes and would leave less than min_free_space ({}) free",
                    room.size, self.cfg.min_free_space
                )));
            }
        }
        Ok(())
    }

    /// Serves a blob or manifest the store has no room for straight from upstream, verified as it streams (the
    /// last chunk is held back until the digest matched), without caching it.
    async fn pass_through(
        &self,
        client: &Client,
        digest: &Digest,
        kind: Kind,
        reason: &str,
        guard: InUse,
    ) -> Result<Opened, ResolveError> {
        tracing::warn!(%digest, reason, "not cached: serving it through from upstream");
        let reference = Reference::Digest(digest.clone());
        let resp = self.upstream.send(client.request(target(kind, digest, &reference), false)).await?;
        let size = resp.content_length();
        let media_type = resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = PassThrough::new(resp.bytes_stream());
        Ok(Opened {
            digest: digest.clone(),
            size,
            media_type,
            source: OpenedSource::PassThrough(Box::new(body)),
            _guard: guard,
        })
    }

    async fn head_upstream(&self, client: &Client, digest: &Digest, guard: InUse) -> Result<Opened, ResolveError> {
        let req = client.request(Target::Blob(digest), true);
        let resp = match self.upstream.send(req).await {
            Ok(r) => r,
            // Upstream cannot say: peers can, for content anyone may have.
            Err(UpstreamError::Unreachable(reason)) => {
                let loc = match &self.mesh {
                    Some(m) => m.locate(digest).await.filter(|l| l.holders.iter().any(|(_, s)| s.public)),
                    None => None,
                };
                let Some(loc) = loc else { return Err(ResolveError::Unavailable(reason)) };
                return Ok(Opened {
                    digest: digest.clone(),
                    size: Some(loc.size),
                    media_type: loc.media_type,
                    source: OpenedSource::HeadOnly,
                    _guard: guard,
                });
            }
            Err(e) => return Err(e.into()),
        };
        let media_type = resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
        // reqwest reports no length for HEAD bodies; the header carries the blob's size.
        let size =
            resp.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        Ok(Opened { digest: digest.clone(), size, media_type, source: OpenedSource::HeadOnly, _guard: guard })
    }
}

impl Resolver {
    /// Downloads running on this node: digest, bytes written, size if known.
    pub fn downloads_in_flight(&self) -> Vec<(Digest, u64, Option<u64>)> {
        let mut v: Vec<_> = lock(&self.downloads)
            .iter()
            .map(|(d, dl)| {
                let p = dl.progress.borrow();
                (d.clone(), p.written, p.header.as_ref().and_then(|h| h.0))
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// What the last download of `digest` on this node did, if it is among the latest [`FETCHES_KEPT`].
    pub fn fetch_record(&self, digest: &Digest) -> Option<FetchRecord> {
        lock(&self.fetches).iter().find(|(d, _)| d == digest).map(|(_, r)| r.clone())
    }

    /// Whether this node's containerd holds `digest`.
    pub fn in_containerd(&self, digest: &Digest) -> bool {
        self.containerd_holds(digest)
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }
}

/// The announcement of a complete blob in the store.
fn stored(digest: Digest, meta: BlobMeta) -> Holding {
    Holding {
        digest,
        size: meta.size,
        media_type: meta.media_type,
        complete: true,
        public: meta.public,
        removed: false,
    }
}

/// The announcement that this node holds nothing of `digest`.
fn removed(digest: Digest) -> Holding {
    Holding { digest, size: 0, media_type: None, complete: false, public: false, removed: true }
}

/// Waits until a download's progress is `ready` or the download ended; a failed download's error is returned.
/// Whether an `Accept` header admits a media type (no header, or no known type, admits everything).
fn accepts(accept: Option<&HeaderValue>, media_type: Option<&str>) -> bool {
    let (Some(accept), Some(mt)) = (accept.and_then(|a| a.to_str().ok()), media_type) else { return true };
    accept.split(',').map(|p| p.split(';').next().unwrap_or_default().trim()).any(|a| a == mt || a == "*/*")
}

#[cfg(test)]
impl Resolver {
    /// What a request does when its store lookup missed a blob committed right after it (a race no test can time):
    /// starts a download, which finds the blob stored, and waits for its end.
    pub(crate) async fn open_after_a_missed_lookup(
        self: &Arc<Self>,
        client: &Client,
        digest: &Digest,
    ) -> Result<(), ResolveError> {
        let (dl, _) = self.join_or_start(client, digest, Kind::Blob, true).await?.expect("a download is started");
        wait_progress(&mut dl.progress.subscribe(), |p| p.verified).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_matching() {
        let h = HeaderValue::from_static(
            "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json;q=0.9",
        );
        assert!(accepts(Some(&h), Some("application/vnd.docker.distribution.manifest.v2+json")));
        assert!(!accepts(Some(&h), Some("application/vnd.docker.distribution.manifest.list.v2+json")));
        assert!(accepts(None, Some("x")));
        assert!(accepts(Some(&HeaderValue::from_static("*/*")), Some("x")));
    }
}
