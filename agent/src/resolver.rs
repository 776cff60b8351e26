//! The resolver: the one place that decides where a manifest's or blob's bytes come from, in order: the local
//! store, a download already running on this node, peers that hold it (through the [`Mesh`]), then upstream.
//!
//! A download is a single flight per digest: the first request starts it as a tracked task that writes a partial
//! file while hashing (sha256 for the digest, BLAKE3 per piece for serving peers); every request for the same
//! digest (the first included) reads that file as it grows, through a [`watch`] channel of progress. The bytes
//! come from peers first: the digest's home names the sources (and starts the zone's one download itself when
//! nobody has it, see [`Mesh::sources`]); the [`PieceScheduler`] decides which source gets which piece (in order, a
//! window of them, the fastest sources first, the head piece hedged), each checked against its hash before it is
//! written; a source that fails or stalls is dropped, the node asks again where to continue
//! when sources run dry or the home moves, and after that brings nothing the download continues from upstream at
//! the same offset. As a home, the resolver downloads on members' behalf ([`Local::fetch`]) and resolves tags for
//! them ([`Local::resolve_tag`]). Readers never get a blob's last byte before its sha256
//! matched (the commit — fsync, rename, index record — follows), so a client of a blob that fails verification
//! sees its response cut short.
//!
//! Access to cached content follows upstream's word: content fetched without a client's credentials is public;
//! content a client's credentials were needed for is served from the cache only after upstream accepted that
//! client's credentials for that repository (cached for `auth_ttl`).

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderValue, header};
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::containerd::{Change, Containerd, ContainerdError, ContentAccess, ContentReader};
use crate::mesh::{Fetched, Holding, Local, Mesh, Order, Piece, PieceRefusal, TagAnswer, Tier};
use crate::metrics::{LookupKind, LookupLabels, LookupResult, Metrics, Source, SourceLabels, TransferFailure};
use crate::oci::{Digest, Reference, RegistryHost, RepoName};
use crate::pieces::{PieceHasher, PieceTable, piece_count, piece_index, piece_range, piece_size};
use crate::store::{BlobMeta, LinkRecord, Store, StoreError, TagRecord, now_secs};
use crate::swarm::scheduler::{Action as SchedAction, PieceScheduler, SchedulerConfig};
use crate::transfer::{FetchError, VerifiedPiece};
use crate::upstream::{Request, Target, Upstream, UpstreamError};

/// Largest manifest accepted from upstream (the distribution spec suggests 4 MiB).
pub const MAX_MANIFEST_SIZE: u64 = 4 << 20;
/// Read size when serving a stored blob: large reads halve the per-chunk overhead (measured: 2 MiB served a
/// cached 1 GiB blob ~25 % faster than 512 KiB), at one such buffer per active response.
const STORED_CHUNK: usize = 2 << 20;
/// Times in a row a download asks where to continue and gets nothing from the answer, before going upstream.
const PEER_ROUNDS: usize = 3;
/// Read size when following a download: smaller, so bytes reach the client as they arrive (measured: 2 MiB made
/// cold pulls ~5–10 % slower than 512 KiB).
const STREAM_CHUNK: usize = 512 << 10;

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

/// Manifest or blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/manifests/<digest>`
    Manifest,
    /// `/blobs/<digest>`
    Blob,
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
}

#[derive(Debug, Clone)]
enum State {
    Running,
    Done,
    Failed(ResolveError),
}

#[derive(Debug, Clone)]
struct Progress {
    /// The partial file, once created.
    partial: Option<PathBuf>,
    /// Size and media type, once upstream answered.
    header: Option<(Option<u64>, Option<String>)>,
    /// Bytes written to the partial file.
    written: u64,
    /// The sha256 matched: every byte may be sent, while the commit (fsync, rename, record) is still running.
    verified: bool,
    state: State,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    repo_key: String,
    cred: Option<u64>,
}

#[derive(Debug)]
struct Download {
    origin: Origin,
    progress: watch::Sender<Progress>,
    /// Piece size and the hashes of the pieces written so far (for serving peers while the download runs).
    pieces: Mutex<Option<(u32, Vec<[u8; 32]>)>>,
}

/// The other holders of bytes a resolver uses besides its store and upstream.
#[derive(Debug, Default)]
pub struct Others {
    /// The peer mesh.
    pub mesh: Option<Arc<Mesh>>,
    /// The node's containerd.
    pub containerd: Option<Arc<Containerd>>,
}

/// The resolver, shared by every request.
#[derive(Debug)]
pub struct Resolver {
    store: Arc<Store>,
    upstream: Arc<Upstream>,
    cfg: ResolverConfig,
    metrics: Metrics,
    downloads: Mutex<HashMap<Digest, Arc<Download>>>,
    /// Tags being resolved: one resolution per tag at a time.
    tag_gates: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    in_use: Arc<Mutex<HashMap<Digest, usize>>>,
    /// (credential hash, registry/repo) → when upstream last accepted it.
    accepted: Mutex<HashMap<(u64, String), Instant>>,
    cred_hasher: std::hash::RandomState,
    gc_running: AtomicBool,
    /// Bytes that running downloads have yet to write (what the free-space check must leave them).
    reserved: Arc<AtomicU64>,
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

/// A manifest or blob ready to be streamed.
#[derive(Debug)]
pub struct Opened {
    /// Its digest.
    pub digest: Digest,
    /// Size, if known (always, except for a download whose upstream sent no length).
    pub size: Option<u64>,
    /// Media type as upstream gave it.
    pub media_type: Option<String>,
    source: OpenedSource,
    _guard: InUse,
}

#[derive(Debug)]
enum OpenedSource {
    /// Headers only (a HEAD answered by upstream).
    HeadOnly,
    Stored(PathBuf),
    /// In the node's containerd.
    Containerd(Arc<Containerd>),
    InFlight {
        rx: watch::Receiver<Progress>,
        final_path: PathBuf,
    },
    /// Straight from upstream, not cached (no room in the store).
    PassThrough(Box<PassThrough>),
}

/// Room reserved in the store for a running download; given back when it ends.
struct Room {
    reserved: Arc<AtomicU64>,
    size: u64,
}

impl Drop for Room {
    fn drop(&mut self) {
        self.reserved.fetch_sub(self.size, Ordering::SeqCst);
    }
}

/// An upstream body streamed to one client without being cached.
struct PassThrough {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<Bytes>> + Send>>,
    hasher: Sha256,
    /// Bytes of the body read so far.
    read: u64,
    /// The last bytes of the client's range, held back until the whole body matched the digest.
    held: Option<Bytes>,
}

impl std::fmt::Debug for PassThrough {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PassThrough").field("read", &self.read).finish_non_exhaustive()
    }
}

impl PassThrough {
    /// The next bytes of `[*pos, end)`. The whole body is read and hashed (a range too: only the whole can be
    /// checked); the range's last bytes go out only once the body matched `digest`.
    async fn next(&mut self, digest: &Digest, pos: &mut u64, end: u64) -> io::Result<Option<Bytes>> {
        loop {
            match self.body.next().await {
                Some(chunk) => {
                    let chunk = chunk.map_err(io::Error::other)?;
                    let at = self.read;
                    self.hasher.update(&chunk);
                    self.read += chunk.len() as u64;
                    let (lo, hi) = ((*pos).max(at), end.min(self.read));
                    if lo < hi {
                        let part = chunk.slice((lo - at) as usize..(hi - at) as usize);
                        if let Some(out) = self.held.replace(part) {
                            *pos += out.len() as u64;
                            return Ok(Some(out));
                        }
                    }
                }
                None => {
                    let Some(out) = self.held.take() else { return Ok(None) };
                    let got = Digest::from_sha256(&self.hasher.clone().finalize());
                    if got != *digest {
                        return Err(io::Error::other(format!("upstream sent content that hashes to {got}")));
                    }
                    *pos += out.len() as u64;
                    return Ok(Some(out));
                }
            }
        }
    }
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
    /// looks for peers before upstream, and serves peers' piece requests.
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
        let this = Arc::new(Self {
            store,
            upstream,
            cfg,
            metrics,
            downloads: Mutex::default(),
            tag_gates: Mutex::default(),
            in_use: Arc::default(),
            accepted: Mutex::default(),
            cred_hasher: std::hash::RandomState::new(),
            gc_running: AtomicBool::new(false),
            reserved: Arc::default(),
            tasks,
            cancel,
            mesh,
            containerd,
        });
        if let Some(m) = &this.mesh {
            let weak: std::sync::Weak<dyn Local> = Arc::downgrade(&this) as _;
            m.set_local(weak);
        }
        this
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

    /// containerd's copy of `digest`, if it holds one and `client` may have it.
    async fn containerd_copy(
        &self,
        client: &Client,
        digest: &Digest,
        kind: Kind,
    ) -> Result<Option<crate::containerd::Held>, ResolveError> {
        let Some(c) = &self.containerd else { return Ok(None) };
        let Some(held) = c.held(digest) else { return Ok(None) };
        if c.config().access == ContentAccess::Upstream {
            self.authorize(client, digest, kind).await?;
        }
        Ok(Some(held))
    }

    /// The upstream client.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    fn lookup(&self, kind: LookupKind, result: LookupResult) {
        self.metrics.mirror.lookups.get_or_create(&LookupLabels { kind, result }).inc();
    }

    fn origin(&self, c: &Client) -> Origin {
        Origin { repo_key: c.repo_key(), cred: c.auth.as_ref().map(|a| self.cred_hasher.hash_one(a.as_bytes())) }
    }

    fn guard(&self, digest: &Digest) -> InUse {
        *lock(&self.in_use).entry(digest.clone()).or_default() += 1;
        InUse { digest: digest.clone(), map: self.in_use.clone() }
    }

    /// Resolves a tag to a manifest digest: from the cache within the TTL, else from the tag's home in the mesh
    /// (which asks upstream once for the cluster), else from upstream (recording the answer), else, when
    /// upstream is unreachable, from the last known answer.
    pub async fn resolve_tag(&self, client: &Client, tag: &str) -> Result<Digest, ResolveError> {
        self.resolve_tag_impl(client, tag, true).await.map(|a| a.digest)
    }

    async fn resolve_tag_impl(&self, client: &Client, tag: &str, ask_home: bool) -> Result<TagAnswer, ResolveError> {
        let key = format!("{}:{tag}", client.repo_key());
        // One resolution of a tag at a time on this node: concurrent ones (a burst at the tag's home) wait and
        // then find the fresh answer in the cache.
        let gate = lock(&self.tag_gates).entry(key.clone()).or_default().clone();
        let result = {
            let _turn = gate.lock().await;
            self.resolve_tag_once(client, tag, key.clone(), ask_home).await
        };
        let mut gates = lock(&self.tag_gates);
        if Arc::strong_count(&gate) == 2 {
            gates.remove(&key);
        }
        result
    }

    async fn resolve_tag_once(
        &self,
        client: &Client,
        tag: &str,
        key: String,
        ask_home: bool,
    ) -> Result<TagAnswer, ResolveError> {
        let store = self.store.clone();
        let k = key.clone();
        let cached = blocking(move || store.tag(&k)).await.unwrap_or(None);
        let origin = self.origin(client);
        if let Some(c) = &cached {
            let fresh = now_secs().saturating_sub(c.fetched_at) < self.cfg.tag_ttl.as_secs();
            let allowed = c.public || self.accepted_recently(&origin, self.cfg.auth_ttl);
            if fresh && allowed && self.cached_manifest_acceptable(client, c).await {
                self.lookup(LookupKind::tag, LookupResult::hit);
                return Ok(TagAnswer {
                    digest: c.digest.clone(),
                    fetched_at: c.fetched_at,
                    media_type: c.media_type.clone(),
                });
            }
        }
        let public = client.auth.is_none();
        if let (Some(mesh), true) = (&self.mesh, ask_home) {
            let order = order(client, Kind::Manifest);
            if let Some(a) = mesh.resolve_tag(&order, tag, self.home_wait()).await {
                self.lookup(LookupKind::tag, LookupResult::miss);
                let rec = TagRecord {
                    digest: a.digest.clone(),
                    fetched_at: a.fetched_at,
                    public,
                    media_type: a.media_type.clone(),
                };
                self.record_tag(key, client, rec).await?;
                return Ok(a);
            }
        }
        let reference = Reference::Tag(tag.to_owned());
        let req = client.request(Target::Manifest(&reference), true);
        match self.upstream.send(req).await {
            Ok(resp) => {
                let digest = resp
                    .headers()
                    .get("docker-content-digest")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|s| Digest::parse(s).ok());
                let Some(digest) = digest else {
                    // Without the header the only way is to fetch by tag and hash; leave that to upstream itself.
                    return Err(ResolveError::Unavailable("upstream sent no valid Docker-Content-Digest".into()));
                };
                let media_type =
                    resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
                self.lookup(LookupKind::tag, LookupResult::miss);
                self.note_accepted(&origin);
                let rec = TagRecord {
                    digest: digest.clone(),
                    fetched_at: now_secs(),
                    public,
                    media_type: media_type.clone(),
                };
                let fetched_at = rec.fetched_at;
                self.record_tag(key, client, rec).await?;
                Ok(TagAnswer { digest, fetched_at, media_type })
            }
            Err(UpstreamError::Unreachable(reason)) => match cached {
                Some(c) if c.public || self.accepted_ever(&origin) => {
                    tracing::warn!(%reason, tag, "upstream unreachable: serving the last known digest of the tag");
                    self.lookup(LookupKind::tag, LookupResult::stale);
                    Ok(TagAnswer { digest: c.digest, fetched_at: c.fetched_at, media_type: c.media_type })
                }
                _ => match self.containerd_tag(client, tag) {
                    Some((digest, media_type)) => {
                        tracing::warn!(%reason, tag, "upstream unreachable: serving the digest containerd's image has");
                        self.lookup(LookupKind::tag, LookupResult::containerd);
                        // As old as can be: a later answer from upstream or a peer replaces it at once.
                        Ok(TagAnswer { digest, fetched_at: 0, media_type })
                    }
                    None => Err(ResolveError::Unavailable(reason)),
                },
            },
            Err(e) => Err(e.into()),
        }
    }

    async fn record_tag(&self, key: String, client: &Client, rec: TagRecord) -> Result<(), ResolveError> {
        let link = format!("{}@{}", client.repo_key(), rec.digest);
        let public = rec.public;
        let store = self.store.clone();
        blocking(move || {
            store.put_tag(&key, &rec)?;
            store.put_link(&link, LinkRecord { public, at: now_secs() })
        })
        .await
    }

    /// How long a member waits for a home that fetches something first (its size, or a tag, from upstream).
    fn home_wait(&self) -> Duration {
        self.upstream.stall_timeout() * 2
    }

    /// Whether the client accepts the manifest a cached tag points to: by the media type recorded with the tag,
    /// else by the stored manifest's.
    async fn cached_manifest_acceptable(&self, client: &Client, rec: &TagRecord) -> bool {
        if rec.media_type.is_some() {
            return accepts(client.accept.as_ref(), rec.media_type.as_deref());
        }
        let store = self.store.clone();
        let d = rec.digest.clone();
        let Ok(Some(meta)) = blocking(move || store.blob(&d)).await else { return false };
        accepts(client.accept.as_ref(), meta.media_type.as_deref())
    }

    fn note_accepted(&self, origin: &Origin) {
        if let Some(c) = origin.cred {
            lock(&self.accepted).insert((c, origin.repo_key.clone()), Instant::now());
        }
    }

    fn accepted_recently(&self, origin: &Origin, within: Duration) -> bool {
        origin.cred.is_some_and(|c| {
            lock(&self.accepted).get(&(c, origin.repo_key.clone())).is_some_and(|t| t.elapsed() < within)
        })
    }

    fn accepted_ever(&self, origin: &Origin) -> bool {
        origin.cred.is_some_and(|c| lock(&self.accepted).contains_key(&(c, origin.repo_key.clone())))
    }

    /// Checks that `client` may be given `digest` from the cache: the repository is known to serve it publicly,
    /// or upstream accepts the client's credentials for it now (or did within `auth_ttl`).
    async fn authorize(&self, client: &Client, digest: &Digest, kind: Kind) -> Result<(), ResolveError> {
        let link_key = format!("{}@{digest}", client.repo_key());
        let store = self.store.clone();
        let lk = link_key.clone();
        let link = blocking(move || store.link(&lk)).await.unwrap_or(None);
        if link.is_some_and(|l| l.public) {
            return Ok(());
        }
        let origin = self.origin(client);
        if link.is_some() && self.accepted_recently(&origin, self.cfg.auth_ttl) {
            return Ok(());
        }
        let reference = Reference::Digest(digest.clone());
        let target = target(kind, digest, &reference);
        let req = client.request(target, true);
        match self.upstream.send(req).await {
            Ok(_) => {
                self.note_accepted(&origin);
                let public = client.auth.is_none();
                let store = self.store.clone();
                blocking(move || store.put_link(&link_key, LinkRecord { public, at: now_secs() })).await?;
                Ok(())
            }
            Err(UpstreamError::Unreachable(_)) if link.is_some() && self.accepted_ever(&origin) => Ok(()),
            Err(e) => Err(e.into()),
        }
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
        let store = self.store.clone();
        let d = digest.clone();
        if let Some(meta) = blocking(move || store.blob(&d)).await? {
            self.authorize(client, digest, kind).await?;
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
        if let Some(held) = self.containerd_copy(client, digest, kind).await? {
            self.lookup(LookupKind::digest, LookupResult::containerd);
            return Ok(Opened {
                digest: digest.clone(),
                size: Some(held.size),
                media_type: held.media_type,
                source: OpenedSource::Containerd(self.containerd.clone().expect("a copy was found in containerd")),
                _guard: guard,
            });
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
            source: OpenedSource::InFlight { rx, final_path: self.store.blob_path(digest) },
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
        let origin = self.origin(client);
        let found = {
            let mut map = lock(&self.downloads);
            match map.get(digest) {
                Some(dl) => Some((dl.clone(), false)),
                None if !start => None,
                None => {
                    let progress = watch::Sender::new(Progress {
                        partial: None,
                        header: None,
                        written: 0,
                        verified: false,
                        state: State::Running,
                    });
                    let dl = Arc::new(Download { origin: origin.clone(), progress, pieces: Mutex::new(None) });
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
                self.authorize(client, digest, kind).await?;
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
        let store = self.store.clone();
        let d = digest.clone();
        if let Some(meta) = blocking(move || store.blob(&d)).await? {
            self.authorize(client, digest, kind).await?;
            return Ok(Fetched {
                size: meta.size,
                media_type: meta.media_type,
                complete: true,
                public: meta.public,
                started: false,
            });
        }
        if let Some(held) = self.containerd_copy(client, digest, kind).await? {
            let public = self.containerd.as_ref().is_some_and(|c| c.config().access == ContentAccess::Node);
            return Ok(Fetched {
                size: held.size,
                media_type: held.media_type,
                complete: true,
                public,
                started: false,
            });
        }
        let (dl, started) =
            self.join_or_start(client, digest, kind, true).await?.expect("a download is started when none runs");
        let p = wait_progress(&mut dl.progress.subscribe(), |p| p.header.is_some()).await?;
        let (size, media_type) = p.header.unwrap_or((None, None));
        let size = size.ok_or_else(|| ResolveError::Unavailable("upstream sent no size".into()))?;
        Ok(Fetched { size, media_type, complete: p.verified, public: dl.origin.cred.is_none(), started })
    }

    /// Reserves room in the store for a blob of `size` bytes: the file system must keep `min_free_space` free
    /// after every running download has written all of its bytes.
    async fn reserve_room(&self, size: u64) -> Result<Room, ResolveError> {
        let store = self.store.clone();
        let free = blocking(move || store.free_bytes()).await?;
        // Reserved before the check, so two downloads checking at once both count each other.
        let promised = self.reserved.fetch_add(size, Ordering::SeqCst);
        let room = Room { reserved: self.reserved.clone(), size };
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
        let body = PassThrough { body: Box::pin(resp.bytes_stream()), hasher: Sha256::new(), read: 0, held: None };
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

    async fn run_download(self: Arc<Self>, client: Client, digest: Digest, kind: Kind, dl: Arc<Download>) {
        let started = Instant::now();
        let result = tokio::select! {
            r = self.download_impl(&client, &digest, kind, &dl) => r,
            () = self.cancel.cancelled() => Err(ResolveError::Unavailable("agent shutting down".into())),
        };
        {
            let mut map = lock(&self.downloads);
            if map.get(&digest).is_some_and(|d| Arc::ptr_eq(d, &dl)) {
                map.remove(&digest);
            }
        }
        let state = match result {
            Ok(()) => {
                tracing::info!(bytes = dl.progress.borrow().written, elapsed = ?started.elapsed(), "download committed");
                State::Done
            }
            Err(e) => {
                tracing::warn!(error = %e, "download failed");
                // The home may have recorded this node as a holder when it asked for sources: take that back,
                // whatever stage the download failed at (a removal of nothing is harmless).
                if let Some(mesh) = &self.mesh
                    && !self.containerd_holds(&digest)
                {
                    mesh.hold(removed(digest.clone()));
                }
                State::Failed(e)
            }
        };
        dl.progress.send_modify(|p| p.state = state);
        self.maybe_gc();
    }

    async fn download_impl(
        &self,
        client: &Client,
        digest: &Digest,
        kind: Kind,
        dl: &Download,
    ) -> Result<(), ResolveError> {
        // A download that finished between the caller's store lookup and this one's start: nothing to fetch.
        let store = self.store.clone();
        let d = digest.clone();
        if let Some(meta) = blocking(move || store.blob(&d)).await? {
            dl.progress.send_modify(|p| {
                p.written = meta.size;
                p.verified = true;
                p.header = Some((Some(meta.size), meta.media_type));
            });
            return Ok(());
        }
        let reference = Reference::Digest(digest.clone());
        let target = target(kind, digest, &reference);
        let mut req = client.request(target, false);
        let order = order(client, kind);
        let tiers = self.peer_tiers(client, digest, kind, &order).await?;
        let mut first_resp = None;
        let (size, media_type) = match tiers.first() {
            Some(t) => (Some(t.located.size), t.located.media_type.clone()),
            None => {
                let resp = self.upstream.send(req).await?;
                let size = resp.content_length();
                let mt = resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
                first_resp = Some(resp);
                self.note_accepted(&self.origin(client));
                (size, mt)
            }
        };
        if kind == Kind::Manifest && size.is_none_or(|s| s > MAX_MANIFEST_SIZE) {
            return Err(ResolveError::Unavailable(format!(
                "manifest size {size:?} is over {MAX_MANIFEST_SIZE} bytes or unknown"
            )));
        }
        // Room for all of it, or none is cached (the client is served through instead).
        let _room = match size {
            Some(size) => Some(self.reserve_room(size).await?),
            None => None,
        };
        let store = self.store.clone();
        let d = digest.clone();
        let (partial, file) = blocking(move || store.create_partial(&d)).await?;
        // The file is removed on failure; on success the commit has renamed it and this finds nothing.
        let _cleanup = RemoveOnDrop(partial.clone());
        dl.progress.send_modify(|p| {
            p.partial = Some(partial.clone());
            p.header = Some((size, media_type.clone()));
        });
        let public = client.auth.is_none();
        let holding = |complete: bool, removed: bool| Holding {
            digest: digest.clone(),
            size: size.unwrap_or_default(),
            media_type: media_type.clone(),
            complete,
            public,
            removed,
        };
        // Peers may fetch what is already here while the rest arrives (only with a known size: pieces need it).
        if let (Some(mesh), Some(_)) = (&self.mesh, size) {
            mesh.hold(holding(false, false));
        }
        let mut sink = Sink::new(file, partial.clone(), size, dl);
        // On failure, run_download tells the home this node holds nothing.
        self.fill(client, digest, kind, &mut req, &mut sink, tiers, first_resp).await?;
        let Sink { writer, written, pieces, peers_used, .. } = sink;
        let (file, hasher) = writer.expect("the writer is put back after every batch");
        let actual = Digest::from_sha256(&hasher.finalize());
        if actual != *digest {
            self.metrics.store.verify_failures.inc();
            if let Some(mesh) = &self.mesh {
                for p in &peers_used {
                    self.metrics
                        .mesh
                        .failures
                        .get_or_create(&crate::metrics::FailureLabels { reason: TransferFailure::digest_mismatch })
                        .inc();
                    mesh.quarantine(*p, "its pieces made up a blob that does not match its digest");
                }
            }
            return Err(ResolveError::Unavailable(format!("content does not match its digest (got {actual})")));
        }
        // Clients get their last byte now; the fsync of a large blob must not delay them (a crash before the
        // commit only loses the cached copy, never serves a wrong byte).
        dl.progress.send_modify(|p| p.verified = true);
        let table = pieces.map(|h| h.finish(written));
        let meta = BlobMeta { size: written, media_type: media_type.clone(), last_access: now_secs(), public };
        let store = self.store.clone();
        let d = digest.clone();
        let link = format!("{}@{digest}", client.repo_key());
        blocking(move || {
            store.commit(&partial, &file, &d, &meta, table.as_ref())?;
            store.put_link(&link, LinkRecord { public, at: now_secs() })
        })
        .await?;
        if let Some(mesh) = &self.mesh {
            let mut h = holding(true, false);
            h.size = written;
            mesh.hold(h);
        }
        self.metrics.store.commits.inc();
        self.update_store_gauges();
        Ok(())
    }

    /// Sources this client may be given bytes from ([`Mesh::sources`]). A client without credentials gets
    /// public copies only; a client with credentials gets any copy once upstream accepted them for this
    /// repository (or public copies only, when upstream cannot be asked).
    async fn peer_tiers(
        &self,
        client: &Client,
        digest: &Digest,
        kind: Kind,
        order: &Order,
    ) -> Result<Vec<Tier>, ResolveError> {
        let Some(mesh) = &self.mesh else { return Ok(Vec::new()) };
        let mut tiers = mesh.sources(digest, order, self.home_wait()).await;
        let private = tiers.iter().any(|t| t.located.holders.iter().any(|(_, s)| !s.public));
        let private_ok = match (&client.auth, private) {
            (None, _) | (_, false) => false,
            (Some(_), true) => match self.authorize(client, digest, kind).await {
                Ok(()) => true,
                Err(ResolveError::Unavailable(_)) => false,
                Err(e) => return Err(e),
            },
        };
        let size = tiers.first().map(|t| t.located.size);
        for t in &mut tiers {
            t.located.holders.retain(|(_, s)| s.public || private_ok);
        }
        // Every tier must agree on the size (the first one's is the download's).
        tiers.retain(|t| !t.located.holders.is_empty() && Some(t.located.size) == size);
        Ok(tiers)
    }

    /// Writes the blob into `sink`: from peers while they deliver (asking again where to get it when every
    /// source failed: the home may have moved), then from upstream from where they stopped.
    #[allow(clippy::too_many_arguments)]
    async fn fill(
        &self,
        client: &Client,
        digest: &Digest,
        kind: Kind,
        req: &mut Request<'_>,
        sink: &mut Sink<'_>,
        mut tiers: Vec<Tier>,
        first_resp: Option<reqwest::Response>,
    ) -> Result<(), ResolveError> {
        if let (Some(mesh), Some(size)) = (&self.mesh, sink.size)
            && !tiers.is_empty()
        {
            let piece = u64::from(piece_size(size));
            // Rounds that brought nothing, in a row.
            let mut fruitless = 0;
            loop {
                let before = sink.written;
                for t in &tiers {
                    if !sink.written.is_multiple_of(piece) || sink.complete() {
                        break;
                    }
                    self.fill_from_peers(mesh, digest, sink, t).await?;
                }
                if sink.complete() {
                    return Ok(());
                }
                fruitless = if sink.written > before { 0 } else { fruitless + 1 };
                if fruitless == PEER_ROUNDS || !sink.written.is_multiple_of(piece) {
                    break;
                }
                tracing::info!(offset = sink.written, "sources ran out: asking where to continue");
                tiers = self.peer_tiers(client, digest, kind, &order(client, kind)).await?;
                tiers.retain(|t| t.located.size == size);
                if tiers.is_empty() {
                    break;
                }
            }
            tracing::info!(offset = sink.written, "no peer could finish the blob: continuing from upstream");
        }
        let resp = match first_resp {
            Some(r) => r,
            None => {
                req.offset = sink.written;
                let r = self.upstream.send(*req).await?;
                self.note_accepted(&self.origin(client));
                r
            }
        };
        self.fill_from_upstream(req, sink, resp).await
    }

    /// Takes pieces from a tier's sources as the [`PieceScheduler`] decides (in order, a window of them, each to
    /// the source expected to deliver it soonest, the piece everyone waits on hedged when it straggles) and writes
    /// them in order. Returns when the tier has nothing more to give (every source failed, or, not following, a
    /// partial source lacks the next piece) or the digest's home moved.
    async fn fill_from_peers(
        &self,
        mesh: &Mesh,
        digest: &Digest,
        sink: &mut Sink<'_>,
        tier: &Tier,
    ) -> Result<(), ResolveError> {
        let size = tier.located.size;
        let piece = piece_size(size);
        let count = piece_count(size, piece);
        let sources: Vec<libp2p::PeerId> =
            tier.located.holders.iter().map(|(p, _)| *p).filter(|p| !mesh.is_quarantined(p)).collect();
        if sources.is_empty() {
            return Ok(());
        }
        // Partial sources are followed for as long as their own source may stall; else pieces they lack end the tier.
        let follow = if tier.follow { self.upstream.stall_timeout() } else { Duration::ZERO };
        let first = sink.written / u64::from(piece);
        let mut sched = PieceScheduler::new(SchedulerConfig::for_piece(piece), count, first, sources.len());
        let fetch = |i: u64, source: usize, stop: CancellationToken| {
            let (offset, len) = piece_range(size, piece, i);
            let peer = sources[source];
            async move {
                let r = tokio::select! {
                    r = fetch_when_ready(mesh, peer, digest, (offset, len as u32), follow) => Some(r),
                    () = stop.cancelled() => None,
                };
                (i, source, r)
            }
        };
        let mut inflight = futures_util::stream::FuturesUnordered::new();
        let mut stops: HashMap<(u64, usize), CancellationToken> = HashMap::new();
        let mut delivered: HashMap<u64, VerifiedPiece> = HashMap::new();
        // When the digest's home moves (it died, or a member joined), the sources it gave may be waiting on a dead
        // node, and this node may be the new home: stop and ask again.
        let home = mesh.home_of(digest);
        let moved = mesh.home_moved(digest, home);
        tokio::pin!(moved);
        loop {
            for a in sched.poll(Instant::now()) {
                if let SchedAction::Fetch { piece: i, source } = a {
                    let stop = CancellationToken::new();
                    stops.insert((i, source), stop.clone());
                    inflight.push(fetch(i, source, stop));
                }
            }
            if sched.is_complete() {
                return Ok(());
            }
            if sched.is_exhausted() {
                tracing::info!(offset = sink.written, "no source of this tier could give the next piece");
                return Ok(());
            }
            let wakeup = sched.next_wakeup();
            let done = tokio::select! {
                biased;
                d = inflight.next() => d,
                () = &mut moved => {
                    tracing::info!(offset = sink.written, "the digest's home moved: asking where to continue");
                    return Ok(());
                }
                () = sleep_until_some(wakeup) => continue,
            };
            let Some((i, source, result)) = done else { return Ok(()) };
            stops.remove(&(i, source));
            match result {
                // Cancelled: another source delivered it first.
                None => {}
                // A hedge's loser that arrived before its cancellation: already have it.
                Some(Ok(_)) if !sched.awaits(i) => {}
                Some(Ok(p)) => {
                    for c in sched.delivered(i, source, Instant::now()) {
                        if let SchedAction::Cancel { piece: ci, source: cs } = c
                            && let Some(stop) = stops.remove(&(ci, cs))
                        {
                            stop.cancel();
                        }
                    }
                    sink.peers_used.insert(sources[source]);
                    delivered.insert(i, p);
                    while let Some(next) = sched.next_to_write() {
                        let p = delivered.remove(&next).expect("the scheduler releases only delivered pieces");
                        sink.write_piece(p).await?;
                    }
                }
                Some(Err(e)) => {
                    tracing::info!(peer = %sources[source], piece = i, error = %e, "source failed");
                    sched.failed(i, source);
                }
            }
        }
    }

    async fn fill_from_upstream(
        &self,
        req: &mut Request<'_>,
        sink: &mut Sink<'_>,
        mut resp: reqwest::Response,
    ) -> Result<(), ResolveError> {
        let size = sink.size;
        let mut resumes = 0;
        let stall = self.upstream.stall_timeout();
        loop {
            // Bytes already written that a resumed response repeats (a registry that ignored our Range).
            let mut skip = 0u64;
            if sink.written > 0 && resp.status() != http::StatusCode::PARTIAL_CONTENT {
                skip = sink.written;
            }
            let mut body = resp.bytes_stream().ready_chunks(64);
            let broken = loop {
                let next = match tokio::time::timeout(stall, body.next()).await {
                    Err(_) => break format!("no data for {stall:?}"),
                    Ok(None) => break String::new(),
                    Ok(Some(chunks)) => chunks,
                };
                let mut batch = Vec::with_capacity(next.len());
                let mut err = None;
                for c in next {
                    match c {
                        Ok(mut b) => {
                            let n = b.len() as u64;
                            if skip > 0 {
                                let drop_n = skip.min(n);
                                let _ = b.split_to(drop_n as usize);
                                skip -= drop_n;
                            }
                            if !b.is_empty() {
                                batch.push(b);
                            }
                        }
                        Err(e) => {
                            err = Some(crate::upstream::error_chain(&e));
                            break;
                        }
                    }
                }
                let n: u64 = batch.iter().map(|b| b.len() as u64).sum();
                if size.is_some_and(|s| sink.written + n > s) {
                    return Err(ResolveError::Unavailable("upstream sent more bytes than it announced".into()));
                }
                if n > 0 {
                    sink.write(batch).await?;
                    self.upstream.count_bytes(n);
                }
                if let Some(e) = err {
                    break e;
                }
            };
            let complete = match size {
                Some(_) => sink.complete(),
                None => broken.is_empty(),
            };
            if complete {
                return Ok(());
            }
            let reason = if broken.is_empty() { "body ended early".to_owned() } else { broken };
            resumes += 1;
            if resumes > 5 {
                return Err(ResolveError::Unavailable(format!("upstream body broke {resumes} times: {reason}")));
            }
            tracing::info!(offset = sink.written, %reason, "upstream body broke; resuming");
            req.offset = sink.written;
            resp = self.upstream.send(*req).await?;
        }
    }

    /// Reads a piece of a stored blob or of a running download, with the hash recorded when it was written.
    async fn read_piece(
        self: Arc<Self>,
        digest: Digest,
        offset: u64,
        len: u32,
        wait: Duration,
    ) -> Result<Piece, PieceRefusal> {
        let internal = |e: ResolveError| PieceRefusal::Internal(e.to_string());
        let _guard = self.guard(&digest);
        let store = self.store.clone();
        let d = digest.clone();
        if let Some(meta) = blocking(move || store.blob(&d)).await.map_err(internal)? {
            let store = self.store.clone();
            let d = digest.clone();
            let size = meta.size;
            let table = blocking(move || match store.pieces(&d)? {
                Some(t) => Ok(t),
                // Committed before piece hashes were recorded: hash the verified file once and keep the table.
                None => {
                    let t = hash_file(&store.blob_path(&d), size)?;
                    store.put_pieces(&d, &t)?;
                    Ok(t)
                }
            })
            .await
            .map_err(internal)?;
            let hash = table
                .hash_of(offset, u64::from(len))
                .ok_or_else(|| PieceRefusal::BadRequest(format!("[{offset}, +{len}) is not a piece")))?;
            let data = read_range(self.store.blob_path(&digest), None, offset, len).await?;
            return Ok(Piece { data, hash, blob_size: meta.size });
        }
        if let Some(c) = &self.containerd
            && let Some(size) = c.readable(&digest)
        {
            let refusal = |e: ContainerdError| match e {
                ContainerdError::NotFound(_) => PieceRefusal::NotFound,
                e => PieceRefusal::Internal(e.to_string()),
            };
            let table = c.piece_table(&digest).await.map_err(refusal)?;
            let hash = table
                .hash_of(offset, u64::from(len))
                .ok_or_else(|| PieceRefusal::BadRequest(format!("[{offset}, +{len}) is not a piece")))?;
            let data = c.read_range(&digest, size, offset, u64::from(len)).await.map_err(refusal)?;
            return Ok(Piece { data, hash, blob_size: size });
        }
        let dl = lock(&self.downloads).get(&digest).cloned().ok_or(PieceRefusal::NotFound)?;
        // The piece's hash, once it is written (waiting up to `wait` for it).
        let ready = |p: &Progress| -> Result<Option<(PathBuf, u64, [u8; 32])>, PieceRefusal> {
            if let State::Failed(_) = p.state {
                return Err(PieceRefusal::NotFound);
            }
            let (Some(partial), Some((Some(size), _))) = (&p.partial, &p.header) else { return Ok(None) };
            let pieces = lock(&dl.pieces);
            let Some((piece, hashes)) = pieces.as_ref() else { return Ok(None) };
            let i = piece_index(*size, *piece, offset, u64::from(len))
                .ok_or_else(|| PieceRefusal::BadRequest(format!("[{offset}, +{len}) is not a piece")))?;
            Ok(hashes.get(i).map(|h| (partial.clone(), *size, *h)))
        };
        let mut rx = dl.progress.subscribe();
        let found = tokio::time::timeout(wait, async {
            loop {
                let p = rx.borrow_and_update().clone();
                if let Some(r) = ready(&p)? {
                    return Ok(Some(r));
                }
                // Done or gone: the committed copy (or nothing) is all there is.
                if !matches!(p.state, State::Running) || rx.changed().await.is_err() {
                    return ready(&rx.borrow().clone());
                }
            }
        })
        .await;
        let (partial, size, hash) = match found {
            Ok(r) => r?.ok_or(PieceRefusal::NotReady)?,
            Err(_) => ready(&dl.progress.borrow().clone())?.ok_or(PieceRefusal::NotReady)?,
        };
        let data = read_range(partial, Some(self.store.blob_path(&digest)), offset, len).await?;
        Ok(Piece { data, hash, blob_size: size })
    }

    fn update_store_gauges(&self) {
        self.metrics.store.bytes.set(self.store.bytes() as i64);
        self.metrics.store.blobs.set(self.store.blob_count() as i64);
    }

    /// Starts a GC pass if the store is above its high watermark and none is running.
    pub fn maybe_gc(self: &Arc<Self>) {
        self.update_store_gauges();
        if self.store.bytes() <= self.cfg.gc_high_bytes || self.gc_running.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        self.tasks.spawn(async move {
            let mut keep: HashSet<Digest> = lock(&this.in_use).keys().cloned().collect();
            keep.extend(lock(&this.downloads).keys().cloned());
            // Blobs containerd holds too go first: their bytes stay servable from containerd.
            let doubled: HashSet<Digest> = this
                .containerd
                .as_ref()
                .map(|c| c.all_held().into_iter().map(|(d, _)| d).collect())
                .unwrap_or_default();
            let store = this.store.clone();
            let target = this.cfg.gc_low_bytes;
            match blocking(move || store.evict_to(target, &keep, &doubled)).await {
                Ok((evicted, bytes)) => {
                    tracing::info!(blobs = evicted.len(), bytes, "GC evicted least recently used blobs");
                    this.metrics.store.evicted_blobs.inc_by(evicted.len() as u64);
                    this.metrics.store.evicted_bytes.inc_by(bytes);
                    if let Some(mesh) = &this.mesh {
                        for digest in evicted {
                            if !this.containerd_holds(&digest) {
                                mesh.hold(removed(digest));
                            }
                        }
                    }
                }
                Err(e) => tracing::error!(error = %e, "GC failed"),
            }
            this.update_store_gauges();
            this.gc_running.store(false, Ordering::Release);
        });
    }
}

impl Local for Resolver {
    fn upstream_down(&self, registry: &RegistryHost) -> bool {
        self.upstream.is_down(registry)
    }

    fn upstream_reported_down(&self, registry: &RegistryHost, reason: &str) {
        self.upstream.reported_down(registry, reason);
    }

    fn piece(
        self: Arc<Self>,
        digest: Digest,
        offset: u64,
        len: u32,
        wait: Duration,
    ) -> futures_util::future::BoxFuture<'static, Result<Piece, PieceRefusal>> {
        Box::pin(self.read_piece(digest, offset, len, wait))
    }

    fn fetch(
        self: Arc<Self>,
        digest: Digest,
        order: Order,
    ) -> futures_util::future::BoxFuture<'static, Result<Fetched, String>> {
        Box::pin(async move {
            let (client, kind) = client_of(order);
            self.fetch_for_peer(&client, &digest, kind).await.map_err(|e| e.to_string())
        })
    }

    fn resolve_tag(
        self: Arc<Self>,
        order: Order,
        tag: String,
    ) -> futures_util::future::BoxFuture<'static, Result<TagAnswer, String>> {
        Box::pin(async move {
            let (client, _) = client_of(order);
            self.resolve_tag_impl(&client, &tag, false).await.map_err(|e| e.to_string())
        })
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
async fn wait_progress(
    rx: &mut watch::Receiver<Progress>,
    ready: impl Fn(&Progress) -> bool,
) -> Result<Progress, ResolveError> {
    let p = rx
        .wait_for(|p| ready(p) || !matches!(p.state, State::Running))
        .await
        .map_err(|_| ResolveError::Unavailable("download ended".into()))?
        .clone();
    match p.state {
        State::Failed(e) => Err(e),
        _ => Ok(p),
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Fetches a piece. Following a partial holder (`follow` > 0), the holder itself waits for a piece it does not
/// have yet, and is asked again while it still lacks it, for up to `follow` in all; otherwise one ask.
async fn fetch_when_ready(
    mesh: &Mesh,
    peer: libp2p::PeerId,
    digest: &Digest,
    piece: (u64, u32),
    follow: Duration,
) -> Result<VerifiedPiece, FetchError> {
    let deadline = Instant::now() + follow;
    loop {
        match mesh.fetch_piece(peer, digest, piece, follow).await {
            Err(FetchError::Refused { code: shoal_proto::peer::error::Code::NotReady, .. })
                if Instant::now() < deadline => {}
            r => return r,
        }
    }
}

/// The client a member's order speaks for, and what it asks for (the inverse of [`order`]).
fn client_of(order: Order) -> (Client, Kind) {
    let kind = if order.manifest { Kind::Manifest } else { Kind::Blob };
    (Client { registry: order.registry, repo: order.repo, auth: order.auth, accept: order.accept }, kind)
}

/// The order a home needs to fetch for this client.
fn order(client: &Client, kind: Kind) -> Order {
    Order {
        registry: client.registry.clone(),
        repo: client.repo.clone(),
        manifest: kind == Kind::Manifest,
        auth: client.auth.clone(),
        accept: client.accept.clone(),
    }
}

/// Reads `len` bytes at `offset` of `path` (or of `fallback` if `path` was renamed away meanwhile).
async fn read_range(path: PathBuf, fallback: Option<PathBuf>, offset: u64, len: u32) -> Result<Bytes, PieceRefusal> {
    tokio::task::spawn_blocking(move || {
        let mut f = match std::fs::File::open(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && fallback.is_some() => {
                std::fs::File::open(fallback.as_ref().expect("checked"))
            }
            r => r,
        }?;
        io::Seek::seek(&mut f, io::SeekFrom::Start(offset))?;
        let mut buf = Vec::with_capacity(len as usize);
        io::Read::read_to_end(&mut io::Read::take(&mut f, u64::from(len)), &mut buf)?;
        if buf.len() < len as usize {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shorter than the piece"));
        }
        Ok::<_, io::Error>(Bytes::from(buf))
    })
    .await
    .map_err(|e| PieceRefusal::Internal(e.to_string()))?
    .map_err(|e| PieceRefusal::Internal(format!("read: {e}")))
}

/// Computes the piece table of a stored file.
fn hash_file(path: &std::path::Path, size: u64) -> Result<PieceTable, StoreError> {
    let io_err = |source| StoreError::Io { op: "read", path: path.to_owned(), source };
    let mut f = std::fs::File::open(path).map_err(io_err)?;
    let mut h = PieceHasher::new(piece_size(size));
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = io::Read::read(&mut f, &mut buf).map_err(io_err)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish(size))
}

/// Where a download's bytes go: the partial file, the sha256, the piece hashes, and the progress readers follow.
struct Sink<'a> {
    dl: &'a Download,
    path: PathBuf,
    writer: Option<(std::fs::File, Sha256)>,
    pieces: Option<PieceHasher>,
    written: u64,
    size: Option<u64>,
    peers_used: HashSet<libp2p::PeerId>,
}

impl<'a> Sink<'a> {
    fn new(file: std::fs::File, path: PathBuf, size: Option<u64>, dl: &'a Download) -> Self {
        let pieces = size.map(|s| PieceHasher::new(piece_size(s)));
        if let Some(h) = &pieces {
            *lock(&dl.pieces) = Some((h.piece(), Vec::new()));
        }
        Self { dl, path, writer: Some((file, Sha256::new())), pieces, written: 0, size, peers_used: HashSet::new() }
    }

    fn complete(&self) -> bool {
        self.size.is_some_and(|s| self.written == s)
    }

    /// Writes a piece whose hash was checked on receipt: its hash goes into the table as is (when it is exactly
    /// the next piece), saving a second BLAKE3 pass.
    async fn write_piece(&mut self, piece: VerifiedPiece) -> Result<(), ResolveError> {
        let len = piece.len();
        let aligned = self.pieces.as_mut().is_some_and(|p| p.push_verified(piece.hash, len, self.size));
        self.write_impl(piece.chunks, !aligned).await
    }

    /// Hashes and writes a batch off the async workers, then tells readers and the piece table.
    async fn write(&mut self, batch: Vec<Bytes>) -> Result<(), ResolveError> {
        self.write_impl(batch, true).await
    }

    async fn write_impl(&mut self, batch: Vec<Bytes>, piece_hash: bool) -> Result<(), ResolveError> {
        let n: u64 = batch.iter().map(|b| b.len() as u64).sum();
        let (mut file, mut hasher) = self.writer.take().expect("the writer is put back after every batch");
        let mut pieces = self.pieces.take();
        let path = self.path.clone();
        let (file, hasher, pieces) = blocking(move || {
            for b in &batch {
                hasher.update(b);
                if let Some(p) = pieces.as_mut().filter(|_| piece_hash) {
                    p.update(b);
                }
                crate::store::write_all(&mut file, b, &path)?;
            }
            Ok((file, hasher, pieces))
        })
        .await?;
        self.writer = Some((file, hasher));
        self.written += n;
        if let Some(p) = &pieces {
            let mut shared = lock(&self.dl.pieces);
            if let Some((_, hashes)) = shared.as_mut() {
                hashes.extend_from_slice(&p.hashes()[hashes.len()..]);
            }
        }
        self.pieces = pieces;
        let written = self.written;
        self.dl.progress.send_modify(|p| p.written = written);
        Ok(())
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Whether an `Accept` header admits a media type (no header, or no known type, admits everything).
fn accepts(accept: Option<&HeaderValue>, media_type: Option<&str>) -> bool {
    let (Some(accept), Some(mt)) = (accept.and_then(|a| a.to_str().ok()), media_type) else { return true };
    accept.split(',').map(|p| p.split(';').next().unwrap_or_default().trim()).any(|a| a == mt || a == "*/*")
}

impl Opened {
    /// Streams bytes `[start, end)`. A download's bytes are sent as they arrive, but never its last byte before
    /// the download was verified; if it fails, the stream ends with an error.
    pub fn stream(
        self,
        start: u64,
        end: u64,
        metrics: &Metrics,
    ) -> impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static {
        let source = match &self.source {
            OpenedSource::Stored(_) | OpenedSource::HeadOnly => Source::store,
            OpenedSource::InFlight { .. } => Source::download,
            OpenedSource::Containerd(_) => Source::containerd,
            OpenedSource::PassThrough(_) => Source::passthrough,
        };
        let counter = metrics.mirror.bytes_served.get_or_create(&SourceLabels { source }).clone();
        let reader = Reader { opened: self, file: None, remote: None, pos: start, end };
        futures_util::stream::unfold(reader, move |mut r| {
            let counter = counter.clone();
            async move {
                match r.next_chunk().await {
                    Ok(None) => None,
                    Ok(Some(b)) => {
                        counter.inc_by(b.len() as u64);
                        Some((Ok(b), r))
                    }
                    Err(e) => {
                        // End the stream after the error.
                        r.pos = r.end;
                        Some((Err(e), r))
                    }
                }
            }
        })
    }
}

struct Reader {
    opened: Opened,
    file: Option<Arc<std::fs::File>>,
    remote: Option<ContentReader>,
    pos: u64,
    end: u64,
}

impl Reader {
    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        if self.pos >= self.end {
            return Ok(None);
        }
        let (avail, path) = match &mut self.opened.source {
            OpenedSource::HeadOnly => return Ok(None),
            OpenedSource::PassThrough(body) => return body.next(&self.opened.digest, &mut self.pos, self.end).await,
            OpenedSource::Containerd(c) => {
                if self.remote.is_none() {
                    let size = self.opened.size.unwrap_or(self.end);
                    let r = c.read(&self.opened.digest, size, self.pos, self.end).await.map_err(io::Error::other)?;
                    self.remote = Some(r);
                }
                let r = self.remote.as_mut().expect("opened just above");
                let chunk = r.next().await.map_err(io::Error::other)?;
                if let Some(b) = &chunk {
                    self.pos += b.len() as u64;
                }
                return Ok(chunk);
            }
            OpenedSource::Stored(path) => (self.end, path.clone()),
            OpenedSource::InFlight { rx, final_path } => loop {
                let p = rx.borrow_and_update().clone();
                let avail = match &p.state {
                    State::Failed(e) => return Err(io::Error::other(e.to_string())),
                    State::Done | State::Running if p.verified && p.written <= self.pos => return Ok(None),
                    State::Done => p.written,
                    State::Running if p.verified => p.written,
                    State::Running => match p.header.as_ref().and_then(|h| h.0) {
                        Some(size) => p.written.min(size.saturating_sub(1)),
                        None => p.written.saturating_sub(1),
                    },
                };
                if avail > self.pos {
                    let path = match (&p.state, p.partial) {
                        (State::Running, Some(partial)) => partial,
                        _ => final_path.clone(),
                    };
                    break (avail.min(self.end), path);
                }
                // A closed channel still has its final state to look at: check it once more before giving up.
                if rx.changed().await.is_err() && matches!(rx.borrow().state, State::Running) {
                    return Err(io::Error::other("download vanished"));
                }
            },
        };
        let file = match &self.file {
            Some(f) => f.clone(),
            None => {
                let fallback = match &self.opened.source {
                    OpenedSource::InFlight { final_path, .. } if *final_path != path => Some(final_path.clone()),
                    _ => None,
                };
                let start = self.pos;
                let f = tokio::task::spawn_blocking(move || {
                    let mut f = match std::fs::File::open(&path) {
                        // The partial was renamed into the store between the progress update and this open: the
                        // committed blob is the same bytes. (A failed download's partial is gone too; then this
                        // fails.)
                        Err(e) if e.kind() == io::ErrorKind::NotFound => match fallback {
                            Some(p) => std::fs::File::open(p),
                            None => Err(e),
                        },
                        r => r,
                    }?;
                    io::Seek::seek(&mut f, io::SeekFrom::Start(start))?;
                    Ok::<_, io::Error>(f)
                })
                .await
                .map_err(io::Error::other)??;
                let f = Arc::new(f);
                self.file = Some(f.clone());
                f
            }
        };
        let max = match self.opened.source {
            OpenedSource::Stored(_) => STORED_CHUNK,
            _ => STREAM_CHUNK,
        };
        let want = (avail - self.pos).min(max as u64) as usize;
        // Read straight into the buffer that goes to the socket (uninitialised capacity: no zeroing), off the
        // async workers. Each reader has its own file, and one read in flight, so the file offset is its cursor.
        let buf = tokio::task::spawn_blocking(move || -> io::Result<Bytes> {
            let mut buf = Vec::with_capacity(want);
            io::Read::read_to_end(&mut io::Read::take(&*file, want as u64), &mut buf)?;
            if buf.len() < want {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "blob file shorter than recorded"));
            }
            Ok(Bytes::from(buf))
        })
        .await
        .map_err(io::Error::other)??;
        self.pos += want as u64;
        Ok(Some(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass_through(chunks: &[&'static [u8]]) -> PassThrough {
        let body = futures_util::stream::iter(chunks.iter().map(|c| Ok(Bytes::from_static(c))).collect::<Vec<_>>());
        PassThrough { body: Box::pin(body), hasher: Sha256::new(), read: 0, held: None }
    }

    async fn drain(p: &mut PassThrough, digest: &Digest, start: u64, end: u64) -> (Vec<u8>, io::Result<()>) {
        let (mut out, mut pos) = (Vec::new(), start);
        loop {
            match p.next(digest, &mut pos, end).await {
                Ok(Some(b)) => out.extend_from_slice(&b),
                Ok(None) => return (out, Ok(())),
                Err(e) => return (out, Err(e)),
            }
        }
    }

    #[tokio::test]
    async fn pass_through_serves_ranges_and_withholds_the_end_of_a_mismatch() {
        let chunks: [&'static [u8]; 3] = [b"hello ", b"pass", b"-through"];
        let digest = Digest::from_sha256(&Sha256::digest(b"hello pass-through"));
        let (all, r) = drain(&mut pass_through(&chunks), &digest, 0, 18).await;
        assert_eq!((all.as_slice(), r.is_ok()), (&b"hello pass-through"[..], true));
        let (part, r) = drain(&mut pass_through(&chunks), &digest, 3, 9).await;
        assert_eq!((part.as_slice(), r.is_ok()), (&b"lo pas"[..], true));
        // Other bytes than the digest names: the range's last bytes never go out.
        let wrong = Digest::from_sha256(&Sha256::digest(b"something else"));
        let (sent, r) = drain(&mut pass_through(&chunks), &wrong, 0, 18).await;
        assert!(r.is_err());
        assert_eq!(sent, b"hello pass");
    }

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
