//! The member view: who is in the cluster, where to reach them, and whether they are alive, as membership
//! ([`crate::swarm::membership`]) last saw it, with each zone's [`HomeRing`] (a digest's home).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use libp2p::{Multiaddr, PeerId};

use crate::oci::Digest;
use crate::swarm::homes::{HomeRing, member_point};

/// What a member says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    /// Its identity (libp2p peer id, from its persisted key).
    pub id: PeerId,
    /// Start time of its process, ms since the epoch: a restart raises it.
    pub incarnation: u64,
    /// Its zone.
    pub zone: String,
    /// Its gossip listener.
    pub gossip_addrs: Vec<Multiaddr>,
    /// Its transfer endpoint.
    pub transfer_addr: SocketAddr,
    /// The Kubernetes Node it is bound to (its point on the homes' ring comes from this name), if any.
    pub node: Option<String>,
}

/// How alive a member looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Liveness {
    /// Answers probes.
    Alive,
    /// Answered no probe, direct or indirect, in a period: not a home, not a source, until it refutes.
    Suspect,
    /// Did not refute within `dead_after`, or said it left.
    Dead,
}

/// What the rest of the agent sees of the membership: this node, its zone, and every other member with its state;
/// and each zone's ring of alive members ([`HomeRing`]), built once per change, so a digest's home costs a
/// binary search.
#[derive(Debug, Clone)]
pub struct MembersView {
    /// This node.
    pub me: PeerId,
    /// This node's zone.
    pub zone: String,
    /// Other members.
    pub members: Vec<(MemberInfo, Liveness)>,
    /// Alive members by zone (this node in its own).
    rings: Arc<BTreeMap<String, HomeRing>>,
    /// Each member's position in `members`: lookups by id cost O(1), not a walk of N members.
    index: Arc<HashMap<PeerId, usize>>,
}

impl MembersView {
    /// The view of node `me` in `zone`, given the other members.
    pub fn new(me: PeerId, zone: String, members: Vec<(MemberInfo, Liveness)>) -> Self {
        Self::bound(me, None, zone, members)
    }

    /// The view of node `me`, bound to Kubernetes Node `node` if any, in `zone`, given the other members.
    pub fn bound(me: PeerId, node: Option<&str>, zone: String, members: Vec<(MemberInfo, Liveness)>) -> Self {
        let mut alive: BTreeMap<String, Vec<(PeerId, u64)>> = BTreeMap::new();
        alive.entry(zone.clone()).or_default().push((me, member_point(&me, node)));
        for (i, s) in &members {
            if *s == Liveness::Alive {
                alive.entry(i.zone.clone()).or_default().push((i.id, member_point(&i.id, i.node.as_deref())));
            }
        }
        let rings = alive.into_iter().map(|(z, ids)| (z, HomeRing::with_points(ids))).collect();
        let index = members.iter().enumerate().map(|(k, (i, _))| (i.id, k)).collect();
        Self { me, zone, members, rings: Arc::new(rings), index: Arc::new(index) }
    }

    /// Another member's entry.
    fn member(&self, id: &PeerId) -> Option<&(MemberInfo, Liveness)> {
        self.members.get(*self.index.get(id)?)
    }

    /// The home of `digest` in this node's zone, with its incarnation (0 for this node): a home that restarted
    /// is another home instance, with an empty directory.
    pub fn home_instance(&self, digest: &Digest) -> (PeerId, u64) {
        let h = self.home(digest);
        (h, self.member(&h).map_or(0, |(i, _)| i.incarnation))
    }

    /// Alive members of this node's zone, this node included.
    pub fn zone_alive(&self) -> &[PeerId] {
        self.rings.get(&self.zone).map_or(&[], |r| r.members())
    }

    /// The home of `digest` in this node's zone.
    pub fn home(&self, digest: &Digest) -> PeerId {
        self.home_in(&self.zone, digest).unwrap_or(self.me)
    }

    /// A member's zone (this node's included), if it is known.
    pub fn zone_of(&self, id: &PeerId) -> Option<&str> {
        if *id == self.me {
            return Some(&self.zone);
        }
        self.member(id).map(|(i, _)| i.zone.as_str())
    }

    /// Zones with an alive member (this node's included), sorted.
    pub fn zones(&self) -> Vec<String> {
        self.rings.keys().cloned().collect()
    }

    /// The zone whose home fetches `digest` from upstream for the whole cluster (rendezvous hashing over zones,
    /// like homes over members): every other zone's home fetches it from there, so it crosses each zone boundary
    /// once.
    pub fn home_zone(&self, digest: &Digest) -> String {
        self.zones()
            .into_iter()
            .max_by_key(|z| {
                let mut h = blake3::Hasher::new();
                h.update(b"zone\0");
                h.update(z.as_bytes());
                h.update(b"\0");
                h.update(digest.as_str().as_bytes());
                (*h.finalize().as_bytes(), z.clone())
            })
            .unwrap_or_else(|| self.zone.clone())
    }

    /// The home of `digest` in `zone`.
    pub fn home_in(&self, zone: &str, digest: &Digest) -> Option<PeerId> {
        self.rings.get(zone)?.home(digest)
    }

    /// An alive member's transfer address.
    pub fn transfer_addr(&self, id: &PeerId) -> Option<SocketAddr> {
        self.member(id).filter(|(_, s)| *s == Liveness::Alive).map(|(i, _)| i.transfer_addr)
    }

    /// The transfer address of a member that is alive or only suspect (silent for a little while: a busy node's
    /// gossip can lag; a source already streaming is not dropped for that).
    pub fn reachable_addr(&self, id: &PeerId) -> Option<SocketAddr> {
        self.member(id).filter(|(_, s)| *s != Liveness::Dead).map(|(i, _)| i.transfer_addr)
    }

    /// Whether `id` is an alive member.
    pub fn is_alive(&self, id: &PeerId) -> bool {
        self.transfer_addr(id).is_some()
    }

    /// Identifies the set of alive zone members and their incarnations: when it changes, homes may have moved.
    pub fn epoch(&self) -> [u8; 32] {
        let mut alive: Vec<(PeerId, u64)> = self
            .members
            .iter()
            .filter(|(i, s)| *s == Liveness::Alive && i.zone == self.zone)
            .map(|(i, _)| (i.id, i.incarnation))
            .collect();
        alive.sort();
        let mut h = blake3::Hasher::new();
        for (id, inc) in alive {
            h.update(&id.to_bytes());
            h.update(&inc.to_be_bytes());
        }
        *h.finalize().as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: PeerId, incarnation: u64) -> MemberInfo {
        MemberInfo {
            id,
            incarnation,
            zone: "z".into(),
            gossip_addrs: vec![],
            transfer_addr: "127.0.0.1:1".parse().unwrap(),
            node: None,
        }
    }

    fn digest(n: u64) -> Digest {
        Digest::from_sha256(&sha2::Sha256::digest(n.to_be_bytes()))
    }
    use sha2::Digest as _;

    #[test]
    fn zones_each_have_a_home_and_every_digest_one_home_zone() {
        let me = PeerId::random();
        let others: Vec<(PeerId, &str)> =
            vec![(PeerId::random(), "a"), (PeerId::random(), "b"), (PeerId::random(), "b"), (PeerId::random(), "c")];
        let mut members: Vec<(MemberInfo, Liveness)> =
            others.iter().map(|(id, z)| (MemberInfo { zone: (*z).into(), ..info(*id, 1) }, Liveness::Alive)).collect();
        // A dead member's zone is not a zone any more.
        members.push((MemberInfo { zone: "d".into(), ..info(PeerId::random(), 1) }, Liveness::Dead));
        let view = MembersView::new(me, "a".into(), members);
        assert_eq!(view.zones(), vec!["a", "b", "c"]);
        assert_eq!(view.zone_of(&me), Some("a"));
        assert_eq!(view.zone_of(&others[1].0), Some("b"));
        let mut home_zones = HashMap::new();
        for n in 0..300 {
            let d = digest(n);
            // Every node computes the same home zone: it depends on the zones, not on who asks.
            let mut others_members: Vec<_> =
                view.members.iter().filter(|(i, _)| i.id != others[1].0).cloned().collect();
            others_members.push((MemberInfo { zone: "a".into(), ..info(me, 1) }, Liveness::Alive));
            let other_view = MembersView::new(others[1].0, "b".into(), others_members);
            let hz = view.home_zone(&d);
            assert_eq!(other_view.home_zone(&d), hz);
            *home_zones.entry(hz.clone()).or_insert(0) += 1;
            // Each zone's home is one of that zone's alive members.
            let hb = view.home_in("b", &d).unwrap();
            assert!(hb == others[1].0 || hb == others[2].0);
            assert_eq!(view.home_in("a", &d), Some(view.home(&d)));
            assert_eq!(view.home_in("d", &d), None, "no alive member there");
        }
        assert_eq!(home_zones.len(), 3, "home zones spread over the zones: {home_zones:?}");
    }
}
