//! Downloads: the table of downloads running on this node (one per digest), each a task that fills a partial file
//! from peers (pieces as the [`PieceScheduler`] decides) and then upstream, hashing as it writes, and commits it;
//! readers follow its [`Progress`].

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http::header;
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::access::{Origin, Provenance};
use super::{Client, Kind, MAX_MANIFEST_SIZE, ResolveError, Resolver, blocking, lock, order, removed, target};
use crate::mesh::{Holding, Mesh, Order, Tier};
use crate::metrics::TransferFailure;
use crate::oci::{Digest, Reference};
use crate::pieces::{PieceHasher, PieceTable, piece_count, piece_range, piece_size};
use crate::store::{BlobMeta, LinkRecord, now_secs};
use crate::swarm::scheduler::{Action as SchedAction, PieceScheduler, SchedulerConfig};
use crate::swarm::vouch::{self, Sender, Vouch};
use crate::transfer::{FetchError, VerifiedPiece};
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

#[derive(Debug)]
pub(super) struct Download {
    pub(super) origin: Origin,
    pub(super) progress: watch::Sender<Progress>,
    /// Piece size and the hashes of the pieces written so far (for serving peers while the download runs).
    pub(super) pieces: Mutex<Option<(u32, Vec<[u8; 32]>)>>,
    /// When someone last wanted it (a client reading it, a member asking for a piece).
    pub(super) wanted: Mutex<Instant>,
    /// Nobody wanting it for this long abandons it.
    abandon_after: Duration,
}

impl Download {
    pub(super) fn new(origin: Origin, progress: watch::Sender<Progress>, abandon_after: Duration) -> Self {
        Self { origin, progress, pieces: Mutex::new(None), wanted: Mutex::new(Instant::now()), abandon_after }
    }

    /// Someone wants it now.
    pub(super) fn wanted(&self) {
        *lock(&self.wanted) = Instant::now();
    }

    /// Whether nobody has wanted it for `abandon_after`: no client follows it and no member asked for a piece.
    fn abandoned(&self, now: Instant) -> bool {
        if self.progress.receiver_count() > 0 {
            *lock(&self.wanted) = now;
            return false;
        }
        now.saturating_duration_since(*lock(&self.wanted)) > self.abandon_after
    }
}

/// Room reserved in the store for a running download; given back when it ends.
pub(super) struct Room {
    pub(super) reserved: Arc<AtomicU64>,
    pub(super) size: u64,
    /// The size at the last free-space check (room taken as bytes arrive).
    pub(super) checked: u64,
}

impl Drop for Room {
    fn drop(&mut self) {
        self.reserved.fetch_sub(self.size, Ordering::SeqCst);
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
                let b = vouch::blame(&first.senders, &first.written, &sink.vouchers, &truth);
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
            *lock(&dl.pieces) = Some((t.piece, t.hashes.clone()));
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
        if let (Some(mesh), Some(size)) = (&self.mesh, sink.size)
            && !tiers.is_empty()
        {
            let piece = u64::from(piece_size(size));
            self.vouch(mesh, req, digest, size, &tiers, sink).await;
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
                self.access.note_accepted(&self.access.origin(client), Instant::now());
                r
            }
        };
        self.fill_from_upstream(req, sink, resp).await
    }

    /// Asks up to two of the tiers' complete holders for their piece tables and decides what this download
    /// believes ([`vouch::weigh`]): two that agree are checked against every piece and readers are streamed to; two
    /// that disagree are settled by upstream's bytes of the first piece in dispute (the one that lied is
    /// quarantined); one member's word holds the readers until the sha256 matched. Without complete holders
    /// (a cold burst) pieces stream on their senders' hashes.
    async fn vouch(
        &self,
        mesh: &Mesh,
        req: &Request<'_>,
        digest: &Digest,
        size: u64,
        tiers: &[Tier],
        sink: &mut Sink<'_>,
    ) {
        let mut complete: Vec<libp2p::PeerId> = Vec::new();
        for (p, _) in tiers.iter().flat_map(|t| &t.located.holders).filter(|(_, s)| s.complete) {
            if !complete.contains(p) && !mesh.is_quarantined(p) {
                complete.push(*p);
            }
        }
        if complete.is_empty() {
            return;
        }
        if complete.len() < 2 {
            // The home handed out one; it knows the others (complete holders first): a second word saves holding
            // the readers.
            for (p, _) in mesh.locate(digest).await.into_iter().flat_map(|l| l.holders).filter(|(_, s)| s.complete) {
                if !complete.contains(&p) && !mesh.is_quarantined(&p) {
                    complete.push(p);
                }
            }
        }
        let asked = complete.iter().take(2).map(|p| async move { (*p, mesh.piece_table(*p, digest, size).await) });
        let mut tables = Vec::new();
        for (p, t) in futures_util::future::join_all(asked).await {
            match t {
                Ok(t) => tables.push((p, t)),
                Err(e) => tracing::info!(peer = %p, error = %e, "a complete holder gave no piece table"),
            }
        }
        sink.vouchers.clone_from(&tables);
        match vouch::weigh(&tables) {
            Vouch::Agreed(t) => sink.trusted = Some(t),
            Vouch::Disputed { piece: i } => {
                let truth = match self.upstream_piece(*req, size, i).await {
                    Ok(h) => h,
                    Err(e) => {
                        tracing::warn!(error = %e, "members' piece tables disagree and upstream cannot settle it");
                        sink.hold = true;
                        return;
                    }
                };
                let (winner, liars) = vouch::settle(&tables, i, truth);
                let blame = vouch::Blame { liars: liars.into_iter().collect(), relayed: Default::default() };
                self.punish(mesh, &blame, "its piece table contradicts upstream's bytes");
                sink.hold = winner.is_none();
                sink.trusted = winner;
            }
            Vouch::One(_) | Vouch::Nobody => sink.hold = true,
        }
        tracing::info!(
            tables = tables.len(),
            trusted = sink.trusted.is_some(),
            hold = sink.hold,
            "piece tables weighed"
        );
    }

    /// The BLAKE3 hash of piece `i` as upstream sends it.
    async fn upstream_piece(&self, mut req: Request<'_>, size: u64, i: u64) -> Result<[u8; 32], ResolveError> {
        let (offset, len) = piece_range(size, piece_size(size), i);
        req.offset = offset;
        let resp = self.upstream.send(req).await?;
        // A registry that ignored the range sends the blob from its first byte.
        let mut skip = if resp.status() == http::StatusCode::PARTIAL_CONTENT { 0 } else { offset };
        let mut left = len;
        let mut hasher = blake3::Hasher::new();
        let mut body = resp.bytes_stream();
        let stall = self.upstream.stall_timeout();
        while left > 0 {
            let chunk = match tokio::time::timeout(stall, body.next()).await {
                Ok(Some(Ok(c))) => c,
                Ok(Some(Err(e))) => return Err(ResolveError::Unavailable(crate::upstream::error_chain(&e))),
                Ok(None) => return Err(ResolveError::Unavailable("upstream's body ended before the piece".into())),
                Err(_) => return Err(ResolveError::Unavailable(format!("no data from upstream for {stall:?}"))),
            };
            let drop_n = skip.min(chunk.len() as u64);
            skip -= drop_n;
            let rest = &chunk[drop_n as usize..];
            let take = rest.len().min(left as usize);
            hasher.update(&rest[..take]);
            self.upstream.count_bytes(take as u64);
            left -= take as u64;
        }
        Ok(*hasher.finalize().as_bytes())
    }

    /// Quarantines proven liars; counts both kinds of blame.
    fn punish(&self, mesh: &Mesh, blame: &vouch::Blame, reason: &str) {
        let count = || {
            self.metrics
                .mesh
                .failures
                .get_or_create(&crate::metrics::FailureLabels { reason: TransferFailure::table_mismatch })
                .inc();
        };
        for p in &blame.liars {
            count();
            mesh.quarantine(*p, reason);
        }
        for p in &blame.relayed {
            count();
            tracing::info!(peer = %p, "a partial holder passed on a piece upstream contradicts (perhaps a liar's)");
        }
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
        let mut delivered: HashMap<u64, (VerifiedPiece, Sender)> = HashMap::new();
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
                Some(Ok(p)) if sink.trusted.as_ref().is_some_and(|t| t.hashes.get(i as usize) != Some(&p.hash)) => {
                    // Its bytes match the hash it sent, not the table two members vouched for: refused, and the
                    // piece taken from another source. A complete holder that vouched for that table itself is
                    // not trusted again; a partial holder may have relayed a liar's piece.
                    tracing::warn!(peer = %sources[source], piece = i, "a piece contradicts the vouched piece table");
                    let peer = sources[source];
                    let mut blame = vouch::Blame::default();
                    if sink.vouchers.iter().any(|(v, _)| *v == peer) {
                        blame.liars.insert(peer);
                    } else {
                        blame.relayed.insert(peer);
                    }
                    self.punish(mesh, &blame, "it sent a piece that contradicts the piece table it vouched for");
                    sched.failed(i, source);
                }
                Some(Ok(p)) => {
                    for c in sched.delivered(i, source, Instant::now()) {
                        if let SchedAction::Cancel { piece: ci, source: cs } = c
                            && let Some(stop) = stops.remove(&(ci, cs))
                        {
                            stop.cancel();
                        }
                    }
                    sink.peers_used.insert(sources[source]);
                    let complete = sink.vouchers.iter().any(|(v, _)| *v == sources[source]);
                    delivered.insert(i, (p, Sender { peer: sources[source], complete }));
                    while let Some(next) = sched.next_to_write() {
                        let (p, sender) =
                            delivered.remove(&next).expect("the scheduler releases only delivered pieces");
                        sink.write_piece(p, sender).await?;
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

pub(super) struct Sink<'a> {
    pub(super) dl: &'a Download,
    pub(super) path: PathBuf,
    pub(super) writer: Option<(std::fs::File, Sha256)>,
    pub(super) pieces: Option<PieceHasher>,
    pub(super) written: u64,
    pub(super) size: Option<u64>,
    pub(super) peers_used: HashSet<libp2p::PeerId>,
    /// The room it takes in the store.
    pub(super) room: Room,
    /// Who sent each piece written (`None`: upstream's bytes).
    pub(super) senders: Vec<Option<Sender>>,
    /// The tables members vouched for (see [`vouch`]).
    pub(super) vouchers: Vec<(libp2p::PeerId, PieceTable)>,
    /// The table every piece from a member must match (two members agreed on it, or upstream settled it).
    pub(super) trusted: Option<PieceTable>,
    /// Readers wait for the sha256: the pieces rest on one member's word.
    pub(super) hold: bool,
}

/// What a pass over the blob wrote, kept when it is written again from upstream.
pub(super) struct Pass {
    pub(super) senders: Vec<Option<Sender>>,
    pub(super) written: Vec<[u8; 32]>,
}

impl<'a> Sink<'a> {
    fn new(file: std::fs::File, path: PathBuf, size: Option<u64>, dl: &'a Download, room: Room) -> Self {
        let pieces = size.map(|s| PieceHasher::new(piece_size(s)));
        if let Some(h) = &pieces {
            *lock(&dl.pieces) = Some((h.piece(), Vec::new()));
        }
        let writer = Some((file, Sha256::new()));
        Self {
            dl,
            path,
            writer,
            pieces,
            written: 0,
            size,
            peers_used: HashSet::new(),
            room,
            senders: Vec::new(),
            vouchers: Vec::new(),
            trusted: None,
            hold: false,
        }
    }

    fn complete(&self) -> bool {
        self.size.is_some_and(|s| self.written == s)
    }

    /// The sha256 of what is written.
    fn digest(&self) -> Digest {
        Digest::from_sha256(
            &self.writer.as_ref().expect("the writer is put back after every batch").1.clone().finalize(),
        )
    }

    /// The piece table of what is written (with a known size).
    fn table(&self) -> Option<PieceTable> {
        self.pieces.clone().map(|h| h.finish(self.written))
    }

    /// Starts the blob again from its first byte (the file emptied, readers told), returning what this pass
    /// wrote.
    fn restart(&mut self) -> Pass {
        let written = self.table().map(|t| t.hashes).unwrap_or_default();
        let pass = Pass { senders: std::mem::take(&mut self.senders), written };
        if let Some((file, hasher)) = self.writer.as_mut() {
            *hasher = Sha256::new();
            // Emptied in place: readers that sent nothing yet keep their handle and read the new bytes.
            let _ = file.set_len(0).and_then(|()| io::Seek::seek(file, io::SeekFrom::Start(0)).map(drop));
        }
        self.pieces = self.size.map(|s| PieceHasher::new(piece_size(s)));
        if let Some(h) = &self.pieces {
            *lock(&self.dl.pieces) = Some((h.piece(), Vec::new()));
        }
        self.written = 0;
        // Upstream's bytes now: streamed as any upstream download's are.
        self.hold = false;
        self.trusted = None;
        self.dl.progress.send_modify(|p| {
            p.written = 0;
            p.released = 0;
            p.restarts += 1;
        });
        pass
    }

    /// Writes a piece whose hash was checked on receipt: its hash goes into the table as is (when it is exactly
    /// the next piece), saving a second BLAKE3 pass.
    async fn write_piece(&mut self, piece: VerifiedPiece, sender: Sender) -> Result<(), ResolveError> {
        let len = piece.len();
        let aligned = self.pieces.as_mut().is_some_and(|p| p.push_verified(piece.hash, len, self.size));
        if aligned {
            let i = self.pieces.as_ref().map_or(0, |p| p.hashes().len()) - 1;
            self.senders.resize(i + 1, None);
            self.senders[i] = Some(sender);
        }
        self.write_impl(piece.chunks, !aligned).await
    }

    /// Hashes and writes a batch off the async workers, then tells readers and the piece table.
    async fn write(&mut self, batch: Vec<Bytes>) -> Result<(), ResolveError> {
        self.write_impl(batch, true).await
    }

    async fn write_impl(&mut self, batch: Vec<Bytes>, piece_hash: bool) -> Result<(), ResolveError> {
        if self.dl.abandoned(Instant::now()) {
            return Err(ResolveError::Unavailable(format!(
                "abandoned at {} bytes: nobody wanted it for {:?}",
                self.written, self.dl.abandon_after
            )));
        }
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
        // Members get pieces of a download that holds its readers only once it is verified: a relay of what rests
        // on one member's word would spread it past this node's check.
        if let Some(p) = pieces.as_ref().filter(|_| !self.hold) {
            let mut shared = lock(&self.dl.pieces);
            if let Some((_, hashes)) = shared.as_mut() {
                hashes.extend_from_slice(&p.hashes()[hashes.len()..]);
            }
        }
        self.pieces = pieces;
        let (written, hold) = (self.written, self.hold);
        self.dl.progress.send_modify(|p| {
            p.written = written;
            if !hold {
                p.released = written;
            }
        });
        Ok(())
    }
}

pub(super) struct RemoveOnDrop(pub(super) PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
