//! What two members exchange besides SWIM's messages: the whole member table (or some buckets of it) for a joining
//! or lagging node, and the digests a node compares with a neighbour to find what it missed (anti-entropy).

use std::net::SocketAddr;
use std::time::Duration;

use libp2p::PeerId;
use rand::seq::IteratorRandom;

use super::record::MemberRecord;
use super::wire::Body;
use super::{ALL_BUCKETS, MAX_MEMBERS, MAX_PULL_BUCKETS, Membership, Output, PULL_AT_MOST_EVERY, RecordError, table};
use crate::mesh::Liveness;

/// A table taken in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableApplied {
    /// Records admitted.
    pub taken: usize,
    /// Members this node did not know.
    pub new: usize,
    /// Records the binding did not admit (left out, alone).
    pub left_out: usize,
}

impl Membership {
    /// The digests of the members this node does not hold dead, itself included, by bucket.
    pub(crate) fn digests(&self) -> [u64; table::BUCKETS] {
        let mut d = self.table.digests();
        d[table::bucket(self.me.key())] ^= table::digest_of(self.me.key(), self.me.version());
        d
    }

    pub(super) fn send_sync(&mut self, to: PeerId, addr: SocketAddr, key: u128, reply: bool) {
        let digests = self.digests().iter().map(|d| d.to_be_bytes()).collect();
        let live = u32::try_from(self.table.live() + 1).unwrap_or(u32::MAX);
        self.send(to, addr, &Body::Sync { digests, live, reply }, Some(key));
    }

    /// Pulls from `to` the buckets in `differ`: all of them when this node is `behind`, else a few.
    pub(super) fn pull(&mut self, to: PeerId, addr: SocketAddr, differ: u64, behind: bool) {
        let every = self.timing.probe_period * PULL_AT_MOST_EVERY;
        if self.last_pull.is_some_and(|t| self.now < t + every) {
            return;
        }
        self.last_pull = Some(self.now);
        let most = if behind { table::BUCKETS } else { MAX_PULL_BUCKETS };
        let buckets = (0..table::BUCKETS)
            .filter(|i| differ & (1 << i) != 0)
            .choose_multiple(&mut self.rng, most)
            .into_iter()
            .fold(0u64, |m, i| m | 1 << i);
        self.out.push_back(Output::PullTable { to, addr, buckets });
    }

    /// What a node asks a member for its table with: its own record (the member answers only a peer the binding
    /// admits) and the buckets it wants ([`ALL_BUCKETS`] for the whole table).
    pub fn table_request(&self, buckets: u64) -> Vec<u8> {
        postcard::to_allocvec(&(&self.me, buckets)).unwrap_or_default()
    }

    /// The table for `from`, which asked with `request` ([`Self::table_request`]): refused unless the record is
    /// `from`'s own, signed, and admitted by the binding.
    pub fn table_for(&mut self, from: PeerId, request: &[u8]) -> Result<Vec<u8>, RecordError> {
        let (r, buckets): (MemberRecord, u64) =
            postcard::from_bytes(request).map_err(|e| RecordError::Decode(e.to_string()))?;
        if r.peer() != from {
            return Err(RecordError::Impersonation { claimed: r.peer() });
        }
        self.checks.check(&r)?;
        Ok(self.table_of(buckets))
    }

    /// The whole table (records, and whether each is dead), this node's record included: a full-state exchange
    /// for a joining node (SWIM's gossip carries changes, not the steady state).
    pub fn table(&self) -> Vec<u8> {
        self.table_of(ALL_BUCKETS)
    }

    /// The records of the buckets in `buckets`, and this node's (always: a table holds its sender's record).
    fn table_of(&self, buckets: u64) -> Vec<u8> {
        let mut all: Vec<(&MemberRecord, bool)> = self
            .table
            .iter()
            .filter(|e| buckets & (1 << table::bucket(e.rec.key())) != 0)
            .map(|e| (&*e.rec, e.state == Liveness::Dead))
            .collect();
        all.push((&self.me, false));
        postcard::to_allocvec(&all).unwrap_or_default()
    }

    /// Takes in a table from `from` (see [`Self::table`]): every record is verified. A bad signature or field
    /// refuses the whole table (its sender lies or is broken); a record the binding does not admit (yet: a Node the
    /// watch has not brought) is left out alone. Nothing taken is re-spread: the others know it already.
    pub fn apply_table(&mut self, from: PeerId, data: &[u8], now: Duration) -> Result<TableApplied, RecordError> {
        self.advance(now);
        let all: Vec<(MemberRecord, bool)> =
            postcard::from_bytes(data).map_err(|e| RecordError::Decode(e.to_string()))?;
        if all.len() > MAX_MEMBERS {
            return Err(RecordError::Full);
        }
        if !all.iter().any(|(r, _)| r.peer() == from) {
            return Err(RecordError::Field("a table must hold its sender's record"));
        }
        let mut admitted = Vec::with_capacity(all.len());
        let mut left_out = 0;
        for (r, dead) in all {
            match self.checks.check(&r) {
                Ok(()) => admitted.push((r, dead)),
                Err(RecordError::Unbound(why)) => {
                    tracing::debug!(member = ?r, why, "unbound member left out of a table");
                    left_out += 1;
                }
                Err(e) => return Err(e),
            }
        }
        let taken = admitted.len();
        let mut new = 0;
        for (r, dead) in admitted {
            if dead {
                // Only a member this node knows alive at that version or earlier is taken dead.
                self.apply_dead(r.key(), r.version(), false);
            } else if self.apply_alive(r, false) {
                new += 1;
            }
        }
        Ok(TableApplied { taken, new, left_out })
    }
}
