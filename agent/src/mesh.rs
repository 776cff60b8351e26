//! The peer mesh: membership (gossip), each digest's home and its directory, and piece transfers between
//! members.
//!
//! A node tells each digest's home what it holds ([`Mesh::hold`]: downloads started, blobs committed or evicted);
//! an announcer task batches these to the homes, and when membership changes (homes move) it announces everything
//! again to the new homes. A node that misses a blob asks where to get it ([`Mesh::sources`]): the digest's home
//! answers with a few sources ahead of the asker, and starts the zone's one download itself when nobody has it
//! (from the digest's home zone, or upstream). Pieces come from those sources ([`Mesh::fetch_piece`]); a source
//! whose piece fails its hash is quarantined. The node answers the same requests from members once
//! [`Mesh::serve`] is given its content ([`Local`], the resolver): `serve.rs`. What a member says (who holds
//! what, a size) only guides where to look: bytes are checked against their hashes.
mod announce;
mod gossip;
mod local;
pub mod members;
mod peer_stats;
mod serve;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use libp2p::{PeerId, identity};
use rand::seq::IndexedRandom as _;
use shoal_proto::peer::{self, error::Code, request, response};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::swarm::directory::{self, HolderState, Holding, Located};
pub use local::{Fetched, Local, MAX_PINS, Order, Piece, Refusal, pin_from_wire, pin_to_wire};
pub use members::{Liveness, MemberInfo, MembersView};

use crate::config::MeshConfig;
use crate::metrics::{FailureLabels, Metrics, TransferFailure};
use crate::oci::Digest;
use crate::pieces::{PieceTable, piece_count, piece_size};
use crate::swarm::bitfield::Bitfield;
use crate::transfer::{FetchError, Transfer, TransferError, VerifiedPiece};

/// Longest wait for a home's answer to a locate (connection included).
const LOCATE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often pins are exchanged with a random member.
const PIN_SYNC_EVERY: Duration = Duration::from_secs(300);

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

/// One group of sources for a download, tried in order.
#[derive(Debug, Clone)]
pub struct Tier {
    /// The holders and the blob's size.
    pub located: Located,
    /// Partial holders are followed (they are ahead, fed by someone fetching from outside): wait for pieces they
    /// do not have yet. Otherwise take only what they have and move on.
    pub follow: bool,
}

/// The mesh, shared by the resolver and the transfer server.
#[derive(Debug)]
pub struct Mesh {
    me: PeerId,
    /// The gossip (TCP) and transfer (UDP) listeners' addresses.
    addrs: (SocketAddr, SocketAddr),
    cfg: MeshConfig,
    view: watch::Receiver<Arc<MembersView>>,
    transfer: Arc<Transfer>,
    directory: Mutex<directory::Directory>,
    quarantine: Mutex<HashMap<PeerId, Instant>>,
    holdings: mpsc::UnboundedSender<Holding>,
    /// The membership epoch the directory was last adjusted to, and until when it may still be missing holders
    /// after that change (they re-announce to new homes).
    settling: Mutex<([u8; 32], Instant)>,
    /// Signalled when announcements were applied to the directory.
    directory_changed: tokio::sync::Notify,
    metrics: Metrics,
    /// Bytes and last contact per member (`shoal peers`).
    peer_stats: Arc<peer_stats::PeerStats>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().expect("mesh locks are never poisoned: no code panics while holding one")
}

/// A peer's piece set for a blob of `count` pieces, checked: the same count, exactly enough words, no bit past the
/// end (else a protocol error: the watch ends and the peer is asked nothing more).
fn piece_set(count: u64, b: peer::PieceBits) -> Result<Bitfield, FetchError> {
    if b.count != count {
        return Err(FetchError::Protocol(format!("a set of {} pieces for a blob of {count}", b.count)));
    }
    Bitfield::from_words(count, b.words)
        .ok_or_else(|| FetchError::Protocol("a piece set of the wrong size or with bits past the blob's end".into()))
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
    /// Binds the transfer endpoint and the gossip listener and starts membership and announcements. Members'
    /// requests are answered once [`Mesh::serve`] is called (until then their connections wait in the endpoint's
    /// queue).
    pub async fn start(
        cfg: &MeshConfig,
        data_dir: &Path,
        metrics: Metrics,
        tasks: &TaskTracker,
        cancel: &CancellationToken,
    ) -> Result<Arc<Self>, MeshError> {
        let keypair = node_key(&data_dir.join("node.key"))?;
        let me = keypair.public().to_peer_id();
        let transfer = Arc::new(Transfer::bind(cfg.transfer_listen, &keypair, &cfg.secret, cfg.peer_stall_timeout)?);
        let bound = transfer.local_addr().map_err(|e| TransferError::Bind { addr: cfg.transfer_listen, source: e })?;
        let transfer_addr = SocketAddr::new(cfg.advertise_ip, bound.port());
        let initial = MembersView::new(me, cfg.zone.clone(), Vec::new());
        let initial_epoch = initial.epoch();
        let (view_tx, view) = watch::channel(Arc::new(initial));
        let peer_stats = Arc::new(peer_stats::PeerStats::default());
        let gossip =
            gossip::Gossip::new(cfg, keypair, transfer_addr, view_tx, metrics.clone(), peer_stats.clone()).await?;
        let gossip_addr = gossip.local_addr();
        let (holdings, rx) = mpsc::unbounded_channel();
        let mesh = Arc::new(Self {
            me,
            addrs: (gossip_addr, bound),
            cfg: cfg.clone(),
            view,
            transfer: transfer.clone(),
            directory: Mutex::new(directory::Directory::new(me)),
            quarantine: Mutex::default(),
            holdings,
            settling: Mutex::new((initial_epoch, Instant::now())),
            directory_changed: tokio::sync::Notify::new(),
            metrics,
            peer_stats,
        });
        tracing::info!(peer_id = %me, zone = %cfg.zone, gossip = %gossip_addr, transfer = %transfer_addr, "mesh started");
        tasks.spawn(gossip.run(cancel.child_token()));
        tasks.spawn(mesh.clone().announce_loop(rx, cancel.child_token()));
        Ok(mesh)
    }

    /// Piece bytes sent to and received from `peer`, and how long ago it was last heard from.
    pub fn peer_counters(&self, peer: &PeerId) -> (u64, u64, Option<Duration>) {
        let c = self.peer_stats.get(peer);
        (c.sent, c.received, c.heard.map(|h| h.elapsed()))
    }

    /// Answers members' requests (announcements, locates, pieces, pins) with this node's content, and exchanges
    /// pins with a random member now and then, until `cancel`.
    pub fn serve(self: &Arc<Self>, local: Arc<dyn Local>, tasks: &TaskTracker, cancel: CancellationToken) {
        let server = Arc::new(serve::PeerServer::new(self.clone(), local.clone()));
        tasks.spawn(self.transfer.clone().serve(server, tasks.clone(), cancel.clone()));
        tasks.spawn(self.clone().pin_sync_loop(local, cancel));
    }

    /// Tells every alive member these pin records. Returns (members told, members alive).
    pub async fn tell_pins(&self, pins: Vec<crate::store::PinRecord>) -> (u32, u32) {
        let view = self.view();
        let alive: Vec<(PeerId, SocketAddr)> = view
            .members
            .iter()
            .filter(|(_, l)| *l == Liveness::Alive)
            .filter_map(|(m, _)| Some((m.id, view.transfer_addr(&m.id)?)))
            .collect();
        let wire: Vec<peer::PinRecord> = pins.iter().map(pin_to_wire).collect();
        let told = futures_util::stream::iter(alive.iter().copied())
            .map(|(p, a)| {
                let req = request::Kind::SharePins(peer::SharePins { pins: wire.clone(), want: false });
                async move { self.transfer.call(p, a, req).await.is_ok() }
            })
            .buffer_unordered(32)
            .filter(|ok| std::future::ready(*ok))
            .count()
            .await;
        (told as u32, alive.len() as u32)
    }

    /// Every [`PIN_SYNC_EVERY`] (and soon after start), exchanges pin records with one random alive member: a
    /// member that was away when a pin was told learns it.
    async fn pin_sync_loop(self: Arc<Self>, local: Arc<dyn Local>, cancel: CancellationToken) {
        let mut wait = Duration::from_secs(5);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            wait = PIN_SYNC_EVERY;
            let view = self.view();
            let alive: Vec<PeerId> =
                view.members.iter().filter(|(_, l)| *l == Liveness::Alive).map(|(m, _)| m.id).collect();
            let Some(peer) = alive.choose(&mut rand::rng()).copied() else { continue };
            let Some(addr) = view.transfer_addr(&peer) else { continue };
            let Ok(mine) = local.clone().merge_pins(Vec::new()).await else { continue };
            let pins = mine.iter().take(MAX_PINS).map(pin_to_wire).collect();
            let req = request::Kind::SharePins(peer::SharePins { pins, want: true });
            match self.transfer.call(peer, addr, req).await {
                Ok(response::Kind::Pins(p)) if p.pins.len() <= MAX_PINS => {
                    let theirs: Result<Vec<_>, _> = p.pins.into_iter().map(pin_from_wire).collect();
                    match theirs {
                        Ok(theirs) => {
                            let _ = local.clone().merge_pins(theirs).await;
                        }
                        Err(e) => tracing::info!(%peer, error = %e, "a member's pins refused"),
                    }
                }
                Ok(_) => self.failure(TransferFailure::protocol),
                Err(e) => tracing::debug!(%peer, error = %e, "pin exchange failed"),
            }
        }
    }

    /// The gossip listener's address.
    pub fn gossip_addr(&self) -> SocketAddr {
        self.addrs.0
    }

    /// The transfer endpoint's address.
    pub fn transfer_addr(&self) -> SocketAddr {
        self.addrs.1
    }

    /// This node's id.
    pub fn id(&self) -> PeerId {
        self.me
    }

    /// Digests this node is the home of (in its directory).
    pub fn homed_digests(&self) -> usize {
        lock(&self.directory).len()
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

    /// A preheat of `digest` in `zone` (`order.warm`): its home there fetches it for the zone (from a holder, the
    /// home zone's home or upstream) unless it is held. Returns the home asked, `None` when this node is that home
    /// (the caller fetches it itself), or why the home could not be asked.
    pub async fn warm(
        &self,
        zone: &str,
        digest: &Digest,
        order: &Order,
        within: Duration,
    ) -> Result<Option<PeerId>, String> {
        let view = self.view();
        let home = view.home_in(zone, digest).ok_or_else(|| format!("zone {zone} has no alive member"))?;
        if home == self.me {
            return Ok(None);
        }
        match self.locate_at(home, digest, Some(order), within).await {
            Ok(_) => Ok(Some(home)),
            Err(e) => Err(format!("its home {home} could not be asked: {e}")),
        }
    }

    /// A preheat's replica: `member` downloads `digest` into its own store (through its zone's home, as any
    /// download), home or not; returns once it knows the size.
    pub async fn replicate(
        &self,
        member: PeerId,
        digest: &Digest,
        order: &Order,
        within: Duration,
    ) -> Result<(), String> {
        let order = Order { warm: true, replica: true, ..order.clone() };
        match self.locate_at(member, digest, Some(&order), within).await {
            Ok(_) => Ok(()),
            Err(e) => Err(format!("member {member} could not be asked to hold it: {e}")),
        }
    }

    /// The members of `zone` (this node included when there) that hold `digest` completely, as its home there
    /// knows them (this node's directory when it is that home), this node itself left out.
    pub async fn holders_in(&self, zone: &str, digest: &Digest) -> usize {
        let view = self.view();
        let Some(home) = view.home_in(zone, digest) else { return 0 };
        let located = if home == self.me {
            let usable = |p: &PeerId| *p == self.me || (view.is_alive(p) && !self.is_quarantined(p));
            // This node's own copy is the caller's to check (its store): the directory is asked about the others.
            lock(&self.directory).locate(digest, &self.me, usable)
        } else {
            self.locate_at(home, digest, None, LOCATE_TIMEOUT).await.ok().flatten()
        };
        let in_zone = |p: &PeerId| view.zone_of(p) == Some(zone);
        located.map_or(0, |l| l.holders.iter().filter(|(p, s)| s.complete && in_zone(p) && *p != self.me).count())
    }

    /// The alive members of `zone` (this node included when there).
    pub fn alive_in(&self, zone: &str) -> Vec<PeerId> {
        let view = self.view();
        let mut v: Vec<PeerId> =
            view.members.iter().filter(|(m, l)| *l == Liveness::Alive && m.zone == zone).map(|(m, _)| m.id).collect();
        if view.zone == zone {
            v.push(view.me);
        }
        v
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
            // What a home says about upstream (UPSTREAM_DOWN, from older members) is a reason to skip that home,
            // never evidence about upstream: this node asks upstream itself.
            Err(FetchError::Refused { code: Code::NotFound | Code::Unavailable | Code::UpstreamDown, message }) => {
                tracing::debug!(%home, %digest, message, "home has no source");
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
                self.peer_stats.received(peer, p.len());
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

    /// How this node's downloads take pieces from members.
    pub fn swarm(&self) -> crate::config::Swarm {
        self.cfg.swarm
    }

    /// Watches which of the `count` pieces of `digest` `peer` holds: its whole set now, then again each time it has
    /// more (at most every 20 ms). The stream ends after a full set, when the peer stops, or with the first
    /// error (a refusal, a set of another length or with bits past its end: a protocol error). `public`: this
    /// node downloads the blob for a client without credentials (the peer trades back only with the same
    /// provenance).
    pub async fn watch_pieces(
        &self,
        peer: PeerId,
        digest: &Digest,
        count: u64,
        public: bool,
    ) -> Result<futures_util::stream::BoxStream<'static, Result<Bitfield, FetchError>>, FetchError> {
        let Some(addr) = self.view().reachable_addr(&peer) else {
            return Err(FetchError::Connect(format!("{peer} is not a member or is dead")));
        };
        let req = request::Kind::WatchPieces(peer::WatchPieces { digest: digest.to_string(), public });
        let recv = self.transfer.open_series(peer, addr, req).await?;
        let frames = futures_util::stream::unfold(Some(recv), move |recv| async move {
            let mut recv = recv?;
            let r = match crate::transfer::read_frame::<peer::Response, _>(&mut recv, crate::transfer::MAX_FRAME).await
            {
                Ok(peer::Response { kind: Some(response::Kind::Bits(b)) }) => piece_set(count, b),
                Ok(peer::Response { kind: Some(response::Kind::Error(e)) }) => {
                    Err(FetchError::Refused { code: e.code(), message: e.message })
                }
                Ok(_) => Err(FetchError::Protocol("answer to a watch is not a piece set".into())),
                // Finished (after its full set) or gone: either way nothing more comes.
                Err(crate::transfer::FrameError::Truncated(_)) => return None,
                Err(e) => Err(FetchError::Protocol(e.to_string())),
            };
            let more = r.as_ref().is_ok_and(|b| !b.is_full());
            Some((r, more.then_some(recv)))
        });
        Ok(Box::pin(frames))
    }

    /// Asks `peer`, a holder that says it verified the whole blob, for its piece table: its word, checked for
    /// shape only (the piece size the blob's size implies, one hash per piece). Who to believe is the caller's
    /// decision.
    pub async fn piece_table(&self, peer: PeerId, digest: &Digest, size: u64) -> Result<PieceTable, FetchError> {
        let Some(addr) = self.view().reachable_addr(&peer) else {
            return Err(FetchError::Connect(format!("{peer} is not a member or is dead")));
        };
        let req = request::Kind::GetPieceTable(peer::GetPieceTable { digest: digest.to_string() });
        let t = match self.transfer.call(peer, addr, req).await? {
            response::Kind::PieceTable(t) => t,
            _ => return Err(FetchError::Protocol("answer to a piece table request is not a piece table".into())),
        };
        let piece = piece_size(size);
        if t.piece_size != piece || t.blob_size != size || t.hashes.len() as u64 != piece_count(size, piece) * 32 {
            return Err(FetchError::Protocol(format!(
                "a piece table of {} bytes for pieces of {} in {} bytes; {} pieces of {piece} in {size} expected",
                t.hashes.len(),
                t.piece_size,
                t.blob_size,
                piece_count(size, piece)
            )));
        }
        let hashes = t.hashes.chunks_exact(32).map(|h| h.try_into().expect("chunks of 32")).collect();
        Ok(PieceTable { piece, size, hashes })
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peers_piece_set_is_checked_before_it_is_believed() {
        let set = |count, words: Vec<u64>| piece_set(100, peer::PieceBits { count, words });
        let ok = set(100, vec![u64::MAX, (1 << 36) - 1]).expect("every piece of 100");
        assert!(ok.is_full());
        assert!(matches!(set(99, vec![0, 0]), Err(FetchError::Protocol(_))), "another blob's count");
        assert!(matches!(set(100, vec![0]), Err(FetchError::Protocol(_))), "too few words");
        assert!(matches!(set(100, vec![0, 0, 0]), Err(FetchError::Protocol(_))), "too many words");
        assert!(matches!(set(100, vec![0, 1 << 36]), Err(FetchError::Protocol(_))), "a bit past the end");
        let huge = set(100, vec![0; 1 << 16]);
        assert!(matches!(huge, Err(FetchError::Protocol(_))), "a flood of words");
    }
}
