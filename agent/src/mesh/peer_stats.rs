//! What this node exchanged with each member, for `shoal peers`: piece bytes each way and when it last heard from
//! it (a membership message, a piece it sent or asked for). Bounded: at most [`MAX_PEERS`] entries, and members
//! that left the view are forgotten on the next view change.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use libp2p::PeerId;

/// Entries kept at most (far above any cluster's members: new peers past it are not counted).
pub(super) const MAX_PEERS: usize = 65_536;

/// One member's counters.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Counters {
    /// Piece bytes sent to it.
    pub(super) sent: u64,
    /// Piece bytes received from it (checked).
    pub(super) received: u64,
    /// When it was last heard from.
    pub(super) heard: Option<Instant>,
}

/// The counters of every member.
#[derive(Debug, Default)]
pub(super) struct PeerStats(Mutex<HashMap<PeerId, Counters>>);

impl PeerStats {
    fn with(&self, p: PeerId, f: impl FnOnce(&mut Counters)) {
        let mut m = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let len = m.len();
        match m.get_mut(&p) {
            Some(c) => f(c),
            None if len < MAX_PEERS => f(m.entry(p).or_default()),
            None => {}
        }
    }

    /// `p` was heard from now.
    pub(super) fn heard(&self, p: PeerId) {
        self.with(p, |c| c.heard = Some(Instant::now()));
    }

    /// `n` piece bytes went to `p`.
    pub(super) fn sent(&self, p: PeerId, n: u64) {
        self.with(p, |c| c.sent += n);
    }

    /// `n` piece bytes came from `p`.
    pub(super) fn received(&self, p: PeerId, n: u64) {
        self.with(p, |c| {
            c.received += n;
            c.heard = Some(Instant::now());
        });
    }

    /// `p`'s counters (zero for a member never exchanged with).
    pub(super) fn get(&self, p: &PeerId) -> Counters {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(p).copied().unwrap_or_default()
    }

    /// Forgets the peers `keep` rejects.
    pub(super) fn retain(&self, keep: impl Fn(&PeerId) -> bool) {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|p, _| keep(p));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_peer_and_forgets_those_gone() {
        let s = PeerStats::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        s.sent(a, 10);
        s.sent(a, 5);
        s.received(b, 7);
        assert_eq!((s.get(&a).sent, s.get(&a).received), (15, 0));
        assert!(s.get(&a).heard.is_none() && s.get(&b).heard.is_some());
        s.retain(|p| *p == b);
        assert_eq!(s.get(&a).sent, 0);
        assert_eq!(s.get(&b).received, 7);
    }
}
