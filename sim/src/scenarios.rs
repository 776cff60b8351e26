//! The built-in scenarios, by name.

use crate::sim::{Params, Swarm};

const GB: f64 = 1e9;
const MIB: u64 = 1 << 20;

fn base(name: &str, nodes: usize) -> Params {
    Params {
        name: name.to_owned(),
        nodes,
        zones: 3,
        // Kraken's published burst: 3 GB in 2 layers.
        layers: vec![1_500_000_000, 1_500_000_000],
        node_rate: 0.3 * GB,
        zone_rate: 1000.0 * GB,
        upstream_rate: 1.25 * GB,
        delay_zone: 0.000_25,
        delay_cross: 0.001,
        delay_upstream: 0.01,
        deaths: 0.0,
        death_window: (0.0, 0.0),
        slow: 0.0,
        slow_factor: 1.0,
        seed: 20261129,
        dt: 0.001,
        limit: 600.0,
        kill_homes: 0,
        machine_cpu: None,
        swarm: Swarm::Tree,
    }
}

/// Names of the built-in scenarios.
pub const NAMES: &[&str] =
    &["calibrate-8", "ci-200", "kraken-2600", "kraken-5000", "kraken-10000", "big-layer-5000", "faults-2600"];

/// A built-in scenario.
pub fn scenario(name: &str) -> Option<Params> {
    Some(match name {
        // The testbed's burst (`shoal-bench burst`): 8 nodes, 256 MiB in 4 layers, 200 Mbit/s upstream, 1 Gbit/s
        // nodes, one zone, one bridge — and one machine's 2 cores for every agent, client and the registry. The CPU
        // cost of a byte delivered, from measurements outside the burst (docs/benchmarks.md, "Peer mesh"): over
        // the mesh 8.46 CPU-s/GiB (sender and receiver), over HTTP/TCP 3.07 (the agent serving its client, or the
        // registry the home), plus the client's sha256 check (2.0); a burst of 8 delivers 1 crossing from upstream
        // and 7 over the mesh: (6.14 + 2.0 + 7 × (11.53 + 2.0)) / 8 = 12.9 CPU-s/GiB, so 2 cores move
        // 2 / 12.9 GiB/s.
        "calibrate-8" => Params {
            machine_cpu: Some(2.0 / 12.9 * (1u64 << 30) as f64),
            zones: 1,
            layers: vec![64 * MIB; 4],
            node_rate: 125e6,
            upstream_rate: 25e6,
            delay_zone: 0.000_05,
            delay_upstream: 0.000_1,
            limit: 120.0,
            ..base(name, 8)
        },
        // CI: small and quick, still several zones and a death.
        "ci-200" => Params {
            zones: 2,
            layers: vec![96 * MIB, 32 * MIB],
            node_rate: 125e6,
            upstream_rate: 125e6,
            deaths: 0.01,
            death_window: (0.5, 1.5),
            kill_homes: 1,
            limit: 120.0,
            ..base(name, 200)
        },
        "kraken-2600" => base(name, 2600),
        "kraken-5000" => base(name, 5000),
        "kraken-10000" => base(name, 10_000),
        // 10 GB: one 5 GB layer and five of 1 GB; 25 Gbit/s nodes.
        "big-layer-5000" => Params {
            layers: [5_000_000_000u64].into_iter().chain([1_000_000_000; 5]).collect(),
            node_rate: 3.125 * GB,
            dt: 0.000_5,
            ..base(name, 5000)
        },
        // 1 % of nodes die mid-burst (homes among them), 5 % run at a tenth of the link rate.
        "faults-2600" => Params {
            deaths: 0.01,
            death_window: (2.0, 6.0),
            kill_homes: 6,
            slow: 0.05,
            slow_factor: 0.1,
            ..base(name, 2600)
        },
        _ => return None,
    })
}
