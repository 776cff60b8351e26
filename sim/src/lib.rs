//! `shoal-sim`: a discrete-event simulation that runs N instances of the agent's swarm core
//! ([`shoal_agent::swarm`]) over a modelled network, to show what a burst of thousands of nodes does.
//!
//! [`net`] models links and max-min fair fluid flows; [`sim`] runs the nodes (the core's decisions are the
//! agent's code, exactly; the bytes are fluid); [`scenarios`] names the built-in cases; [`report`] prints the
//! table, the JSON line and the CDF plot. [`membership`] runs the agent's membership protocol at thousands of
//! nodes (`--membership`).

pub mod membership;
pub mod net;
pub mod report;
pub mod scenarios;
pub mod sim;
