//! Shoal's wire messages, generated at build time from `proto/*.proto` (see those files for the protocols).
//!
//! `peer` holds the gossip announcement and the transfer protocol's request and response frames; `admin` the
//! admin API (a gRPC service on the agent's unix socket) with its server and client.

/// The peer protocol, version 1.
#[allow(missing_docs, unreachable_pub, missing_debug_implementations, clippy::use_self, unused_qualifications)]
pub mod peer {
    include!(concat!(env!("OUT_DIR"), "/shoal.peer.v1.rs"));
}

/// The admin API, version 1.
#[allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::use_self,
    unused_qualifications,
    clippy::all
)]
pub mod admin {
    include!(concat!(env!("OUT_DIR"), "/shoal.admin.v1.rs"));
}
