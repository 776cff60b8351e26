//! The piece exchange of one download: pieces taken out of order from every peer that has them, rarest first.
//!
//! Where [`super::scheduler`] takes pieces in order from sources ahead of it (a burst then forms a tree, and a
//! tree with fan-out `f` gives each node `1/f` of a link), here every peer of the download — holders handed out by
//! the home, and askers that connected to this node for the same blob — may give and take any piece: nodes hold
//! different pieces early and trade them, so every node's uplink works for the swarm (BitTorrent's idea, as Kraken
//! runs it). Sans-IO: the driver reports what peers have (their bitfield when they connect, then each piece they
//! add), what was delivered and what failed, and asks [`Exchange::poll`] for requests to send.
//!
//! Rules:
//! - A piece is only ever requested from a peer known to have it, so a request never waits on a peer that is itself
//!   waiting: no cycles, whatever the peers' order of arrival.
//! - At most `per_peer` requests per peer and `window` in all (each piece is buffered whole to check its hash).
//! - Each free slot takes the piece fewest of this download's peers have (rarest first), ties broken by a seeded
//!   rotation so that nodes holding the same pieces choose different ones.
//! - A peer that fails a piece is never asked again in this download; its pieces no longer count as available.
//! - Endgame: once every missing piece is requested, an idle peer takes a copy of a missing piece it has (at most
//!   `endgame_copies` requests per piece); the first delivery wins and the others are cancelled. A straggler at the
//!   end (a slow peer holding the last pieces) is overtaken this way.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::bitfield::{Bitfield, BitsOf};
pub use super::scheduler::Action;

/// Settings of an exchange.
#[derive(Debug, Clone, Copy)]
pub struct ExchangeConfig {
    /// Requests out at once to one peer.
    pub per_peer: usize,
    /// Requests out at once in all.
    pub window: usize,
    /// Requests of one piece at most, in the endgame.
    pub endgame_copies: usize,
}

impl ExchangeConfig {
    /// The settings for pieces of `piece` bytes: 24 MiB of requests out (8 to 32 pieces), one per peer.
    ///
    /// Chosen in the simulator (kraken-2600's shape at 600 nodes): more requests per peer or a wider window made
    /// every hop slower (a piece shares its sender's link with more others, so the swarm's newest pieces spread
    /// later) — 2 per peer and 64 out: 2.9× the ideal; 1 per peer and 12 out: 1.23×.
    pub fn for_piece(piece: u32) -> Self {
        let window = ((24u64 << 20) / u64::from(piece.max(1))).clamp(8, 32) as usize;
        Self { per_peer: 1, window, endgame_copies: 2 }
    }

    /// For a home that brings the blob into its zone from another zone's holders
    /// ([`super::directory::PEERS_ACROSS_ZONES`] of them): four times the window, so its share of their links adds
    /// up to its own.
    pub fn across_zones(self) -> Self {
        Self { window: self.window * 4, ..self }
    }
}

#[derive(Debug, Clone)]
struct Peer {
    has: Bitfield,
    failed: bool,
    inflight: usize,
    delivered: u32,
    busy: Duration,
    /// It refused a request for want of an upload slot: asked nothing before then.
    resting_until: Option<Instant>,
}

/// The exchange of one download.
#[derive(Debug, Clone)]
pub struct Exchange {
    cfg: ExchangeConfig,
    have: Bitfield,
    /// Pieces with at least one request out.
    requested: Bitfield,
    /// Requests out per piece: (peer, when).
    flights: BTreeMap<u64, Vec<(usize, Instant)>>,
    out: usize,
    peers: Vec<Peer>,
    /// Per piece: usable peers known to have it.
    avail: Vec<u32>,
    rng: u64,
}

impl Exchange {
    /// An exchange for a blob of `count` pieces, `have` of them already here; `seed` decorrelates this node's
    /// choices from its peers'.
    pub fn new(cfg: ExchangeConfig, count: u64, have: &Bitfield, seed: u64) -> Self {
        let cfg = ExchangeConfig {
            per_peer: cfg.per_peer.max(1),
            window: cfg.window.max(1),
            endgame_copies: cfg.endgame_copies.max(1),
        };
        Self {
            cfg,
            have: Self::fit(count, have),
            requested: Bitfield::new(count),
            flights: BTreeMap::new(),
            out: 0,
            peers: Vec::new(),
            avail: vec![0; count as usize],
            // splitmix64 of the seed: neighbouring seeds start far apart, and xorshift needs a non-zero state.
            rng: {
                let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                (z ^ (z >> 31)) | 1
            },
        }
    }

    /// `bits` over exactly `count` pieces (a set over another length keeps only the pieces that exist).
    fn fit(count: u64, bits: &Bitfield) -> Bitfield {
        if bits.len() == count {
            return bits.clone();
        }
        let mut b = Bitfield::new(count);
        for i in bits.ones() {
            b.set(i);
        }
        b
    }

    fn next_rand(&mut self) -> u64 {
        // xorshift64: only decorrelates choices; determinism by seed is what matters.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// Requests out at once in all from now on; 0 pauses the download (requests out are let finish). A node
    /// whose downlink should go to another download first (the home bringing a blob into its zone) lowers it.
    pub fn set_window(&mut self, window: usize) {
        self.cfg.window = window;
    }

    /// Pieces of the blob.
    pub fn count(&self) -> u64 {
        self.have.len()
    }

    /// The pieces here.
    pub fn have(&self) -> &Bitfield {
        &self.have
    }

    /// Every piece is here.
    pub fn is_complete(&self) -> bool {
        self.have.is_full()
    }

    /// Requests out now (an endgame copy counts again).
    pub fn requests(&self) -> usize {
        self.out
    }

    /// Peers added so far (failed ones included: indexes are never reused).
    pub fn peers(&self) -> usize {
        self.peers.len()
    }

    /// Whether `peer` failed in this download.
    pub fn peer_failed(&self, peer: usize) -> bool {
        self.peers.get(peer).is_none_or(|p| p.failed)
    }

    /// Whether a usable peer has a piece this node lacks (requested or not): something may still come.
    pub fn can_progress(&self) -> bool {
        self.peers.iter().any(|p| !p.failed && Self::wants(&self.have, &p.has))
    }

    /// Whether `has` holds a piece `have` lacks.
    fn wants(have: &Bitfield, has: &Bitfield) -> bool {
        has.words().iter().zip(have.words()).any(|(h, m)| h & !m != 0)
    }

    /// Whether `peer` was seen to hold every piece.
    pub fn peer_has_every_piece(&self, peer: usize) -> bool {
        self.peers.get(peer).is_some_and(|p| p.has.is_full())
    }

    /// Whether this node lacks a piece `peer` has (it is worth hearing from).
    pub fn wants_from(&self, peer: usize) -> bool {
        self.peers.get(peer).is_some_and(|p| !p.failed && Self::wants(&self.have, &p.has))
    }

    /// A new peer that has `has` (a complete holder: [`Bitfield::full`]); returns its index.
    pub fn add_peer(&mut self, has: &Bitfield) -> usize {
        let has = Self::fit(self.count(), has);
        for i in has.ones() {
            self.avail[i as usize] += 1;
        }
        self.peers.push(Peer {
            has,
            failed: false,
            inflight: 0,
            delivered: 0,
            busy: Duration::ZERO,
            resting_until: None,
        });
        self.peers.len() - 1
    }

    /// `peer` now has `piece` too (pieces past the end are ignored).
    pub fn peer_has(&mut self, peer: usize, piece: u64) {
        let Some(p) = self.peers.get_mut(peer) else { return };
        if p.has.set(piece) && !p.failed {
            self.avail[piece as usize] += 1;
        }
    }

    /// `peer` has every piece of `has` too.
    pub fn peer_has_all(&mut self, peer: usize, has: &Bitfield) {
        for i in has.ones() {
            self.peer_has(peer, i);
        }
    }

    /// `peer` is gone (it left, or holds nothing of the blob any more): it gets no request from now on, and its
    /// pieces no longer count as available. Its requests out still end as delivered or failed.
    pub fn peer_gone(&mut self, peer: usize) {
        let Some(p) = self.peers.get_mut(peer) else { return };
        if !p.failed {
            p.failed = true;
            for i in p.has.ones() {
                self.avail[i as usize] -= 1;
            }
        }
    }

    fn request(&mut self, piece: u64, peer: usize, now: Instant, out: &mut Vec<Action>) {
        self.peers[peer].inflight += 1;
        self.out += 1;
        self.requested.set(piece);
        self.flights.entry(piece).or_default().push((peer, now));
        out.push(Action::Fetch { piece, source: peer });
    }

    /// The piece `peer` should be asked for next: the rarest it has that is neither here nor requested; in the
    /// endgame, a missing piece with the fewest requests, none of them to `peer`.
    fn pick(&mut self, peer: usize) -> Option<u64> {
        let words = self.have.words().len();
        if words == 0 {
            return None;
        }
        let r = self.next_rand();
        let start = (r % words as u64) as usize;
        // Ties go to the first found: the scan starts at a random word, and at a random bit of every word.
        let rot = ((r >> 32) % 64) as u32;
        let bits = |w: u64| BitsOf(w.rotate_right(rot)).map(move |b| (b + u64::from(rot)) % 64);
        let mut best: Option<(u32, u64)> = None;
        for k in 0..words {
            let w = (start + k) % words;
            let fresh = self.peers[peer].has.words()[w] & !self.have.words()[w] & !self.requested.words()[w];
            for b in bits(fresh) {
                let i = w as u64 * 64 + b;
                let a = self.avail[i as usize];
                if best.is_none_or(|(ba, _)| a < ba) {
                    best = Some((a, i));
                }
            }
        }
        if let Some((_, i)) = best {
            return Some(i);
        }
        if self.have.count() + self.requested.count() < self.count() {
            return None;
        }
        let mut best: Option<(usize, u64)> = None;
        for k in 0..words {
            let w = (start + k) % words;
            let missing = self.peers[peer].has.words()[w] & !self.have.words()[w];
            for b in bits(missing) {
                let i = w as u64 * 64 + b;
                let Some(f) = self.flights.get(&i) else { continue };
                if f.len() >= self.cfg.endgame_copies || f.iter().any(|(p, _)| *p == peer) {
                    continue;
                }
                if best.is_none_or(|(n, _)| f.len() < n) {
                    best = Some((f.len(), i));
                }
            }
        }
        best.map(|(_, i)| i)
    }

    /// What to request now: each usable peer with a free slot takes a piece in turn, until the window is full or
    /// no peer has anything more to give.
    pub fn poll(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        let n = self.peers.len();
        if self.is_complete() || n == 0 {
            return out;
        }
        let start = (self.next_rand() % n as u64) as usize;
        // A full window, or no peer with a free slot: nothing to ask (checked before any allocation: a driver
        // polls after every event).
        let per_peer = self.cfg.per_peer;
        let askable = |p: &Peer| !p.failed && p.inflight < per_peer && p.resting_until.is_none_or(|t| t <= now);
        if self.out >= self.cfg.window || !self.peers.iter().any(askable) {
            return out;
        }
        let mut open: Vec<usize> = (0..n).map(|k| (start + k) % n).collect();
        while !open.is_empty() {
            open.retain(|&i| askable(&self.peers[i]));
            let mut next = Vec::with_capacity(open.len());
            for i in open {
                if self.out >= self.cfg.window {
                    return out;
                }
                if let Some(piece) = self.pick(i) {
                    self.request(piece, i, now, &mut out);
                    next.push(i);
                }
            }
            open = next;
        }
        out
    }

    /// Whether `piece` is still awaited from `peer`: a late or unasked delivery is not.
    pub fn awaits(&self, piece: u64, peer: usize) -> bool {
        self.flights.get(&piece).is_some_and(|f| f.iter().any(|(p, _)| *p == peer))
    }

    /// `peer` delivered `piece` (its hash checked): it is here now. Returns the other requests of the same piece,
    /// to cancel. A delivery nobody awaits (a late endgame copy) changes nothing.
    pub fn delivered(&mut self, piece: u64, peer: usize, now: Instant) -> Vec<Action> {
        if !self.awaits(piece, peer) {
            return Vec::new();
        }
        let flight = self.flights.remove(&piece).unwrap_or_default();
        self.requested.unset(piece);
        self.have.set(piece);
        let mut cancel = Vec::new();
        for (p, since) in flight {
            self.out -= 1;
            let src = &mut self.peers[p];
            src.inflight -= 1;
            if p == peer {
                src.delivered += 1;
                src.busy += now.saturating_duration_since(since);
            } else {
                cancel.push(Action::Cancel { piece, source: p });
            }
        }
        cancel
    }

    /// `peer` refused `piece` for want of an upload slot (`BUSY`): the piece is requested elsewhere unless another
    /// request for it is out, and `peer` is asked nothing until `until` — it is not failed: a holder many members
    /// trade with refuses some of them at times, and is asked again once it may have a free slot.
    pub fn refused(&mut self, piece: u64, peer: usize, until: Instant) {
        let Some(p) = self.peers.get_mut(peer) else { return };
        p.resting_until = Some(until);
        self.drop_flight(piece, peer);
    }

    /// When the earliest resting peer may be asked again (after `now`), if one rests.
    pub fn rest_ends(&self, now: Instant) -> Option<Instant> {
        self.peers.iter().filter(|p| !p.failed).filter_map(|p| p.resting_until).filter(|t| *t > now).min()
    }

    /// Removes `peer`'s request of `piece`, if out.
    fn drop_flight(&mut self, piece: u64, peer: usize) {
        let Some(f) = self.flights.get_mut(&piece) else { return };
        let Some(at) = f.iter().position(|(p, _)| *p == peer) else { return };
        f.remove(at);
        self.out -= 1;
        self.peers[peer].inflight -= 1;
        if f.is_empty() {
            self.flights.remove(&piece);
            self.requested.unset(piece);
        }
    }

    /// `peer` failed `piece` (refused, stalled, a bad hash, gone): it gets nothing more here, and the piece is
    /// requested elsewhere unless another request for it is still out.
    pub fn failed(&mut self, piece: u64, peer: usize) {
        if peer >= self.peers.len() {
            return;
        }
        self.peer_gone(peer);
        self.drop_flight(piece, peer);
    }

    /// The time `peer` took per piece delivered, if it delivered any.
    pub fn piece_time(&self, peer: usize) -> Option<Duration> {
        let p = self.peers.get(peer)?;
        (p.delivered > 0).then(|| p.busy / p.delivered)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn cfg(per_peer: usize, window: usize) -> ExchangeConfig {
        ExchangeConfig { per_peer, window, endgame_copies: 2 }
    }

    fn bits(len: u64, ones: &[u64]) -> Bitfield {
        let mut b = Bitfield::new(len);
        for &i in ones {
            b.set(i);
        }
        b
    }

    fn fetches(a: &[Action]) -> Vec<(u64, usize)> {
        a.iter()
            .filter_map(|x| match *x {
                Action::Fetch { piece, source } => Some((piece, source)),
                Action::Cancel { .. } => None,
            })
            .collect()
    }

    #[test]
    fn asks_each_peer_only_for_what_it_has_rarest_first() {
        let t0 = Instant::now();
        let mut x = Exchange::new(cfg(1, 8), 6, &Bitfield::new(6), 7);
        // Piece 5 is held by one peer only, pieces 0–2 by three.
        let a = x.add_peer(&bits(6, &[0, 1, 2, 5]));
        let b = x.add_peer(&bits(6, &[0, 1, 2]));
        let c = x.add_peer(&bits(6, &[0, 1, 2]));
        let got = fetches(&x.poll(t0));
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got.contains(&(5, a)), "the rare piece from the only peer with it: {got:?}");
        for (piece, peer) in &got {
            assert!([a, b, c].contains(peer));
            assert!(x.peers[*peer].has.get(*piece));
        }
        assert!(x.poll(t0).is_empty(), "one request per peer");
    }

    #[test]
    fn a_piece_nobody_has_waits_for_a_peer_to_get_it() {
        let t0 = Instant::now();
        let mut x = Exchange::new(cfg(2, 8), 3, &bits(3, &[0]), 1);
        let p = x.add_peer(&bits(3, &[0]));
        assert!(x.poll(t0).is_empty());
        assert!(!x.can_progress());
        x.peer_has(p, 2);
        assert_eq!(fetches(&x.poll(t0)), vec![(2, p)]);
        x.delivered(2, p, t0);
        assert_eq!(x.have().ones().collect::<Vec<_>>(), vec![0, 2]);
        assert!(!x.is_complete());
    }

    #[test]
    fn a_failed_peer_is_dropped_and_its_piece_goes_elsewhere() {
        let t0 = Instant::now();
        let mut x = Exchange::new(cfg(1, 8), 1, &Bitfield::new(1), 3);
        let a = x.add_peer(&Bitfield::full(1));
        let got = fetches(&x.poll(t0));
        assert_eq!(got, vec![(0, a)]);
        let b = x.add_peer(&Bitfield::full(1));
        // Endgame: the only missing piece is requested, b takes a copy.
        assert_eq!(fetches(&x.poll(t0)), vec![(0, b)]);
        x.failed(0, a);
        assert!(x.peer_failed(a));
        assert!(x.poll(t0).is_empty(), "b already has the piece out");
        let cancel = x.delivered(0, b, t0);
        assert!(cancel.is_empty());
        assert!(x.is_complete());
    }

    #[test]
    fn a_busy_peer_rests_and_is_asked_again_not_dropped() {
        let t0 = Instant::now();
        let mut x = Exchange::new(cfg(1, 8), 2, &Bitfield::new(2), 5);
        let a = x.add_peer(&Bitfield::full(2));
        let first = fetches(&x.poll(t0));
        assert_eq!(first.len(), 1);
        let until = t0 + Duration::from_millis(100);
        x.refused(first[0].0, a, until);
        assert!(!x.peer_failed(a) && x.can_progress());
        assert_eq!(x.requests(), 0);
        assert!(x.poll(t0 + Duration::from_millis(50)).is_empty(), "resting");
        assert_eq!(x.rest_ends(t0), Some(until));
        assert_eq!(fetches(&x.poll(until)).len(), 1, "asked again once its rest is over");
        assert_eq!(x.rest_ends(until), None);
    }

    #[test]
    fn the_endgame_copies_the_last_piece_and_cancels_the_loser() {
        let t0 = Instant::now();
        let mut x = Exchange::new(cfg(1, 8), 2, &Bitfield::new(2), 5);
        let a = x.add_peer(&Bitfield::full(2));
        let b = x.add_peer(&Bitfield::full(2));
        let got = fetches(&x.poll(t0));
        assert_eq!(got.len(), 2);
        let (p_b, _) = *got.iter().find(|(_, s)| *s == b).expect("b asked");
        let (p_a, _) = *got.iter().find(|(_, s)| *s == a).expect("a asked");
        x.delivered(p_b, b, t0);
        // b is idle; the only missing piece is out at a: b takes a copy.
        assert_eq!(fetches(&x.poll(t0)), vec![(p_a, b)]);
        assert_eq!(x.delivered(p_a, b, t0), vec![Action::Cancel { piece: p_a, source: a }]);
        assert!(x.is_complete());
        assert!(x.delivered(p_a, a, t0).is_empty(), "a late copy changes nothing");
        assert_eq!(x.requests(), 0);
    }

    #[test]
    fn nodes_with_the_same_peers_choose_differently() {
        let t0 = Instant::now();
        let firsts: std::collections::BTreeSet<u64> = (0..16)
            .map(|seed| {
                let mut x = Exchange::new(cfg(1, 1), 256, &Bitfield::new(256), seed);
                x.add_peer(&Bitfield::full(256));
                fetches(&x.poll(t0))[0].0
            })
            .collect();
        assert!(firsts.len() > 8, "{firsts:?}");
    }

    #[derive(Debug, Clone)]
    enum Ev {
        Deliver(usize),
        Fail(usize),
        Has(usize, u64),
        Join(u64),
    }

    proptest! {
        #[test]
        fn pieces_come_once_from_peers_that_have_them_within_the_limits(
            count in 1u64..150, held in prop::collection::vec(0u64..150, 0..20),
            peers in prop::collection::vec(prop::collection::vec(0u64..150, 0..150), 0..5),
            per_peer in 1usize..4, window in 1usize..10, seed in any::<u64>(),
            evs in prop::collection::vec(prop_oneof![
                (0usize..64).prop_map(Ev::Deliver), (0usize..64).prop_map(Ev::Fail),
                (0usize..8, 0u64..150).prop_map(|(p, i)| Ev::Has(p, i)), any::<u64>().prop_map(Ev::Join),
            ], 1..400),
        ) {
            let t0 = Instant::now();
            let held = bits(count, &held.into_iter().filter(|i| *i < count).collect::<Vec<_>>());
            let mut x = Exchange::new(ExchangeConfig { per_peer, window, endgame_copies: 2 }, count, &held, seed);
            let mut has: Vec<Bitfield> = Vec::new();
            let mut failed: Vec<bool> = Vec::new();
            for p in &peers {
                let b = bits(count, &p.iter().copied().filter(|i| *i < count).collect::<Vec<_>>());
                prop_assert_eq!(x.add_peer(&b), has.len());
                has.push(b);
                failed.push(false);
            }
            let mut got = held.clone();
            let mut out: Vec<(u64, usize)> = Vec::new();
            for ev in evs {
                for a in x.poll(t0) {
                    let Action::Fetch { piece, source } = a else { unreachable!("poll never cancels") };
                    prop_assert!(!failed[source], "a failed peer was asked again");
                    prop_assert!(has[source].get(piece), "asked a peer for a piece it does not have");
                    prop_assert!(!got.get(piece), "asked for a piece already here");
                    prop_assert!(!out.contains(&(piece, source)), "the same request twice");
                    out.push((piece, source));
                }
                prop_assert!(out.len() <= window);
                prop_assert_eq!(out.len(), x.requests());
                for (p, _) in has.iter().enumerate() {
                    prop_assert!(out.iter().filter(|(_, s)| *s == p).count() <= per_peer);
                }
                // Nothing left idle: a peer with a free slot has no piece that is missing and unrequested.
                if out.len() < window {
                    for (p, h) in has.iter().enumerate() {
                        if failed[p] || out.iter().filter(|(_, s)| *s == p).count() >= per_peer { continue; }
                        let idle = h.ones().any(|i| !got.get(i) && !out.iter().any(|(q, _)| *q == i));
                        prop_assert!(!idle, "peer {} left idle with a piece to give", p);
                    }
                }
                match ev {
                    Ev::Deliver(i) if !out.is_empty() => {
                        let (piece, source) = out.remove(i % out.len());
                        prop_assert!(got.set(piece), "a piece accepted twice");
                        for c in x.delivered(piece, source, t0) {
                            let Action::Cancel { piece: cp, source: cs } = c else { unreachable!() };
                            prop_assert_eq!(cp, piece);
                            out.retain(|r| *r != (cp, cs));
                        }
                        prop_assert!(out.iter().all(|(p, _)| *p != piece), "a request of a piece here left out");
                    }
                    Ev::Fail(i) if !out.is_empty() => {
                        let (piece, source) = out.remove(i % out.len());
                        failed[source] = true;
                        x.failed(piece, source);
                    }
                    Ev::Has(p, i) if p < has.len() && i < count => {
                        has[p].set(i);
                        x.peer_has(p, i);
                    }
                    Ev::Join(s) => {
                        let b = bits(count, &(0..count).filter(|i| (s >> (i % 64)) & 1 == 1).collect::<Vec<_>>());
                        prop_assert_eq!(x.add_peer(&b), has.len());
                        has.push(b);
                        failed.push(false);
                    }
                    _ => {}
                }
                prop_assert_eq!(x.have(), &got);
            }
            prop_assert_eq!(x.is_complete(), got.is_full());
        }
    }
}
