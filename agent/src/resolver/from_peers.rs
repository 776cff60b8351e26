//! A download's pieces from members: which holders' piece tables it believes ([`vouch`]), the pieces themselves as
//! the [`PieceScheduler`] hands them to sources, checked against the believed table, and the blame for liars.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::sink::Sink;
use super::{ResolveError, Resolver};
use crate::mesh::{Mesh, Tier};
use crate::metrics::TransferFailure;
use crate::oci::Digest;
use crate::pieces::{piece_count, piece_range, piece_size};
use crate::swarm::scheduler::{Action as SchedAction, PieceScheduler, SchedulerConfig};
use crate::swarm::vouch::{self, Sender, Vouch};
use crate::transfer::{FetchError, VerifiedPiece};
use crate::upstream::Request;

impl Resolver {
    /// Asks up to two of the tiers' complete holders for their piece tables and decides what this download
    /// believes ([`vouch::weigh`]): two that agree are checked against every piece and readers are streamed to; two
    /// that disagree are settled by upstream's bytes of the first piece in dispute (the one that lied is
    /// quarantined); one member's word holds the readers until the sha256 matched. Without complete holders
    /// (a cold burst) pieces stream on their senders' hashes.
    pub(super) async fn vouch(
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
                // Blamed once: the verified blob does not blame it again.
                sink.vouchers.retain(|(p, _)| !blame.liars.contains(p));
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
        req.end = Some(offset + len);
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
    pub(super) fn punish(&self, mesh: &Mesh, blame: &vouch::Blame, reason: &str) {
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

    /// Whether piece `i` from `peer` contradicts the piece table two members vouched for (its bytes match the hash
    /// it sent, not the table): it is refused and taken from another source. A holder that vouched for that table
    /// itself is not trusted again. A partial holder may have relayed a liar's piece; a `complete` one (it says it
    /// verified the blob) sends its own bytes: upstream's bytes of the piece settle whether it lied or the two
    /// that vouched did (then their table is dropped, and readers wait for the sha256).
    pub(super) async fn contradicts_vouched(
        &self,
        mesh: &Mesh,
        req: &Request<'_>,
        sink: &mut Sink<'_>,
        (peer, complete): (libp2p::PeerId, bool),
        i: u64,
        p: &VerifiedPiece,
    ) -> bool {
        let Some(vouched) = sink.trusted.as_ref().and_then(|t| t.hashes.get(i as usize)).copied() else {
            return false;
        };
        if vouched == p.hash {
            return false;
        }
        tracing::warn!(%peer, piece = i, "a piece contradicts the vouched piece table");
        let mut blame = vouch::Blame::default();
        if sink.vouchers.iter().any(|(v, _)| *v == peer) {
            blame.liars.insert(peer);
        } else if let (true, Some(size)) = (complete, sink.size) {
            match self.upstream_piece(*req, size, i).await {
                Ok(truth) if truth == vouched => {
                    blame.liars.insert(peer);
                }
                Ok(truth) if truth == p.hash => {
                    tracing::warn!(
                        piece = i,
                        "upstream's bytes match the piece, not the table two members vouched for"
                    );
                    blame.liars.extend(sink.vouchers.iter().map(|(v, _)| *v));
                    sink.vouchers.clear();
                    sink.trusted = None;
                    sink.hold = true;
                }
                Ok(_) => {
                    blame.relayed.insert(peer);
                }
                Err(e) => {
                    tracing::info!(error = %e, "upstream cannot settle a contradicted piece");
                    blame.relayed.insert(peer);
                }
            }
        } else {
            blame.relayed.insert(peer);
        }
        self.punish(mesh, &blame, "it sent a piece that contradicts the piece table it vouched for");
        true
    }

    /// Takes pieces from a tier's sources as the [`PieceScheduler`] decides (in order, a window of them, each to
    /// the source expected to deliver it soonest, the piece everyone waits on hedged when it straggles) and writes
    /// them in order. Returns when the tier has nothing more to give (every source failed, or, not following, a
    /// partial source lacks the next piece) or the digest's home moved.
    pub(super) async fn fill_from_peers(
        &self,
        mesh: &Mesh,
        (req, digest): (&Request<'_>, &Digest),
        sink: &mut Sink<'_>,
        tier: &Tier,
    ) -> Result<(), ResolveError> {
        let size = tier.located.size;
        let piece = piece_size(size);
        let count = piece_count(size, piece);
        let (sources, complete): (Vec<libp2p::PeerId>, Vec<bool>) =
            tier.located.holders.iter().filter(|(p, _)| !mesh.is_quarantined(p)).map(|(p, s)| (*p, s.complete)).unzip();
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
                Some(Ok(p))
                    if self.contradicts_vouched(mesh, req, sink, (sources[source], complete[source]), i, &p).await =>
                {
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
                    sink.dl.tally.failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    sched.failed(i, source);
                }
            }
        }
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
