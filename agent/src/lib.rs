//! Shoal's agent: a containerd registry mirror that caches on the node's disk and shares it with its peers.
//!
//! Data flows from containerd's HTTP request in [`mirror`] (parsing with [`oci`]), to the [`resolver`], which
//! serves from the [`store`], or streams a single download per digest into the store while clients read it: from
//! peers that hold it (found and fetched through the [`mesh`], bytes over [`transfer`], checked piece by piece, see
//! [`pieces`]), else from [`upstream`]. [`config`] turns the file, env and flags into typed settings; [`agent`] wires it all up and
//! shuts it down in order; [`metrics`] holds the Prometheus metrics of every subsystem.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod admin;
pub mod agent;
pub mod config;
pub mod containerd;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod kubernetes;
pub mod mesh;
pub mod metrics;
pub mod mirror;
pub mod oci;
pub mod pieces;
pub mod resolver;
pub mod store;
pub mod swarm;
pub mod transfer;
pub mod upstream;

/// Sets up logging once: `SHOAL_LOG` (EnvFilter syntax, default `info`), text or JSON lines on stderr.
pub fn init_tracing(format: config::LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("SHOAL_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let result = match format {
        config::LogFormat::Text => builder.try_init(),
        config::LogFormat::Json => builder.json().try_init(),
    };
    // A second call (tests) keeps the first subscriber.
    drop(result);
}
