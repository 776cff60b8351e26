//! The member table (indexed by member key: every update costs O(1), whatever the cluster's size), each node's
//! neighbours on a few hash rings, and the queue of updates still to spread.
//!
//! **Neighbours.** Every member sits on [`RINGS`] rings at points hashed from its key; a node's neighbours are its
//! successor and predecessor on each ring among the members it does not hold dead. The relation is symmetric (when
//! views agree, A's successor B has A as its predecessor), every member has neighbours, and the union of random
//! rings is an expander: a node probes and gossips only with its at most `2 × RINGS` neighbours, so its
//! connections stay open (no handshake per message) and do not grow with the cluster, while news still reaches
//! everyone in O(log N) hops. Keeping them costs O(1) per join and a walk of the table only when a neighbour dies.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use bytes::Bytes;

use super::record::{MemberRecord, Version};
use crate::mesh::Liveness;

/// Hash rings a node finds its neighbours on.
pub(super) const RINGS: usize = 4;

/// Hashes member keys by their low 64 bits: keys are BLAKE3 outputs of names and ids, already uniform, and nobody
/// can choose one (so no flooding of one bucket), which SipHash would only re-hash.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

/// A map by member key.
pub(super) type ByKey<V> = HashMap<u128, V, BuildHasherDefault<KeyHasher>>;

/// A member as this node sees it.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub(super) rec: Arc<MemberRecord>,
    pub(super) state: Liveness,
    /// The version declared dead (only a later record revives it).
    pub(super) down: Option<Version>,
}

/// A table's digest is kept in this many buckets (by member key): two nodes whose views differ find which buckets
/// differ, and exchange the records of those alone.
pub(super) const BUCKETS: usize = 64;

/// The bucket of member `key`.
pub(super) fn bucket(key: u128) -> usize {
    (key >> 122) as usize % BUCKETS
}

/// A member version's share of its bucket's digest.
pub(super) fn digest_of(key: u128, version: Version) -> u64 {
    let mut b = [0u8; 28];
    b[..16].copy_from_slice(&key.to_be_bytes());
    b[16..24].copy_from_slice(&version.0.to_be_bytes());
    b[24..].copy_from_slice(&version.1.to_be_bytes());
    let h = blake3::Hasher::new_derive_key("shoal 2026 membership digest v1").update(&b).finalize();
    u64::from_be_bytes(h.as_bytes()[..8].try_into().unwrap_or_default())
}

/// Its points on the rings.
fn positions(key: u128) -> [u64; RINGS] {
    let h = blake3::Hasher::new_derive_key("shoal 2026 membership rings v1").update(&key.to_be_bytes()).finalize();
    let b = h.as_bytes();
    std::array::from_fn(|i| u64::from_be_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or_default()))
}

/// Every member this node knows, with its neighbours.
#[derive(Debug)]
pub(super) struct Table {
    me: u128,
    my_pos: [u64; RINGS],
    entries: ByKey<Entry>,
    /// Per ring: the closest member after this node and before it, as (distance, key).
    succ: [Option<(u64, u128)>; RINGS],
    pred: [Option<(u64, u128)>; RINGS],
    neighbours: Vec<u128>,
    live: usize,
    /// Per bucket, XOR of [`digest_of`] over its members not held dead: two nodes with the same live members and
    /// versions have the same digests (kept as members change, O(1) each).
    digests: [u64; BUCKETS],
}

impl Table {
    pub(super) fn new(me: u128) -> Self {
        Self {
            me,
            my_pos: positions(me),
            entries: ByKey::default(),
            succ: [None; RINGS],
            pred: [None; RINGS],
            neighbours: Vec::new(),
            live: 0,
            digests: [0; BUCKETS],
        }
    }

    pub(super) fn get(&self, key: u128) -> Option<&Entry> {
        self.entries.get(&key)
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The digests of the members not held dead, by bucket.
    pub(super) fn digests(&self) -> [u64; BUCKETS] {
        self.digests
    }

    fn flip(&mut self, key: u128, version: Version) {
        self.digests[bucket(key)] ^= digest_of(key, version);
    }

    /// Members not held dead.
    pub(super) fn live(&self) -> usize {
        self.live
    }

    pub(super) fn iter(&self) -> impl ExactSizeIterator<Item = &Entry> + Clone {
        self.entries.values()
    }

    /// This node's neighbours (members not held dead), without repeats.
    pub(super) fn neighbours(&self) -> &[u128] {
        &self.neighbours
    }

    pub(super) fn is_neighbour(&self, key: u128) -> bool {
        self.neighbours.contains(&key)
    }

    /// Adds a member not known yet.
    pub(super) fn insert(&mut self, rec: Arc<MemberRecord>) {
        let key = rec.key();
        if self.entries.contains_key(&key) {
            return self.replace(rec);
        }
        self.flip(key, rec.version());
        self.entries.insert(key, Entry { rec, state: Liveness::Alive, down: None });
        self.live += 1;
        self.consider(key, positions(key));
    }

    /// A known member's newer record (alive again if it was dead).
    pub(super) fn replace(&mut self, rec: Arc<MemberRecord>) {
        let key = rec.key();
        let Some(e) = self.entries.get_mut(&key) else { return };
        let old = (e.state != Liveness::Dead).then(|| e.rec.version());
        let new = rec.version();
        e.rec = rec;
        e.down = None;
        let revived = e.state == Liveness::Dead;
        e.state = Liveness::Alive;
        if let Some(old) = old {
            self.flip(key, old);
        }
        self.flip(key, new);
        if revived {
            self.live += 1;
            self.consider(key, positions(key));
        }
    }

    /// Marks a known member suspect (it stays a neighbour: it may be alive).
    pub(super) fn suspect(&mut self, key: u128) {
        if let Some(e) = self.entries.get_mut(&key)
            && e.state == Liveness::Alive
        {
            e.state = Liveness::Suspect;
        }
    }

    /// Marks a known member dead at `version`.
    pub(super) fn kill(&mut self, key: u128, version: Version) {
        let Some(e) = self.entries.get_mut(&key) else { return };
        e.down = Some(e.down.map_or(version, |d| d.max(version)));
        if e.state != Liveness::Dead {
            e.state = Liveness::Dead;
            let v = e.rec.version();
            self.flip(key, v);
            self.live -= 1;
            if self.neighbours.contains(&key) {
                self.rescan();
            }
        }
    }

    /// Forgets a member.
    pub(super) fn remove(&mut self, key: u128) -> Option<Entry> {
        let e = self.entries.remove(&key)?;
        if e.state != Liveness::Dead {
            self.flip(key, e.rec.version());
            self.live -= 1;
            if self.neighbours.contains(&key) {
                self.rescan();
            }
        }
        Some(e)
    }

    /// A member not held dead: a neighbour if it is closer than the current one on some ring.
    fn consider(&mut self, key: u128, pos: [u64; RINGS]) {
        let mut moved = false;
        let mine = self.my_pos;
        for (i, (p, m)) in pos.iter().zip(mine).enumerate() {
            let after = p.wrapping_sub(m);
            let before = m.wrapping_sub(*p);
            if self.succ[i].is_none_or(|(d, k)| (after, key) < (d, k)) {
                self.succ[i] = Some((after, key));
                moved = true;
            }
            if self.pred[i].is_none_or(|(d, k)| (before, key) < (d, k)) {
                self.pred[i] = Some((before, key));
                moved = true;
            }
        }
        if moved {
            self.collect();
        }
    }

    /// Finds every ring's neighbours again (a neighbour died or left): a walk of the table.
    fn rescan(&mut self) {
        self.succ = [None; RINGS];
        self.pred = [None; RINGS];
        let live: Vec<(u128, [u64; RINGS])> =
            self.entries.iter().filter(|(_, e)| e.state != Liveness::Dead).map(|(k, _)| (*k, positions(*k))).collect();
        for i in 0..RINGS {
            for (key, pos) in &live {
                let after = pos[i].wrapping_sub(self.my_pos[i]);
                let before = self.my_pos[i].wrapping_sub(pos[i]);
                if self.succ[i].is_none_or(|(d, k)| (after, *key) < (d, k)) {
                    self.succ[i] = Some((after, *key));
                }
                if self.pred[i].is_none_or(|(d, k)| (before, *key) < (d, k)) {
                    self.pred[i] = Some((before, *key));
                }
            }
        }
        self.collect();
    }

    fn collect(&mut self) {
        let mut v: Vec<u128> = self.succ.iter().chain(&self.pred).flatten().map(|(_, k)| *k).collect();
        v.sort_unstable();
        v.dedup();
        debug_assert!(!v.contains(&self.me));
        self.neighbours = v;
    }
}

/// Updates waiting to be spread at most: beyond, the most transmitted are dropped. In a join storm of thousands
/// the queue could hold one update per member while each message carries a dozen; the table exchanges and the
/// digests carry what the queue drops, and a node's memory stays bounded.
pub(super) const MAX_PENDING: usize = 1024;

/// Updates still to spread: this node's own first (a refutation must leave the suspect before anything else: its
/// suspecters' timers are running); then refutations and deaths for their first [`URGENT_SENDS`] transmissions;
/// then fewest transmissions first and, among those sent as often, news (joins, records) before suspicions, newest
/// first (memberlist's order: under a backlog a fresh update goes out at once instead of behind a thousand older
/// ones that have mostly spread already). Refutations go ahead of suspicions because a late suspicion only delays
/// a death, while a late refutation makes one: when many members slow down at once (hundreds of suspicions and
/// refutations in a few seconds at 5,000 nodes), each update gets about one transmission per node, which leaves
/// a third of the nodes without it; the refutations must not be among those. A newer update about a member
/// replaces the older.
#[derive(Debug, Default)]
pub(super) struct Broadcasts {
    /// By (this node's own or not, urgent or not, transmissions, class, newest first).
    queue: BTreeMap<Slot, (u128, Bytes)>,
    by_key: ByKey<Slot>,
    seq: u64,
    me: u128,
    /// Updates queued and never sent.
    fresh: usize,
}

/// A queued update's place: (0 for this node's own, 0 while urgent, transmissions so far, its [`Class`],
/// `u64::MAX - ` its sequence).
type Slot = (u8, u8, u32, u8, u64);

/// Transmissions for which a refutation or a death goes ahead of other updates (then it waits its turn).
pub(super) const URGENT_SENDS: u32 = 4;

fn slot(mine: bool, class: u8, tx: u32, order: u64) -> Slot {
    let urgent = class == Class::Urgent as u8 && tx < URGENT_SENDS;
    (u8::from(!mine), u8::from(!urgent), tx, class, order)
}

/// What an update is, for its place in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    /// A refutation (a renewed record) or a death.
    Urgent = 0,
    /// Joins and other records.
    News = 1,
    /// A suspicion or its confirmation.
    Suspicion = 2,
}

impl Broadcasts {
    /// A queue of node `me` (whose own updates go first).
    pub(super) fn new(me: u128) -> Self {
        Self { me, ..Self::default() }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }

    /// Updates queued and never sent yet.
    pub(super) fn fresh(&self) -> usize {
        self.fresh
    }

    /// Queues an update of `class` about member `key` (its bytes), replacing any older one about it.
    pub(super) fn push(&mut self, key: u128, bytes: Bytes, class: Class) {
        if let Some(old) = self.by_key.remove(&key)
            && self.queue.remove(&old).is_some()
            && old.2 == 0
        {
            self.fresh -= 1;
        }
        self.seq += 1;
        let slot = slot(key == self.me, class as u8, 0, u64::MAX - self.seq);
        self.queue.insert(slot, (key, bytes));
        self.by_key.insert(key, slot);
        self.fresh += 1;
        while self.queue.len() > MAX_PENDING {
            let Some(((_, _, tx, _, _), (k, _))) = self.queue.pop_last() else { break };
            self.by_key.remove(&k);
            if tx == 0 {
                self.fresh -= 1;
            }
        }
    }

    /// Updates fitting in `room` bytes, in the queue's order, none about `skip` (already in the message); each is
    /// counted as sent once more and dropped after `limit` transmissions.
    pub(super) fn take(&mut self, mut room: usize, limit: u32, skip: Option<u128>) -> Vec<Bytes> {
        let mut picked = Vec::new();
        // A bounded look: a message holds about a dozen updates.
        for (&slot, (key, bytes)) in self.queue.iter().take(64) {
            if Some(*key) == skip || bytes.len() > room {
                continue;
            }
            room -= bytes.len();
            picked.push(slot);
            if room < 16 {
                break;
            }
        }
        let mut out = Vec::with_capacity(picked.len());
        for slot in picked {
            let Some((key, bytes)) = self.queue.remove(&slot) else { continue };
            let (mine, _, tx, class, order) = slot;
            if tx == 0 {
                self.fresh -= 1;
            }
            if tx + 1 < limit {
                let next = self::slot(mine == 0, class, tx + 1, order);
                self.queue.insert(next, (key, bytes.clone()));
                self.by_key.insert(key, next);
            } else {
                self.by_key.remove(&key);
            }
            out.push(bytes);
        }
        out
    }
}
