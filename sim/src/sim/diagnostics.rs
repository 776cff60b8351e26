//! What a run measured, and what `SHOAL_SIM_DEBUG=1` shows: wait cycles, link utilisation each simulated second,
//! downloads that never finished.

use std::collections::HashMap;

use super::{LinkId, Node, Phase, Report, Sim, Swarm};

impl Sim {
    /// Finds nodes that wait, through the partial holders they follow, on themselves.
    pub(super) fn check_cycles(&mut self) {
        for b in 0..self.layers.len() {
            let mut waits_on: HashMap<usize, Vec<usize>> = HashMap::new();
            for (s, node) in self.nodes.iter().enumerate() {
                for w in &node.blobs[b].waiters {
                    // Only requests still wanted (cancelled ones are dropped lazily).
                    let live = matches!(self.nodes[w.node].blobs[b].dl.as_ref(), Some(dl) if dl.generation == w.generation
                        && matches!(&dl.phase, Phase::Peers { flows, .. } if flows.get(&(w.piece, w.source)) == Some(&None)));
                    if live {
                        waits_on.entry(w.node).or_default().push(s);
                    }
                }
            }
            // A cycle: following edges from a node leads back to it (the graph is small: waiters only).
            let mut state: HashMap<usize, u8> = HashMap::new();
            let keys: Vec<usize> = waits_on.keys().copied().collect();
            for start in keys {
                let mut stack = vec![(start, 0usize)];
                if state.get(&start).copied().unwrap_or(0) != 0 {
                    continue;
                }
                state.insert(start, 1);
                while let Some((v, i)) = stack.pop() {
                    let next = waits_on.get(&v).and_then(|e| e.get(i)).copied();
                    match next {
                        Some(u) => {
                            stack.push((v, i + 1));
                            match state.get(&u).copied().unwrap_or(0) {
                                0 => {
                                    state.insert(u, 1);
                                    stack.push((u, 0));
                                }
                                1 => {
                                    self.wait_cycles += 1;
                                    if self.debug {
                                        let path: Vec<usize> = stack.iter().map(|(v, _)| *v).collect();
                                        eprintln!("t={:.2} cycle blob {b}: {v} waits on {u}; stack {path:?}", self.now);
                                        for &x in path.iter().chain([&u]) {
                                            let dl = self.nodes[x].blobs[b].dl.as_ref();
                                            let ph = dl.map(|d| match &d.phase {
                                                Phase::Peers { sources, home, follow, .. } => {
                                                    format!("peers {sources:?} home {home} follow {follow}")
                                                }
                                                other => format!("{other:?}").chars().take(40).collect(),
                                            });
                                            eprintln!(
                                                "  node {x} have {} home {} phase {ph:?}",
                                                self.nodes[x].blobs[b].have,
                                                self.home_of(x, b)
                                            );
                                        }
                                    }
                                }
                                _ => {}
                            }
                        }
                        None => {
                            state.insert(v, 2);
                        }
                    }
                }
            }
        }
    }

    /// One line a simulated second: mean link use of unfinished nodes, flows, waiting requests, progress.
    pub(super) fn trace_second(&self) {
        let u = self.net.utilisation();
        let mean = |f: &dyn Fn(&Node) -> LinkId| {
            let alive: Vec<&Node> = self.nodes.iter().filter(|n| n.alive && n.done_at.is_none()).collect();
            alive.iter().map(|n| u[f(n)]).sum::<f64>() / alive.len().max(1) as f64
        };
        let waiting: usize = self.nodes.iter().map(|n| n.blobs.iter().map(|b| b.waiters.len()).sum::<usize>()).sum();
        let have: Vec<u64> =
            self.nodes.iter().map(|n| n.blobs.iter().map(|b| b.have.max(b.bits.count())).sum()).collect();
        eprintln!(
            "t={:.0} down {:.2} up {:.2} flows {} waiters {waiting} have min {} max {}",
            self.now,
            mean(&|n| n.down),
            mean(&|n| n.up),
            self.net.live(),
            have.iter().min().unwrap_or(&0),
            have.iter().max().unwrap_or(&0)
        );
    }

    /// Every download that never finished, with its tier.
    pub(super) fn dump_stuck(&self) {
        for (i, n) in self.nodes.iter().enumerate().filter(|(_, n)| n.alive && n.done_at.is_none()) {
            for (b, bs) in n.blobs.iter().enumerate().filter(|(_, bs)| !bs.complete) {
                let ph = bs.dl.as_ref().map(|d| match &d.phase {
                    Phase::Peers { sources, home, follow, flows, sched } => format!(
                        "peers {sources:?} home {home} follow {follow} flows {flows:?} written {} outstanding {} exhausted {}",
                        sched.written(), sched.outstanding(), sched.is_exhausted()
                    ),
                    other => format!("{other:?}"),
                });
                eprintln!("stuck: node {i} blob {b} have {} home {} {ph:?}", bs.have, self.home_of(i, b));
            }
        }
    }

    pub(super) fn report(&self, wall_s: f64) -> Report {
        let image: u64 = self.layers.iter().map(|l| l.size).sum();
        let ideal = image as f64 / self.p.node_rate;
        let survivors: Vec<&Node> = self.nodes.iter().filter(|n| n.alive).collect();
        let own_ideal = |n: &Node| image as f64 / n.rate;
        let mut times: Vec<f64> = survivors.iter().filter_map(|n| Some(n.done_at? / own_ideal(n))).collect();
        times.sort_by(f64::total_cmp);
        let completed = times.len();
        // Nodes that never completed count as the time limit.
        let mut all = times.clone();
        all.extend(survivors.iter().filter(|n| n.done_at.is_none()).map(|n| self.p.limit / own_ideal(n)));
        all.sort_by(f64::total_cmp);
        let pct = |q: f64| {
            if all.is_empty() {
                return 0.0;
            }
            let i = ((q * all.len() as f64).ceil() as usize).clamp(1, all.len()) - 1;
            all[i]
        };
        let end = survivors.iter().filter_map(|n| n.done_at).fold(0.0f64, f64::max).max(1e-9);
        if self.debug {
            for z in 0..self.p.zones {
                let mut t: Vec<f64> = survivors.iter().filter(|n| n.zone == z).filter_map(|n| n.done_at).collect();
                t.sort_by(f64::total_cmp);
                let q =
                    |f: f64| t.get(((t.len() as f64 * f).ceil() as usize).saturating_sub(1)).copied().unwrap_or(0.0);
                eprintln!("zone {z}: done p10 {:.2} p50 {:.2} p90 {:.2} max {:.2} s", q(0.1), q(0.5), q(0.9), q(1.0));
            }
        }
        let control: u64 = self.nodes.iter().map(|n| n.control).sum();
        Report {
            scenario: match self.p.swarm {
                Swarm::Tree => self.p.name.clone(),
                Swarm::Exchange => format!("{} (exchange)", self.p.name),
            },
            swarm: self.p.swarm.name(),
            nodes: self.p.nodes,
            completed,
            survivors: survivors.len(),
            p50: pct(0.5),
            p99: pct(0.99),
            p999: pct(0.999),
            max: pct(1.0),
            ideal_s: ideal,
            upstream_bytes_per_zone: self.zone_in.iter().map(|&l| self.net.carried[l] / image as f64).collect(),
            upstream_total: self.net.carried[self.upstream] / image as f64,
            control_msgs_per_node_s: control as f64 / self.p.nodes as f64 / end,
            max_uploads: self.nodes.iter().map(|n| n.max_uploads).max().unwrap_or(0),
            waits_on_self: self.waits_on_self,
            wait_cycles: self.wait_cycles,
            sim_s: self.now,
            wall_s,
            times,
        }
    }
}
