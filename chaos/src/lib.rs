//! Shoal's chaos suite: named fault scenarios run on the testbed's real processes (a `docker-registry` upstream,
//! `shoal agent`s in network namespaces on a bridge, a real `containerd` where the scenario is about it), each
//! taking a seed it prints so a failure can be replayed, each ending with the same invariants checked
//! ([`report::Report::verdict`]):
//!
//! - every pull that should finish finished (a pull retries like the kubelet does, and each request moves from the
//!   node's agent to upstream as containerd moves down `hosts.toml`);
//! - every pulled blob matched its digest (a complete body that does not is a *corrupt* blob, which must never
//!   happen);
//! - no store holds a blob that does not match its name, and every store's index agrees with its files (checked
//!   with [`shoal_agent::store::Store::check`] after the agents stopped);
//! - no agent exited or panicked unless the scenario killed it, and every killed agent came back ready.
//!
//! [`scenarios`] holds the scenarios, [`bed`] the topology they run on; [`inputs`] the checks of the fuzz targets
//! (bad input at the edges).

pub mod bed;
pub mod inputs;
pub mod report;
pub mod scenarios;

pub use report::Report;
pub use scenarios::{Scenario, Size};
