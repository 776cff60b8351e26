//! Membership messages as they travel: an [`Envelope`] is the sender's record, what the message is about
//! ([`Body`]), and the updates it carries ([`Update`]), encoded with postcard. A message is built from updates
//! already encoded (the broadcast queue keeps their bytes), so its size is known before it is sent.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::record::{MemberRecord, Version};

/// One message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Envelope {
    /// The sender's current record (it must be the peer the transport authenticated).
    pub(super) from: MemberRecord,
    pub(super) body: Body,
    pub(super) updates: Vec<Update>,
}

/// What a message asks or answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) enum Body {
    /// Are you alive? Answered with an [`Body::Ack`] of the same sequence number.
    Ping { seq: u64 },
    /// The answer to a ping (or, from a member asked with [`Body::PingReq`], the target's answer relayed).
    Ack { seq: u64 },
    /// Ping `target` for me and relay its answer as `Ack { seq }`: it did not answer my direct ping.
    PingReq { seq: u64, target: Box<MemberRecord> },
    /// A new node: take my record and answer with a [`Body::Feed`] of members.
    Announce,
    /// Members for a node that announced itself.
    Feed,
    /// Updates only.
    Gossip,
    /// My table's digests by bucket and how many members I hold alive or suspect, myself included (anti-entropy): a
    /// receiver whose digests differ pulls the sender's records in the buckets that differ and, when `reply` is
    /// false, answers with its own so the sender can do the same.
    Sync { digests: Vec<[u8; 8]>, live: u32, reply: bool },
}

/// What a member says about a member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Update {
    /// This record is alive (signed by its member: only the member can raise its version).
    Alive(Box<MemberRecord>),
    /// `by` suspects the member with `key` at `version` (not signed by anyone: the member refutes it).
    Suspect { key: u128, version: Version, by: u128 },
    /// The member with `key` at `version` is dead (or left).
    Dead { key: u128, version: Version },
}

impl Update {
    /// Which member it is about.
    pub(super) fn key(&self) -> u128 {
        match self {
            Self::Alive(r) => r.key(),
            Self::Suspect { key, .. } | Self::Dead { key, .. } => *key,
        }
    }
}

/// An update's bytes.
pub(super) fn encode_update(u: &Update) -> Bytes {
    Bytes::from(postcard::to_allocvec(u).unwrap_or_default())
}

/// A message from `from` with `body` and the updates `updates` (each already encoded by [`encode_update`]): the
/// same bytes as the [`Envelope`] they make (postcard writes a struct as its fields one after the other, and a
/// sequence as its length then its elements).
pub(super) fn encode(from: &MemberRecord, body: &Body, updates: &[&[u8]]) -> Vec<u8> {
    let mut v = postcard::to_allocvec(&(from, body)).unwrap_or_default();
    v.extend(postcard::to_allocvec(&updates.len()).unwrap_or_default());
    for u in updates {
        v.extend_from_slice(u);
    }
    v
}

/// The bytes a message with `body` from `from` takes before its updates (with room for the updates' count).
pub(super) fn header_len(from: &MemberRecord, body: &Body) -> usize {
    postcard::to_allocvec(&(from, body)).map_or(0, |v| v.len()) + 2
}

/// Decodes a message.
pub(super) fn decode(data: &[u8]) -> Result<Envelope, postcard::Error> {
    postcard::from_bytes(data)
}
