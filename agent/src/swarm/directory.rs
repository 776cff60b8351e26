//! The directory a home node keeps for the digests homed on it: who holds each one, completely or in part.
//! Holders tell it (announcements); requesters ask it (locate). Sans-IO and bounded: a member cannot make it grow
//! without limit, however many announcements it sends.

use std::collections::HashMap;

use libp2p::PeerId;

use crate::oci::Digest;

/// Digests one home keeps track of, at most (an entry is ~200 bytes: ~200 MiB at the limit).
pub const MAX_DIGESTS: usize = 1 << 20;
/// Holders remembered per digest, at most (a zone of 8,192 nodes pulling one layer): complete holders displace
/// partial ones that were never handed out. 64 (the bound before) left every asker past the 64th unrecorded in a
/// burst of hundreds: never a source itself, all of them streaming from the first 64 (the simulator's 200-node
/// burst: one node uploading to 94 at once).
pub const MAX_HOLDERS: usize = 8192;
/// Holder entries over all digests, at most (~120 bytes each: ~120 MiB at the limit).
pub const MAX_ENTRIES: usize = 1 << 20;
/// Holder entries one member may have in one home's directory, over all digests (an eighth of the whole): one
/// member cannot crowd out the others.
pub const MAX_PER_MEMBER: usize = MAX_ENTRIES / 8;
/// Holders returned by one locate.
pub const MAX_LOCATED: usize = 16;
/// Sources handed to one asker that is about to download (spread its pieces over them).
pub const SOURCES: usize = 3;
/// Askers a holder is handed to before others are preferred: bounds each holder's uploads, so a burst forms a
/// tree of partial holders streaming to each other rather than a star around the first one.
pub const FANOUT: u32 = 4;
/// Peers handed to one asker that trades pieces out of order ([`HandOut::Exchange`]).
pub const PEERS: usize = 6;
/// Peers handed to the home of another zone, which brings the blob into its zone: its intake is the whole zone's,
/// so it trades with more of this zone's holders (at their fair share each; simulated: with 6 the far zones'
/// homes took in about half a link, and every node of their zones waited on them).
pub const PEERS_ACROSS_ZONES: usize = 4 * PEERS;
/// Longest media type accepted.
const MAX_MEDIA_TYPE: usize = 255;

/// One announcement, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    /// The digest (sha256).
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// Its media type.
    pub media_type: Option<String>,
    /// Held completely and verified.
    pub complete: bool,
    /// Fetched without a client's credentials.
    pub public: bool,
    /// No longer held.
    pub removed: bool,
}

impl Holding {
    /// Checks a wire announcement.
    pub fn from_wire(h: shoal_proto::peer::Holding) -> Result<Self, String> {
        let digest = Digest::parse(&h.digest).map_err(|e| format!("digest: {e}"))?;
        if !digest.is_sha256() {
            return Err("digest: only sha256".into());
        }
        if h.media_type.as_ref().is_some_and(|m| m.len() > MAX_MEDIA_TYPE || m.contains(['\r', '\n'])) {
            return Err("media type: too long or not one line".into());
        }
        Ok(Self {
            digest,
            size: h.size,
            media_type: h.media_type,
            complete: h.complete,
            public: h.public,
            removed: h.removed,
        })
    }

    /// The wire form.
    pub fn to_wire(&self) -> shoal_proto::peer::Holding {
        shoal_proto::peer::Holding {
            digest: self.digest.to_string(),
            size: self.size,
            media_type: self.media_type.clone(),
            complete: self.complete,
            public: self.public,
            removed: self.removed,
        }
    }
}

/// A holder of a digest as the directory knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HolderState {
    /// Complete and verified.
    pub complete: bool,
    /// Fetched without credentials.
    pub public: bool,
}

#[derive(Debug, Clone, Copy)]
struct Holder {
    state: HolderState,
    /// The size it claims.
    size: u64,
    /// Order of arrival: a partial holder that arrived earlier is ahead in the stream.
    since: u64,
    /// Askers it was handed to.
    given: u32,
}

#[derive(Debug)]
struct Entry {
    size: u64,
    media_type: Option<String>,
    holders: HashMap<PeerId, Holder>,
}

/// The answer to a locate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// The blob's size.
    pub size: u64,
    /// Its media type.
    pub media_type: Option<String>,
    /// Holders, complete ones first.
    pub holders: Vec<(PeerId, HolderState)>,
}

/// What kind of download the asker runs, so what the home hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandOut {
    /// In-order streaming ([`super::scheduler`]): sources ahead of the asker ([`Directory::sources`]).
    Tree,
    /// Out-of-order trading ([`super::exchange`]): this many peers in any order ([`Directory::exchange_peers`]).
    Exchange {
        /// Peers handed out.
        peers: usize,
    },
}

/// The directory.
#[derive(Debug, Default)]
pub struct Directory {
    entries: HashMap<Digest, Entry>,
    /// Holder entries over all digests (kept as they change: counting them would walk the whole map).
    holders: usize,
    /// Holder entries per member: one member cannot fill the directory.
    per_member: HashMap<PeerId, usize>,
    /// Arrival counter.
    seq: u64,
    /// The home this directory belongs to: its own complete copy has been verified here, so its size decides.
    owner: Option<PeerId>,
}

impl Directory {
    /// The directory of home `owner`: what the owner itself holds completely it has verified, so its size is the
    /// digest's.
    pub fn new(owner: PeerId) -> Self {
        Self { owner: Some(owner), ..Self::default() }
    }

    /// Records what `from` says it holds. Returns false if the directory (or `from`'s share of it) is full and the
    /// announcement was dropped.
    ///
    /// A size is a claim: each holder's is kept with it, and the digest's size is the owner's own verified one
    /// when it holds the digest completely, else the one most complete holders claim (the first claimed, on a
    /// tie). Holders of another size are not handed out; a claim that loses is never locked in.
    pub fn apply(&mut self, from: PeerId, h: &Holding) -> bool {
        if h.removed {
            if let Some(e) = self.entries.get_mut(&h.digest) {
                if e.holders.remove(&from).is_some() {
                    self.holders -= 1;
                    Self::uncount(&mut self.per_member, &from);
                }
                if e.holders.is_empty() {
                    self.entries.remove(&h.digest);
                } else {
                    Self::decide_size(e, self.owner.as_ref());
                }
            }
            return true;
        }
        if !self.entries.contains_key(&h.digest) && self.entries.len() >= MAX_DIGESTS {
            return false;
        }
        let e = self.entries.entry(h.digest.clone()).or_insert_with(|| Entry {
            size: h.size,
            media_type: h.media_type.clone(),
            holders: HashMap::new(),
        });
        let state = HolderState { complete: h.complete, public: h.public };
        let new = !e.holders.contains_key(&from);
        if new && self.per_member.get(&from).copied().unwrap_or(0) >= MAX_PER_MEMBER {
            if e.holders.is_empty() {
                self.entries.remove(&h.digest);
            }
            return false;
        }
        if new && (e.holders.len() >= MAX_HOLDERS || self.holders >= MAX_ENTRIES) {
            // Only a partial holder nobody was sent to may make room: one that others follow must stay known, or
            // it would ask as a newcomer and could be handed the very holders that wait on it (a cycle).
            let victim = e.holders.iter().find(|(_, s)| !s.state.complete && s.given == 0).map(|(p, _)| *p);
            match victim {
                Some(v) if h.complete => {
                    e.holders.remove(&v);
                    self.holders -= 1;
                    Self::uncount(&mut self.per_member, &v);
                }
                _ => return true,
            }
        }
        match e.holders.get_mut(&from) {
            Some(known) => {
                known.state = state;
                known.size = h.size;
            }
            None => {
                e.holders.insert(from, Holder { state, size: h.size, since: self.seq, given: 0 });
                self.seq += 1;
                self.holders += 1;
                *self.per_member.entry(from).or_default() += 1;
            }
        }
        if h.complete || new {
            let before = e.size;
            Self::decide_size(e, self.owner.as_ref());
            if e.size == h.size && (before != h.size || e.media_type.is_none()) {
                e.media_type.clone_from(&h.media_type);
            }
        }
        true
    }

    fn uncount(per_member: &mut HashMap<PeerId, usize>, p: &PeerId) {
        if let Some(n) = per_member.get_mut(p) {
            *n -= 1;
            if *n == 0 {
                per_member.remove(p);
            }
        }
    }

    /// The digest's size: the owner's verified one, else the one most complete holders claim (the earliest on a
    /// tie), else the earliest partial holder's.
    fn decide_size(e: &mut Entry, owner: Option<&PeerId>) {
        if let Some(own) = owner.and_then(|o| e.holders.get(o)).filter(|h| h.state.complete) {
            e.size = own.size;
            return;
        }
        let mut votes: HashMap<u64, (usize, u64)> = HashMap::new();
        for h in e.holders.values().filter(|h| h.state.complete) {
            let v = votes.entry(h.size).or_insert((0, h.since));
            v.0 += 1;
            v.1 = v.1.min(h.since);
        }
        let chosen = match votes.into_iter().max_by_key(|(_, (n, first))| (*n, std::cmp::Reverse(*first))) {
            Some((size, _)) => size,
            None => match e.holders.values().min_by_key(|h| h.since) {
                Some(h) => h.size,
                None => return,
            },
        };
        e.size = chosen;
    }

    /// Who holds `digest`, among members `usable` accepts, `asker` left out; complete holders first.
    pub fn locate(&self, digest: &Digest, asker: &PeerId, usable: impl Fn(&PeerId) -> bool) -> Option<Located> {
        let e = self.entries.get(digest)?;
        let mut holders: Vec<_> = e
            .holders
            .iter()
            .filter(|(p, h)| *p != asker && h.size == e.size && usable(p))
            .map(|(p, h)| (*p, h.state))
            .collect();
        if holders.is_empty() {
            return None;
        }
        holders.sort_by_key(|(p, s)| (!s.complete, p.to_bytes()));
        holders.truncate(MAX_LOCATED);
        Some(Located { size: e.size, media_type: e.media_type.clone(), holders })
    }

    /// Peers for `asker`, which is about to download `digest` and trades pieces out of order
    /// ([`super::exchange`]): up to [`PEERS`] holders whatever their arrival (a request only ever goes to a peer
    /// known to have the piece, so nobody waits on anyone behind it), those handed out fewest times first (each
    /// holder's uploads stay spread), then complete before partial, then the earliest. The `home` counts as any
    /// holder: it is one of the swarm, not the root of a tree.
    pub fn exchange_peers(
        &mut self,
        digest: &Digest,
        asker: &PeerId,
        usable: impl Fn(&PeerId) -> bool,
        count: usize,
    ) -> Option<Located> {
        let e = self.entries.get_mut(digest)?;
        Self::hand(e, |p, _| p != asker && usable(p), count.max(1) as u32, count)
    }

    /// Up to `count` of `e`'s holders `pick` accepts (of the size decided), those handed out fewer than `spread`
    /// times first, then complete before partial, then the earliest; each one chosen counts as handed out once
    /// more.
    fn hand(e: &mut Entry, pick: impl Fn(&PeerId, &Holder) -> bool, spread: u32, count: usize) -> Option<Located> {
        let size = e.size;
        let mut chosen: Vec<(PeerId, Holder)> =
            e.holders.iter().filter(|(p, h)| h.size == size && pick(p, h)).map(|(p, h)| (*p, *h)).collect();
        chosen.sort_by_key(|(_, h)| (h.given / spread, !h.state.complete, h.since));
        chosen.truncate(count);
        if chosen.is_empty() {
            return None;
        }
        for (p, _) in &chosen {
            if let Some(h) = e.holders.get_mut(p) {
                h.given += 1;
            }
        }
        let holders = chosen.into_iter().map(|(p, h)| (p, h.state)).collect();
        Some(Located { size: e.size, media_type: e.media_type.clone(), holders })
    }

    /// Sources for `asker`, which is about to download `digest` and streams from what it is given: complete
    /// holders, the `home` (which fetches from outside), and partial holders that arrived before the asker (so
    /// waits only ever point at holders further ahead, and end at the home). Holders handed out fewer than [`FANOUT`] times come first, then
    /// complete before partial, then the earliest. Each one chosen counts as handed out once more.
    pub fn sources(
        &mut self,
        digest: &Digest,
        asker: &PeerId,
        home: &PeerId,
        usable: impl Fn(&PeerId) -> bool,
    ) -> Option<Located> {
        let e = self.entries.get_mut(digest)?;
        // An asker the directory does not know is followed by nobody (holders are followed only once handed out,
        // and those are never displaced): everyone is ahead of it.
        let asker_since = e.holders.get(asker).map_or(u64::MAX, |h| h.since);
        // The home itself fetches from outside, never waiting on the others: it is ahead of everyone.
        let ahead = |p: &PeerId, h: &Holder| h.state.complete || h.since < asker_since || p == home;
        Self::hand(e, |p, h| p != asker && usable(p) && ahead(p, h), FANOUT, SOURCES)
    }

    /// Whether the home must make sure it downloads `digest` itself before it hands out sources: no usable
    /// complete holder is known (partial holders alone may all be following a download that died).
    pub fn needs_origin(&self, digest: &Digest, asker: &PeerId, usable: impl Fn(&PeerId) -> bool) -> bool {
        !self.locate(digest, asker, usable).is_some_and(|l| l.holders.iter().any(|(_, s)| s.complete))
    }

    /// The home's answer to `asker`, about to download `digest`: sources ahead of it ([`Directory::sources`]),
    /// after which the asker counts as a partial holder (a source for later askers) when `record` (it is in the
    /// home's zone: askers from other zones stream from their own zone's members).
    pub fn hand_out(
        &mut self,
        digest: &Digest,
        asker: &PeerId,
        home: &PeerId,
        usable: impl Fn(&PeerId) -> bool,
        record: Option<bool>,
        how: HandOut,
    ) -> Option<Located> {
        let loc = match how {
            HandOut::Tree => self.sources(digest, asker, home, usable)?,
            HandOut::Exchange { peers } => self.exchange_peers(digest, asker, usable, peers)?,
        };
        if let Some(public) = record {
            let h = Holding {
                digest: digest.clone(),
                size: loc.size,
                media_type: loc.media_type.clone(),
                complete: false,
                public,
                removed: false,
            };
            self.apply(*asker, &h);
        }
        Some(loc)
    }

    /// Forgets holders `keep` rejects (members that died), and digests left without holders.
    pub fn prune(&mut self, keep: impl Fn(&PeerId) -> bool) {
        let owner = self.owner;
        self.entries.retain(|_, e| {
            let before = e.holders.len();
            e.holders.retain(|p, _| keep(p));
            if e.holders.len() != before && !e.holders.is_empty() {
                Self::decide_size(e, owner.as_ref());
            }
            !e.holders.is_empty()
        });
        self.recount();
    }

    /// Counts holder entries again, in all and per member.
    fn recount(&mut self) {
        self.per_member.clear();
        let mut holders = 0;
        for e in self.entries.values() {
            holders += e.holders.len();
            for p in e.holders.keys() {
                *self.per_member.entry(*p).or_default() += 1;
            }
        }
        self.holders = holders;
    }

    /// Forgets the digests `homed_here` rejects: after a membership change their holders tell the new home.
    pub fn keep_homed(&mut self, homed_here: impl Fn(&Digest) -> bool) {
        self.entries.retain(|d, _| homed_here(d));
        self.recount();
    }

    /// Holder entries over all digests.
    pub fn holders(&self) -> usize {
        self.holders
    }

    /// Digests known.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is known.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest as _;

    fn d(n: u8) -> Digest {
        Digest::from_sha256(&sha2::Sha256::digest([n]))
    }

    fn h(n: u8, size: u64, complete: bool) -> Holding {
        Holding { digest: d(n), size, media_type: None, complete, public: true, removed: false }
    }

    #[test]
    fn holders_come_and_go() {
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let mut dir = Directory::default();
        assert!(dir.apply(a, &h(1, 10, false)));
        assert!(dir.apply(b, &h(1, 10, true)));
        let loc = dir.locate(&d(1), &c, |_| true).unwrap();
        assert_eq!(loc.holders[0].0, b, "complete holders first");
        assert_eq!(loc.holders.len(), 2);
        // The asker is not told about itself; unusable members are left out.
        assert_eq!(dir.locate(&d(1), &b, |_| true).unwrap().holders.len(), 1);
        assert_eq!(dir.holders(), 2);
        assert!(dir.locate(&d(1), &c, |p| *p == c).is_none());
        // A holder claiming another size than the first complete one is kept, not handed out (a tie goes to the
        // first claim).
        assert!(dir.apply(c, &h(1, 11, true)));
        assert_eq!(
            dir.locate(&d(1), &a, |_| true).unwrap().holders,
            vec![(b, HolderState { complete: true, public: true })]
        );
        let mut gone = h(1, 10, true);
        gone.removed = true;
        dir.apply(b, &gone);
        assert_eq!(dir.holders(), 2);
        dir.prune(|p| *p == b);
        assert!(dir.is_empty());
        assert_eq!(dir.holders(), 0);
        dir.apply(a, &h(2, 1, true));
        dir.apply(b, &h(3, 1, true));
        dir.keep_homed(|x| *x == d(3));
        assert_eq!((dir.len(), dir.holders()), (1, 1));
    }

    #[test]
    fn a_size_claim_never_locks_honest_holders_out() {
        let (liar, a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random(), PeerId::random());
        let mut dir = Directory::default();
        // The liar announces a wrong size first; two honest complete holders follow.
        dir.apply(liar, &h(1, 999, true));
        dir.apply(a, &h(1, 10, true));
        dir.apply(b, &h(1, 10, true));
        let loc = dir.locate(&d(1), &c, |_| true).unwrap();
        assert_eq!(loc.size, 10);
        assert!(loc.holders.iter().all(|(p, _)| *p != liar), "{loc:?}");
        assert_eq!(loc.holders.len(), 2);
        let src = dir.sources(&d(1), &c, &c, |_| true).unwrap();
        assert!(src.holders.iter().all(|(p, _)| *p != liar));
        // The home's own verified copy decides, however many claim otherwise.
        let home = PeerId::random();
        let mut dir = Directory::new(home);
        for _ in 0..3 {
            dir.apply(PeerId::random(), &h(2, 999, true));
        }
        dir.apply(home, &h(2, 10, true));
        let loc = dir.locate(&d(2), &c, |_| true).unwrap();
        assert_eq!((loc.size, loc.holders.len()), (10, 1));
        // When it goes, the majority decides again.
        let mut gone = h(2, 10, true);
        gone.removed = true;
        dir.apply(home, &gone);
        assert_eq!(dir.locate(&d(2), &c, |_| true).unwrap().size, 999);
    }

    #[test]
    fn one_member_cannot_fill_the_directory() {
        let (flooder, honest) = (PeerId::random(), PeerId::random());
        let mut dir = Directory::default();
        let digest = |i: usize| Digest::from_sha256(&sha2::Sha256::digest(i.to_le_bytes()));
        let holding = |i: usize| Holding {
            digest: digest(i),
            size: 1,
            media_type: None,
            complete: true,
            public: true,
            removed: false,
        };
        for i in 0..MAX_PER_MEMBER {
            assert!(dir.apply(flooder, &holding(i)));
        }
        assert!(!dir.apply(flooder, &holding(MAX_PER_MEMBER)), "past its share");
        assert_eq!(dir.len(), MAX_PER_MEMBER, "a refused announcement leaves no empty entry");
        assert!(dir.apply(honest, &holding(MAX_PER_MEMBER)), "others still have room");
        // Its share comes back as its holdings go.
        dir.prune(|p| *p != flooder);
        assert!(dir.apply(flooder, &holding(0)));
    }

    #[test]
    fn wire_input_is_checked() {
        let mut w = h(1, 5, true).to_wire();
        assert_eq!(Holding::from_wire(w.clone()).unwrap(), h(1, 5, true));
        w.digest = "sha256:../../etc".into();
        assert!(Holding::from_wire(w.clone()).is_err());
        w.digest = d(1).to_string();
        w.media_type = Some("x".repeat(300));
        assert!(Holding::from_wire(w).is_err());
    }

    #[test]
    fn holders_per_digest_are_bounded_and_complete_ones_displace_partial_ones() {
        let mut dir = Directory::default();
        for _ in 0..MAX_HOLDERS + 10 {
            dir.apply(PeerId::random(), &h(1, 10, false));
        }
        let complete = PeerId::random();
        dir.apply(complete, &h(1, 10, true));
        let me = PeerId::random();
        let loc = dir.locate(&d(1), &me, |_| true).unwrap();
        assert_eq!(loc.holders[0].0, complete);
        assert_eq!(loc.holders.len(), MAX_LOCATED);
        assert_eq!(dir.entries[&d(1)].holders.len(), MAX_HOLDERS);
        assert_eq!(dir.holders(), MAX_HOLDERS);
    }

    #[test]
    fn a_followed_holder_is_never_displaced_and_a_recorded_asker_gets_only_holders_ahead_of_it() {
        let mut dir = Directory::default();
        let home = PeerId::random();
        dir.apply(home, &h(1, 10, false));
        // Fill the digest's list with partial holders, the last ones askers recorded by the hand-out (which
        // hands out some of the earlier ones).
        for _ in 0..MAX_HOLDERS - 11 {
            dir.apply(PeerId::random(), &h(1, 10, false));
        }
        let mut askers = Vec::new();
        while dir.entries[&d(1)].holders.len() < MAX_HOLDERS {
            let a = PeerId::random();
            dir.hand_out(&d(1), &a, &home, |_| true, Some(true), HandOut::Tree).unwrap();
            askers.push(a);
        }
        let handed: Vec<PeerId> =
            dir.entries[&d(1)].holders.iter().filter(|(_, x)| x.given > 0).map(|(p, _)| *p).collect();
        assert!(!handed.is_empty());
        // More complete holders arrive than there are partial holders nobody was sent to: they displace only
        // those (the rule before displaced any partial holder), and the rest are not recorded.
        for _ in 0..MAX_HOLDERS - handed.len() + 20 {
            dir.apply(PeerId::random(), &h(1, 10, true));
        }
        assert_eq!(dir.entries[&d(1)].holders.len(), MAX_HOLDERS);
        for p in &handed {
            assert!(dir.entries[&d(1)].holders.contains_key(p), "a holder others follow stays known");
        }
        // A recorded asker (the latest one still known) is sent only to complete holders, the home and partial
        // holders that came before it.
        let holders = &dir.entries[&d(1)].holders;
        let last =
            *handed.iter().chain(&askers).filter(|p| holders.contains_key(p)).max_by_key(|p| holders[p].since).unwrap();
        let since = holders[&last].since;
        let loc = dir.hand_out(&d(1), &last, &home, |_| true, Some(true), HandOut::Tree).unwrap();
        for (p, s) in &loc.holders {
            let x = dir.entries[&d(1)].holders[p];
            assert!(s.complete || *p == home || x.since < since, "{p} is not ahead of the asker");
        }
        assert!(dir.holders() <= MAX_ENTRIES);
    }

    #[test]
    fn a_burst_forms_a_tree_not_a_star() {
        let mut dir = Directory::default();
        let home = PeerId::random();
        dir.apply(home, &h(1, 10, false));
        let askers: Vec<PeerId> = (0..12).map(|_| PeerId::random()).collect();
        let mut handed: HashMap<PeerId, u32> = HashMap::new();
        for (i, a) in askers.iter().enumerate() {
            // Each asker is recorded as a partial holder once it got its sources (as the home does).
            let loc = dir.sources(&d(1), a, &home, |_| true).unwrap();
            assert!(!loc.holders.is_empty() && loc.holders.len() <= SOURCES);
            for (p, _) in &loc.holders {
                assert!(*p == home || askers[..i].contains(p), "only holders ahead of the asker are sources");
                *handed.entry(*p).or_default() += 1;
            }
            dir.apply(*a, &h(1, 10, false));
        }
        // Nobody is handed out far beyond the fan-out while others have room.
        assert!(handed.values().all(|n| *n <= FANOUT + 1), "{handed:?}");
        assert!(handed.len() > 3, "later askers stream from earlier ones: {handed:?}");
        // A late asker that is already a holder is never sent to holders behind it.
        let first = askers[0];
        let loc = dir.sources(&d(1), &first, &home, |_| true).unwrap();
        assert_eq!(loc.holders.iter().map(|(p, _)| *p).collect::<Vec<_>>(), vec![home]);
        // Complete holders are sources for anyone.
        dir.apply(askers[11], &h(1, 10, true));
        let loc = dir.sources(&d(1), &first, &home, |_| true).unwrap();
        assert!(loc.holders.iter().any(|(p, s)| *p == askers[11] && s.complete));
    }
}
