//! Membership: SWIM with suspicion, refutation and piggybacked dissemination (foca's sans-IO state machine), over
//! member records each signed by its member's node key.
//!
//! Each period a node probes one member; a member that does not answer, directly or through
//! [`MembershipTiming::indirect_probes`] others, becomes suspect and is declared dead unless it refutes within
//! `suspicion`. Joins, suspicions and deaths ride on the probes and on short gossip rounds to a few random members.
//! A node's cost per period is a constant number of messages, whatever the cluster's size: nobody hears everybody.
//!
//! What a member says about *itself* (its zone, addresses, incarnation) is a [`MemberRecord`] signed with the key its
//! peer id is derived from: nobody can speak for another member or forge its addresses. A message's sender must be
//! the peer the transport authenticated ([`Membership::handle_data`]). What members say about *others* (alive,
//! suspect, dead) cannot be signed by the subject; a false suspicion is refuted by the subject itself.
//!
//! Sans-IO: inputs are messages, timer firings and a joining peer; outputs are [`Output`]s (send these bytes to this
//! peer, fire this timer after this long) and the member table. The agent drives it from `mesh::gossip`; a
//! simulator can drive the same code.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::num::{NonZeroU8, NonZeroU32, NonZeroUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use foca::{AccumulatingRuntime, Codec, Config, Foca, Header, Identity, Member, Message, OwnedNotification, State};
use libp2p::{Multiaddr, PeerId, identity};
use serde::{Deserialize, Serialize};

use super::binding::{Binding, Claim};
use crate::mesh::{Liveness, MemberInfo};

/// Records this node accepts at most (a member inventing identities cannot grow the table without bound).
pub const MAX_MEMBERS: usize = 16_384;
/// The largest membership message (a probe with its piggybacked updates, or a join's feed): about a dozen
/// records. Larger messages let a backlog of updates (a burst of joins, suspicions under load) ride on every
/// probe, which multiplies the bytes and the decoding while the cluster is busiest; the whole table has its own
/// exchange.
pub const MAX_MESSAGE: usize = 2 << 10;
/// A zone name's longest length.
const MAX_ZONE: usize = 63;
/// Domain separation of a record's signature.
const RECORD_CONTEXT: &[u8] = b"shoal member record v1\0";

/// What a member says about itself, signed with its node key (the signed fields are [`SignedFields`]).
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "SignedFields", into = "SignedFields")]
pub struct MemberRecord {
    w: SignedFields,
    /// Which member this is, whatever its incarnation: its Node when it names one (one member per Node), else its
    /// peer id. Derived from the fields, never sent.
    key: u128,
}

/// A record's fields, as they travel and are signed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SignedFields {
    #[serde(with = "peer_bytes")]
    peer: PeerId,
    /// Start of its process, ms since the epoch: a restart raises it.
    incarnation: u64,
    /// Identity renewals within the process (declared dead while alive, it comes back as a new record).
    renewal: u16,
    /// The Kubernetes Node it runs on (empty outside Kubernetes).
    node: String,
    zone: String,
    gossip: SocketAddr,
    transfer: SocketAddr,
    /// Ed25519 over the fields above; empty only in a join's placeholder for a peer not known yet.
    sig: Vec<u8>,
}

impl std::ops::Deref for MemberRecord {
    type Target = SignedFields;

    fn deref(&self) -> &SignedFields {
        &self.w
    }
}

impl From<SignedFields> for MemberRecord {
    fn from(w: SignedFields) -> Self {
        let mut h = blake3::Hasher::new_derive_key("shoal 2026 member key v1");
        if w.node.is_empty() {
            h.update(b"peer\0").update(&w.peer.to_bytes());
        } else {
            h.update(b"node\0").update(w.node.as_bytes());
        }
        let key = u128::from_be_bytes(h.finalize().as_bytes()[..16].try_into().unwrap_or_default());
        Self { w, key }
    }
}

impl From<MemberRecord> for SignedFields {
    fn from(r: MemberRecord) -> Self {
        r.w
    }
}

/// What a node says about itself in its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct About {
    /// The Kubernetes Node it runs on (empty outside Kubernetes).
    pub node: String,
    /// Its zone.
    pub zone: String,
    /// Its gossip listener, as others reach it.
    pub gossip: SocketAddr,
    /// Its transfer endpoint.
    pub transfer: SocketAddr,
}

mod peer_bytes {
    use libp2p::PeerId;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(p: &PeerId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&p.to_bytes())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PeerId, D::Error> {
        let b: &[u8] = Deserialize::deserialize(d)?;
        PeerId::from_bytes(b).map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Debug for MemberRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}.{}", self.peer, self.incarnation, self.renewal)
    }
}

/// Why a record or message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Not decodable.
    #[error("undecodable: {0}")]
    Decode(String),
    /// The signature does not verify against the key the peer id names.
    #[error("bad signature for {0}")]
    Signature(PeerId),
    /// The peer id does not embed a public key (only ed25519 ids do).
    #[error("peer id {0} names no key")]
    NoKey(PeerId),
    /// A field is out of bounds.
    #[error("{0}")]
    Field(&'static str),
    /// The sender is not the peer the transport authenticated.
    #[error("claims to be {claimed}")]
    Impersonation {
        /// Who the message says it is from.
        claimed: PeerId,
    },
    /// The table is full.
    #[error("member table full ({MAX_MEMBERS})")]
    Full,
    /// Not bound to what the cluster's [`Binding`] requires (an unknown Node, another Node's address, an unlisted
    /// peer id).
    #[error("unbound identity: {0}")]
    Unbound(&'static str),
}

impl MemberRecord {
    fn signing_bytes(&self) -> Vec<u8> {
        let unsigned = SignedFields { sig: Vec::new(), ..self.w.clone() };
        let mut v = RECORD_CONTEXT.to_vec();
        v.extend(postcard::to_allocvec(&unsigned).unwrap_or_default());
        v
    }

    /// A signed record of this node.
    pub fn sign(key: &identity::Keypair, incarnation: u64, renewal: u16, about: &About) -> Self {
        let wire = SignedFields {
            peer: key.public().to_peer_id(),
            incarnation,
            renewal,
            node: about.node.clone(),
            zone: about.zone.clone(),
            gossip: about.gossip,
            transfer: about.transfer,
            sig: Vec::new(),
        };
        let mut r = Self::from(wire);
        // Signing with an ed25519 key cannot fail; a key type that could leaves the record unsigned (refused).
        r.w.sig = key.sign(&r.signing_bytes()).unwrap_or_default();
        r
    }

    /// A stand-in for a peer known only by id and address (a bootstrap node): the destination of a join.
    fn placeholder(peer: PeerId, gossip: SocketAddr) -> Self {
        Self::from(SignedFields {
            peer,
            incarnation: 0,
            renewal: 0,
            node: String::new(),
            zone: String::new(),
            gossip,
            transfer: gossip,
            sig: Vec::new(),
        })
    }

    /// What it says about itself.
    pub fn about(&self) -> About {
        About { node: self.node.clone(), zone: self.zone.clone(), gossip: self.gossip, transfer: self.transfer }
    }

    fn claim(&self) -> Claim<'_> {
        Claim { peer: self.peer, node: &self.node, zone: &self.zone, ips: [self.gossip.ip(), self.transfer.ip()] }
    }

    /// Checks the fields and the signature.
    pub fn verify(&self) -> Result<(), RecordError> {
        let zone_ok = !self.zone.is_empty()
            && self.zone.len() <= MAX_ZONE
            && self.zone.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !zone_ok {
            return Err(RecordError::Field("zone: 1-63 characters of [A-Za-z0-9._-]"));
        }
        if !self.node.is_empty() && !crate::config::valid_node_name(&self.node) {
            return Err(RecordError::Field("node: not a Kubernetes node name"));
        }
        let mh = self.peer.as_ref();
        if mh.code() != 0 {
            return Err(RecordError::NoKey(self.peer));
        }
        let key = identity::PublicKey::try_decode_protobuf(mh.digest()).map_err(|_| RecordError::NoKey(self.peer))?;
        if key.to_peer_id() != self.peer || !key.verify(&self.signing_bytes(), &self.sig) {
            return Err(RecordError::Signature(self.peer));
        }
        Ok(())
    }

    /// Its peer id.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// Its gossip address.
    pub fn gossip(&self) -> SocketAddr {
        self.gossip
    }

    /// What the rest of the agent knows of a member.
    pub fn info(&self) -> MemberInfo {
        MemberInfo {
            id: self.peer,
            incarnation: self.incarnation,
            zone: self.zone.clone(),
            gossip_addrs: vec![tcp_multiaddr(self.gossip)],
            transfer_addr: self.transfer,
            node: (!self.node.is_empty()).then(|| self.node.clone()),
        }
    }
}

/// The TCP multiaddr of a socket address.
pub fn tcp_multiaddr(addr: SocketAddr) -> Multiaddr {
    use libp2p::multiaddr::Protocol;
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) => Protocol::Ip4(ip),
        std::net::IpAddr::V6(ip) => Protocol::Ip6(ip),
    };
    Multiaddr::empty().with(ip).with(Protocol::Tcp(addr.port()))
}

impl Identity for MemberRecord {
    type Addr = u128;

    /// Renewal needs the node key: [`Membership`] does it when foca reports the node defunct.
    fn renew(&self) -> Option<Self> {
        None
    }

    fn addr(&self) -> u128 {
        self.key
    }

    /// The later record of the same member wins (a restart, a renewal).
    fn win_addr_conflict(&self, other: &Self) -> bool {
        (self.incarnation, self.renewal, &self.sig) > (other.incarnation, other.renewal, &other.sig)
    }
}

/// What the codec checks, shared with [`Membership`] (foca owns the codec).
#[derive(Debug, Default)]
struct Checks {
    /// Who may be a member.
    binding: Binding,
    /// The peer the transport authenticated as the sender of the message being decoded.
    sender: Option<PeerId>,
    /// Records whose signature verified, by peer: a record seen again costs a comparison, not a signature check.
    verified: HashMap<PeerId, MemberRecord>,
    /// Why the last decode failed.
    last_error: Option<RecordError>,
    /// Signatures are not checked (simulations of thousands of nodes: [`lab`]).
    trust: bool,
}

impl Checks {
    /// Verifies `r`'s signature (once per record) and that the binding admits it (every time: a Node can go).
    fn check(&mut self, r: &MemberRecord) -> Result<(), RecordError> {
        if !self.trust && self.verified.get(&r.peer) != Some(r) {
            if !self.verified.contains_key(&r.peer) && self.verified.len() >= MAX_MEMBERS {
                return Err(RecordError::Full);
            }
            r.verify()?;
            self.verified.insert(r.peer, r.clone());
        }
        self.binding.admit(&r.claim()).map_err(RecordError::Unbound)
    }

    fn fail(&mut self, e: RecordError) -> RecordError {
        self.last_error = Some(e.clone());
        e
    }
}

/// foca's postcard encoding, with every record verified on the way in and the sender bound to the transport's peer.
#[derive(Debug, Clone)]
struct SignedCodec(Arc<Mutex<Checks>>);

impl SignedCodec {
    fn checks(&self) -> std::sync::MutexGuard<'_, Checks> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Codec<MemberRecord> for SignedCodec {
    type Error = RecordError;

    fn encode_header(&mut self, header: &Header<MemberRecord>, buf: impl BufMut) -> Result<(), RecordError> {
        foca::PostcardCodec.encode_header(header, buf).map_err(|e| RecordError::Decode(e.to_string()))
    }

    fn decode_header(&mut self, buf: impl Buf) -> Result<Header<MemberRecord>, RecordError> {
        let mut checks = self.checks();
        let header: Header<MemberRecord> =
            foca::PostcardCodec.decode_header(buf).map_err(|e| checks.fail(RecordError::Decode(e.to_string())))?;
        if let Some(actual) = checks.sender
            && actual != header.src.peer
        {
            return Err(checks.fail(RecordError::Impersonation { claimed: header.src.peer }));
        }
        // The destination is this node (foca compares it with its own record), possibly a join's placeholder.
        let mut records = vec![&header.src];
        match &header.message {
            Message::PingReq { target, .. } | Message::IndirectAck { target, .. } => records.push(target),
            Message::IndirectPing { origin, .. } | Message::ForwardedAck { origin, .. } => records.push(origin),
            _ => {}
        }
        for r in records {
            checks.check(r).map_err(|e| checks.fail(e))?;
        }
        Ok(header)
    }

    fn encode_member(&mut self, member: &Member<MemberRecord>, buf: impl BufMut) -> Result<(), RecordError> {
        foca::PostcardCodec.encode_member(member, buf).map_err(|e| RecordError::Decode(e.to_string()))
    }

    fn decode_member(&mut self, buf: impl Buf) -> Result<Member<MemberRecord>, RecordError> {
        let mut checks = self.checks();
        let m: Member<MemberRecord> =
            foca::PostcardCodec.decode_member(buf).map_err(|e| checks.fail(RecordError::Decode(e.to_string())))?;
        checks.check(m.id()).map_err(|e| checks.fail(e))?;
        Ok(m)
    }
}

/// foca's random numbers (rand 0.10's traits) from the workspace's generator.
#[derive(Debug)]
pub struct SwimRng(rand::rngs::StdRng);

impl SwimRng {
    /// A generator seeded from the OS.
    pub fn from_os() -> Self {
        use rand::SeedableRng;
        Self(rand::rngs::StdRng::from_os_rng())
    }

    /// A generator with a fixed seed (tests, simulation).
    pub fn seeded(seed: u64) -> Self {
        use rand::SeedableRng;
        Self(rand::rngs::StdRng::seed_from_u64(seed))
    }
}

impl foca_rand::TryRng for SwimRng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok(rand::RngCore::next_u32(&mut self.0))
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(rand::RngCore::next_u64(&mut self.0))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        rand::RngCore::fill_bytes(&mut self.0, dst);
        Ok(())
    }
}

/// The protocol's timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MembershipTiming {
    /// One member probed per period.
    pub probe_period: Duration,
    /// Wait for a direct answer before asking others to probe (shorter than the period).
    pub probe_timeout: Duration,
    /// A suspect member's time to refute before it is dead.
    pub suspicion: Duration,
    /// Members asked to probe one that did not answer.
    pub indirect_probes: usize,
    /// While there are updates to spread: this many random members are sent them, this many times a period.
    pub gossip: (usize, u32),
}

impl MembershipTiming {
    /// The gossip the agent uses: three members, four times a period. Fewer (2×2, 3×2) left starved members no
    /// time to refute at 1,000 nodes: `shoal-sim --membership 1000` counted 54,081 and 34,081 false (node,
    /// member) deaths against 3 (docs/scale.md).
    pub const GOSSIP: (usize, u32) = (3, 4);
}

impl MembershipTiming {
    fn config(&self, cluster_hint: u32) -> Config {
        let mut c = Config::new_lan(NonZeroU32::new(cluster_hint.max(2)).unwrap_or(NonZeroU32::MIN));
        c.probe_period = self.probe_period;
        c.probe_rtt = self.probe_timeout;
        c.suspect_to_down_after = self.suspicion;
        c.num_indirect_probes = NonZeroUsize::new(self.indirect_probes.max(1)).unwrap_or(NonZeroUsize::MIN);
        // A dead member is remembered (and announced to now and then, so a healed partition merges) for 10 min.
        c.remove_down_after = Some(Duration::from_secs(600));
        c.max_packet_size = NonZeroUsize::new(MAX_MESSAGE).unwrap_or(NonZeroUsize::MIN);
        // Updates spread faster than probes alone carry them: a few random members, a few times a period, only while
        // there is something to tell (each message to a member not talked to lately costs a connection).
        if let Some(g) = c.periodic_gossip.as_mut() {
            g.frequency = self.probe_period / self.gossip.1.max(1);
            g.num_members = NonZeroUsize::new(self.gossip.0.max(1)).unwrap_or(NonZeroUsize::MIN);
        }
        if let Some(a) = c.periodic_announce_to_down_members.as_mut() {
            a.frequency = self.probe_period * 10;
        }
        c.max_transmissions = c.max_transmissions.max(NonZeroU8::new(6).unwrap_or(NonZeroU8::MIN));
        c
    }
}

/// Something the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Deliver `data` to `to` (at its gossip address `addr`).
    Send {
        /// The peer.
        to: PeerId,
        /// Its gossip listener.
        addr: SocketAddr,
        /// The message.
        data: Bytes,
    },
    /// Call [`Membership::handle_timer`] with `timer` after `after`.
    Timer {
        /// The delay.
        after: Duration,
        /// The timer.
        timer: foca::Timer<MemberRecord>,
    },
}

type Swim = Foca<MemberRecord, SignedCodec, SwimRng, foca::NoCustomBroadcast>;

/// This node's membership: the SWIM state machine, the node's signed record, and what changed.
pub struct Membership {
    foca: Swim,
    rt: AccumulatingRuntime<MemberRecord>,
    codec: SignedCodec,
    key: identity::Keypair,
    me: MemberRecord,
    changed: bool,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership").field("me", &self.me).finish_non_exhaustive()
    }
}

impl Membership {
    /// Membership of the node holding `key`, described by `me` (signed with `key`), admitting members `binding`
    /// admits.
    pub fn new(
        key: identity::Keypair,
        me: MemberRecord,
        timing: MembershipTiming,
        rng: SwimRng,
        binding: Binding,
    ) -> Self {
        let codec = SignedCodec(Arc::new(Mutex::new(Checks { binding, ..Checks::default() })));
        let foca = Foca::new(me.clone(), timing.config(1000), rng, codec.clone());
        Self { foca, rt: AccumulatingRuntime::new(), codec, key, me, changed: false }
    }

    /// Stops checking records' signatures: only for simulations, where thousands of nodes each checking thousands
    /// of records would measure ed25519 rather than the protocol.
    pub fn trust_signatures(&mut self) {
        self.codec.checks().trust = true;
    }

    /// Every other member's peer id and liveness.
    pub fn states(&self) -> impl Iterator<Item = (PeerId, Liveness)> + '_ {
        self.foca.iter_membership_state().map(|m| {
            let l = match m.state() {
                State::Alive => Liveness::Alive,
                State::Suspect => Liveness::Suspect,
                State::Down => Liveness::Dead,
            };
            (m.id().peer, l)
        })
    }

    /// How this node sees `peer`, if it knows it.
    pub fn liveness_of(&self, peer: &PeerId) -> Option<Liveness> {
        self.states().find(|(p, _)| p == peer).map(|(_, l)| l)
    }

    /// This node's current record.
    pub fn me(&self) -> &MemberRecord {
        &self.me
    }

    /// Asks `peer` (reached at `addr`, its record unknown yet) to let this node in: it answers with members it
    /// knows, and tells the others.
    pub fn join(&mut self, peer: PeerId, addr: SocketAddr) {
        if peer != self.me.peer
            && let Err(e) = self.foca.announce(MemberRecord::placeholder(peer, addr), &mut self.rt)
        {
            tracing::debug!(%peer, error = %e, "membership join failed");
        }
    }

    /// A message from `from` (the peer the transport authenticated).
    pub fn handle_data(&mut self, from: PeerId, data: &[u8]) -> Result<(), RecordError> {
        if data.len() > MAX_MESSAGE {
            return Err(RecordError::Field("message larger than 2 KiB"));
        }
        {
            let mut c = self.codec.checks();
            c.sender = Some(from);
            c.last_error = None;
        }
        let r = self.foca.handle_data(data, &mut self.rt);
        let last = {
            let mut c = self.codec.checks();
            c.sender = None;
            c.last_error.take()
        };
        self.after_input();
        match r {
            Ok(()) => Ok(()),
            // Messages from ourselves (a loopback through a stale address) are no one's fault.
            Err(foca::Error::DataFromOurselves) => Ok(()),
            Err(e) => Err(last.unwrap_or_else(|| RecordError::Decode(e.to_string()))),
        }
    }

    /// A timer asked for in an [`Output::Timer`] fired.
    pub fn handle_timer(&mut self, timer: foca::Timer<MemberRecord>) {
        if let Err(e) = self.foca.handle_timer(timer, &mut self.rt) {
            tracing::debug!(error = %e, "membership timer");
        }
        self.after_input();
    }

    /// Tells the cluster this node leaves.
    pub fn leave(&mut self) {
        let _ = self.foca.leave_cluster(&mut self.rt);
    }

    fn after_input(&mut self) {
        while let Some(n) = self.rt.to_notify() {
            match n {
                OwnedNotification::MemberUp(_) | OwnedNotification::MemberDown(_) | OwnedNotification::Rename(_, _) => {
                    self.changed = true
                }
                // Declared dead while alive: come back as a renewed record (foca cannot sign one).
                OwnedNotification::Defunct => {
                    let me = MemberRecord::sign(
                        &self.key,
                        self.me.incarnation,
                        self.me.renewal.wrapping_add(1),
                        &self.me.about(),
                    );
                    tracing::info!(renewal = me.renewal, "declared dead by the cluster while alive: rejoining");
                    if self.foca.change_identity(me.clone(), &mut self.rt).is_ok() {
                        self.me = me;
                    }
                    self.changed = true;
                }
                _ => {}
            }
        }
    }

    /// The next thing to do, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.after_input();
        if let Some((to, data)) = self.rt.to_send() {
            return Some(Output::Send { to: to.peer, addr: to.gossip, data });
        }
        self.rt.to_schedule().map(|(after, timer)| Output::Timer { after, timer })
    }

    /// Whether the member table changed since the last call (a member joined, left, or changed record).
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// Every other member this node knows, with its liveness.
    pub fn members(&self) -> Vec<(MemberInfo, Liveness)> {
        let mut v: Vec<_> =
            self.foca.iter_membership_state().zip(self.states()).map(|(m, (_, l))| (m.id().info(), l)).collect();
        v.sort_by_key(|(i, _)| i.id);
        v
    }

    /// Alive or suspect members, and a fingerprint of their states: it changes when any member's state does.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut v: Vec<(Vec<u8>, u64, u16, u8)> = self
            .foca
            .iter_membership_state()
            .map(|m| (m.id().peer.to_bytes(), m.id().incarnation, m.id().renewal, m.state() as u8))
            .collect();
        v.sort();
        let mut h = blake3::Hasher::new();
        for (p, i, r, s) in v {
            h.update(&p);
            h.update(&i.to_be_bytes());
            h.update(&r.to_be_bytes());
            h.update(&[s]);
        }
        *h.finalize().as_bytes()
    }

    /// Number of members known, dead ones included.
    pub fn len(&self) -> usize {
        self.foca.iter_membership_state().len()
    }

    /// Whether no other member is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What a joining node asks a member for the table with: its own record, so the member answers only a peer
    /// the binding admits.
    pub fn table_request(&self) -> Vec<u8> {
        postcard::to_allocvec(&self.me).unwrap_or_default()
    }

    /// The table for `from`, which asked with `request` ([`Self::table_request`]): refused unless the record is
    /// `from`'s own, signed, and admitted by the binding.
    pub fn table_for(&self, from: PeerId, request: &[u8]) -> Result<Vec<u8>, RecordError> {
        let r: MemberRecord = postcard::from_bytes(request).map_err(|e| RecordError::Decode(e.to_string()))?;
        if r.peer != from {
            return Err(RecordError::Impersonation { claimed: r.peer });
        }
        self.codec.checks().check(&r)?;
        Ok(self.table())
    }

    /// The whole table, for a joining node (a full-state exchange: SWIM's gossip carries changes, not the steady
    /// state, so a node joining a large cluster would otherwise learn the other members slowly).
    pub fn table(&self) -> Vec<u8> {
        let mut all: Vec<Member<MemberRecord>> = self.foca.iter_membership_state().cloned().collect();
        all.push(Member::alive(self.me.clone()));
        postcard::to_allocvec(&all).unwrap_or_default()
    }

    /// Takes in a table from `from` (see [`Self::table`]): every record is verified. A bad signature or field
    /// refuses the whole table (its sender lies or is broken); a record the binding does not admit (yet: a Node the
    /// watch has not brought) is left out alone. Returns how many records were taken and how many left out.
    pub fn apply_table(&mut self, from: PeerId, data: &[u8]) -> Result<(usize, usize), RecordError> {
        let all: Vec<Member<MemberRecord>> =
            postcard::from_bytes(data).map_err(|e| RecordError::Decode(e.to_string()))?;
        if all.len() > MAX_MEMBERS {
            return Err(RecordError::Full);
        }
        if !all.iter().any(|m| m.id().peer == from) {
            return Err(RecordError::Field("a table must hold its sender's record"));
        }
        let mut admitted = Vec::with_capacity(all.len());
        let mut left_out = 0;
        {
            let mut c = self.codec.checks();
            for m in all {
                match c.check(m.id()) {
                    Ok(()) => admitted.push(m),
                    Err(RecordError::Unbound(why)) => {
                        tracing::debug!(member = ?m.id(), why, "unbound member left out of a table");
                        left_out += 1;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let n = admitted.len();
        let all = admitted;
        // Not re-broadcast: the rest of the cluster knows these already.
        if let Err(e) = self.foca.apply_many(all.into_iter(), false, &mut self.rt) {
            tracing::debug!(error = %e, "membership table");
        }
        self.after_input();
        Ok((n, left_out))
    }
}

pub mod lab;
#[cfg(test)]
mod tests;
