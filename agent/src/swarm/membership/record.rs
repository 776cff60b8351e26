//! A member's record: what it says about itself (peer id, incarnation, Node, zone, addresses), signed with the key
//! its peer id names, and the checks every record passes before it is believed.

use std::collections::HashMap;
use std::net::SocketAddr;

use libp2p::{Multiaddr, PeerId, identity};
use serde::{Deserialize, Serialize};

use super::MAX_MEMBERS;
use crate::mesh::MemberInfo;
use crate::swarm::binding::{Binding, Claim};

/// A record's version: (incarnation, renewal).
pub type Version = (u64, u32);

/// A zone name's longest length.
const MAX_ZONE: usize = 63;
/// Domain separation of a record's signature.
const RECORD_CONTEXT: &[u8] = b"shoal member record v2\0";

/// What a member says about itself, signed with its node key (the signed fields are [`SignedFields`]).
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "SignedFields", into = "SignedFields")]
pub struct MemberRecord {
    pub(super) w: SignedFields,
    /// Which member this is, whatever its incarnation: its Node when it names one (one member per Node), else its
    /// peer id. Derived from the fields, never sent.
    key: u128,
}

/// A record's fields, as they travel and are signed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SignedFields {
    #[serde(with = "peer_bytes")]
    pub(super) peer: PeerId,
    /// Start of its process, ms since the epoch: a restart raises it.
    pub(super) incarnation: u64,
    /// Raised by the member itself to refute a suspicion or a death (SWIM's incarnation number): only its key can
    /// sign a higher one, so nobody else can keep it alive.
    pub(super) renewal: u32,
    /// The Kubernetes Node it runs on (empty outside Kubernetes).
    pub(super) node: String,
    pub(super) zone: String,
    pub(super) gossip: SocketAddr,
    pub(super) transfer: SocketAddr,
    /// Ed25519 over the fields above.
    pub(super) sig: Vec<u8>,
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
    pub fn sign(key: &identity::Keypair, incarnation: u64, renewal: u32, about: &About) -> Self {
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

    /// Which member this is, whatever its version: its Node's name when it names one, else its peer id, hashed.
    pub fn key(&self) -> u128 {
        self.key
    }

    /// Its version: a later record of the same member supersedes an earlier one (a restart raises the
    /// incarnation, a refutation the renewal).
    pub fn version(&self) -> Version {
        (self.incarnation, self.renewal)
    }

    /// Whether this record supersedes `other` (a record of the same member): the later version, and between two
    /// records of one version (two processes claiming one Node in the same millisecond) the larger signature, so
    /// every node picks the same.
    pub fn supersedes(&self, other: &Self) -> bool {
        (self.version(), &self.sig) > (other.version(), &other.sig)
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

/// What every record is checked against.
#[derive(Debug, Default)]
pub(super) struct Checks {
    /// Who may be a member.
    pub(super) binding: Binding,
    /// Records whose signature verified, by peer: a record seen again costs a comparison, not a signature check.
    pub(super) verified: HashMap<PeerId, MemberRecord>,
    /// Signatures are not checked (simulations of thousands of nodes: [`super::lab`]).
    pub(super) trust: bool,
}

impl Checks {
    /// Verifies `r`'s signature (once per record) and that the binding admits it (every time: a Node can go).
    pub(super) fn check(&mut self, r: &MemberRecord) -> Result<(), RecordError> {
        if !self.trust && self.verified.get(&r.peer) != Some(r) {
            if !self.verified.contains_key(&r.peer) && self.verified.len() >= MAX_MEMBERS {
                return Err(RecordError::Full);
            }
            r.verify()?;
            self.verified.insert(r.peer, r.clone());
        }
        self.binding.admit(&r.claim()).map_err(RecordError::Unbound)
    }

    /// Forgets a record's cached verification (its member left the table).
    pub(super) fn forget(&mut self, peer: &PeerId) {
        self.verified.remove(peer);
    }
}
