//! Shoal's wire messages, generated at build time from `proto/peer.proto` (see that file for the protocol).
//!
//! `peer` holds the gossip announcement and the transfer protocol's request and response frames.

/// The peer protocol, version 1.
#[allow(missing_docs, unreachable_pub, missing_debug_implementations, clippy::use_self, unused_qualifications)]
pub mod peer {
    include!(concat!(env!("OUT_DIR"), "/shoal.peer.v1.rs"));
}
