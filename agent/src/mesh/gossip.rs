//! Membership over libp2p: the SWIM core ([`crate::swarm::membership`]) driven over TCP protected by a pre-shared
//! key derived from the cluster secret (pnet), then noise and yamux; optionally mDNS. One actor task owns the swarm
//! and the core, and publishes the member table through a `watch`.
//!
//! A node talks only to the members the protocol picks: one probe per period, a few gossip targets while there is
//! news, indirect probes for a member that did not answer. The least recently used connections close beyond
//! [`KEEP_CONNECTIONS`] (and any after 30 idle seconds), with [`MAX_CONNECTIONS`] as a hard cap, so a node's
//! connections, messages and bytes do not grow with the cluster.
//!
//! Joining: bootstrap names are resolved every few seconds; while this node knows no alive member (or a bootstrap
//! address is not one), it dials a few of them, announces itself to whoever answers, and asks for the whole member
//! table once (SWIM's gossip carries changes, not the steady state).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::core::ConnectedPoint;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::upgrade::Version;
use libp2p::multiaddr::Protocol;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, Transport, connection_limits, identity, mdns, noise, tcp, yamux,
};
use rand::seq::IteratorRandom;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::members::{Liveness, MembersView};
use crate::config::MemberBinding;
use crate::config::MeshConfig;
use crate::metrics::{Metrics, PeerState, PeerStateLabels};
use crate::swarm::binding::{Binding, NodeBook};
use crate::swarm::membership::{
    ALL_BUCKETS, About, MAX_MEMBERS, MAX_MESSAGE, MemberRecord, Membership, MembershipTiming, Output, SwimRng,
    TableApplied, tcp_multiaddr,
};

/// SWIM messages (one per stream; the answer is empty). Another version fails stream negotiation.
const SWIM_PROTOCOL: StreamProtocol = StreamProtocol::new("/shoal/swim/2");
/// The whole member table, for a joining node.
const TABLE_PROTOCOL: StreamProtocol = StreamProtocol::new("/shoal/members/2");
/// The largest member table read (16,384 records of ~170 bytes).
const MAX_TABLE: usize = 4 << 20;
/// How often bootstrap names are resolved and, if need be, dialled.
const REDIAL_EVERY: Duration = Duration::from_secs(3);
/// Bootstrap addresses dialled per round.
const DIALS_PER_ROUND: usize = 3;
/// Open membership connections at most, whatever the cluster's size (a backstop: new ones are refused).
pub(super) const MAX_CONNECTIONS: u32 = 64;
/// Past this many open connections, the least recently used are closed as new ones open: a node keeps
/// connections to the members it talks to most (all of them in a small cluster: no handshake per message) and
/// never reaches [`MAX_CONNECTIONS`] in a large one.
const KEEP_CONNECTIONS: usize = 48;
/// A connection nobody used for this long closes.
const IDLE_CONNECTION: Duration = Duration::from_secs(30);
/// Tables served at most per [`TABLE_WINDOW`] (a table costs a few hundred kilobytes at thousands of members).
const TABLES_PER_WINDOW: usize = 64;
const TABLE_WINDOW: Duration = Duration::from_secs(10);
/// For this long after start, a node pulls the member table from a random alive member at each redial round,
/// until two tables in a row bring no member it did not know: when a whole cluster starts at once, the first tables
/// are nearly empty, and SWIM alone would spread thousands of joins a dozen records per message.
pub(crate) const PULL_TABLES_FOR: Duration = Duration::from_secs(60);

/// Reads and writes one length-bounded frame per stream.
#[derive(Debug, Clone, Copy)]
struct Frames {
    max_request: usize,
    max_response: usize,
}

async fn read_bounded<T: AsyncRead + Unpin + Send>(io: &mut T, max: usize) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    io.take(max as u64 + 1).read_to_end(&mut v).await?;
    if v.len() > max {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("frame larger than {max} bytes")));
    }
    Ok(v)
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, data: Vec<u8>) -> std::io::Result<()> {
    io.write_all(&data).await?;
    io.close().await
}

impl request_response::Codec for Frames {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Vec<u8>> {
        read_bounded(io, self.max_request).await
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Vec<u8>> {
        read_bounded(io, self.max_response).await
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> std::io::Result<()> {
        write_frame(io, req).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> std::io::Result<()> {
        write_frame(io, res).await
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: connection_limits::Behaviour,
    swim: request_response::Behaviour<Frames>,
    table: request_response::Behaviour<Frames>,
    mdns: Toggle<mdns::tokio::Behaviour>,
}

/// The gossip could not start.
#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    /// Building the swarm failed.
    #[error("gossip setup: {0}")]
    Setup(String),
    /// Listening failed.
    #[error("gossip listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
}

fn socket_addr(addr: &Multiaddr) -> Option<SocketAddr> {
    let mut ip = None;
    let mut port = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(IpAddr::V4(a)),
            Protocol::Ip6(a) => ip = Some(IpAddr::V6(a)),
            Protocol::Tcp(p) => port = Some(p),
            _ => {}
        }
    }
    Some(SocketAddr::new(ip?, port?))
}

/// The membership actor.
pub(super) struct Gossip {
    swarm: Swarm<Behaviour>,
    core: Membership,
    me: PeerId,
    view: watch::Sender<Arc<MembersView>>,
    own_addrs: HashSet<SocketAddr>,
    /// The gossip listener's address.
    bound: SocketAddr,
    /// Peers dialled as bootstrap addresses: once connected, this node joins through them.
    joining: HashSet<Multiaddr>,
    tables_served: VecDeque<Instant>,
    /// Tables in a row that brought no new member (pulling stops at two).
    stale_tables: u32,
    /// The core's clock starts here.
    started: Instant,
    /// Open connections and when each last carried a message.
    connections: HashMap<ConnectionId, Instant>,
    /// The Nodes members are checked against (`member_binding = "kubernetes"`).
    book: Option<Arc<NodeBook>>,
    /// This node's Kubernetes Node, when bound to one.
    node: Option<String>,
    cfg: MeshConfig,
    metrics: Metrics,
    peer_stats: Arc<super::peer_stats::PeerStats>,
}

impl std::fmt::Debug for Gossip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gossip").field("me", &self.me).finish_non_exhaustive()
    }
}

impl Gossip {
    /// Builds the swarm and starts listening (on the port the OS picks, when the configured one is 0).
    pub(super) async fn new(
        cfg: &MeshConfig,
        keypair: identity::Keypair,
        transfer_addr: SocketAddr,
        view: watch::Sender<Arc<MembersView>>,
        metrics: Metrics,
        peer_stats: Arc<super::peer_stats::PeerStats>,
    ) -> Result<Self, GossipError> {
        let me = keypair.public().to_peer_id();
        let psk = PreSharedKey::new(blake3::derive_key("shoal 2026 gossip pnet v1", &cfg.secret.0));
        let setup = |e: &dyn std::fmt::Display| GossipError::Setup(e.to_string());
        let mdns_on = cfg.mdns;
        let rr = |max_request, max_response, protocol| {
            request_response::Behaviour::with_codec(
                Frames { max_request, max_response },
                [(protocol, ProtocolSupport::Full)],
                request_response::Config::default()
                    .with_request_timeout(Duration::from_secs(5))
                    .with_max_concurrent_streams(64),
            )
        };
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair.clone())
            .with_tokio()
            .with_other_transport(|key| {
                let noise = noise::Config::new(key)?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                    tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                        .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
                        .upgrade(Version::V1Lazy)
                        .authenticate(noise)
                        .multiplex(yamux::Config::default())
                        .timeout(Duration::from_secs(10))
                        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer))),
                )
            })
            .map_err(|e| setup(&e))?
            .with_behaviour(|key| {
                let mdns = if mdns_on {
                    Some(mdns::tokio::Behaviour::new(mdns::Config::default(), key.public().to_peer_id())?)
                } else {
                    None
                };
                let limits = connection_limits::ConnectionLimits::default()
                    .with_max_established(Some(MAX_CONNECTIONS))
                    .with_max_pending_incoming(Some(MAX_CONNECTIONS))
                    .with_max_pending_outgoing(Some(MAX_CONNECTIONS))
                    .with_max_established_per_peer(Some(2));
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Behaviour {
                    limits: connection_limits::Behaviour::new(limits),
                    swim: rr(MAX_MESSAGE, 0, SWIM_PROTOCOL),
                    table: rr(1024, MAX_TABLE, TABLE_PROTOCOL),
                    mdns: Toggle::from(mdns),
                })
            })
            .map_err(|e| setup(&e))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION))
            .build();
        let listen_err = |reason: String| GossipError::Listen { addr: cfg.gossip_listen, reason };
        swarm.listen_on(tcp_multiaddr(cfg.gossip_listen)).map_err(|e| listen_err(e.to_string()))?;
        // The listener's port (the configured one, or the one the OS picked for port 0).
        let port = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match swarm.select_next_some().await {
                    SwarmEvent::NewListenAddr { address, .. } => {
                        if let Some(a) = socket_addr(&address) {
                            return Ok(a.port());
                        }
                    }
                    SwarmEvent::ListenerClosed { reason: Err(e), .. } | SwarmEvent::ListenerError { error: e, .. } => {
                        return Err(listen_err(e.to_string()));
                    }
                    _ => {}
                }
            }
        })
        .await
        .map_err(|_| listen_err("the listener did not come up".into()))??;
        let bound = SocketAddr::new(cfg.gossip_listen.ip(), port);
        let advertised = SocketAddr::new(cfg.advertise_ip, port);
        let incarnation = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let (binding, book, node) = match &cfg.binding {
            MemberBinding::Open => {
                tracing::warn!(
                    "member_binding = open: any holder of the cluster secret can join under any id and pick its \
                     place on the homes' ring; bind members to their Nodes (node_name) or list them (members_file)"
                );
                (Binding::Open, None, None)
            }
            MemberBinding::List(list) => (Binding::List(Arc::new(list.clone())), None, None),
            MemberBinding::Kubernetes { node } => {
                let book = Arc::new(NodeBook::default());
                (Binding::Nodes(book.clone()), Some(book), Some(node.clone()))
            }
        };
        let about = About {
            node: node.clone().unwrap_or_default(),
            zone: cfg.zone.clone(),
            gossip: advertised,
            transfer: transfer_addr,
        };
        let record = MemberRecord::sign(&keypair, incarnation, 0, &about);
        let timing = MembershipTiming {
            probe_period: cfg.gossip_interval,
            probe_timeout: cfg.suspect_after,
            suspicion: cfg.dead_after,
            indirect_probes: 3,
            gossip: MembershipTiming::GOSSIP,
        };
        let core = Membership::new(keypair, record, timing, SwimRng::from_os(), binding);
        Ok(Self {
            swarm,
            core,
            me,
            view,
            own_addrs: HashSet::from([bound, advertised]),
            bound,
            joining: HashSet::new(),
            tables_served: VecDeque::new(),
            stale_tables: 0,
            started: Instant::now(),
            connections: HashMap::new(),
            book,
            node,
            cfg: cfg.clone(),
            metrics,
            peer_stats,
        })
    }

    /// The gossip listener's address.
    pub(super) fn local_addr(&self) -> SocketAddr {
        self.bound
    }

    /// Runs until `cancel` fires, then tells the cluster this node leaves.
    pub(super) async fn run(mut self, cancel: CancellationToken) {
        if let Some(book) = self.book.clone() {
            let cancel = cancel.child_token();
            tokio::spawn(async move {
                match crate::kubernetes::client().await {
                    Ok(client) => crate::kubernetes::watch_nodes(client, book, cancel).await,
                    Err(e) => {
                        tracing::error!(error = %e, "member_binding = kubernetes but no API client: no member can be admitted")
                    }
                }
            });
        }
        let mut redial = tokio::time::interval(REDIAL_EVERY);
        redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = self.core.next_wake().map(|d| self.started + d);
            let timer = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = cancel.cancelled() => break,
                () = timer => self.core.tick(self.now()),
                _ = redial.tick() => self.redial().await,
                event = self.swarm.select_next_some() => self.on_event(event),
            }
            self.flush();
        }
        self.core.leave(self.now());
        self.flush();
        // Give the leaving message a moment to go out.
        let flush = tokio::time::sleep(Duration::from_millis(300));
        tokio::pin!(flush);
        loop {
            tokio::select! {
                () = &mut flush => break,
                _ = self.swarm.select_next_some() => {}
            }
        }
    }

    /// The core's clock.
    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Carries out what the core asked for, and publishes the view if it changed.
    fn flush(&mut self) {
        while let Some(o) = self.core.poll_output() {
            match o {
                Output::Send { to, addr, data } => {
                    self.metrics.mesh.membership_bytes_sent.inc_by(data.len() as u64);
                    let addrs = vec![tcp_multiaddr(addr)];
                    self.swarm.behaviour_mut().swim.send_request_with_addresses(&to, data.to_vec(), addrs);
                }
                Output::PullTable { to, addr, buckets } => {
                    let request = self.core.table_request(buckets);
                    let addrs = vec![tcp_multiaddr(addr)];
                    self.swarm.behaviour_mut().table.send_request_with_addresses(&to, request, addrs);
                }
            }
        }
        if self.core.take_changed() {
            self.publish_view();
        }
        self.metrics.mesh.membership_local_health.set(i64::from(self.core.health()));
    }

    fn publish_view(&mut self) {
        self.metrics.mesh.membership_view_changes.inc();
        let members = self.core.members();
        for state in [PeerState::alive, PeerState::suspect, PeerState::dead] {
            let want = match state {
                PeerState::alive => Liveness::Alive,
                PeerState::suspect => Liveness::Suspect,
                PeerState::dead => Liveness::Dead,
            };
            let n = members.iter().filter(|(_, s)| *s == want).count();
            self.metrics.mesh.peers.get_or_create(&PeerStateLabels { state }).set(n as i64);
        }
        tracing::debug!(members = members.len(), "membership view changed");
        let known: HashSet<PeerId> = members.iter().map(|(m, _)| m.id).collect();
        self.peer_stats.retain(|p| known.contains(p));
        let view = MembersView::bound(self.me, self.node.as_deref(), self.cfg.zone.clone(), members);
        self.view.send_replace(Arc::new(view));
    }

    /// Resolves the bootstrap names and dials a few addresses that are not alive members (all of them while this
    /// node knows nobody; one otherwise, so a healed partition or a missed member is found again). A name that
    /// resolves to every node of a large cluster costs a few dials, not one per node.
    async fn redial(&mut self) {
        // Nobody can be admitted before the Nodes are listed: joining now would only have the answers refused.
        if self.book.as_ref().is_some_and(|b| !b.is_ready()) {
            return;
        }
        let mut resolved: Vec<SocketAddr> = Vec::new();
        for entry in &self.cfg.bootstrap {
            let r = tokio::time::timeout(Duration::from_secs(2), tokio::net::lookup_host(entry.as_str())).await;
            match r {
                Ok(Ok(addrs)) => resolved.extend(addrs),
                Ok(Err(e)) => tracing::debug!(bootstrap = %entry, error = %e, "bootstrap name did not resolve"),
                Err(_) => tracing::debug!(bootstrap = %entry, "bootstrap name resolution timed out"),
            }
        }
        let members = self.core.members();
        let alive: HashSet<SocketAddr> = members
            .iter()
            .filter(|(_, l)| *l != Liveness::Dead)
            .flat_map(|(i, _)| i.gossip_addrs.iter().filter_map(socket_addr))
            .collect();
        let lonely = !members.iter().any(|(_, l)| *l == Liveness::Alive);
        if !lonely && self.started.elapsed() < PULL_TABLES_FOR && self.stale_tables < 2 {
            let alive = members.iter().filter(|(_, l)| *l == Liveness::Alive).map(|(i, _)| i.id);
            if let Some(peer) = alive.choose(&mut rand::rng()) {
                let request = self.core.table_request(ALL_BUCKETS);
                self.swarm.behaviour_mut().table.send_request(&peer, request);
            }
        }
        let candidates = resolved.into_iter().filter(|a| !self.own_addrs.contains(a) && !alive.contains(a));
        let n = if lonely { DIALS_PER_ROUND } else { 1 };
        for addr in candidates.choose_multiple(&mut rand::rng(), n) {
            self.dial_to_join(tcp_multiaddr(addr));
        }
    }

    fn dial_to_join(&mut self, addr: Multiaddr) {
        self.joining.insert(addr.clone());
        if let Err(e) = self.swarm.dial(addr.clone()) {
            self.joining.remove(&addr);
            tracing::debug!(%addr, error = %e, "dial failed");
        }
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Swim(e)) => self.on_swim(e),
            SwarmEvent::Behaviour(BehaviourEvent::Table(e)) => self.on_table(e),
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                let known: HashSet<PeerId> = self.core.members().iter().map(|(i, _)| i.id).collect();
                for (peer, addr) in found {
                    if peer != self.me && !known.contains(&peer) {
                        self.dial_to_join(addr);
                    }
                }
            }
            SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, .. } => {
                self.connections.insert(connection_id, Instant::now());
                self.metrics.mesh.membership_connections_opened.inc();
                self.trim_connections(connection_id);
                self.metrics.mesh.membership_connections.set(self.connections.len() as i64);
                if let ConnectedPoint::Dialer { address, .. } = &endpoint
                    && self.joining.remove(address)
                    && let Some(addr) = socket_addr(address)
                {
                    tracing::debug!(peer = %peer_id, %addr, "joining through");
                    let now = self.now();
                    self.core.join(peer_id, addr, now);
                    let request = self.core.table_request(ALL_BUCKETS);
                    self.swarm.behaviour_mut().table.send_request(&peer_id, request);
                }
            }
            SwarmEvent::ConnectionClosed { connection_id, .. } => {
                self.connections.remove(&connection_id);
                self.metrics.mesh.membership_connections.set(self.connections.len() as i64);
            }
            SwarmEvent::OutgoingConnectionError { error, .. } => {
                tracing::trace!(error = %error, "membership dial failed");
            }
            SwarmEvent::IncomingConnectionError { send_back_addr, error, .. } => {
                // A node without the secret fails here (pnet or noise).
                self.metrics.mesh.gossip_refused.inc();
                tracing::debug!(from = %send_back_addr, error = %error, "incoming gossip connection refused");
            }
            SwarmEvent::ListenerError { error, .. } => tracing::error!(error = %error, "gossip listener failed"),
            _ => {}
        }
    }

    /// Closes the least recently used connections beyond [`KEEP_CONNECTIONS`] (never `keep`, the one just opened).
    fn trim_connections(&mut self, keep: ConnectionId) {
        let excess = self.connections.len().saturating_sub(KEEP_CONNECTIONS);
        if excess == 0 {
            return;
        }
        let mut by_age: Vec<(Instant, ConnectionId)> =
            self.connections.iter().filter(|(c, _)| **c != keep).map(|(c, t)| (*t, *c)).collect();
        by_age.sort_unstable();
        for (_, c) in by_age.into_iter().take(excess) {
            // Forgotten now (its ConnectionClosed finds nothing): a close is not asked for twice.
            self.connections.remove(&c);
            self.swarm.close_connection(c);
        }
    }

    fn used(&mut self, c: ConnectionId) {
        if let Some(t) = self.connections.get_mut(&c) {
            *t = Instant::now();
        }
    }

    fn refused(&self, peer: PeerId, what: &str, error: &dyn std::fmt::Display) {
        self.metrics.mesh.membership_refused.inc();
        tracing::debug!(%peer, error = %error, "{what} refused");
    }

    fn on_swim(&mut self, e: request_response::Event<Vec<u8>, Vec<u8>>) {
        use request_response::{Event, Message};
        match e {
            Event::Message { peer, connection_id, message: Message::Request { request, channel, .. } } => {
                self.used(connection_id);
                let _ = self.swarm.behaviour_mut().swim.send_response(channel, Vec::new());
                self.metrics.mesh.membership_bytes_received.inc_by(request.len() as u64);
                self.peer_stats.heard(peer);
                let now = self.now();
                match self.core.handle_data(peer, &request, now) {
                    Ok(0) => {}
                    Ok(left_out) => {
                        self.metrics.mesh.membership_refused.inc_by(left_out as u64);
                    }
                    Err(e) => self.refused(peer, "membership message", &e),
                }
            }
            Event::Message { connection_id, message: Message::Response { .. }, .. } => self.used(connection_id),
            Event::OutboundFailure { peer, error: request_response::OutboundFailure::UnsupportedProtocols, .. } => {
                tracing::warn!(%peer, "member speaks another membership protocol version");
            }
            Event::OutboundFailure { peer, error, .. } => {
                // SWIM copes with lost messages: the probe cycle and suspicion decide, not one failure.
                tracing::trace!(%peer, error = %error, "membership message not delivered");
            }
            _ => {}
        }
    }

    fn on_table(&mut self, e: request_response::Event<Vec<u8>, Vec<u8>>) {
        use request_response::{Event, Message};
        match e {
            Event::Message { peer, message: Message::Request { request, channel, .. }, .. } => {
                let now = Instant::now();
                while self.tables_served.front().is_some_and(|t| now.duration_since(*t) > TABLE_WINDOW) {
                    self.tables_served.pop_front();
                }
                // Over the rate, the answer is empty: the asker still learns members from SWIM's feeds. A peer the
                // binding does not admit gets nothing.
                let table = if self.tables_served.len() < TABLES_PER_WINDOW {
                    match self.core.table_for(peer, &request) {
                        Ok(t) => {
                            self.tables_served.push_back(now);
                            t
                        }
                        Err(e) => {
                            self.refused(peer, "member table request", &e);
                            Vec::new()
                        }
                    }
                } else {
                    tracing::debug!(%peer, "member table request over the rate: empty answer");
                    Vec::new()
                };
                self.metrics.mesh.membership_bytes_sent.inc_by(table.len() as u64);
                let _ = self.swarm.behaviour_mut().table.send_response(channel, table);
            }
            Event::Message { peer, message: Message::Response { response, .. }, .. } => {
                self.metrics.mesh.membership_bytes_received.inc_by(response.len() as u64);
                if response.is_empty() {
                    return;
                }
                let now = self.now();
                match self.core.apply_table(peer, &response, now) {
                    Ok(TableApplied { taken, new, left_out }) => {
                        self.stale_tables = if new == 0 { self.stale_tables + 1 } else { 0 };
                        self.metrics.mesh.membership_refused.inc_by(left_out as u64);
                        tracing::debug!(%peer, members = taken, new, left_out, "member table received");
                    }
                    Err(e) => self.refused(peer, "member table", &e),
                }
            }
            Event::OutboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, error = %error, "member table request failed");
            }
            _ => {}
        }
    }
}

/// At most this many members: see [`MAX_MEMBERS`].
const _: () = assert!(MAX_MEMBERS * 200 < MAX_TABLE);
