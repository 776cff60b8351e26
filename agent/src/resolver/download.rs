//! Downloads: the table of downloads running on this node (one per digest), each a task that fills a partial file
//! (a [`Sink`]) from peers ([`super::from_peers`]) and then upstream, hashing as it writes, verifies it (writing it
//! again from upstream when members' pieces do not make up the digest) and commits it; readers follow its
//! [`Progress`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use http::header;
use tokio::sync::watch;

use super::access::{Origin, Provenance};
use super::sink::{RemoveOnDrop, Sink};
use super::{Client, Kind, MAX_MANIFEST_SIZE, ResolveError, Resolver, blocking, lock, order, removed, target};
use crate::mesh::{Holding, Order, Tier};
use crate::metrics::TransferFailure;
use crate::oci::{Digest, Reference};
use crate::pieces::{piece_range, piece_size};
use crate::store::{BlobMeta, LinkRecord, now_secs};
use crate::swarm::bitfield::Bitfield;
use crate::swarm::vouch;
use crate::upstream::Request;

/// Times in a row a download asks where to continue and gets nothing from the answer, before going upstream.
const PEER_ROUNDS: usize = 3;

#[derive(Debug, Clone)]
pub(super) enum State {
    Running,
    Done,
    Failed(ResolveError),
}

#[derive(Debug, Clone)]
pub(super) struct Progress {
    /// The partial file, once created.
    pub(super) partial: Option<PathBuf>,
    /// Size and media type, once upstream answered.
    pub(super) header: Option<(Option<u64>, Option<String>)>,
    /// Bytes written to the partial file.
    pub(super) written: u64,
    /// The sha256 matched: every byte may be sent, while the commit (fsync, rename, record) is still running.
    pub(super) verified: bool,
    /// Bytes readers may be given before the sha256 matched: all that is written, unless the download holds its
    /// readers (its pieces rest on one member's word, see [`crate::swarm::vouch`]).
    pub(super) released: u64,
    /// Times the partial file was written again from upstream (members' bytes did not match the digest): a reader
    /// that sent bytes of an earlier pass cannot take them back and fails; one that sent none goes on.
    pub(super) restarts: u32,
    pub(super) state: State,
}

impl Progress {
    /// A download that has nothing yet.
    pub(super) fn starting() -> Self {
        Self {
            partial: None,
            header: None,
            written: 0,
            verified: false,
            released: 0,
            restarts: 0,
            state: State::Running,
        }
    }
}

#[derive(Debug)]
pub(super) struct Download {
    pub(super) origin: Origin,
    pub(super) progress: watch::Sender<Progress>,
    /// The pieces members may be given while the download runs (with a known size).
    pub(super) pieces: Mutex<Option<Held>>,
    /// While the download trades pieces out of order: members downloading the same blob that watch this node's
    /// pieces are sent here to be traded with too.
    pub(super) traders: Mutex<Option<Traders>>,
    /// When someone last wanted it (a client reading it, a member asking for a piece).
    pub(super) wanted: Mutex<Instant>,
    /// Nobody wanting it for this long abandons it.
    pub(super) abandon_after: Duration,
    /// Bytes it received, by where from.
    pub(super) tally: Arc<Tally>,
}

/// The pieces of a running download members may be given: each one's BLAKE3 hash as written, and which are there
/// (not necessarily a prefix: the exchange writes pieces in any order). A piece this node brought into its zone
/// (from upstream or another zone) is told to one of the members watching its pieces, in turn, not to all
/// (super-seeding: the zone spreads it from there, and this node's upload carries new pieces rather than many
/// copies of the newest one); every piece is served to whoever asks for it.
#[derive(Debug, Clone)]
pub(super) struct Held {
    pub(super) piece: u32,
    pub(super) hashes: Vec<Option<[u8; 32]>>,
    pub(super) bits: Bitfield,
    /// Pieces brought in, and the watcher each was told to.
    told_to: HashMap<u64, u64>,
    /// Members of this zone watching, by an id of this download's, in the order they came (those of other zones
    /// are served, not traded with: they are told every piece).
    watchers: Vec<u64>,
    turn: usize,
    next_watcher: u64,
}

impl Held {
    pub(super) fn new(size: u64, piece: u32) -> Self {
        let count = crate::pieces::piece_count(size, piece);
        Self {
            piece,
            hashes: vec![None; count as usize],
            bits: Bitfield::new(count),
            told_to: HashMap::new(),
            watchers: Vec::new(),
            turn: 0,
            next_watcher: 0,
        }
    }

    /// Piece `i` is there, with this hash; `brought_in`: this node brought it into its zone.
    pub(super) fn set(&mut self, i: usize, hash: [u8; 32], brought_in: bool) {
        let Some(h) = self.hashes.get_mut(i) else { return };
        *h = Some(hash);
        if self.bits.set(i as u64) && brought_in && !self.watchers.is_empty() {
            self.turn = (self.turn + 1) % self.watchers.len();
            self.told_to.insert(i as u64, self.watchers[self.turn]);
        }
    }

    /// A member watches the pieces: its id. `trades`: it is of this zone, and takes its turn at pieces brought in.
    pub(super) fn watch(&mut self, trades: bool) -> u64 {
        self.next_watcher += 1;
        if trades {
            self.watchers.push(self.next_watcher);
        }
        self.next_watcher
    }

    /// The member stopped watching: what it alone was told is told to everyone.
    pub(super) fn unwatch(&mut self, watcher: u64) {
        self.watchers.retain(|w| *w != watcher);
        self.told_to.retain(|_, w| *w != watcher);
    }

    /// The pieces `watcher` is told of.
    pub(super) fn bits_for(&self, watcher: u64) -> Bitfield {
        let mut b = self.bits.clone();
        if !self.watchers.contains(&watcher) {
            return b;
        }
        for (i, w) in &self.told_to {
            if *w != watcher {
                b.unset(*i);
            }
        }
        b
    }
}

/// Where a download that trades out of order hears of members to trade with.
#[derive(Debug)]
pub(super) struct Traders {
    /// The download is for a client without credentials: only members whose download is too trade with it.
    pub(super) public: bool,
    pub(super) tell: tokio::sync::mpsc::UnboundedSender<libp2p::PeerId>,
}

/// Bytes a download received from members and from upstream (a restart from upstream counts again).
#[derive(Debug, Default)]
pub struct Tally {
    /// From members (pieces).
    pub peers: std::sync::atomic::AtomicU64,
    /// From upstream.
    pub upstream: std::sync::atomic::AtomicU64,
    /// From each member.
    pub by_peer: Mutex<HashMap<libp2p::PeerId, u64>>,
    /// Sources that failed a piece (refused, stalled, a bad hash).
    pub failures: std::sync::atomic::AtomicU32,
}

/// What the last download of a digest on this node did (`shoal explain`), kept in memory for the latest
/// [`FETCHES_KEPT`] downloads.
#[derive(Debug, Clone)]
pub struct FetchRecord {
    /// Manifest or blob.
    pub kind: Kind,
    /// When it started, seconds since the epoch.
    pub when: u64,
    /// How long it took.
    pub seconds: f64,
    /// Why it failed, if it did.
    pub failure: Option<String>,
    /// Bytes from upstream.
    pub upstream: u64,
    /// Bytes from each member, most first.
    pub peers: Vec<(libp2p::PeerId, u64)>,
    /// Times it was written again from upstream (members' bytes did not match the digest).
    pub restarts: u32,
    /// Sources that failed a piece.
    pub source_failures: u32,
}

/// Downloads remembered for `shoal explain`.
pub const FETCHES_KEPT: usize = 4096;

impl Download {
    pub(super) fn new(origin: Origin, progress: watch::Sender<Progress>, abandon_after: Duration) -> Self {
        Self {
            origin,
            progress,
            pieces: Mutex::new(None),
            traders: Mutex::new(None),
            wanted: Mutex::new(Instant::now()),
            abandon_after,
            tally: Arc::default(),
        }
    }

    /// Someone wants it now.
    pub(super) fn wanted(&self) {
        *lock(&self.wanted) = Instant::now();
    }

    /// Whether nobody has wanted it for `abandon_after`: no client follows it and no member asked for a piece.
    pub(super) fn abandoned(&self, now: Instant) -> bool {
        if self.progress.receiver_count() > 0 {
            *lock(&self.wanted) = now;
            return false;
        }
        now.saturating_duration_since(*lock(&self.wanted)) > self.abandon_after
    }
}

impl Resolver {
    pub(super) async fn run_download(self: Arc<Self>, client: Client, digest: Digest, kind: Kind, dl: Arc<Download>) {
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
        let record = {
            let t = &dl.tally;
            let mut peers: Vec<_> = lock(&t.by_peer).iter().map(|(p, n)| (*p, *n)).collect();
            peers.sort_by_key(|p| std::cmp::Reverse(p.1));
            FetchRecord {
                kind,
                when: now_secs().saturating_sub(started.elapsed().as_secs()),
                seconds: started.elapsed().as_secs_f64(),
                failure: match &state {
                    State::Failed(e) => Some(e.to_string()),
                    _ => None,
                },
                upstream: t.upstream.load(Ordering::Relaxed),
                peers,
                restarts: dl.progress.borrow().restarts,
                source_failures: t.failures.load(Ordering::Relaxed),
            }
        };
        {
            let mut fetches = lock(&self.fetches);
            fetches.retain(|(d, _)| *d != digest);
            if fetches.len() >= FETCHES_KEPT {
                fetches.pop_back();
            }
            fetches.push_front((digest.clone(), record));
        }
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
            // The request that started this download looked before the blob was there: its access is checked as
            // for any stored copy, or a client the copy's registry never accepted would be given it.
            let provenance = Provenance { public: meta.public, registry: meta.registry.clone() };
            self.authorize(client, digest, kind, &provenance).await?;
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
        let order = order(client, kind, self.trades(kind));
        let tiers = self.peer_tiers(client, digest, kind, &order).await?;
        let mut first_resp = None;
        let (size, media_type) = match tiers.first() {
            Some(t) => (Some(t.located.size), t.located.media_type.clone()),
            None => {
                let resp = self.upstream.send(req).await?;
                let size = resp.content_length();
                let mt = resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
                first_resp = Some(resp);
                self.access.note_accepted(&self.access.origin(client), Instant::now());
                (size, mt)
            }
        };
        if kind == Kind::Manifest && size.is_none_or(|s| s > MAX_MANIFEST_SIZE) {
            return Err(ResolveError::Unavailable(format!(
                "manifest size {size:?} is over {MAX_MANIFEST_SIZE} bytes or unknown"
            )));
        }
        // Room for all of it, or none is cached (the client is served through instead); without a size, room is
        // taken as the bytes arrive.
        let room = self.reserve_room(size.unwrap_or(0)).await?;
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
        let mut sink = Sink::new(file, partial.clone(), size, dl, room);
        // On failure, run_download tells the home this node holds nothing.
        self.fill(client, digest, kind, &mut req, &mut sink, tiers, first_resp).await?;
        let mut actual = sink.digest();
        if actual != *digest && !sink.peers_used.is_empty() {
            // Members' bytes: upstream's are the truth, which also shows who lied.
            self.metrics.store.verify_failures.inc();
            self.metrics
                .mesh
                .failures
                .get_or_create(&crate::metrics::FailureLabels { reason: TransferFailure::digest_mismatch })
                .inc();
            let first = sink.restart();
            tracing::warn!(got = %actual, "members' pieces do not make up the digest: fetching it again from upstream");
            req.offset = 0;
            let resp = self.upstream.send(req).await?;
            self.fill_from_upstream(&mut req, &mut sink, resp).await?;
            actual = sink.digest();
            if actual == *digest
                && let (Some(mesh), Some(truth)) = (&self.mesh, sink.table())
            {
                let b = vouch::blame(&first.senders, &first.written, &first.vouchers, &truth);
                self.punish(mesh, &b, "a piece or piece table it vouched for contradicts upstream's bytes");
            }
        }
        if actual != *digest {
            self.metrics.store.verify_failures.inc();
            return Err(ResolveError::Unavailable(format!("content does not match its digest (got {actual})")));
        }
        // Clients get their last byte now; the fsync of a large blob must not delay them (a crash before the
        // commit only loses the cached copy, never serves a wrong byte).
        dl.progress.send_modify(|p| p.verified = true);
        let table = sink.table();
        if let Some(t) = &table {
            // Every piece may be served now (a download that held its readers kept its pieces from members).
            let mut held = Held::new(t.size, t.piece);
            for (i, h) in t.hashes.iter().enumerate() {
                held.set(i, *h, false);
            }
            *lock(&dl.pieces) = Some(held);
        }
        if let (Some(mesh), Some(truth)) = (&self.mesh, &table) {
            // A member that vouched for another table than the verified one lied, whoever sent the pieces.
            let b = vouch::blame(&[], &[], &sink.vouchers, truth);
            self.punish(mesh, &b, "the piece table it vouched for contradicts the verified blob");
        }
        let Sink { writer, written, .. } = sink;
        let (file, _) = writer.expect("the writer is put back after every batch");
        let meta = BlobMeta {
            size: written,
            media_type: media_type.clone(),
            last_access: now_secs(),
            public,
            registry: (!public).then(|| client.registry.clone()),
        };
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
    /// public copies only; a client with credentials gets any copy once a configured registry accepted them for
    /// this repository (peers' copies have no provenance this node can check: an unlisted registry cannot vouch
    /// for them), or public copies only, when upstream cannot be asked.
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
            (Some(_), true) => {
                match self.authorize(client, digest, kind, &Provenance { public: false, registry: None }).await {
                    Ok(()) => true,
                    Err(ResolveError::Unavailable(_)) => false,
                    Err(e) => return Err(e),
                }
            }
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
        // As the digest's home, this node brings the blob into its zone (from another zone or upstream).
        let _bringing_in = self.mesh.as_ref().filter(|m| m.home_of(digest) == m.id()).map(|_| {
            self.bringing_in.fetch_add(1, Ordering::Relaxed);
            BringingIn(&self.bringing_in)
        });
        if let (Some(mesh), Some(size)) = (&self.mesh, sink.size)
            && !tiers.is_empty()
        {
            let piece = u64::from(piece_size(size));
            let exchange = self.trades(kind);
            self.vouch(mesh, req, digest, size, &tiers, sink).await;
            // Rounds that brought nothing, in a row.
            let mut fruitless = 0;
            loop {
                let before = sink.have().count();
                for t in &tiers {
                    if !sink.written.is_multiple_of(piece) || sink.complete() {
                        break;
                    }
                    if exchange {
                        self.fill_by_exchange(mesh, (req, digest), sink, t, client.auth.is_none()).await?;
                    } else {
                        self.fill_from_peers(mesh, (req, digest), sink, t).await?;
                    }
                }
                if sink.complete() {
                    return Ok(());
                }
                fruitless = if sink.have().count() > before { 0 } else { fruitless + 1 };
                if fruitless == PEER_ROUNDS || !sink.written.is_multiple_of(piece) {
                    break;
                }
                tracing::info!(offset = sink.written, "sources ran out: asking where to continue");
                tiers = self.peer_tiers(client, digest, kind, &order(client, kind, exchange)).await?;
                tiers.retain(|t| t.located.size == size);
                if tiers.is_empty() {
                    break;
                }
            }
            tracing::info!(offset = sink.written, "no peer could finish the blob: continuing from upstream");
            if sink.scattered.is_some() {
                let r = self.fill_missing_from_upstream(req, sink).await;
                if r.is_ok() {
                    self.access.note_accepted(&self.access.origin(client), Instant::now());
                }
                return r;
            }
        }
        let resp = match first_resp {
            Some(r) => r,
            None => {
                req.offset = sink.written;
                let r = self.upstream.send(*req).await?;
                self.access.note_accepted(&self.access.origin(client), Instant::now());
                r
            }
        };
        self.fill_from_upstream(req, sink, resp).await
    }

    /// Whether downloads of this kind trade pieces out of order (blobs, with `swarm = "exchange"`).
    fn trades(&self, kind: Kind) -> bool {
        kind == Kind::Blob && self.mesh.as_ref().is_some_and(|m| m.swarm() == crate::config::Swarm::Exchange)
    }

    /// Fills the pieces a scattered download still lacks from upstream, a range request per run of missing pieces
    /// (a body that breaks is asked again from the first piece it did not finish, five times at most).
    async fn fill_missing_from_upstream(&self, req: &mut Request<'_>, sink: &mut Sink<'_>) -> Result<(), ResolveError> {
        let size = sink.size.ok_or_else(|| ResolveError::Unavailable("a scattered download without a size".into()))?;
        let piece = piece_size(size);
        let stall = self.upstream.stall_timeout();
        let mut breaks = 0;
        while let Some((first, end)) = sink.missing_run() {
            let (start, _) = piece_range(size, piece, first);
            let stop = piece_range(size, piece, end - 1);
            req.offset = start;
            req.end = Some(stop.0 + stop.1);
            let resp = self.upstream.send(*req).await?;
            req.end = None;
            // A registry that ignored the range sends the blob from its first byte.
            let mut skip = if resp.status() == http::StatusCode::PARTIAL_CONTENT { 0 } else { start };
            let mut body = resp.bytes_stream();
            let mut k = first;
            let mut buf: Vec<bytes::Bytes> = Vec::new();
            let mut have = 0u64;
            let broken = loop {
                if k == end {
                    break None;
                }
                let mut chunk = match tokio::time::timeout(stall, body.next()).await {
                    Ok(Some(Ok(c))) => c,
                    Ok(Some(Err(e))) => break Some(crate::upstream::error_chain(&e)),
                    Ok(None) => break Some("body ended early".to_owned()),
                    Err(_) => break Some(format!("no data for {stall:?}")),
                };
                let drop_n = skip.min(chunk.len() as u64);
                skip -= drop_n;
                let _ = chunk.split_to(drop_n as usize);
                while !chunk.is_empty() && k < end {
                    let want = piece_range(size, piece, k).1;
                    let take = (want - have).min(chunk.len() as u64) as usize;
                    buf.push(chunk.split_to(take));
                    have += take as u64;
                    self.upstream.count_bytes(take as u64);
                    if have == want {
                        let mut h = blake3::Hasher::new();
                        for b in &buf {
                            h.update(b);
                        }
                        let hash = *h.finalize().as_bytes();
                        sink.put_piece(k, std::mem::take(&mut buf), hash, (None, true)).await?;
                        have = 0;
                        k += 1;
                    }
                }
            };
            if let Some(reason) = broken {
                breaks += 1;
                if breaks > 5 {
                    return Err(ResolveError::Unavailable(format!("upstream body broke {breaks} times: {reason}")));
                }
                tracing::info!(piece = k, %reason, "upstream body broke; asking again from the piece it did not finish");
            }
        }
        Ok(())
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
                    if size.is_none() {
                        self.grow_room(&mut sink.room, n).await?;
                    }
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
}

/// Counts a download in [`Resolver::bringing_in`] while it lives.
struct BringingIn<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for BringingIn<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(super) async fn wait_progress(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pieces::MIN_PIECE;

    #[test]
    fn pieces_brought_in_are_told_to_one_trading_watcher_in_turn() {
        let mut h = Held::new(8 * u64::from(MIN_PIECE), MIN_PIECE);
        let (a, b, c) = (h.watch(true), h.watch(true), h.watch(true));
        let far = h.watch(false);
        for i in 0..6 {
            h.set(i, [i as u8; 32], true);
        }
        // A piece that came from a member of the zone is told to everyone.
        h.set(6, [6; 32], false);
        let told = |h: &Held, w| h.bits_for(w).ones().collect::<Vec<_>>();
        let (ta, tb, tc) = (told(&h, a), told(&h, b), told(&h, c));
        for t in [&ta, &tb, &tc] {
            assert_eq!(t.len(), 3, "two pieces brought in each, and the zone's one: {ta:?} {tb:?} {tc:?}");
            assert!(t.contains(&6));
        }
        for i in 0..6 {
            let holders = [&ta, &tb, &tc].iter().filter(|t| t.contains(&i)).count();
            assert_eq!(holders, 1, "piece {i} is told to exactly one trading watcher");
        }
        // A member of another zone is served, not traded with: it hears of every piece.
        assert_eq!(told(&h, far), (0..7).collect::<Vec<_>>());
        // A watcher that leaves leaves its pieces to everyone.
        h.unwatch(a);
        let tb = told(&h, b);
        for i in ta {
            assert!(tb.contains(&i), "piece {i} of the watcher that left");
        }
        // Without trading watchers, a piece brought in is told to everyone.
        let mut h = Held::new(u64::from(MIN_PIECE), MIN_PIECE);
        h.set(0, [0; 32], true);
        let w = h.watch(true);
        assert_eq!(h.bits_for(w).count(), 1);
    }
}
