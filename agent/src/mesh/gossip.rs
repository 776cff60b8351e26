//! Membership over libp2p: TCP protected by a pre-shared key derived from the cluster secret (pnet), then noise
//! and yamux; identify to check the protocol version; gossipsub to spread every member's signed announcement;
//! optionally mDNS. Runs as one actor task owning the swarm; publishes the member table through a `watch`.
//!
//! Bootstrap addresses are resolved again every few seconds and dialled while not connected, and so is every known
//! member this node has no connection to: members end up directly connected to each other (no node is a hub whose
//! death cuts the others apart), a restarted node rejoins and a healed partition merges by itself.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::upgrade::Version;
use libp2p::multiaddr::Protocol;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, Transport, gossipsub, identify, identity, mdns, noise, tcp, yamux};
use prost::Message;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::members::{Liveness, MemberInfo, MemberTable, MembersView, Timing};
use crate::config::MeshConfig;
use crate::metrics::{Metrics, PeerState, PeerStateLabels};

/// identify's protocol version: members with another one are disconnected.
const PROTOCOL_VERSION: &str = "/shoal/peer/1";
/// The membership topic.
const TOPIC: &str = "shoal/members/1";
/// How often bootstrap names are resolved and silent members redialled.
const REDIAL_EVERY: Duration = Duration::from_secs(3);
/// How long a dead member is still redialled before it is forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(600);

#[derive(NetworkBehaviour)]
struct Behaviour {
    gossipsub: gossipsub::Behaviour,
    identify: identify::Behaviour,
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

fn tcp_multiaddr(addr: SocketAddr) -> Multiaddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) => Protocol::Ip4(ip),
        IpAddr::V6(ip) => Protocol::Ip6(ip),
    };
    Multiaddr::empty().with(ip).with(Protocol::Tcp(addr.port()))
}

/// The membership actor.
pub(super) struct Gossip {
    swarm: Swarm<Behaviour>,
    topic: gossipsub::IdentTopic,
    me: PeerId,
    announcement: Vec<u8>,
    leaving: Vec<u8>,
    table: MemberTable,
    view: watch::Sender<Arc<MembersView>>,
    own_addrs: HashSet<Multiaddr>,
    /// The gossip listener's address.
    bound: SocketAddr,
    connected: HashSet<PeerId>,
    cfg: MeshConfig,
    metrics: Metrics,
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
    ) -> Result<Self, GossipError> {
        let me = keypair.public().to_peer_id();
        let psk = PreSharedKey::new(blake3::derive_key("shoal 2026 gossip pnet v1", &cfg.secret.0));
        let setup = |e: &dyn std::fmt::Display| GossipError::Setup(e.to_string());
        let mdns_on = cfg.mdns;
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
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
                let gossip_cfg = gossipsub::ConfigBuilder::default()
                    .heartbeat_interval(Duration::from_millis(500))
                    .max_transmit_size(16 << 10)
                    .validation_mode(gossipsub::ValidationMode::Strict)
                    .build()?;
                let gossipsub =
                    gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(key.clone()), gossip_cfg)?;
                let identify =
                    identify::Behaviour::new(identify::Config::new(PROTOCOL_VERSION.to_owned(), key.public()));
                let mdns = if mdns_on {
                    Some(mdns::tokio::Behaviour::new(mdns::Config::default(), key.public().to_peer_id())?)
                } else {
                    None
                };
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Behaviour {
                    gossipsub,
                    identify,
                    mdns: Toggle::from(mdns),
                })
            })
            .map_err(|e| setup(&e))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();
        let topic = gossipsub::IdentTopic::new(TOPIC);
        swarm.behaviour_mut().gossipsub.subscribe(&topic).map_err(|e| setup(&e))?;
        let listen_err = |reason: String| GossipError::Listen { addr: cfg.gossip_listen, reason };
        swarm.listen_on(tcp_multiaddr(cfg.gossip_listen)).map_err(|e| listen_err(e.to_string()))?;
        // The listener's port (the configured one, or the one the OS picked for port 0).
        let port = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match swarm.select_next_some().await {
                    SwarmEvent::NewListenAddr { address, .. } => {
                        if let Some(p) = address.iter().find_map(|p| match p {
                            Protocol::Tcp(p) => Some(p),
                            _ => None,
                        }) {
                            return Ok(p);
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
        let listen = tcp_multiaddr(bound);
        let advertised = tcp_multiaddr(SocketAddr::new(cfg.advertise_ip, port));
        let incarnation = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let ann = |leaving| shoal_proto::peer::MemberAnnouncement {
            peer_id: me.to_bytes(),
            incarnation,
            zone: cfg.zone.clone(),
            gossip_addrs: vec![advertised.to_vec()],
            transfer_addr: transfer_addr.to_string(),
            leaving,
        };
        let timing = Timing {
            suspect_after: cfg.suspect_after,
            dead_after: cfg.dead_after,
            forget_after: FORGET_AFTER.max(cfg.dead_after * 2),
        };
        Ok(Self {
            swarm,
            topic,
            me,
            announcement: ann(false).encode_to_vec(),
            leaving: ann(true).encode_to_vec(),
            table: MemberTable::new(me, timing),
            view,
            own_addrs: HashSet::from([listen, advertised]),
            bound,
            connected: HashSet::new(),
            cfg: cfg.clone(),
            metrics,
        })
    }

    /// The gossip listener's address.
    pub(super) fn local_addr(&self) -> SocketAddr {
        self.bound
    }

    /// Runs until `cancel` fires, then announces that this node leaves.
    pub(super) async fn run(mut self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.cfg.gossip_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_redial: Option<Instant> = None;
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                _ = tick.tick() => {
                    self.publish(false);
                    if self.table.tick(Instant::now()) {
                        self.publish_view();
                    }
                    if last_redial.is_none_or(|t| t.elapsed() >= REDIAL_EVERY) {
                        last_redial = Some(Instant::now());
                        self.redial().await;
                    }
                }
                event = self.swarm.select_next_some() => self.on_event(event),
            }
        }
        self.publish(true);
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

    fn publish(&mut self, leaving: bool) {
        let data = if leaving { self.leaving.clone() } else { self.announcement.clone() };
        // With no peer subscribed yet there is nobody to tell: not an error.
        if let Err(e) = self.swarm.behaviour_mut().gossipsub.publish(self.topic.clone(), data)
            && !matches!(e, gossipsub::PublishError::NoPeersSubscribedToTopic | gossipsub::PublishError::Duplicate)
        {
            tracing::debug!(error = %e, "gossip publish failed");
        }
    }

    fn publish_view(&mut self) {
        let members = self.table.snapshot();
        for state in [PeerState::alive, PeerState::suspect, PeerState::dead] {
            let want = match state {
                PeerState::alive => Liveness::Alive,
                PeerState::suspect => Liveness::Suspect,
                PeerState::dead => Liveness::Dead,
            };
            let n = members.iter().filter(|(_, s)| *s == want).count();
            self.metrics.mesh.peers.get_or_create(&PeerStateLabels { state }).set(n as i64);
        }
        let view = MembersView::new(self.me, self.cfg.zone.clone(), members);
        self.view.send_replace(Arc::new(view));
    }

    /// Dials bootstrap addresses and members this node is not connected to.
    async fn redial(&mut self) {
        let mut targets: Vec<Multiaddr> = Vec::new();
        for entry in &self.cfg.bootstrap {
            let resolved = tokio::time::timeout(Duration::from_secs(2), tokio::net::lookup_host(entry.as_str())).await;
            match resolved {
                Ok(Ok(addrs)) => targets.extend(addrs.map(tcp_multiaddr)),
                Ok(Err(e)) => tracing::debug!(bootstrap = %entry, error = %e, "bootstrap name did not resolve"),
                Err(_) => tracing::debug!(bootstrap = %entry, "bootstrap name resolution timed out"),
            }
        }
        // Addresses of members already connected need no dial.
        let mut covered: HashSet<Multiaddr> = self.own_addrs.clone();
        for (info, _) in self.table.snapshot() {
            if self.connected.contains(&info.id) {
                covered.extend(info.gossip_addrs.iter().cloned());
            }
        }
        // Every member, alive or silent, gets a direct connection: gossip then does not depend on any one node
        // (the bootstrap node dying must not cut the others apart), and silent members are retried.
        for state in [Liveness::Alive, Liveness::Suspect, Liveness::Dead] {
            for info in self.table.in_state(state) {
                if !self.connected.contains(&info.id) {
                    targets.extend(info.gossip_addrs.iter().cloned());
                }
            }
        }
        let mut seen = HashSet::new();
        for addr in targets {
            if covered.contains(&addr) || !seen.insert(addr.clone()) {
                continue;
            }
            if let Err(e) = self.swarm.dial(addr.clone()) {
                tracing::debug!(%addr, error = %e, "dial failed");
            }
        }
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message { message, .. })) => {
                self.on_announcement(message);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }))
                if info.protocol_version != PROTOCOL_VERSION =>
            {
                tracing::warn!(%peer_id, version = %info.protocol_version, "peer speaks another protocol version");
                let _ = self.swarm.disconnect_peer_id(peer_id);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    if peer != self.me && !self.connected.contains(&peer) {
                        let _ = self.swarm.dial(addr);
                    }
                }
            }
            SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                self.connected.insert(peer_id);
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                self.connected.remove(&peer_id);
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

    fn on_announcement(&mut self, message: gossipsub::Message) {
        let Ok(ann) = shoal_proto::peer::MemberAnnouncement::decode(message.data.as_slice()) else {
            tracing::debug!("undecodable member announcement dropped");
            return;
        };
        let Ok(id) = PeerId::from_bytes(&ann.peer_id) else { return };
        // The signed source must be the member described: nobody announces for another.
        if message.source != Some(id) {
            tracing::debug!(%id, "announcement not signed by the member it describes: dropped");
            return;
        }
        let Ok(transfer_addr) = ann.transfer_addr.parse::<SocketAddr>() else { return };
        let zone_ok = !ann.zone.is_empty()
            && ann.zone.len() <= 63
            && ann.zone.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !zone_ok || ann.gossip_addrs.len() > 8 {
            return;
        }
        let gossip_addrs: Vec<Multiaddr> =
            ann.gossip_addrs.iter().filter_map(|a| Multiaddr::try_from(a.clone()).ok()).collect();
        let dial = (!ann.leaving && !self.connected.contains(&id)).then(|| gossip_addrs.clone());
        let info = MemberInfo { id, incarnation: ann.incarnation, zone: ann.zone, gossip_addrs, transfer_addr };
        if self.table.observe(info, ann.leaving, Instant::now()) {
            tracing::info!(%id, leaving = ann.leaving, "membership changed");
            self.publish_view();
            // A member heard of through another one gets a direct connection now, not at the next redial: until
            // then its gossip depends on the node that relayed it.
            for addr in dial.into_iter().flatten() {
                if let Err(e) = self.swarm.dial(addr.clone()) {
                    tracing::debug!(%addr, error = %e, "dial failed");
                }
            }
        }
    }
}
