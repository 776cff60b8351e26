//! The announcer: what this node has told which home, and what it must tell next.
//!
//! A node tells each digest's home what it holds (downloads started, blobs committed, blobs gone). Homes move when
//! membership changes; the announcer then re-announces only the digests whose home moved (or whose home
//! restarted and so lost its directory), not everything it holds: at thousands of nodes a membership change
//! every few seconds would otherwise turn into a storm of every node re-announcing its whole store. Pending
//! announcements go out in batches, one message per home. A full re-announcement now and then
//! ([`Announcer::reannounce_all`]) repairs a home that lost track some other way.
//!
//! Sans-IO: the driver passes the home of each digest (a member and its incarnation) and reports what it
//! delivered.

use std::collections::{BTreeMap, HashMap};

use libp2p::PeerId;

use super::directory::Holding;
use crate::oci::Digest;

/// A home: a member and its incarnation (a restarted home starts with an empty directory).
pub type HomeInstance = (PeerId, u64);

#[derive(Debug, Clone)]
struct Held {
    holding: Holding,
    /// The home it was last delivered to.
    told: Option<HomeInstance>,
}

/// The announcer's state.
#[derive(Debug, Default)]
pub struct Announcer {
    held: HashMap<Digest, Held>,
    /// Digests to announce (held ones), or removals to announce (not held any more).
    pending: BTreeMap<Digest, Holding>,
}

impl Announcer {
    /// An empty announcer.
    pub fn new() -> Self {
        Self::default()
    }

    /// This node holds (or no longer holds) something: tell its home.
    pub fn hold(&mut self, h: Holding) {
        if h.removed {
            self.held.remove(&h.digest);
        } else {
            self.held.insert(h.digest.clone(), Held { holding: h.clone(), told: None });
        }
        self.pending.insert(h.digest.clone(), h);
    }

    /// Membership changed: digests whose home is not the one last told are announced again. Returns how many.
    pub fn view_changed(&mut self, home: impl Fn(&Digest) -> HomeInstance) -> usize {
        let mut n = 0;
        for (d, h) in &self.held {
            if h.told != Some(home(d)) && !self.pending.contains_key(d) {
                self.pending.insert(d.clone(), h.holding.clone());
                n += 1;
            }
        }
        n
    }

    /// Everything held is announced again (anti-entropy).
    pub fn reannounce_all(&mut self) {
        for (d, h) in &self.held {
            self.pending.entry(d.clone()).or_insert_with(|| h.holding.clone());
        }
    }

    /// Announcements waiting.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Digests held.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Takes every pending announcement, grouped by home, in messages of at most `max` holdings.
    pub fn take_batches(
        &mut self,
        home: impl Fn(&Digest) -> HomeInstance,
        max: usize,
    ) -> Vec<(HomeInstance, Vec<Holding>)> {
        let mut by_home: BTreeMap<HomeInstance, Vec<Holding>> = BTreeMap::new();
        for (d, h) in std::mem::take(&mut self.pending) {
            by_home.entry(home(&d)).or_default().push(h);
        }
        let mut out = Vec::new();
        for (home, hs) in by_home {
            let mut hs = hs.into_iter().peekable();
            while hs.peek().is_some() {
                out.push((home, hs.by_ref().take(max.max(1)).collect()));
            }
        }
        out
    }

    /// `home` received `batch`.
    pub fn delivered(&mut self, home: HomeInstance, batch: &[Holding]) {
        for h in batch {
            if let Some(held) = self.held.get_mut(&h.digest)
                && held.holding == *h
            {
                held.told = Some(home);
            }
        }
    }

    /// `batch` could not be delivered: what is still current goes out with the next batches.
    pub fn undelivered(&mut self, batch: Vec<Holding>) {
        for h in batch {
            let current = if h.removed {
                !self.held.contains_key(&h.digest)
            } else {
                self.held.get(&h.digest).is_some_and(|held| held.holding == h)
            };
            if current {
                self.pending.entry(h.digest.clone()).or_insert(h);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use sha2::Digest as _;

    use super::*;
    use crate::swarm::homes::{HomeRing, test_id};

    fn d(n: u32) -> Digest {
        Digest::from_sha256(&sha2::Sha256::digest(n.to_be_bytes()))
    }

    fn h(n: u32) -> Holding {
        Holding { digest: d(n), size: 10, media_type: None, complete: true, public: true, removed: false }
    }

    #[test]
    fn only_digests_whose_home_moved_are_announced_again() {
        let members: Vec<PeerId> = (0..20u32).map(|i| test_id(&i.to_be_bytes())).collect();
        let ring = HomeRing::new(members.clone());
        fn home(r: &HomeRing) -> impl Fn(&Digest) -> HomeInstance + '_ {
            move |dg| (r.home(dg).unwrap(), 1)
        }
        let mut a = Announcer::new();
        for n in 0..1000 {
            a.hold(h(n));
        }
        let batches = a.take_batches(home(&ring), 300);
        assert!(batches.iter().all(|(_, b)| b.len() <= 300));
        assert_eq!(batches.iter().map(|(_, b)| b.len()).sum::<usize>(), 1000);
        for (to, b) in &batches {
            a.delivered(*to, b);
        }
        assert_eq!(a.view_changed(home(&ring)), 0, "nothing moved");
        // One member of 21 joins: about 1/21 of the digests move to it, and only those are announced.
        let joined = HomeRing::new(members.iter().copied().chain([test_id(b"new")]));
        let moved = (0..1000).filter(|n| ring.home(&d(*n)) != joined.home(&d(*n))).count();
        assert_eq!(a.view_changed(home(&joined)), moved);
        assert!(moved > 0 && moved < 150, "{moved}");
        // A home that restarted (same id, new incarnation) is told again what is homed on it.
        let target = joined.home(&d(0)).unwrap();
        for (to, b) in a.take_batches(home(&joined), 300) {
            a.delivered(to, &b);
        }
        let restarted = |dg: &Digest| {
            let p = joined.home(dg).unwrap();
            (p, if p == target { 2 } else { 1 })
        };
        let again = a.view_changed(restarted);
        assert_eq!(again, (0..1000).filter(|n| joined.home(&d(*n)) == Some(target)).count());
    }

    #[test]
    fn failed_deliveries_are_retried_unless_superseded() {
        let home = test_id(b"home");
        let at = |_: &Digest| (home, 1);
        let mut a = Announcer::new();
        a.hold(h(1));
        a.hold(h(2));
        let batch = a.take_batches(at, 10).remove(0).1;
        assert_eq!(a.pending(), 0);
        // Digest 2 is gone meanwhile: its stale "held" announcement is not resent, the removal is.
        a.hold(Holding { removed: true, ..h(2) });
        a.undelivered(batch);
        let again = a.take_batches(at, 10).remove(0).1;
        assert_eq!(again.len(), 2);
        assert!(again.iter().any(|x| x.digest == d(1) && !x.removed));
        assert!(again.iter().any(|x| x.digest == d(2) && x.removed));
        a.delivered((home, 1), &again);
        assert_eq!(a.held(), 1);
        a.reannounce_all();
        assert_eq!(a.pending(), 1);
    }
}
