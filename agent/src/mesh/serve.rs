//! Serving members: the answers this node gives as a digest's home (announcements applied to its directory,
//! locates answered, downloads started for the zone) and as a holder (pieces, under an upload limit and a rate
//! cap). Started by [`Mesh::serve`] once the node's content ([`Local`]) exists; every answer that fails is a
//! [`Refusal`] turned into its wire code in one place.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use libp2p::PeerId;
use shoal_proto::peer::{self, request, response};
use tokio::sync::Semaphore;

use super::{HolderState, Holding, Local, Located, Mesh, Order, Refusal, lock};
use crate::oci::Digest;
use crate::swarm::bitfield::Bitfield;
use crate::swarm::directory::{HandOut, PEERS, PEERS_ACROSS_ZONES};
use crate::transfer::{Sent, Service, respond, respond_error, write_piece};
use futures_util::StreamExt as _;

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

/// What answers members' requests.
#[derive(Debug)]
pub(super) struct PeerServer {
    mesh: Arc<Mesh>,
    local: Arc<dyn Local>,
    uploads: Arc<Semaphore>,
    limiter: Option<RateLimiter>,
}

impl PeerServer {
    pub(super) fn new(mesh: Arc<Mesh>, local: Arc<dyn Local>) -> Self {
        let limiter = mesh
            .cfg
            .upload_rate
            .map(|r| RateLimiter { rate: r as f64, state: tokio::sync::Mutex::new((0.0, Instant::now())) });
        let uploads = Arc::new(Semaphore::new(mesh.cfg.max_uploads));
        Self { mesh, local, uploads, limiter }
    }

    /// Answers a locate. Without an order: who holds it (complete first). With one, from a member about to
    /// download it: if no usable complete holder is known, this node makes sure it downloads it itself (the one
    /// download for the zone), then hands the asker a few sources ahead of it ([`super::directory::Directory::sources`])
    /// and records the asker (of this zone) as a partial holder, a source for later askers.
    async fn answer_locate(&self, asker: PeerId, digest: &Digest, order: Option<Order>) -> Result<Located, Refusal> {
        let mesh = &self.mesh;
        let me = mesh.me;
        let view = mesh.view();
        let usable = |p: &PeerId| *p == me || (view.is_alive(p) && !mesh.is_quarantined(p));
        let no_holder = || Refusal::NotFound("no holder known".to_owned());
        let Some(order) = order else {
            return lock(&mesh.directory).locate(digest, &asker, usable).ok_or_else(no_holder);
        };
        let same_zone = view.zone_of(&asker) == Some(view.zone.as_str());
        if order.replica {
            // A preheat's replica: this node holds it, home or not (its download goes through the zone's home).
            let f = self.local.clone().fetch(digest.clone(), order).await?;
            let me_held = HolderState { complete: f.complete, public: f.public };
            return Ok(Located { size: f.size, media_type: f.media_type, holders: vec![(me, me_held)] });
        }
        // Views disagree for a moment after a change (the asker may see a death first): give this node's view the
        // time to agree. Two nodes that each think the other is the home would wait on each other: past that, the
        // asker goes upstream instead.
        if view.home(digest) != me {
            let mut rx = mesh.view.clone();
            let agreed = tokio::time::timeout(mesh.settle_time(), rx.wait_for(|v| v.home(digest) == me)).await;
            if !matches!(agreed, Ok(Ok(_))) {
                return Err(Refusal::NotFound("not the digest's home".to_owned()));
            }
        }
        let view = mesh.view();
        let usable = |p: &PeerId| *p == me || (view.is_alive(p) && !mesh.is_quarantined(p));
        let needs_origin = lock(&mesh.directory).needs_origin(digest, &asker, usable);
        if needs_origin {
            let f = self.local.clone().fetch(digest.clone(), order.clone()).await?;
            if f.started {
                mesh.metrics.mesh.home_fetches.inc();
            }
            let mut dir = lock(&mesh.directory);
            dir.apply(
                me,
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
        let mut dir = lock(&mesh.directory);
        if order.warm {
            // A preheat: the asker downloads nothing, so it is neither recorded nor handed sources.
            return dir.locate(digest, &asker, usable).ok_or_else(no_holder);
        }
        let record = same_zone.then_some(order.auth.is_none());
        let how = match (order.exchange, same_zone) {
            (false, _) => HandOut::Tree,
            (true, true) => HandOut::Exchange { peers: PEERS },
            // Another zone's home brings the blob into its zone: its intake is that zone's.
            (true, false) => HandOut::Exchange { peers: PEERS_ACROSS_ZONES },
        };
        let loc = dir.hand_out(digest, &asker, &me, usable, record, how).ok_or_else(no_holder)?;
        mesh.directory_gauges(&dir);
        Ok(loc)
    }

    /// Sends a piece. The wait for a piece being downloaded comes before the upload slot (waiting askers hold no
    /// slot); a slot is held only while the asker reads: a write that makes no progress for the stall timeout
    /// resets the stream and frees the slot.
    async fn serve_piece(&self, asker: PeerId, send: &mut quinn::SendStream, p: peer::GetPiece) -> Result<(), Refusal> {
        let digest = Digest::parse(&p.digest).map_err(|_| Refusal::BadRequest("bad digest".into()))?;
        let stall = self.mesh.cfg.peer_stall_timeout;
        let wait = Duration::from_millis(u64::from(p.wait_ms)).min(stall / 2);
        let piece = self.local.clone().piece(digest, p.offset, p.length, wait).await;
        let Ok(_permit) = self.uploads.clone().try_acquire_owned() else {
            self.mesh.metrics.mesh.uploads_refused.inc();
            return Err(Refusal::Busy("upload limit reached".into()));
        };
        let piece = piece?;
        let header = peer::PieceHeader {
            length: piece.data.len() as u32,
            blake3: piece.hash.to_vec(),
            blob_size: piece.blob_size,
        };
        let data = piece.data;
        #[cfg(feature = "fault-injection")]
        let (header, data) = crate::fault::piece(header, data);
        let frame = crate::transfer::encode_frame(&peer::Response { kind: Some(response::Kind::Piece(header)) });
        let limiter = self.limiter.as_ref();
        let pace = |n: usize| async move {
            if let Some(l) = limiter {
                l.take(n).await;
            }
        };
        let mut total = 0u64;
        let sent = |n: u64| {
            self.mesh.metrics.mesh.bytes_sent.inc_by(n);
            total += n;
        };
        let outcome = write_piece(send, &frame, &data, stall, pace, sent).await;
        // Per member once per piece, not per chunk: its map is behind a lock.
        self.mesh.peer_stats.sent(asker, total);
        if outcome == Sent::Stalled {
            tracing::info!(peer = %asker, "a member stopped reading a piece: stream reset, upload slot freed");
        }
        Ok(())
    }

    /// Sends each piece set as a frame until the sets end (then finishes the stream) or the watcher stops reading
    /// (a write that makes no progress for the stall timeout resets the stream).
    async fn send_sets(
        &self,
        send: &mut quinn::SendStream,
        mut sets: futures_util::stream::BoxStream<'static, Bitfield>,
    ) {
        let stall = self.mesh.cfg.peer_stall_timeout;
        loop {
            let next = tokio::select! {
                s = sets.next() => s,
                // The watcher is done with it (its download ended): stop without waiting for another set.
                _ = send.stopped() => return,
            };
            let Some(bits) = next else { break };
            let set = peer::PieceBits { count: bits.len(), words: bits.words().to_vec() };
            let frame = crate::transfer::encode_frame(&peer::Response { kind: Some(response::Kind::Bits(set)) });
            match tokio::time::timeout(stall, send.write_all(&frame)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                Err(_) => {
                    let _ = send.reset(0u32.into());
                    return;
                }
            }
        }
        let _ = send.finish();
    }

    async fn handle_impl(&self, peer: PeerId, req: request::Kind, send: &mut quinn::SendStream) -> Result<(), Refusal> {
        match req {
            request::Kind::Announce(a) => {
                self.mesh.apply_announcement(peer, a);
                respond(send, response::Kind::Announced(peer::AnnounceAck {})).await;
            }
            request::Kind::Locate(l) => {
                let digest = Digest::parse(&l.digest).map_err(|_| Refusal::BadRequest("bad digest".into()))?;
                let order = l.fetch.map(Order::from_wire).transpose().map_err(Refusal::BadRequest)?;
                let loc = self.answer_locate(peer, &digest, order).await?;
                let holders = loc
                    .holders
                    .iter()
                    .map(|(p, s)| peer::Holder { peer_id: p.to_bytes(), complete: s.complete, public: s.public })
                    .collect();
                let l = peer::Located { size: loc.size, media_type: loc.media_type, holders };
                respond(send, response::Kind::Located(l)).await;
            }
            // A member's answer about a tag is a claim nobody may serve by: every node asks upstream itself.
            request::Kind::ResolveTag(_) => {
                return Err(Refusal::NotFound("members do not resolve tags for each other".into()));
            }
            request::Kind::GetPiece(p) => self.serve_piece(peer, send, p).await?,
            request::Kind::GetPieceTable(t) => {
                let digest = Digest::parse(&t.digest).map_err(|_| Refusal::BadRequest("bad digest".into()))?;
                let table = self.local.clone().piece_table(digest.clone()).await?;
                #[cfg(feature = "fault-injection")]
                let table = crate::fault::table(self.local.clone(), digest, table).await;
                let hashes = table.hashes.iter().flatten().copied().collect();
                let t = peer::PieceTable { piece_size: table.piece, blob_size: table.size, hashes };
                respond(send, response::Kind::PieceTable(t)).await;
            }
            request::Kind::WatchPieces(w) => {
                let digest = Digest::parse(&w.digest).map_err(|_| Refusal::BadRequest("bad digest".into()))?;
                let sets = self.local.clone().watch_pieces(digest, peer, w.public).await?;
                self.send_sets(send, sets).await;
            }
            request::Kind::SharePins(p) => {
                if p.pins.len() > super::MAX_PINS {
                    return Err(Refusal::BadRequest(format!("more than {} pins", super::MAX_PINS)));
                }
                let pins = p.pins.into_iter().map(super::pin_from_wire).collect::<Result<Vec<_>, _>>();
                let mine = self.local.clone().merge_pins(pins.map_err(Refusal::BadRequest)?).await?;
                let pins = if p.want {
                    mine.iter().take(super::MAX_PINS).map(super::pin_to_wire).collect()
                } else {
                    Vec::new()
                };
                respond(send, response::Kind::Pins(peer::Pins { pins })).await;
            }
            request::Kind::Hello(_) => return Err(Refusal::BadRequest("already authenticated".into())),
        }
        Ok(())
    }
}

impl Service for PeerServer {
    fn handle(
        self: Arc<Self>,
        peer: PeerId,
        req: request::Kind,
        mut send: quinn::SendStream,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            if let Err(refusal) = self.handle_impl(peer, req, &mut send).await {
                respond_error(&mut send, refusal.code(), refusal.to_string()).await;
            }
        })
    }
}
