//! A download's pieces traded out of order (`swarm = "exchange"`): the [`Exchange`] decides which peer gives which
//! piece (only pieces a peer is known to have, rarest first); this loop watches every peer's pieces (their sets as
//! they grow), sends the requests it decides, checks what arrives as [`super::from_peers`] does, and writes each
//! piece at its offset ([`Sink::put_piece`]). Peers are the holders the home handed out, and members downloading
//! the same blob that watch this node's pieces (trading goes both ways).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::{BoxStream, FuturesUnordered, SelectAll};
use libp2p::PeerId;
use tokio_util::sync::CancellationToken;

use super::download::Traders;
use super::sink::Sink;
use super::{ResolveError, Resolver, lock};
use crate::mesh::{Mesh, Tier};
use crate::oci::Digest;
use crate::pieces::{piece_count, piece_range, piece_size};
use crate::swarm::bitfield::Bitfield;
use crate::swarm::exchange::{Action, Exchange, ExchangeConfig};
use crate::swarm::vouch::Sender;
use crate::transfer::{FetchError, VerifiedPiece};
use crate::upstream::Request;
use shoal_proto::peer::error::Code;

/// Peers one download trades with, at most (handed out, and members that came to trade).
const MAX_PEERS: usize = 32;
/// How long a peer that answered BUSY (no upload slot free) is left alone.
const BUSY_REST: Duration = Duration::from_millis(100);

/// What a peer's watch said: its set of pieces now, or that it ended.
type Watch<'a> = BoxStream<'a, (usize, Option<Result<Bitfield, FetchError>>)>;

/// A peer of one exchange.
#[derive(Debug, Clone, Copy)]
struct Trader {
    peer: PeerId,
    /// The home said it holds the whole blob, verified (a member that came to trade does not).
    complete: bool,
    /// It is in another zone: its pieces are brought into this one.
    far: bool,
    /// Its first piece set, or the end of its watch, came.
    heard: bool,
}

/// Takes the trader channel out of the download when the exchange ends.
struct Untrade<'a>(&'a std::sync::Mutex<Option<Traders>>);

impl Drop for Untrade<'_> {
    fn drop(&mut self) {
        *lock(self.0) = None;
    }
}

impl Resolver {
    /// Trades pieces with the tier's holders, and with members that come to trade, until the blob is here, no
    /// peer can give more (every one gone or holding nothing new), nothing arrived nor was heard of for the
    /// stall timeout, or the digest's home moved. Pieces are written where they belong; what is missing at the
    /// end comes from upstream ([`Resolver::fill_missing_from_upstream`]).
    pub(super) async fn fill_by_exchange(
        &self,
        mesh: &Mesh,
        (req, digest): (&Request<'_>, &Digest),
        sink: &mut Sink<'_>,
        tier: &Tier,
        public: bool,
    ) -> Result<(), ResolveError> {
        let size = tier.located.size;
        let piece = piece_size(size);
        let count = piece_count(size, piece);
        sink.scatter();
        let me = mesh.id();
        let mut cfg = ExchangeConfig::for_piece(piece);
        let home = mesh.home_of(digest);
        let home_here = home == me;
        if home_here {
            // The home trades only to bring the blob in (from another zone, or after the previous home died): the
            // whole zone waits on its intake.
            cfg = cfg.across_zones();
        }
        let seed = {
            let h = blake3::hash(&[me.to_bytes(), digest.to_string().into_bytes()].concat());
            u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
        };
        let mut ex = Exchange::new(cfg, count, &sink.have(), seed);
        let (tell, mut told) = tokio::sync::mpsc::unbounded_channel();
        *lock(&sink.dl.traders) = Some(Traders { public, tell: tell.clone() });
        let _untrade = Untrade(&sink.dl.traders);
        for (p, _) in &tier.located.holders {
            let _ = tell.send(*p);
        }
        // The exchange's peers, by its index.
        let mut traders: Vec<Trader> = Vec::new();
        let said_complete = |p: &PeerId| tier.located.holders.iter().any(|(h, s)| h == p && s.complete);
        let view = mesh.view();
        let mut watches: SelectAll<Watch<'_>> = SelectAll::new();
        let fetch = |i: u64, source: usize, peer: PeerId, stop: CancellationToken| {
            let (offset, len) = piece_range(size, piece, i);
            async move {
                let r = tokio::select! {
                    r = mesh.fetch_piece(peer, digest, (offset, len as u32), Duration::ZERO) => Some(r),
                    () = stop.cancelled() => None,
                };
                (i, source, r)
            }
        };
        let mut inflight = FuturesUnordered::new();
        let mut stops: HashMap<(u64, usize), CancellationToken> = HashMap::new();
        let stall = self.upstream.stall_timeout();
        let mut heard = Instant::now();
        // Whether pieces may still come to peers that lack them: from a home fetching from outside (a followed
        // tier: the digest's home zone's home), or, on a member, from its zone's home. The home itself, given
        // only partial holders of its zone (the previous home died), waits for nobody: it fetches the rest.
        let news = tier.follow || !home_here;
        let moved = mesh.home_moved(digest, home);
        tokio::pin!(moved);
        loop {
            // While this node brings another blob into its zone, this one takes one piece at a time: with a full
            // window of its own it would take most of the link from that single download, and the whole zone
            // waits on it (simulated: docs/scale.md).
            let bringing_in = !home_here && self.bringing_in.load(std::sync::atomic::Ordering::Relaxed) > 0;
            ex.set_window(if bringing_in { 1 } else { cfg.window });
            for a in ex.poll(Instant::now()) {
                if let Action::Fetch { piece: i, source } = a {
                    let stop = CancellationToken::new();
                    stops.insert((i, source), stop.clone());
                    inflight.push(fetch(i, source, traders[source].peer, stop));
                }
            }
            if ex.is_complete() {
                return Ok(());
            }
            // Nothing out, nobody to hear from, and nobody has what is missing: nothing more can come.
            if ex.requests() == 0
                && (watches.is_empty() || (!news && traders.iter().all(|t| t.heard)))
                && !ex.can_progress()
                && told.is_empty()
            {
                tracing::info!(have = ex.have().count(), count, "no peer has more of this blob");
                return Ok(());
            }
            if heard.elapsed() >= stall {
                tracing::info!(have = ex.have().count(), count, ?stall, "no piece nor news from any peer");
                return Ok(());
            }
            // The stall's end, or a resting peer's.
            let wake = ex.rest_ends(Instant::now()).map_or(heard + stall, |r| r.min(heard + stall));
            tokio::select! {
                biased;
                Some((i, source, result)) = inflight.next() => {
                    stops.remove(&(i, source));
                    let Trader { peer, complete, far, .. } = traders[source];
                    match result {
                        // Cancelled (another peer delivered it first), or a late copy.
                        None => {}
                        Some(Ok(_)) if !ex.awaits(i, source) => {}
                        Some(Ok(p)) if self.contradicts_vouched(mesh, req, sink, (peer, complete), i, &p).await => {
                            ex.failed(i, source);
                        }
                        Some(Ok(p)) => {
                            heard = Instant::now();
                            for c in ex.delivered(i, source, Instant::now()) {
                                if let Action::Cancel { piece: ci, source: cs } = c
                                    && let Some(stop) = stops.remove(&(ci, cs))
                                {
                                    stop.cancel();
                                }
                            }
                            sink.peers_used.insert(peer);
                            let vouched = sink.vouchers.iter().any(|(v, _)| *v == peer);
                            let VerifiedPiece { chunks, hash } = p;
                            let sender = Sender { peer, complete: vouched };
                            sink.put_piece(i, chunks, hash, (Some(sender), far)).await?;
                        }
                        // Out of upload slots: asked again a little later, not dropped.
                        Some(Err(FetchError::Refused { code: Code::Busy, .. })) => {
                            ex.refused(i, source, Instant::now() + BUSY_REST);
                        }
                        Some(Err(e)) => {
                            tracing::info!(%peer, piece = i, error = %e, "peer failed a piece");
                            sink.dl.tally.failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            ex.failed(i, source);
                        }
                    }
                }
                Some((k, update)) = watches.next() => {
                    // Its first set, an error or the watch's end: heard from either way.
                    traders[k].heard = true;
                    match update {
                    Some(Ok(bits)) => {
                        let before = ex.wants_from(k);
                        ex.peer_has_all(k, &bits);
                        if ex.wants_from(k) && !before {
                            heard = Instant::now();
                        }
                    }
                    Some(Err(e)) => {
                        tracing::debug!(peer = %traders[k].peer, error = %e, "a peer's piece watch failed");
                        ex.peer_gone(k);
                    }
                    // Ended after a full set: the peer keeps what it has. Ended otherwise: it holds nothing more.
                    None => {
                        if !ex.peer_failed(k) && !ex.peer_has_every_piece(k) {
                            ex.peer_gone(k);
                        }
                    }
                    }
                }
                Some(p) = told.recv() => {
                    let known = traders.iter().any(|t| t.peer == p);
                    if p == me || known || traders.len() >= MAX_PEERS || mesh.is_quarantined(&p) {
                        continue;
                    }
                    let k = ex.add_peer(&Bitfield::new(count));
                    traders.push(Trader {
                        peer: p,
                        complete: said_complete(&p),
                        far: view.zone_of(&p) != Some(view.zone.as_str()),
                        heard: false,
                    });
                    watches.push(watch(mesh, p, digest, count, public, k));
                }
                () = &mut moved => {
                    tracing::info!(have = ex.have().count(), "the digest's home moved: asking where to continue");
                    return Ok(());
                }
                () = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }
}

/// `peer`'s piece sets for the exchange's peer `k`, then `None` once the watch ends.
fn watch<'a>(mesh: &'a Mesh, peer: PeerId, digest: &'a Digest, count: u64, public: bool, k: usize) -> Watch<'a> {
    let opened = mesh.watch_pieces(peer, digest, count, public);
    let stream = futures_util::stream::once(opened).flat_map(move |r| match r {
        Ok(sets) => sets.map(move |s| (k, Some(s))).chain(futures_util::stream::once(async move { (k, None) })).boxed(),
        Err(e) => futures_util::stream::iter([(k, Some(Err(e))), (k, None)]).boxed(),
    });
    stream.boxed()
}
