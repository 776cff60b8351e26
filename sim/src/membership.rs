//! `shoal-sim --membership 1000,2000`: the agent's membership code (SWIM over signed records, `swarm::membership`)
//! on a virtual network of N nodes ([`Lab`]), production timing (a probe per second, 500 ms to answer, 5 s to
//! refute). Per size: the time until every node sees every other alive after all join at once through one node;
//! idle messages and bytes per node per second; how long a join and a crash take to be seen by every node; false
//! deaths over a minute with 1 % of messages lost and 5 % of nodes CPU-starved; and how often two nodes disagree on
//! a digest's home while a crash is being detected.

use std::collections::HashMap;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use shoal_agent::mesh::{Liveness, MembersView};
use shoal_agent::oci::Digest;
use shoal_agent::swarm::membership::MembershipTiming;
use shoal_agent::swarm::membership::lab::Lab;

/// The agent's defaults.
pub const TIMING: MembershipTiming = MembershipTiming {
    probe_period: Duration::from_secs(1),
    probe_timeout: Duration::from_millis(500),
    suspicion: Duration::from_secs(5),
    indirect_probes: 3,
    gossip: MembershipTiming::GOSSIP,
};

/// Crashes measured one after another.
pub const CRASHES: usize = 5;

/// One size's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    /// Nodes.
    pub nodes: usize,
    /// All join at once through one node: until every node sees every other alive (s).
    pub converged: Option<f64>,
    /// Idle messages sent per node per second (a minute after the join).
    pub idle_messages: f64,
    /// Idle bytes sent per node per second.
    pub idle_bytes: f64,
    /// One more node joins: until every node sees it alive (s).
    pub join_seen: Option<f64>,
    /// [`CRASHES`] nodes crash one after another: until every node sees one dead (s), the slowest.
    pub death_seen: Option<f64>,
    /// The same, the median.
    pub death_seen_median: Option<f64>,
    /// While that crash is detected: the largest fraction of (node, digest) pairs whose home differs from the
    /// majority's, over 200 digests.
    pub home_disagreement: f64,
    /// Over a minute with 1 % loss and 5 % of nodes starved: (node, member) pairs ever seen dead while alive.
    pub false_deaths: usize,
    /// Bytes sent per node per second over that minute (tables included).
    pub noisy_bytes: f64,
}

fn digests(n: usize) -> Vec<Digest> {
    use sha2::Digest as _;
    (0..n as u64).map(|i| Digest::from_sha256(&sha2::Sha256::digest(i.to_be_bytes()))).collect()
}

/// Nodes whose views are compared for [`disagreement`] (a view of N members costs O(N) to build).
const VIEWS_SAMPLED: usize = 200;

/// Fraction of (node, digest) pairs whose home differs from the most common home of that digest, over
/// [`VIEWS_SAMPLED`] nodes spread evenly over the cluster.
fn disagreement(lab: &Lab, ds: &[Digest]) -> f64 {
    let stride = lab.len().div_ceil(VIEWS_SAMPLED).max(1);
    let views: Vec<MembersView> = (0..lab.len())
        .step_by(stride)
        .filter_map(|i| lab.node(i))
        .map(|m| MembersView::new(m.me().peer(), "z".into(), m.members()))
        .collect();
    let mut off = 0usize;
    for d in ds {
        let mut counts: HashMap<libp2p::PeerId, usize> = HashMap::new();
        for v in &views {
            *counts.entry(v.home(d)).or_default() += 1;
        }
        let top = counts.values().copied().max().unwrap_or(0);
        off += views.len() - top;
    }
    off as f64 / (views.len() * ds.len()).max(1) as f64
}

/// Steps `lab` in `step`s until `done` or `limit` passed; the time it took.
fn until(lab: &mut Lab, step: Duration, limit: Duration, mut done: impl FnMut(&mut Lab) -> bool) -> Option<f64> {
    let start = lab.now();
    while lab.now() - start < limit {
        let t = lab.now() + step;
        lab.run_until(t);
        if done(lab) {
            return Some((lab.now() - start).as_secs_f64());
        }
    }
    None
}

/// Runs one size with the agent's timing.
pub fn run(nodes: usize, seed: u64) -> Row {
    run_with(nodes, seed, TIMING)
}

/// Runs one size with `timing`.
pub fn run_with(nodes: usize, seed: u64, timing: MembershipTiming) -> Row {
    let clock = std::time::Instant::now();
    let phase = |what: &str| eprintln!("    {what}: {:.1} s", clock.elapsed().as_secs_f64());
    let step = Duration::from_millis(250);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // One node more than the cluster: it joins later.
    let mut lab = Lab::new(nodes + 1, timing, 0.0, seed, false);
    let late = nodes;
    for i in 1..nodes {
        lab.join(i, 0);
    }
    let mut since_pull = Duration::ZERO;
    let converged = until(&mut lab, step, Duration::from_secs(120), |l| {
        // As the agent: a table from a random alive member every 3 s for the first minute.
        since_pull += step;
        if since_pull >= Duration::from_secs(3) && l.now() < Duration::from_secs(60) {
            since_pull = Duration::ZERO;
            l.pull_tables();
        }
        // The late node has not joined yet: every other must see the others.
        l.alive_counts()[..nodes].iter().all(|c| *c == Some(nodes - 1))
    });
    phase("all joined");
    // Idle: after a minute for the joins' updates to finish spreading.
    let t = lab.now() + Duration::from_secs(60);
    lab.run_until(t);
    let (m0, b0): (u64, u64) = (lab.sent.iter().sum(), lab.sent_bytes.iter().sum());
    let idle = Duration::from_secs(30);
    let t = lab.now() + idle;
    lab.run_until(t);
    let (m1, b1): (u64, u64) = (lab.sent.iter().sum(), lab.sent_bytes.iter().sum());
    let per = |v: u64| v as f64 / (nodes as f64 * idle.as_secs_f64());
    phase("idle");
    // A join.
    let via = rng.random_range(0..nodes);
    lab.join(late, via);
    let late_id = lab.peer(late).expect("alive");
    let join_seen =
        until(&mut lab, step, Duration::from_secs(60), |l| l.seen_as(late_id).get("Alive").copied() == Some(nodes));
    // Crashes one after another, and the homes while each is detected.
    let ds = digests(200);
    let mut worst = 0.0f64;
    let mut deaths = Vec::new();
    for _ in 0..CRASHES {
        let t = lab.now() + Duration::from_secs(10);
        lab.run_until(t);
        let victim = loop {
            let v = rng.random_range(1..nodes);
            if lab.node(v).is_some() {
                break v;
            }
        };
        let victim_id = lab.peer(victim).expect("alive");
        lab.kill(victim);
        let seen = until(&mut lab, Duration::from_millis(250), Duration::from_secs(60), |l| {
            worst = worst.max(disagreement(l, &ds));
            if std::env::var_os("SHOAL_SIM_DEBUG").is_some() {
                eprintln!("    {:?}: {:?}", l.now(), l.seen_as(victim_id));
            }
            l.seen_as(victim_id).get("Dead").copied() == Some(l.live())
        });
        deaths.push(seen.unwrap_or(f64::INFINITY));
    }
    deaths.sort_by(f64::total_cmp);
    let finite = |v: f64| v.is_finite().then_some(v);
    let death_seen = finite(deaths[deaths.len() - 1]);
    let death_seen_median = finite(deaths[deaths.len() / 2]);
    phase("a join and a crash");
    // The first cluster's memory back before the second starts (each holds N × N table entries).
    drop(lab);
    let (false_deaths, noisy_bytes) = noise(nodes, seed, timing);
    phase("loss and starvation");
    Row {
        nodes,
        noisy_bytes,
        converged,
        idle_messages: per(m1 - m0),
        idle_bytes: per(b1 - b0),
        join_seen,
        death_seen,
        death_seen_median,
        home_disagreement: worst,
        false_deaths,
    }
}

/// Loss and starvation: a separate cluster of `nodes`, converged first, then a minute with 1 % of messages lost and
/// every 20th node starved. Returns the (node, member) pairs ever seen dead while alive and the bytes sent per node
/// and second meanwhile. With `SHOAL_SIM_DEBUG` set, prints who was seen dead by how many and how often the
/// starved nodes refuted.
pub fn noise(nodes: usize, seed: u64, timing: MembershipTiming) -> (usize, f64) {
    let step = Duration::from_millis(250);
    let mut noisy = Lab::new(nodes, timing, 0.0, seed ^ 0x5eed, false);
    for i in 1..nodes {
        noisy.join(i, 0);
    }
    let mut since_pull = Duration::ZERO;
    until(&mut noisy, step, Duration::from_secs(120), |l| {
        since_pull += step;
        if since_pull >= Duration::from_secs(3) {
            since_pull = Duration::ZERO;
            l.pull_tables();
        }
        l.all_alive()
    });
    let t = noisy.now() + Duration::from_secs(60);
    noisy.run_until(t);
    if std::env::var_os("SHOAL_SIM_DEBUG").is_some() {
        eprintln!("    second cluster joined at {:?}", noisy.now());
    }
    noisy.loss = 0.01;
    for i in 0..nodes {
        noisy.starved[i] = i % 20 == 7;
    }
    let mut false_deaths = std::collections::HashSet::new();
    let noisy_before: u64 = noisy.sent_bytes.iter().sum();
    for _ in 0..60 {
        let t = noisy.now() + Duration::from_secs(1);
        noisy.run_until(t);
        for i in 0..nodes {
            if let Some(m) = noisy.node(i) {
                for (p, l) in m.states() {
                    if l == Liveness::Dead {
                        false_deaths.insert((i, p));
                    }
                }
            }
        }
    }
    let noisy_bytes = (noisy.sent_bytes.iter().sum::<u64>() - noisy_before) as f64 / (nodes as f64 * 60.0);
    if std::env::var_os("SHOAL_SIM_DEBUG").is_some() {
        let mut by_member: HashMap<libp2p::PeerId, usize> = HashMap::new();
        for (_, p) in &false_deaths {
            *by_member.entry(*p).or_default() += 1;
        }
        let starved: Vec<libp2p::PeerId> =
            (0..nodes).filter(|i| noisy.starved[*i]).filter_map(|i| noisy.peer(i)).collect();
        let mut counts: Vec<(usize, bool)> = by_member.iter().map(|(p, c)| (*c, starved.contains(p))).collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        eprintln!("    seen dead by (observers, starved): {counts:?}");
        let renewals: u64 = (0..nodes)
            .filter(|i| noisy.starved[*i])
            .filter_map(|i| noisy.node(i))
            .map(|m| u64::from(m.me().version().1))
            .sum();
        let others: u64 = (0..nodes)
            .filter(|i| !noisy.starved[*i])
            .filter_map(|i| noisy.node(i))
            .map(|m| u64::from(m.me().version().1))
            .sum();
        eprintln!("    renewals: starved {renewals}, others {others}");
        let by_starved = false_deaths.iter().filter(|(i, _)| noisy.starved[*i]).count();
        eprintln!("    false deaths seen by starved nodes: {by_starved} of {}", false_deaths.len());
    }
    (false_deaths.len(), noisy_bytes)
}

/// The rows as a markdown table.
pub fn table(rows: &[Row]) -> String {
    let s = |v: Option<f64>| v.map_or_else(|| "not within the limit".to_owned(), |v| format!("{v:.1} s"));
    let mut t = String::from(
        "| nodes | all join at once: converged | idle messages / node / s | idle bytes / node / s | a join seen by all | a crash seen dead by all (median / slowest of 5) | homes disagreeing during the crashes | false deaths (1 % loss, 5 % starved, 60 s) | bytes / node / s meanwhile |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        t.push_str(&format!(
            "| {} | {} | {:.2} | {:.0} B | {} | {} / {} | {:.2} % | {} | {:.0} B |\n",
            r.nodes,
            s(r.converged),
            r.idle_messages,
            r.idle_bytes,
            s(r.join_seen),
            s(r.death_seen_median),
            s(r.death_seen),
            r.home_disagreement * 100.0,
            r.false_deaths,
            r.noisy_bytes
        ));
    }
    t
}
