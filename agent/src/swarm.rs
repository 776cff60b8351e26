//! The swarm core: the mesh's decisions as plain state machines, with no sockets, files, tasks or clocks inside
//! (events and `now` in, actions out — the quinn-proto / quinn split).
//!
//! - [`homes`]: which member of a zone is a digest's home (a consistent-hashing ring, O(log N) per lookup).
//! - [`directory`]: what a home knows of the digests homed on it, and the sources it hands to an asker so that a
//!   burst forms a tree of holders streaming to each other.
//! - [`scheduler`]: which source gets which piece of a download, in a bounded window, with failed sources
//!   dropped and straggling pieces hedged.
//! - [`exchange`]: the same for a download that trades pieces out of order with every peer that has them, rarest
//!   first (over a [`bitfield`] per peer) — the swarm without a tree, simulated (`shoal-sim --swarm exchange`).
//! - [`announcer`]: what this node must tell which home, re-announcing only what moved.
//! - [`membership`]: who is in the cluster and alive (SWIM over signed member records), and [`binding`]: what a
//!   member's identity is bound to (its Kubernetes Node, a list), so nobody can pick its place on the ring.
//! - [`vouch`]: which piece hashes a download may believe before its sha256 matched (two members' agreeing piece
//!   tables, or upstream settling their dispute), and who lied once the truth is known.
//!
//! The agent drives them from thin async loops ([`crate::mesh`], [`crate::resolver`]); the simulator
//! (`shoal-sim`) drives the very same code over a modelled network of thousands of nodes.

pub mod announcer;
pub mod binding;
pub mod bitfield;
pub mod directory;
pub mod exchange;
pub mod homes;
pub mod membership;
pub mod scheduler;
pub mod vouch;
