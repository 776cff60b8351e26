//! containerd: what the node's containerd already holds, served to local clients and to peers without a second
//! copy on disk, and the `hosts.toml` files that point containerd at this mirror ([`hosts`]).
//!
//! [`Containerd::follow`] walks every image of the namespace at start (index → manifests → config and layers,
//! every platform present in the content store), then follows containerd's events: an image created or updated
//! is walked, an image deleted triggers a full walk (its blobs may still belong to other images), deleted
//! content is dropped. What changed goes to the resolver as [`Change`]s, which announces it to the mesh. A full
//! walk also runs every [`ContainerdConfig::resync`], which covers events missed while (re)subscribing.
//!
//! Reads go over containerd's content API under a lease that holds the blob, so containerd's garbage collector
//! cannot remove it mid-transfer ([`Containerd::read`]). A whole-blob read is checked against its digest before
//! its last byte is returned; peers get pieces with BLAKE3 hashes computed once per blob, from a read that was
//! checked against the digest ([`Containerd::piece_table`]).

pub mod hosts;

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use containerd_client::services::v1::{
    AddResourceRequest, CreateRequest, DeleteRequest, GetImageRequest, InfoRequest, ListImagesRequest, ListRequest,
    ReadContentRequest, ReadContentResponse, Resource, SubscribeRequest, content_client::ContentClient,
    events_client::EventsClient, images_client::ImagesClient, leases_client::LeasesClient,
};
use containerd_client::tonic::transport::{Channel, Endpoint};
use containerd_client::tonic::{Code, Request, Status, Streaming};
use prost::Message as _;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::ContainerdMetrics;
use crate::oci::Digest;
use crate::pieces::{PieceHasher, PieceTable, piece_size};

/// Largest index or manifest read while walking images (the distribution spec's limit is 4 MiB).
const MAX_MANIFEST: i64 = 4 << 20;
/// How long a lease outlives an agent that crashed while holding it (containerd's GC removes it then).
const LEASE_EXPIRY: Duration = Duration::from_secs(3600);
/// How long a lease is kept after its last read: a peer's transfer is one read per piece, and containerd's GC
/// must not slip in between two of them.
const LEASE_LINGER: Duration = Duration::from_secs(30);
/// The label on our leases, so the next start can remove those a crash left behind.
const LEASE_LABEL: &str = "io.shoal/owner";

/// Who may be given what containerd holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentAccess {
    /// Anything on the node's containerd is the node's: served to any client of the mirror and to any member,
    /// as Kubernetes lets any pod on a node run an image present there.
    Node,
    /// Served only to clients whose credentials upstream accepts for the repository (as for the store's own
    /// content of unknown visibility), and offered to peers as private content.
    Upstream,
}

/// containerd settings, validated.
#[derive(Debug, Clone)]
pub struct ContainerdConfig {
    /// containerd's gRPC socket.
    pub socket: PathBuf,
    /// The namespace whose images are shared (`k8s.io` for the kubelet's).
    pub namespace: String,
    /// Who may be given containerd's content.
    pub access: ContentAccess,
    /// Interval of the full walk that catches what events missed.
    pub resync: Duration,
}

/// A blob containerd holds, as an image references it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// Size in bytes.
    pub size: u64,
    /// Media type from the referencing descriptor.
    pub media_type: Option<String>,
}

/// A change in what containerd holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Now held.
    Added(Digest, Held),
    /// No longer held (deleted, or no image references it any more).
    Removed(Digest),
}

/// Why a containerd call failed.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    /// containerd answered with an error status (or could not be reached: `unavailable`).
    #[error("containerd {call}: {status}")]
    Call {
        /// The call.
        call: &'static str,
        /// Its status.
        status: Box<Status>,
    },
    /// containerd does not hold the blob (any more).
    #[error("containerd does not hold {0}")]
    NotFound(Digest),
    /// The bytes containerd returned do not match the blob's digest or size.
    #[error("containerd's copy of {digest} is corrupt: {reason}")]
    Corrupt {
        /// The blob.
        digest: Digest,
        /// What did not match.
        reason: String,
    },
}

fn call(name: &'static str) -> impl FnOnce(Status) -> ContainerdError {
    move |status| ContainerdError::Call { call: name, status: Box::new(status) }
}

/// The node's containerd, as this agent sees it.
#[derive(Debug)]
pub struct Containerd {
    cfg: ContainerdConfig,
    channel: Channel,
    held: Mutex<HashMap<Digest, Held>>,
    /// `registry/repository:tag` of each image → its target (last resort for tags while upstream is down).
    tags: Mutex<HashMap<String, (Digest, Option<String>)>>,
    tables: Mutex<HashMap<Digest, Arc<PieceTable>>>,
    /// Leases by blob, with their last use; [`Containerd::sweep_leases`] releases idle ones.
    leases: Mutex<HashMap<Digest, LeaseEntry>>,
    metrics: ContainerdMetrics,
    tasks: TaskTracker,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().expect("containerd locks are never poisoned: no code panics while holding one")
}

/// Adds the namespace header containerd scopes every call by.
fn req<T>(ns: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    if let Ok(v) = ns.parse() {
        r.metadata_mut().insert("containerd-namespace", v);
    }
    r
}

impl Containerd {
    /// A handle on containerd's socket. Connects lazily: containerd may start after the agent, and calls made
    /// while it is down fail with `unavailable` and succeed again once it is back.
    pub fn new(cfg: ContainerdConfig, metrics: ContainerdMetrics, tasks: TaskTracker) -> Arc<Self> {
        let socket = cfg.socket.clone();
        // The URI is a placeholder: the connector dials the unix socket.
        let channel = Endpoint::from_static("http://containerd.invalid")
            .connect_timeout(Duration::from_secs(2))
            .connect_with_connector_lazy(tower::service_fn(move |_| {
                let socket = socket.clone();
                async move {
                    Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(socket).await?))
                }
            }));
        Arc::new(Self {
            cfg,
            channel,
            held: Mutex::default(),
            tags: Mutex::default(),
            tables: Mutex::default(),
            leases: Mutex::default(),
            metrics,
            tasks,
        })
    }

    /// The settings.
    pub fn config(&self) -> &ContainerdConfig {
        &self.cfg
    }

    /// Whether containerd holds `digest` (as far as the last walk and events tell).
    pub fn held(&self, digest: &Digest) -> Option<Held> {
        lock(&self.held).get(digest).cloned()
    }

    /// The size of a blob this node may read from containerd: one it holds, or one a transfer that began while
    /// it was held still keeps under a lease (so the transfer finishes after the image was deleted).
    pub fn readable(&self, digest: &Digest) -> Option<u64> {
        if let Some(h) = self.held(digest) {
            return Some(h.size);
        }
        lock(&self.leases).get(digest).map(|(_, _, size)| *size)
    }

    /// Every blob containerd holds.
    pub fn all_held(&self) -> Vec<(Digest, Held)> {
        lock(&self.held).iter().map(|(d, h)| (d.clone(), h.clone())).collect()
    }

    /// The digest an image named `registry/repository:tag` points at, if containerd has such an image.
    pub fn tag(&self, registry: &str, repository: &str, tag: &str) -> Option<(Digest, Option<String>)> {
        let tags = lock(&self.tags);
        tags.get(&format!("{registry}/{repository}:{tag}")).cloned().or_else(|| {
            // containerd names Docker Hub's images `docker.io/...`, whatever host the client used.
            (registry == "registry-1.docker.io" || registry == "index.docker.io")
                .then(|| tags.get(&format!("docker.io/{repository}:{tag}")).cloned())
                .flatten()
        })
    }

    fn content(&self) -> ContentClient<Channel> {
        ContentClient::new(self.channel.clone()).max_decoding_message_size(16 << 20)
    }

    /// Walks every image, then follows events until `cancel`, sending what changed to `changes`. Reconnects
    /// (with a full walk) whenever the event stream breaks.
    pub async fn follow(self: Arc<Self>, changes: mpsc::Sender<Vec<Change>>, cancel: CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        let mut warned = false;
        let mut first = true;
        while !cancel.is_cancelled() {
            if first {
                self.remove_stale_leases().await;
            }
            let result = tokio::select! {
                r = self.follow_once(&changes, &mut backoff) => r,
                () = cancel.cancelled() => return,
            };
            self.metrics.connected.set(0);
            match result {
                Err(e) if !warned => {
                    tracing::warn!(error = %e, socket = %self.cfg.socket.display(),
                        "containerd not reachable: its content is not shared until it is (retrying)");
                    warned = true;
                }
                Err(e) => tracing::debug!(error = %e, "containerd still not reachable"),
                Ok(()) => tracing::info!("containerd's event stream ended; walking its images again"),
            }
            first = false;
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = cancel.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    async fn follow_once(
        self: &Arc<Self>,
        changes: &mpsc::Sender<Vec<Change>>,
        backoff: &mut Duration,
    ) -> Result<(), ContainerdError> {
        // Subscribe first, walk second: an event during the walk is then not lost. The call returns only once
        // the first event arrives, so it runs in its own task.
        let (etx, mut erx) = mpsc::channel(256);
        let this = self.clone();
        let sub = tokio::spawn(async move { this.subscribe(etx).await });
        let _abort = AbortOnDrop(sub);
        let walked = self.walk_all().await?;
        self.metrics.connected.set(1);
        *backoff = Duration::from_millis(200);
        self.apply_full(walked, changes).await;
        let mut resync = tokio::time::interval(self.cfg.resync);
        resync.reset();
        let mut sweep = tokio::time::interval(LEASE_LINGER / 3);
        loop {
            tokio::select! {
                _ = sweep.tick() => self.sweep_leases(),
                ev = erx.recv() => match ev {
                    Some(Ok(ev)) => self.on_event(ev, changes).await?,
                    Some(Err(e)) => return Err(e),
                    None => return Ok(()),
                },
                _ = resync.tick() => {
                    let walked = self.walk_all().await?;
                    self.apply_full(walked, changes).await;
                }
            }
        }
    }

    async fn subscribe(&self, tx: mpsc::Sender<Result<Event, ContainerdError>>) {
        let ns = &self.cfg.namespace;
        let filters = vec![
            format!("namespace=={ns:?},topic~=\"^/images/\""),
            format!("namespace=={ns:?},topic==\"/content/delete\""),
        ];
        let mut events = EventsClient::new(self.channel.clone());
        let mut stream = match events.subscribe(SubscribeRequest { filters }).await {
            Ok(s) => s.into_inner(),
            Err(s) => {
                let _ = tx.send(Err(call("events.subscribe")(s))).await;
                return;
            }
        };
        loop {
            let item = match stream.message().await {
                Ok(Some(env)) => Event::decode(&env.topic, env.event.as_ref()),
                Ok(None) => return,
                Err(s) => Some(Err(call("events.subscribe")(s))),
            };
            if let Some(item) = item
                && tx.send(item).await.is_err()
            {
                return;
            }
        }
    }

    async fn on_event(&self, ev: Event, changes: &mpsc::Sender<Vec<Change>>) -> Result<(), ContainerdError> {
        self.metrics.events.inc();
        match ev {
            Event::ImageChanged(name) => {
                let mut images = ImagesClient::new(self.channel.clone());
                let image = match images.get(req(&self.cfg.namespace, GetImageRequest { name: name.clone() })).await {
                    Ok(r) => r.into_inner().image,
                    Err(s) if s.code() == Code::NotFound => None,
                    Err(s) => return Err(call("images.get")(s)),
                };
                let Some(image) = image else { return Ok(()) };
                let mut found = HashMap::new();
                let mut tags = HashMap::new();
                self.walk_image(&image, &mut found, &mut tags).await?;
                lock(&self.tags).extend(tags);
                let added: Vec<Change> = {
                    let mut held = lock(&self.held);
                    let mut added = Vec::new();
                    for (d, h) in found {
                        if held.get(&d) != Some(&h) {
                            held.insert(d.clone(), h.clone());
                            added.push(Change::Added(d, h));
                        }
                    }
                    added
                };
                self.send(added, changes).await;
            }
            Event::ImageDeleted => {
                let walked = self.walk_all().await?;
                self.apply_full(walked, changes).await;
            }
            Event::ContentDeleted(digest) => {
                let removed = lock(&self.held).remove(&digest).is_some();
                lock(&self.tables).remove(&digest);
                lock(&self.leases).remove(&digest);
                if removed {
                    self.send(vec![Change::Removed(digest)], changes).await;
                }
            }
        }
        Ok(())
    }

    async fn send(&self, batch: Vec<Change>, changes: &mpsc::Sender<Vec<Change>>) {
        self.metrics.blobs.set(lock(&self.held).len() as i64);
        if !batch.is_empty() {
            let _ = changes.send(batch).await;
        }
    }

    /// Replaces the view with a full walk's result and sends the difference.
    async fn apply_full(&self, walked: Walked, changes: &mpsc::Sender<Vec<Change>>) {
        let (found, tags) = walked;
        *lock(&self.tags) = tags;
        let batch = {
            let mut held = lock(&self.held);
            let mut batch: Vec<Change> =
                held.keys().filter(|d| !found.contains_key(*d)).map(|d| Change::Removed(d.clone())).collect();
            batch.extend(
                found
                    .iter()
                    .filter(|(d, h)| held.get(*d) != Some(*h))
                    .map(|(d, h)| Change::Added(d.clone(), h.clone())),
            );
            *held = found;
            batch
        };
        self.sweep_leases();
        self.send(batch, changes).await;
    }

    async fn walk_all(&self) -> Result<Walked, ContainerdError> {
        let mut images = ImagesClient::new(self.channel.clone());
        let list = images
            .list(req(&self.cfg.namespace, ListImagesRequest { filters: Vec::new() }))
            .await
            .map_err(call("images.list"))?
            .into_inner()
            .images;
        let mut found = HashMap::new();
        let mut tags = HashMap::new();
        for image in &list {
            self.walk_image(image, &mut found, &mut tags).await?;
        }
        tracing::debug!(images = list.len(), blobs = found.len(), "walked containerd's images");
        Ok((found, tags))
    }

    /// Adds every blob of `image` that the content store holds: the target, and below an index each manifest
    /// present (every platform pulled), below a manifest its config and layers.
    async fn walk_image(
        &self,
        image: &containerd_client::services::v1::Image,
        found: &mut HashMap<Digest, Held>,
        tags: &mut HashMap<String, (Digest, Option<String>)>,
    ) -> Result<(), ContainerdError> {
        let Some(target) = &image.target else { return Ok(()) };
        let Ok(root) = Digest::parse(&target.digest) else { return Ok(()) };
        let media_type = Some(target.media_type.clone()).filter(|m| !m.is_empty());
        if let Some((name, tag)) = image.name.rsplit_once(':')
            && !tag.contains('/')
            && !image.name.contains('@')
        {
            tags.insert(format!("{name}:{tag}"), (root.clone(), media_type.clone()));
        }
        let mut queue = vec![(root, target.size, media_type)];
        let mut seen = HashSet::new();
        while let Some((digest, size, media_type)) = queue.pop() {
            if !digest.is_sha256() || !seen.insert(digest.clone()) || size < 0 {
                continue;
            }
            let Some(info) = self.info(&digest).await? else { continue };
            if info.size != size {
                tracing::warn!(%digest, expected = size, held = info.size, "containerd's blob has another size than its descriptor: skipped");
                continue;
            }
            let is_manifest = media_type.as_deref().is_some_and(is_manifest_type);
            if is_manifest && size <= MAX_MANIFEST {
                let body = self.read_range(&digest, size as u64, 0, size as u64).await?;
                queue.extend(children(&body));
            }
            found.insert(digest, Held { size: size as u64, media_type });
        }
        Ok(())
    }

    async fn info(&self, digest: &Digest) -> Result<Option<containerd_client::services::v1::Info>, ContainerdError> {
        match self.content().info(req(&self.cfg.namespace, InfoRequest { digest: digest.to_string() })).await {
            Ok(r) => Ok(r.into_inner().info),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(call("content.info")(s)),
        }
    }

    /// Opens `[start, end)` of a blob of `size` bytes for reading, under a lease that keeps it from containerd's
    /// garbage collector until the reader is dropped. A read of the whole blob is checked against the digest
    /// before its last chunk is returned.
    pub async fn read(
        &self,
        digest: &Digest,
        size: u64,
        start: u64,
        end: u64,
    ) -> Result<ContentReader, ContainerdError> {
        let lease = self.lease(digest, size).await?;
        let want = end.saturating_sub(start);
        let stream = if want == 0 {
            None
        } else {
            let msg = ReadContentRequest { digest: digest.to_string(), offset: start as i64, size: want as i64 };
            match self.content().read(req(&self.cfg.namespace, msg)).await {
                Ok(s) => Some(s.into_inner()),
                Err(s) if s.code() == Code::NotFound => return Err(ContainerdError::NotFound(digest.clone())),
                Err(s) => return Err(call("content.read")(s)),
            }
        };
        let hasher = (start == 0 && end == size).then(Sha256::new);
        Ok(ContentReader {
            digest: digest.clone(),
            stream,
            hasher,
            pos: start,
            end,
            _lease: lease,
            bytes: self.metrics.bytes_read.clone(),
        })
    }

    /// The piece hashes of a blob containerd holds, computed once from a read checked against the digest.
    pub async fn piece_table(&self, digest: &Digest) -> Result<Arc<PieceTable>, ContainerdError> {
        if let Some(t) = lock(&self.tables).get(digest) {
            return Ok(t.clone());
        }
        let size = self.readable(digest).ok_or_else(|| ContainerdError::NotFound(digest.clone()))?;
        let mut r = self.read(digest, size, 0, size).await?;
        let mut h = PieceHasher::new(piece_size(size));
        while let Some(b) = r.next().await? {
            h.update(&b);
        }
        let table = Arc::new(h.finish(size));
        lock(&self.tables).insert(digest.clone(), table.clone());
        Ok(table)
    }

    /// Reads `[offset, offset + len)` whole (checked against the digest when that is the whole blob).
    pub async fn read_range(
        &self,
        digest: &Digest,
        size: u64,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, ContainerdError> {
        let mut r = self.read(digest, size, offset, offset + len).await?;
        let mut out = Vec::with_capacity(len as usize);
        while let Some(b) = r.next().await? {
            out.extend_from_slice(&b);
        }
        Ok(Bytes::from(out))
    }

    /// A lease holding `digest`, shared by the reads of the blob and kept [`LEASE_LINGER`] after the last.
    async fn lease(&self, digest: &Digest, size: u64) -> Result<Arc<LeaseInner>, ContainerdError> {
        if let Some((l, used, _)) = lock(&self.leases).get_mut(digest) {
            *used = Instant::now();
            return Ok(l.clone());
        }
        let ns = &self.cfg.namespace;
        let mut leases = LeasesClient::new(self.channel.clone());
        let id = format!("shoal-{}-{:016x}", &digest.hex()[..12], rand::random::<u64>());
        let expire = humantime::format_rfc3339_seconds(SystemTime::now() + LEASE_EXPIRY).to_string();
        let labels = HashMap::from([
            ("containerd.io/gc.expire".to_owned(), expire),
            (LEASE_LABEL.to_owned(), "shoal".to_owned()),
        ]);
        leases.create(req(ns, CreateRequest { id: id.clone(), labels })).await.map_err(call("leases.create"))?;
        let inner = Arc::new(LeaseInner {
            id: id.clone(),
            namespace: ns.clone(),
            channel: self.channel.clone(),
            tasks: self.tasks.clone(),
        });
        let resource = Resource { id: digest.to_string(), r#type: "content".to_owned() };
        match leases.add_resource(req(ns, AddResourceRequest { id, resource: Some(resource) })).await {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => return Err(ContainerdError::NotFound(digest.clone())),
            Err(s) => return Err(call("leases.add_resource")(s)),
        }
        self.metrics.leases.inc();
        lock(&self.leases).insert(digest.clone(), (inner.clone(), Instant::now(), size));
        Ok(inner)
    }

    /// Releases leases no read has used for [`LEASE_LINGER`] (dropping the last handle deletes the lease), and
    /// the piece tables of blobs neither held nor leased.
    fn sweep_leases(&self) {
        let mut leases = lock(&self.leases);
        leases.retain(|_, (l, used, _)| Arc::strong_count(l) > 1 || used.elapsed() < LEASE_LINGER);
        let held = lock(&self.held);
        lock(&self.tables).retain(|d, _| held.contains_key(d) || leases.contains_key(d));
    }

    /// Leases a crashed agent left behind (they would expire anyway, after [`LEASE_EXPIRY`]).
    async fn remove_stale_leases(&self) {
        let ns = &self.cfg.namespace;
        let mut leases = LeasesClient::new(self.channel.clone());
        let filters = vec![format!("labels.{LEASE_LABEL:?}==shoal")];
        let Ok(list) = leases.list(req(ns, ListRequest { filters })).await else { return };
        for l in list.into_inner().leases {
            let _ = leases.delete(req(ns, DeleteRequest { id: l.id, sync: false })).await;
        }
    }
}

/// A lease on one blob: the lease, when a read last used it, the blob's size.
type LeaseEntry = (Arc<LeaseInner>, Instant, u64);

type Walked = (HashMap<Digest, Held>, HashMap<String, (Digest, Option<String>)>);

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A containerd lease; deleted (in the background) when the last handle is dropped.
#[derive(Debug)]
struct LeaseInner {
    id: String,
    namespace: String,
    channel: Channel,
    tasks: TaskTracker,
}

impl Drop for LeaseInner {
    fn drop(&mut self) {
        let (id, ns, channel) =
            (std::mem::take(&mut self.id), std::mem::take(&mut self.namespace), self.channel.clone());
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        self.tasks.spawn(async move {
            let mut leases = LeasesClient::new(channel);
            if let Err(e) = leases.delete(req(&ns, DeleteRequest { id: id.clone(), sync: false })).await {
                tracing::debug!(lease = id, error = %e, "could not delete a containerd lease (it expires by itself)");
            }
        });
    }
}

/// A read of a blob from containerd's content store.
#[derive(Debug)]
pub struct ContentReader {
    digest: Digest,
    stream: Option<Streaming<ReadContentResponse>>,
    hasher: Option<Sha256>,
    pos: u64,
    end: u64,
    _lease: Arc<LeaseInner>,
    bytes: prometheus_client::metrics::counter::Counter,
}

impl ContentReader {
    /// The next chunk, `None` at the end. An error ends the read.
    pub async fn next(&mut self) -> Result<Option<Bytes>, ContainerdError> {
        if self.pos >= self.end {
            return Ok(None);
        }
        let corrupt = |reason: String| ContainerdError::Corrupt { digest: self.digest.clone(), reason };
        let Some(stream) = &mut self.stream else { return Ok(None) };
        let msg = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return Err(corrupt(format!("the read ended at {} of {}", self.pos, self.end))),
            Err(s) if s.code() == Code::NotFound => return Err(ContainerdError::NotFound(self.digest.clone())),
            Err(s) => return Err(call("content.read")(s)),
        };
        // containerd 1.6 leaves `offset` unset in its answers: chunks arrive in order, their lengths are what counts.
        let mut data = msg.data;
        let left = self.end - self.pos;
        if data.len() as u64 > left {
            return Err(corrupt(format!("{} bytes past the end", data.len() as u64 - left)));
        }
        if let Some(h) = &mut self.hasher {
            h.update(&data);
        }
        self.pos += data.len() as u64;
        if self.pos == self.end
            && let Some(h) = self.hasher.take()
        {
            let got = Digest::from_sha256(&h.finalize());
            if got != self.digest {
                return Err(corrupt(format!("its bytes hash to {got}")));
            }
        }
        self.bytes.inc_by(data.len() as u64);
        Ok(Some(Bytes::from(std::mem::take(&mut data))))
    }
}

/// What the event stream tells.
#[derive(Debug)]
enum Event {
    ImageChanged(String),
    ImageDeleted,
    ContentDeleted(Digest),
}

impl Event {
    fn decode(topic: &str, any: Option<&prost_types::Any>) -> Option<Result<Self, ContainerdError>> {
        use containerd_client::events::ContentDelete;
        use containerd_client::services::v1::{ImageCreate, ImageUpdate};
        let value = any.map(|a| a.value.as_slice()).unwrap_or_default();
        let ev = match topic {
            "/images/create" => Self::ImageChanged(ImageCreate::decode(value).ok()?.name),
            "/images/update" => Self::ImageChanged(ImageUpdate::decode(value).ok()?.name),
            "/images/delete" => Self::ImageDeleted,
            "/content/delete" => Self::ContentDeleted(Digest::parse(&ContentDelete::decode(value).ok()?.digest).ok()?),
            _ => return None,
        };
        Some(Ok(ev))
    }
}

fn is_manifest_type(m: &str) -> bool {
    matches!(
        m,
        "application/vnd.oci.image.index.v1+json"
            | "application/vnd.oci.image.manifest.v1+json"
            | "application/vnd.docker.distribution.manifest.list.v2+json"
            | "application/vnd.docker.distribution.manifest.v2+json"
    )
}

/// The descriptors an index (its manifests) or a manifest (its config and layers) points at; nothing for a body
/// that is not one.
pub fn children(body: &[u8]) -> Vec<(Digest, i64, Option<String>)> {
    #[derive(serde::Deserialize)]
    struct Desc {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        digest: String,
        size: i64,
    }
    #[derive(serde::Deserialize)]
    struct Doc {
        #[serde(default)]
        manifests: Vec<Desc>,
        config: Option<Desc>,
        #[serde(default)]
        layers: Vec<Desc>,
    }
    let Ok(doc) = serde_json::from_slice::<Doc>(body) else { return Vec::new() };
    doc.manifests
        .into_iter()
        .chain(doc.config)
        .chain(doc.layers)
        .filter_map(|d| Some((Digest::parse(&d.digest).ok()?, d.size, d.media_type)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_of_index_and_manifest() {
        let index = br#"{"schemaVersion":2,"manifests":[
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","size":10,"platform":{"os":"linux","architecture":"amd64"}},
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb","size":11}]}"#;
        let c = children(index);
        assert_eq!(c.len(), 2);
        assert_eq!(c[1].1, 11);
        let manifest = br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc","size":3},
            "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd","size":4},
            {"digest":"not a digest","size":1}]}"#;
        let c = children(manifest);
        assert_eq!(c.len(), 2, "the malformed descriptor is skipped");
        assert_eq!(c[0].2.as_deref(), Some("application/vnd.oci.image.config.v1+json"));
        assert!(children(b"not json").is_empty());
    }

    #[test]
    fn only_manifests_are_opened() {
        assert!(is_manifest_type("application/vnd.oci.image.index.v1+json"));
        assert!(is_manifest_type("application/vnd.docker.distribution.manifest.v2+json"));
        assert!(!is_manifest_type("application/vnd.oci.image.layer.v1.tar+gzip"));
    }
}
