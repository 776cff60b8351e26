//! The member table: who is in the cluster, where to reach them, and whether they are alive, from the
//! announcements gossip delivers. Sans-IO: the clock is passed in, so liveness is tested without sockets. Also the
//! rendezvous choice of a digest's home.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};

use crate::oci::Digest;

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
}

/// How alive a member looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Liveness {
    /// Heard from within `suspect_after`.
    Alive,
    /// Silent for `suspect_after`: not a home, not a source.
    Suspect,
    /// Silent for `dead_after`, or announced that it left.
    Dead,
}

#[derive(Debug, Clone)]
struct Entry {
    info: MemberInfo,
    last_heard: Instant,
    state: Liveness,
}

/// Liveness timing.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Silence before suspect.
    pub suspect_after: Duration,
    /// Silence before dead.
    pub dead_after: Duration,
    /// Silence before a dead member is forgotten (no more redials).
    pub forget_after: Duration,
}

/// Every member this node has heard of, other than itself.
#[derive(Debug)]
pub struct MemberTable {
    me: PeerId,
    timing: Timing,
    members: HashMap<PeerId, Entry>,
}

impl MemberTable {
    /// An empty table for node `me`.
    pub fn new(me: PeerId, timing: Timing) -> Self {
        Self { me, timing, members: HashMap::new() }
    }

    /// Takes in an announcement. Returns whether the view changed (a new member, a state or address change).
    /// Announcements of an older incarnation than the one known are ignored: they are gossip arriving late.
    pub fn observe(&mut self, info: MemberInfo, leaving: bool, now: Instant) -> bool {
        if info.id == self.me {
            return false;
        }
        let state = if leaving { Liveness::Dead } else { Liveness::Alive };
        match self.members.get_mut(&info.id) {
            Some(e) if info.incarnation < e.info.incarnation => false,
            Some(e) if leaving && info.incarnation == e.info.incarnation && e.state == Liveness::Dead => false,
            Some(e) => {
                let changed = e.state != state || e.info != info;
                e.info = info;
                e.state = state;
                e.last_heard = now;
                changed
            }
            None if leaving => false,
            None => {
                self.members.insert(info.id, Entry { info, last_heard: now, state });
                true
            }
        }
    }

    /// Advances the clock: silent members become suspect, then dead, then forgotten. Returns whether any member's
    /// state changed (or one was forgotten).
    pub fn tick(&mut self, now: Instant) -> bool {
        let t = self.timing;
        let mut changed = false;
        self.members.retain(|_, e| {
            let silent = now.saturating_duration_since(e.last_heard);
            if silent >= t.forget_after && e.state == Liveness::Dead {
                changed = true;
                return false;
            }
            let state = match e.state {
                // A member that left stays dead until it announces itself again.
                Liveness::Dead => Liveness::Dead,
                _ if silent >= t.dead_after => Liveness::Dead,
                _ if silent >= t.suspect_after => Liveness::Suspect,
                _ => Liveness::Alive,
            };
            changed |= state != e.state;
            e.state = state;
            true
        });
        changed
    }

    /// Members in a given state.
    pub fn in_state(&self, state: Liveness) -> impl Iterator<Item = &MemberInfo> {
        self.members.values().filter(move |e| e.state == state).map(|e| &e.info)
    }

    /// A snapshot of the table.
    pub fn snapshot(&self) -> Vec<(MemberInfo, Liveness)> {
        let mut v: Vec<_> = self.members.values().map(|e| (e.info.clone(), e.state)).collect();
        v.sort_by_key(|(i, _)| i.id);
        v
    }
}

/// The rendezvous score of `peer` for `digest`: the home is the candidate with the highest.
fn score(peer: &PeerId, digest: &Digest) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&peer.to_bytes());
    h.update(digest.as_str().as_bytes());
    *h.finalize().as_bytes()
}

/// A digest's home among `candidates` (rendezvous hashing): every node that sees the same candidates picks the
/// same home, and a candidate joining or leaving moves only the digests whose home it is or becomes.
pub fn home<'a>(digest: &Digest, candidates: impl IntoIterator<Item = &'a PeerId>) -> Option<PeerId> {
    candidates.into_iter().max_by_key(|p| (score(p, digest), p.to_bytes())).copied()
}

/// What the rest of the agent sees of the membership: this node, its zone, and every other member with its state.
#[derive(Debug, Clone)]
pub struct MembersView {
    /// This node.
    pub me: PeerId,
    /// This node's zone.
    pub zone: String,
    /// Other members.
    pub members: Vec<(MemberInfo, Liveness)>,
}

impl MembersView {
    /// Alive members of this node's zone, this node included.
    pub fn zone_alive(&self) -> Vec<PeerId> {
        let mut v: Vec<PeerId> = self
            .members
            .iter()
            .filter(|(i, s)| *s == Liveness::Alive && i.zone == self.zone)
            .map(|(i, _)| i.id)
            .collect();
        v.push(self.me);
        v
    }

    /// The home of `digest` in this node's zone.
    pub fn home(&self, digest: &Digest) -> PeerId {
        home(digest, &self.zone_alive()).unwrap_or(self.me)
    }

    /// A member's zone (this node's included), if it is known.
    pub fn zone_of(&self, id: &PeerId) -> Option<&str> {
        if *id == self.me {
            return Some(&self.zone);
        }
        self.members.iter().find(|(i, _)| i.id == *id).map(|(i, _)| i.zone.as_str())
    }

    /// Zones with an alive member (this node's included), sorted.
    pub fn zones(&self) -> Vec<String> {
        let mut z: Vec<String> =
            self.members.iter().filter(|(_, s)| *s == Liveness::Alive).map(|(i, _)| i.zone.clone()).collect();
        z.push(self.zone.clone());
        z.sort();
        z.dedup();
        z
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
        if zone == self.zone {
            return Some(self.home(digest));
        }
        let alive: Vec<PeerId> =
            self.members.iter().filter(|(i, s)| *s == Liveness::Alive && i.zone == zone).map(|(i, _)| i.id).collect();
        home(digest, &alive)
    }

    /// An alive member's transfer address.
    pub fn transfer_addr(&self, id: &PeerId) -> Option<SocketAddr> {
        self.members.iter().find(|(i, s)| i.id == *id && *s == Liveness::Alive).map(|(i, _)| i.transfer_addr)
    }

    /// The transfer address of a member that is alive or only suspect (silent for a little while: a busy node's
    /// gossip can lag; a source already streaming is not dropped for that).
    pub fn reachable_addr(&self, id: &PeerId) -> Option<SocketAddr> {
        self.members.iter().find(|(i, s)| i.id == *id && *s != Liveness::Dead).map(|(i, _)| i.transfer_addr)
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
    use proptest::prelude::*;

    fn info(id: PeerId, incarnation: u64) -> MemberInfo {
        MemberInfo {
            id,
            incarnation,
            zone: "z".into(),
            gossip_addrs: vec![],
            transfer_addr: "127.0.0.1:1".parse().unwrap(),
        }
    }

    const T: Timing = Timing {
        suspect_after: Duration::from_secs(3),
        dead_after: Duration::from_secs(6),
        forget_after: Duration::from_secs(60),
    };

    #[test]
    fn silence_makes_suspect_then_dead_then_forgotten_and_a_restart_revives() {
        let me = PeerId::random();
        let a = PeerId::random();
        let mut t = MemberTable::new(me, T);
        let t0 = Instant::now();
        assert!(t.observe(info(a, 1), false, t0));
        assert!(!t.observe(info(me, 1), false, t0), "itself is not a member");
        assert!(!t.tick(t0 + Duration::from_secs(2)));
        assert!(t.tick(t0 + Duration::from_secs(3)));
        assert_eq!(t.snapshot()[0].1, Liveness::Suspect);
        assert!(t.tick(t0 + Duration::from_secs(7)));
        assert_eq!(t.snapshot()[0].1, Liveness::Dead);
        // Late gossip from the old incarnation does not revive it; the restarted one does.
        assert!(t.observe(info(a, 1), false, t0 + Duration::from_secs(8)));
        assert!(t.observe(info(a, 2), false, t0 + Duration::from_secs(9)));
        assert!(!t.observe(info(a, 1), false, t0 + Duration::from_secs(9)));
        assert_eq!(t.snapshot()[0].0.incarnation, 2);
        // Leaving is immediate and sticks until it announces itself again.
        assert!(t.observe(info(a, 2), true, t0 + Duration::from_secs(10)));
        assert!(!t.tick(t0 + Duration::from_secs(11)));
        assert_eq!(t.snapshot()[0].1, Liveness::Dead);
        assert!(!t.tick(t0 + Duration::from_secs(69)));
        assert!(t.tick(t0 + Duration::from_secs(70)));
        assert!(t.snapshot().is_empty(), "forgotten after forget_after");
    }

    fn digest(n: u64) -> Digest {
        Digest::from_sha256(&sha2::Sha256::digest(n.to_be_bytes()))
    }
    use sha2::Digest as _;

    proptest! {
        #[test]
        fn rendezvous_is_stable_and_moves_only_what_it_must(n in 1usize..12, d in any::<u64>(), rotate in 0usize..12) {
            let peers: Vec<PeerId> = (0..n).map(|_| PeerId::random()).collect();
            let digest = digest(d);
            let h = home(&digest, &peers).unwrap();
            prop_assert!(peers.contains(&h));
            // Order of candidates does not matter.
            let mut shuffled = peers.clone();
            shuffled.rotate_left(rotate % n);
            prop_assert_eq!(home(&digest, &shuffled), Some(h));
            // Removing a member that is not the home keeps the home; removing the home moves it elsewhere.
            for (i, p) in peers.iter().enumerate() {
                let mut rest = peers.clone();
                rest.remove(i);
                let h2 = home(&digest, &rest);
                if *p == h { prop_assert!(h2 != Some(h)); } else { prop_assert_eq!(h2, Some(h)); }
            }
            // A newcomer either becomes the home or leaves it where it was.
            let newcomer = PeerId::random();
            let mut more = peers.clone();
            more.push(newcomer);
            let h3 = home(&digest, &more).unwrap();
            prop_assert!(h3 == h || h3 == newcomer);
        }
    }

    #[test]
    fn zones_each_have_a_home_and_every_digest_one_home_zone() {
        let me = PeerId::random();
        let others: Vec<(PeerId, &str)> =
            vec![(PeerId::random(), "a"), (PeerId::random(), "b"), (PeerId::random(), "b"), (PeerId::random(), "c")];
        let mut members: Vec<(MemberInfo, Liveness)> =
            others.iter().map(|(id, z)| (MemberInfo { zone: (*z).into(), ..info(*id, 1) }, Liveness::Alive)).collect();
        // A dead member's zone is not a zone any more.
        members.push((MemberInfo { zone: "d".into(), ..info(PeerId::random(), 1) }, Liveness::Dead));
        let view = MembersView { me, zone: "a".into(), members };
        assert_eq!(view.zones(), vec!["a", "b", "c"]);
        assert_eq!(view.zone_of(&me), Some("a"));
        assert_eq!(view.zone_of(&others[1].0), Some("b"));
        let mut home_zones = HashMap::new();
        for n in 0..300 {
            let d = digest(n);
            // Every node computes the same home zone: it depends on the zones, not on who asks.
            let other_view = MembersView { me: others[1].0, zone: "b".into(), ..view.clone() };
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

    #[test]
    fn homes_spread_over_members() {
        let peers: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
        let mut counts = HashMap::new();
        for d in 0..4000 {
            *counts.entry(home(&digest(d), &peers).unwrap()).or_insert(0) += 1;
        }
        for p in &peers {
            let c = counts.get(p).copied().unwrap_or(0);
            assert!((800..1200).contains(&c), "{c} of 4000 digests homed on one of 4 peers");
        }
    }
}
