//! The simulation: N nodes, each running the agent's swarm core — the member view's homes
//! ([`MembersView`]/[`shoal_agent::swarm::homes`]), the home's [`Directory`] and its hand-out of sources, the
//! [`PieceScheduler`] of every download, the [`Announcer`] — over the modelled [`Net`].
//!
//! What each node does is what the agent's resolver and mesh do, step for step: ask the digest's home; the home
//! starts the zone's one download when nobody complete is known (from the digest's home zone, else upstream) and
//! hands out sources ahead of the asker, recording it as a partial holder; the asker schedules pieces over its
//! sources, following partial holders (a request waits at the source until it has the piece, up to the follow
//! timeout); a tier that runs dry is asked again, and after [`PEER_ROUNDS`] rounds without progress the node
//! continues from upstream at its offset. Deaths stop a node's flows; its peers notice through stalls and,
//! after the detection delay, through their view (homes move, the announcer re-announces what moved).
//!
//! Not modelled: CPU, disk, QUIC's congestion control (flows share links max-min fairly and start at their fair
//! rate), message loss, tags and manifests (the image's layers only), membership gossip itself (a death reaches
//! every view after `detect` ± 0.5 s).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use sha2::Digest as _;
use shoal_agent::mesh::{Liveness, MemberInfo, MembersView};
use shoal_agent::oci::Digest;
use shoal_agent::pieces::{piece_count, piece_size};
use shoal_agent::swarm::announcer::Announcer;
use shoal_agent::swarm::directory::{Directory, Holding};
use shoal_agent::swarm::homes::test_id;
use shoal_agent::swarm::scheduler::{Action, PieceScheduler, SchedulerConfig};

use crate::net::{Carry, FlowId, LinkId, Net};
pub use crate::report::Report;

mod diagnostics;

/// Rounds without progress before upstream (the resolver's `PEER_ROUNDS`).
pub const PEER_ROUNDS: u32 = 3;

/// A scenario's parameters.
#[derive(Debug, Clone)]
pub struct Params {
    /// Scenario name.
    pub name: String,
    /// Nodes.
    pub nodes: usize,
    /// Zones (nodes spread round-robin).
    pub zones: usize,
    /// Layer sizes, bytes.
    pub layers: Vec<u64>,
    /// Each node's link, bytes/s, each way.
    pub node_rate: f64,
    /// Each zone's link to the rest (each way), bytes/s.
    pub zone_rate: f64,
    /// The upstream registry's link, bytes/s.
    pub upstream_rate: f64,
    /// One-way delays: within a zone, across zones, to upstream (seconds).
    pub delay_zone: f64,
    /// Across zones.
    pub delay_cross: f64,
    /// To upstream.
    pub delay_upstream: f64,
    /// Fraction of nodes that die during the burst, and when (seconds, spread uniformly).
    pub deaths: f64,
    /// Deaths happen in this window.
    pub death_window: (f64, f64),
    /// Fraction of nodes whose links run at `slow_factor` of the rate.
    pub slow: f64,
    /// Link factor of slow nodes.
    pub slow_factor: f64,
    /// Seed.
    pub seed: u64,
    /// Simulation step, seconds.
    pub dt: f64,
    /// Give up after this much simulated time.
    pub limit: f64,
    /// Home zone's homes of these layers die (to kill homes on purpose): number of homes killed.
    pub kill_homes: usize,
    /// The nodes share one machine's CPU (the testbed: every agent and client on two cores): every flow's bytes
    /// cross it, at most this many bytes per second in all (the cores over the measured CPU cost of a byte
    /// delivered). `None`: each node has CPU of its own, not modelled.
    pub machine_cpu: Option<f64>,
}

/// Timeouts the agent uses (config defaults).
const STALL: f64 = 5.0;
const CONNECT_TIMEOUT: f64 = 1.0;
const FOLLOW: f64 = 30.0;
const DETECT: f64 = 6.0;
/// How long a home waits for its view to agree, or for holders to re-announce, after a membership change
/// (`Mesh::settle_time` with the default gossip interval).
const SETTLE: f64 = 2.4;

/// splitmix64: a small seeded generator (determinism by seed).
#[derive(Debug, Clone)]
pub struct Rng(u64);
impl Rng {
    /// Next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Debug)]
enum Phase {
    Asking,
    /// Asked a home that could not be reached: wait for the view to move the digest elsewhere.
    WaitHomeMove {
        from: usize,
    },
    Peers {
        sched: Box<PieceScheduler>,
        sources: Vec<usize>,
        follow: bool,
        home: usize,
        flows: BTreeMap<(u64, usize), Option<FlowId>>,
    },
    Upstream {
        flow: Option<FlowId>,
    },
    Done,
}

#[derive(Debug)]
struct Dl {
    generation: u64,
    phase: Phase,
    fruitless: u32,
    round_have: u64,
}

#[derive(Debug, Clone, Copy)]
struct Waiter {
    node: usize,
    piece: u64,
    source: usize,
    generation: u64,
    deadline: f64,
}

#[derive(Debug, Default)]
struct BlobState {
    have: u64,
    complete: bool,
    dl: Option<Dl>,
    waiters: Vec<Waiter>,
    /// When the pending `Wake` fires (one at a time: an earlier one looks again and schedules the next).
    wake_at: Option<f64>,
    /// When the pending `FollowTimeout` of this holder's waiters fires (one at a time, for the earliest).
    timeout_at: Option<f64>,
}

#[derive(Debug)]
struct Node {
    id: PeerId,
    zone: usize,
    /// Its link rate, each way.
    rate: f64,
    alive: bool,
    up: LinkId,
    down: LinkId,
    dir: Directory,
    ann: Announcer,
    view: usize,
    blobs: Vec<BlobState>,
    done_at: Option<f64>,
    /// When its view last changed.
    view_changed_at: f64,
    /// Locates this node is not the home of in its own view yet: (asker, blob, generation, give up at).
    deferred: Vec<(usize, usize, u64, f64)>,
    control: u64,
    uploads: u32,
    max_uploads: u32,
}

#[derive(Debug, Clone)]
enum Ev {
    Start(usize),
    Locate {
        home: usize,
        asker: usize,
        blob: usize,
        generation: u64,
    },
    Located {
        asker: usize,
        blob: usize,
        generation: u64,
        home: usize,
        sources: Option<Vec<usize>>,
    },
    PieceReq {
        src: usize,
        node: usize,
        blob: usize,
        piece: u64,
        source: usize,
        generation: u64,
        follow: bool,
    },
    PieceFail {
        node: usize,
        blob: usize,
        piece: u64,
        source: usize,
        generation: u64,
    },
    FollowTimeout {
        src: usize,
        blob: usize,
    },
    Announce {
        home: usize,
        from: usize,
        holdings: Vec<Holding>,
    },
    /// The node's download of the blob (whatever its generation by then) looks at its scheduler again.
    Wake {
        node: usize,
        blob: usize,
    },
    UpstreamStart {
        node: usize,
        blob: usize,
        generation: u64,
    },
    HomeGone {
        node: usize,
        blob: usize,
        generation: u64,
    },
    /// Deferred locates at `home` whose wait ran out are answered "no sources".
    LocateGiveUp {
        home: usize,
    },
    /// A new home looks again for holders after its settling time.
    HomeOwn {
        node: usize,
        blob: usize,
        generation: u64,
    },
    Death(usize),
    ViewUpdate {
        node: usize,
        view: usize,
    },
}

/// One layer.
#[derive(Debug)]
struct Layer {
    digest: Digest,
    size: u64,
    piece: u32,
    count: u64,
}

/// The simulation state.
#[derive(Debug)]
pub struct Sim {
    p: Params,
    epoch: Instant,
    now: f64,
    seq: u64,
    events: BinaryHeap<Reverse<(u64, u64, usize)>>,
    /// Events' payloads by slot (a slot is free again once its event was handled).
    payloads: Vec<Option<Ev>>,
    free_slots: Vec<usize>,
    net: Net,
    nodes: Vec<Node>,
    index: HashMap<PeerId, usize>,
    layers: Vec<Layer>,
    views: Vec<(MembersView, Vec<bool>)>,
    zone_in: Vec<LinkId>,
    zone_out: Vec<LinkId>,
    upstream: LinkId,
    /// The shared CPU, when modelled ([`Params::machine_cpu`]).
    cpu: Option<LinkId>,
    generation: u64,
    rng: Rng,
    waits_on_self: u64,
    wait_cycles: u64,
    deaths_pending: usize,
    /// `SHOAL_SIM_DEBUG` is set: print traces.
    debug: bool,
}

fn view_of(nodes: &[Node], alive: &[bool]) -> MembersView {
    let me = alive.iter().position(|a| *a).unwrap_or(0);
    let members = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != me)
        .map(|(i, n)| {
            let info = MemberInfo {
                id: n.id,
                incarnation: 1,
                zone: format!("z{}", n.zone),
                gossip_addrs: Vec::new(),
                transfer_addr: std::net::SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 30024)),
                node: None,
            };
            (info, if alive[i] { Liveness::Alive } else { Liveness::Dead })
        })
        .collect();
    MembersView::new(nodes[me].id, format!("z{}", nodes[me].zone), members)
}

impl Sim {
    /// Sets a scenario up.
    pub fn new(p: Params) -> Self {
        let mut net = Net::default();
        let mut rng = Rng(p.seed);
        let upstream = net.link(p.upstream_rate);
        let cpu = p.machine_cpu.map(|c| net.link(c));
        let zone_in: Vec<LinkId> = (0..p.zones).map(|_| net.link(p.zone_rate)).collect();
        let zone_out: Vec<LinkId> = (0..p.zones).map(|_| net.link(p.zone_rate)).collect();
        let layers: Vec<Layer> = p
            .layers
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let digest = Digest::from_sha256(&sha2::Sha256::digest(format!("{}/{}/{i}", p.name, p.seed)));
                let piece = piece_size(size);
                Layer { digest, size, piece, count: piece_count(size, piece) }
            })
            .collect();
        let nodes: Vec<Node> = (0..p.nodes)
            .map(|i| {
                let rate = if rng.unit() < p.slow { p.node_rate * p.slow_factor } else { p.node_rate };
                let id = test_id(format!("{}/{}/node/{i}", p.name, p.seed).as_bytes());
                Node {
                    rate,
                    id,
                    zone: i % p.zones.max(1),
                    alive: true,
                    up: net.link(rate),
                    down: net.link(rate),
                    dir: Directory::new(id),
                    ann: Announcer::new(),
                    view: 0,
                    blobs: (0..layers.len()).map(|_| BlobState::default()).collect(),
                    done_at: None,
                    view_changed_at: f64::NEG_INFINITY,
                    deferred: Vec::new(),
                    control: 0,
                    uploads: 0,
                    max_uploads: 0,
                }
            })
            .collect();
        let index = nodes.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
        let alive = vec![true; nodes.len()];
        let views = vec![(view_of(&nodes, &alive), alive)];
        let mut sim = Self {
            p,
            epoch: Instant::now(),
            now: 0.0,
            seq: 0,
            events: BinaryHeap::new(),
            payloads: Vec::new(),
            free_slots: Vec::new(),
            net,
            nodes,
            index,
            layers,
            views,
            zone_in,
            zone_out,
            upstream,
            cpu,
            generation: 0,
            rng,
            waits_on_self: 0,
            wait_cycles: 0,
            deaths_pending: 0,
            debug: std::env::var_os("SHOAL_SIM_DEBUG").is_some(),
        };
        for n in 0..sim.nodes.len() {
            sim.at(0.0, Ev::Start(n));
        }
        let deaths = (sim.p.deaths * sim.p.nodes as f64).round() as usize;
        let (lo, hi) = sim.p.death_window;
        let mut killed = vec![false; sim.nodes.len()];
        // Homes first (the interesting deaths), then anyone.
        let homes: Vec<usize> = (0..sim.layers.len())
            .flat_map(|b| (0..sim.p.zones).map(move |z| (b, z)))
            .filter_map(|(b, z)| {
                let v = &sim.views[0].0;
                let id = v.home_in(&format!("z{z}"), &sim.layers[b].digest)?;
                sim.index.get(&id).copied()
            })
            .collect();
        for &h in homes.iter().take(sim.p.kill_homes.min(deaths)) {
            if !killed[h] {
                killed[h] = true;
                let t = lo + (hi - lo) * sim.rng.unit();
                sim.deaths_pending += 1;
                sim.at(t, Ev::Death(h));
            }
        }
        while killed.iter().filter(|k| **k).count() < deaths {
            let n = (sim.rng.next_u64() % sim.nodes.len() as u64) as usize;
            if !killed[n] {
                killed[n] = true;
                let t = lo + (hi - lo) * sim.rng.unit();
                sim.deaths_pending += 1;
                sim.at(t, Ev::Death(n));
            }
        }
        sim
    }

    fn instant(&self, t: f64) -> Instant {
        self.epoch + Duration::from_secs_f64(t.max(0.0))
    }

    fn at(&mut self, t: f64, ev: Ev) {
        let id = match self.free_slots.pop() {
            Some(id) => {
                self.payloads[id] = Some(ev);
                id
            }
            None => {
                self.payloads.push(Some(ev));
                self.payloads.len() - 1
            }
        };
        self.seq += 1;
        self.events.push(Reverse(((t.max(self.now) * 1e9) as u64, self.seq, id)));
    }

    fn delay(&self, a: usize, b: usize) -> f64 {
        if self.nodes[a].zone == self.nodes[b].zone { self.p.delay_zone } else { self.p.delay_cross }
    }

    fn view(&self, n: usize) -> &(MembersView, Vec<bool>) {
        &self.views[self.nodes[n].view]
    }

    fn zone_name(&self, n: usize) -> String {
        format!("z{}", self.nodes[n].zone)
    }

    /// The home of layer `b` in `n`'s zone, as `n` sees it.
    fn home_of(&self, n: usize, b: usize) -> usize {
        let v = &self.view(n).0;
        v.home_in(&self.zone_name(n), &self.layers[b].digest).and_then(|id| self.index.get(&id).copied()).unwrap_or(n)
    }

    fn links(&self, src: usize, dst: usize) -> Vec<LinkId> {
        let (s, d) = (&self.nodes[src], &self.nodes[dst]);
        let mut links = if s.zone == d.zone {
            vec![s.up, d.down]
        } else {
            vec![s.up, self.zone_out[s.zone], self.zone_in[d.zone], d.down]
        };
        links.extend(self.cpu);
        links
    }

    fn holding(&self, b: usize, complete: bool) -> Holding {
        let l = &self.layers[b];
        Holding { digest: l.digest.clone(), size: l.size, media_type: None, complete, public: true, removed: false }
    }

    fn new_dl(&mut self, n: usize, b: usize) -> u64 {
        self.generation += 1;
        let g = self.generation;
        let have = self.nodes[n].blobs[b].have;
        self.nodes[n].blobs[b].dl = Some(Dl { generation: g, phase: Phase::Asking, fruitless: 0, round_have: have });
        let h = self.holding(b, false);
        self.nodes[n].ann.hold(h);
        self.flush_announcements(n);
        g
    }

    fn dl_generation(&self, n: usize, b: usize) -> Option<u64> {
        self.nodes[n].blobs[b].dl.as_ref().map(|d| d.generation)
    }

    /// Sends what the node's announcer has pending to the homes (its own directory directly).
    fn flush_announcements(&mut self, n: usize) {
        let batches = {
            let me = self.nodes[n].id;
            let zone = self.zone_name(n);
            let v = &self.views[self.nodes[n].view].0;
            let home = |d: &Digest| (v.home_in(&zone, d).unwrap_or(me), 1u64);
            self.nodes[n].ann.take_batches(home, 2000)
        };
        for ((home_id, inc), batch) in batches {
            self.nodes[n].ann.delivered((home_id, inc), &batch);
            let Some(&h) = self.index.get(&home_id) else { continue };
            if h == n {
                let id = self.nodes[n].id;
                for x in &batch {
                    self.nodes[n].dir.apply(id, x);
                }
            } else {
                self.nodes[n].control += 1;
                let t = self.now + self.delay(n, h);
                self.at(t, Ev::Announce { home: h, from: n, holdings: batch });
            }
        }
    }

    fn start_blob(&mut self, n: usize, b: usize) {
        let g = self.new_dl(n, b);
        self.ask(n, b, g);
    }

    /// Where to continue: the home (this node, or a locate to it).
    fn ask(&mut self, n: usize, b: usize, g: u64) {
        let home = self.home_of(n, b);
        if let Some(dl) = self.nodes[n].blobs[b].dl.as_mut() {
            dl.phase = Phase::Asking;
        }
        if home == n {
            self.home_own(n, b, g);
        } else {
            self.nodes[n].control += 1;
            let t = self.now + self.delay(n, home);
            self.at(t, Ev::Locate { home, asker: n, blob: b, generation: g });
        }
    }

    fn usable(&self, at: usize) -> impl Fn(&PeerId) -> bool + '_ {
        let alive = &self.view(at).1;
        move |p: &PeerId| self.index.get(p).is_some_and(|&i| alive[i])
    }

    /// The home's own download of a digest homed on it (`Mesh::sources` on the home): complete holders, else what
    /// partial holders have, else the home zone's home (from another zone) or upstream.
    fn home_own(&mut self, n: usize, b: usize, g: u64) {
        let me = self.nodes[n].id;
        let digest = self.layers[b].digest.clone();
        let located = self.nodes[n].dir.locate(&digest, &me, self.usable(n));
        if let Some(loc) = located {
            let complete: Vec<usize> = loc
                .holders
                .iter()
                .filter(|(_, s)| s.complete)
                .filter_map(|(p, _)| self.index.get(p).copied())
                .collect();
            let sources = if complete.is_empty() {
                loc.holders.iter().filter_map(|(p, _)| self.index.get(p).copied()).collect()
            } else {
                complete
            };
            if !sources.is_empty() {
                self.peers(n, b, g, sources, false, n);
                return;
            }
        }
        // A new home waits for holders to re-announce before concluding nobody holds it (`settled_locate`).
        let settled = self.nodes[n].view_changed_at + SETTLE;
        if self.now < settled {
            self.at(settled, Ev::HomeOwn { node: n, blob: b, generation: g });
            return;
        }
        if !self.ask_home_zone(n, b, g) {
            self.go_upstream(n, b, g);
        }
    }

    /// A home outside the digest's home zone asks the home zone's home (the next tier of `Mesh::sources` on a
    /// home, after what partial holders have). Returns whether it asked.
    fn ask_home_zone(&mut self, n: usize, b: usize, g: u64) -> bool {
        let digest = &self.layers[b].digest;
        let home_zone = self.view(n).0.home_zone(digest);
        if home_zone == self.zone_name(n) {
            return false;
        }
        let Some(far) = self.view(n).0.home_in(&home_zone, digest).and_then(|id| self.index.get(&id).copied()) else {
            return false;
        };
        self.nodes[n].control += 1;
        let t = self.now + self.delay(n, far);
        self.at(t, Ev::Locate { home: far, asker: n, blob: b, generation: g });
        true
    }

    fn go_upstream(&mut self, n: usize, b: usize, g: u64) {
        let Some(dl) = self.nodes[n].blobs[b].dl.as_mut() else { return };
        dl.phase = Phase::Upstream { flow: None };
        let t = self.now + 2.0 * self.p.delay_upstream;
        self.at(t, Ev::UpstreamStart { node: n, blob: b, generation: g });
    }

    /// A locate at `home` from `asker` (in `Mesh::answer_locate`).
    fn on_locate(&mut self, home: usize, asker: usize, b: usize, g: u64) {
        if !self.nodes[home].alive {
            let t = self.now + CONNECT_TIMEOUT;
            self.at(t, Ev::HomeGone { node: asker, blob: b, generation: g });
            return;
        }
        self.nodes[home].control += 1;
        let digest = self.layers[b].digest.clone();
        let same_zone = self.nodes[home].zone == self.nodes[asker].zone;
        let reply = self.now + self.delay(home, asker);
        // Not the home in its own view (views disagree for a moment): no sources.
        let zone = self.zone_name(home);
        let my_home = self.view(home).0.home_in(&zone, &digest) == Some(self.nodes[home].id);
        if !my_home {
            // Give its view the settling time to agree (`answer_locate`); past that the asker goes upstream.
            let known = self.nodes[home].deferred.iter().find(|d| (d.0, d.1, d.2) == (asker, b, g)).map(|d| d.3);
            match known {
                Some(until) if until <= self.now => {
                    self.nodes[home].deferred.retain(|d| (d.0, d.1, d.2) != (asker, b, g));
                    self.at(reply, Ev::Located { asker, blob: b, generation: g, home, sources: Some(Vec::new()) });
                }
                Some(_) => {}
                None => {
                    let until = self.now + SETTLE;
                    self.nodes[home].deferred.push((asker, b, g, until));
                    self.at(until, Ev::LocateGiveUp { home });
                }
            }
            return;
        }
        self.nodes[home].deferred.retain(|d| (d.0, d.1, d.2) != (asker, b, g));
        let (asker_id, home_id) = (self.nodes[asker].id, self.nodes[home].id);
        let needs_origin = {
            let usable = self.usable(home);
            self.nodes[home].dir.needs_origin(&digest, &asker_id, |p| *p == home_id || usable(p))
        };
        let mut extra = 0.0;
        if needs_origin {
            let bs = &self.nodes[home].blobs[b];
            if !bs.complete && bs.dl.is_none() {
                self.start_blob(home, b);
                extra = 2.0 * self.p.delay_upstream;
            }
            let complete = self.nodes[home].blobs[b].complete;
            let h = self.holding(b, complete);
            self.nodes[home].dir.apply(home_id, &h);
        }
        let loc = {
            let alive = self.views[self.nodes[home].view].1.clone();
            let index = &self.index;
            let usable = |p: &PeerId| *p == home_id || index.get(p).is_some_and(|&i| alive[i]);
            self.nodes[home].dir.hand_out(&digest, &asker_id, &home_id, usable, same_zone.then_some(true))
        };
        let sources = loc.map(|l| l.holders.iter().filter_map(|(p, _)| self.index.get(p).copied()).collect());
        self.at(reply + extra, Ev::Located { asker, blob: b, generation: g, home, sources });
    }

    fn on_located(&mut self, n: usize, b: usize, g: u64, home: usize, sources: Option<Vec<usize>>) {
        if self.dl_generation(n, b) != Some(g) || !self.nodes[n].alive {
            return;
        }
        match sources {
            Some(s) if !s.is_empty() => self.peers(n, b, g, s, true, home),
            // Nobody can help: straight to upstream.
            _ => self.go_upstream(n, b, g),
        }
    }

    /// A new tier: a generation of its own, so requests of earlier tiers (to other nodes under the same source
    /// index) are told apart.
    fn peers(&mut self, n: usize, b: usize, _g: u64, sources: Vec<usize>, follow: bool, home: usize) {
        let l = &self.layers[b];
        let have = self.nodes[n].blobs[b].have;
        let sched = PieceScheduler::new(SchedulerConfig::for_piece(l.piece), l.count, have, sources.len());
        self.generation += 1;
        let g = self.generation;
        if let Some(dl) = self.nodes[n].blobs[b].dl.as_mut() {
            dl.generation = g;
            dl.phase = Phase::Peers { sched: Box::new(sched), sources, follow, home, flows: BTreeMap::new() };
        }
        self.drive(n, b, g);
    }

    /// Lets the scheduler act: requests out, completion, exhaustion, the next hedge.
    fn drive(&mut self, n: usize, b: usize, g: u64) {
        let now = self.instant(self.now);
        let mut sends = Vec::new();
        let mut outcome = None;
        let mut wake = None;
        {
            let Some(dl) = self.nodes[n].blobs[b].dl.as_mut() else { return };
            if dl.generation != g {
                return;
            }
            let Phase::Peers { sched, sources, follow, flows, .. } = &mut dl.phase else { return };
            for a in sched.poll(now) {
                if let Action::Fetch { piece, source } = a {
                    flows.insert((piece, source), None);
                    sends.push((sources[source], piece, source, *follow));
                }
            }
            if sched.is_complete() {
                outcome = Some(true);
            } else if sched.is_exhausted() {
                outcome = Some(false);
            } else {
                // A microsecond late: the clock's round trip through f64 must not land before the deadline.
                wake = sched.next_wakeup().map(|w| w.duration_since(self.epoch).as_secs_f64() + 1e-6);
            }
        }
        if let Some(t) = wake {
            // One pending wake per download: a later one is scheduled when the earlier one fires (an event queue
            // full of stale wakes made the simulator slow at thousands of nodes).
            let bs = &mut self.nodes[n].blobs[b];
            if bs.wake_at.is_none_or(|w| t < w) {
                bs.wake_at = Some(t);
                self.at(t, Ev::Wake { node: n, blob: b });
            }
        }
        for (src, piece, source, follow) in sends {
            let t = self.now + self.delay(n, src);
            self.at(t, Ev::PieceReq { src, node: n, blob: b, piece, source, generation: g, follow });
        }
        match outcome {
            Some(true) => self.complete(n, b),
            Some(false) => self.exhausted(n, b, g),
            None => {}
        }
    }

    fn exhausted(&mut self, n: usize, b: usize, g: u64) {
        self.cancel_requests(n, b);
        // The agent's home takes its tiers in turn in one round: what partial holders have, then the home zone's
        // home; only a round that brought nothing counts.
        let partial_tier_of_home = matches!(self.nodes[n].blobs[b].dl.as_ref(),
            Some(Dl { phase: Phase::Peers { follow: false, home, .. }, .. }) if *home == n);
        if partial_tier_of_home && self.ask_home_zone(n, b, g) {
            return;
        }
        let have = self.nodes[n].blobs[b].have;
        let Some(dl) = self.nodes[n].blobs[b].dl.as_mut() else { return };
        dl.fruitless = if have > dl.round_have { 0 } else { dl.fruitless + 1 };
        dl.round_have = have;
        if dl.fruitless >= PEER_ROUNDS {
            self.go_upstream(n, b, g);
        } else {
            self.ask(n, b, g);
        }
    }

    /// Drops every piece request of the node's current tier.
    fn cancel_requests(&mut self, n: usize, b: usize) {
        let Some(dl) = self.nodes[n].blobs[b].dl.as_mut() else { return };
        if let Phase::Peers { flows, sources, .. } = &mut dl.phase {
            let flows = std::mem::take(flows);
            let sources = sources.clone();
            for ((_, source), f) in flows {
                if let Some(f) = f {
                    self.net.stop(f);
                    let s = sources[source];
                    self.nodes[s].uploads = self.nodes[s].uploads.saturating_sub(1);
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_piece_req(&mut self, src: usize, n: usize, b: usize, piece: u64, source: usize, g: u64, follow: bool) {
        if !self.nodes[src].alive {
            let t = self.now + CONNECT_TIMEOUT;
            self.at(t, Ev::PieceFail { node: n, blob: b, piece, source, generation: g });
            return;
        }
        if src == n {
            self.waits_on_self += 1;
        }
        let bs = &self.nodes[src].blobs[b];
        if bs.complete || bs.have > piece {
            self.start_piece(src, n, b, piece, source, g);
        } else if follow {
            let w = Waiter { node: n, piece, source, generation: g, deadline: self.now + FOLLOW };
            let bs = &mut self.nodes[src].blobs[b];
            bs.waiters.push(w);
            // Deadlines only grow: a pending timeout is the earliest.
            if bs.timeout_at.is_none() {
                bs.timeout_at = Some(w.deadline);
                self.at(w.deadline, Ev::FollowTimeout { src, blob: b });
            }
        } else {
            let t = self.now + self.delay(src, n);
            self.at(t, Ev::PieceFail { node: n, blob: b, piece, source, generation: g });
        }
    }

    fn start_piece(&mut self, src: usize, n: usize, b: usize, piece: u64, source: usize, g: u64) {
        let wanted = matches!(self.nodes[n].blobs[b].dl.as_ref(), Some(dl) if dl.generation == g
            && matches!(&dl.phase, Phase::Peers { flows, .. } if flows.get(&(piece, source)) == Some(&None)));
        if !wanted || !self.nodes[n].alive {
            return;
        }
        let l = &self.layers[b];
        let len = (l.size - piece * u64::from(l.piece)).min(u64::from(l.piece));
        let links = self.links(src, n);
        let conn = ((src as u64) << 32) | n as u64;
        let f =
            self.net.start(conn, &links, len as f64, Carry::Piece { node: n, blob: b, piece, source, generation: g });
        if let Some(Dl { phase: Phase::Peers { flows, .. }, .. }) = self.nodes[n].blobs[b].dl.as_mut() {
            flows.insert((piece, source), Some(f));
        }
        let s = &mut self.nodes[src];
        s.uploads += 1;
        s.max_uploads = s.max_uploads.max(s.uploads);
    }

    fn on_piece_done(&mut self, n: usize, b: usize, piece: u64, source: usize, g: u64) {
        let now = self.instant(self.now);
        let mut stop = Vec::new();
        let mut written = 0;
        let src;
        {
            let Some(dl) = self.nodes[n].blobs[b].dl.as_mut() else { return };
            if dl.generation != g {
                return;
            }
            let Phase::Peers { sched, flows, sources, .. } = &mut dl.phase else { return };
            if flows.remove(&(piece, source)).is_none() {
                return;
            }
            src = sources[source];
            for c in sched.delivered(piece, source, now) {
                if let Action::Cancel { piece, source } = c
                    && let Some(f) = flows.remove(&(piece, source))
                {
                    stop.push((f, sources[source]));
                }
            }
            while sched.next_to_write().is_some() {
                written += 1;
            }
        }
        self.nodes[src].uploads = self.nodes[src].uploads.saturating_sub(1);
        for (f, s) in stop {
            if let Some(f) = f {
                self.net.stop(f);
                self.nodes[s].uploads = self.nodes[s].uploads.saturating_sub(1);
            }
        }
        if written > 0 {
            self.nodes[n].blobs[b].have += written;
            self.serve_waiters(n, b);
        }
        self.drive(n, b, g);
    }

    fn on_piece_fail(&mut self, n: usize, b: usize, piece: u64, source: usize, g: u64) {
        {
            let Some(dl) = self.nodes[n].blobs[b].dl.as_mut() else { return };
            if dl.generation != g {
                return;
            }
            let Phase::Peers { sched, flows, .. } = &mut dl.phase else { return };
            if flows.remove(&(piece, source)).is_none() {
                return;
            }
            sched.failed(piece, source);
        }
        self.drive(n, b, g);
    }

    /// Requests waiting at `n` for pieces it now has are served.
    fn serve_waiters(&mut self, n: usize, b: usize) {
        let bs = &mut self.nodes[n].blobs[b];
        let (have, complete) = (bs.have, bs.complete);
        if bs.waiters.is_empty() {
            return;
        }
        let (ready, wait): (Vec<Waiter>, Vec<Waiter>) =
            std::mem::take(&mut bs.waiters).into_iter().partition(|w| complete || w.piece < have);
        self.nodes[n].blobs[b].waiters = wait;
        for w in ready {
            self.start_piece(n, w.node, b, w.piece, w.source, w.generation);
        }
    }

    fn on_follow_timeout(&mut self, src: usize, b: usize) {
        // Event times are whole nanoseconds (rounded down): a deadline within one of now is due, or its timeout
        // would fire again at the same instant forever.
        let now = self.now + 1e-9;
        let (late, wait): (Vec<Waiter>, Vec<Waiter>) =
            std::mem::take(&mut self.nodes[src].blobs[b].waiters).into_iter().partition(|w| w.deadline <= now);
        let next = wait.iter().map(|w| w.deadline).min_by(f64::total_cmp);
        let bs = &mut self.nodes[src].blobs[b];
        bs.waiters = wait;
        bs.timeout_at = next;
        if let Some(t) = next {
            self.at(t, Ev::FollowTimeout { src, blob: b });
        }
        for w in late {
            self.on_piece_fail(w.node, b, w.piece, w.source, w.generation);
        }
    }

    fn complete(&mut self, n: usize, b: usize) {
        let bs = &mut self.nodes[n].blobs[b];
        bs.complete = true;
        bs.have = self.layers[b].count;
        if let Some(dl) = bs.dl.as_mut() {
            dl.phase = Phase::Done;
        }
        self.serve_waiters(n, b);
        let h = self.holding(b, true);
        self.nodes[n].ann.hold(h);
        self.flush_announcements(n);
        if self.nodes[n].blobs.iter().all(|x| x.complete) && self.nodes[n].done_at.is_none() {
            self.nodes[n].done_at = Some(self.now);
        }
    }

    fn on_upstream_start(&mut self, n: usize, b: usize, g: u64) {
        if self.dl_generation(n, b) != Some(g) || !self.nodes[n].alive {
            return;
        }
        let l = &self.layers[b];
        let offset = self.nodes[n].blobs[b].have * u64::from(l.piece);
        let mut links = vec![self.upstream, self.zone_in[self.nodes[n].zone], self.nodes[n].down];
        links.extend(self.cpu);
        // Each download from upstream is a connection of its own.
        self.generation += 1;
        let conn = u64::MAX - self.generation;
        let f = self.net.start(
            conn,
            &links,
            (l.size - offset) as f64,
            Carry::Upstream { node: n, blob: b, offset, generation: g },
        );
        if let Some(Dl { phase: Phase::Upstream { flow }, .. }) = self.nodes[n].blobs[b].dl.as_mut() {
            *flow = Some(f);
        }
    }

    fn on_death(&mut self, n: usize) {
        self.deaths_pending -= 1;
        if !self.nodes[n].alive {
            return;
        }
        self.nodes[n].alive = false;
        // Its downloads stop; pieces it was sending stall at the receivers.
        for b in 0..self.layers.len() {
            self.cancel_requests(n, b);
            if let Some(Dl { phase: Phase::Upstream { flow: Some(f) }, .. }) = self.nodes[n].blobs[b].dl.as_ref() {
                let f = *f;
                self.net.stop(f);
            }
            self.nodes[n].blobs[b].dl = None;
            for w in std::mem::take(&mut self.nodes[n].blobs[b].waiters) {
                let t = self.now + STALL;
                self.at(
                    t,
                    Ev::PieceFail { node: w.node, blob: b, piece: w.piece, source: w.source, generation: w.generation },
                );
            }
        }
        let mut stalled = Vec::new();
        for (m, node) in self.nodes.iter().enumerate() {
            for (b, bs) in node.blobs.iter().enumerate() {
                if let Some(Dl { generation, phase: Phase::Peers { sources, flows, .. }, .. }) = &bs.dl {
                    for (&(piece, source), f) in flows {
                        if sources[source] == n && f.is_some() {
                            stalled.push((m, b, piece, source, *generation, f.expect("checked")));
                        }
                    }
                }
            }
        }
        for (m, b, piece, source, g, f) in stalled {
            self.net.stop(f);
            if let Some(Dl { phase: Phase::Peers { flows, .. }, .. }) = self.nodes[m].blobs[b].dl.as_mut() {
                flows.insert((piece, source), None);
            }
            let t = self.now + STALL;
            self.at(t, Ev::PieceFail { node: m, blob: b, piece, source, generation: g });
        }
        let mut alive = self.views.last().expect("a view").1.clone();
        alive[n] = false;
        let v = view_of(&self.nodes, &alive);
        self.views.push((v, alive));
        let vi = self.views.len() - 1;
        for m in 0..self.nodes.len() {
            if self.nodes[m].alive {
                let t = self.now + DETECT - 0.5 + self.rng.unit();
                self.at(t, Ev::ViewUpdate { node: m, view: vi });
            }
        }
    }

    fn on_view_update(&mut self, n: usize, view: usize) {
        if !self.nodes[n].alive || view <= self.nodes[n].view {
            return;
        }
        let old = self.nodes[n].view;
        self.nodes[n].view = view;
        self.nodes[n].view_changed_at = self.now;
        let alive = self.views[view].1.clone();
        let me = self.nodes[n].id;
        let zone = self.zone_name(n);
        {
            let v = &self.views[view].0;
            let index = &self.index;
            self.nodes[n].dir.prune(|p| *p == me || index.get(p).is_some_and(|&i| alive[i]));
            self.nodes[n].dir.keep_homed(|d| v.home_in(&zone, d) == Some(me));
            let home = |d: &Digest| (v.home_in(&zone, d).unwrap_or(me), 1u64);
            self.nodes[n].ann.view_changed(home);
        }
        self.flush_announcements(n);
        // Downloads whose home moved ask again (`Mesh::home_moved`); those waiting for a dead home to move go on.
        for b in 0..self.layers.len() {
            let new_home = self.home_of(n, b);
            let old_home = self.views[old]
                .0
                .home_in(&zone, &self.layers[b].digest)
                .and_then(|id| self.index.get(&id).copied())
                .unwrap_or(n);
            let Some(dl) = self.nodes[n].blobs[b].dl.as_ref() else { continue };
            let g = dl.generation;
            let again = match &dl.phase {
                Phase::WaitHomeMove { from } => new_home != *from,
                Phase::Peers { home, .. } => new_home != old_home && *home == old_home,
                _ => false,
            };
            if again {
                self.cancel_requests(n, b);
                self.ask(n, b, g);
            }
        }
        // Locates it deferred while its view disagreed are looked at again.
        for (asker, b, g, _) in self.nodes[n].deferred.clone() {
            self.on_locate(n, asker, b, g);
        }
    }

    fn on_home_gone(&mut self, n: usize, b: usize, g: u64) {
        if self.dl_generation(n, b) != Some(g) {
            return;
        }
        let from = self.home_of(n, b);
        if let Some(dl) = self.nodes[n].blobs[b].dl.as_mut() {
            dl.phase = Phase::WaitHomeMove { from };
        }
        // `Mesh::sources`: waits up to twice the death detection for the home to move, else upstream.
        let t = self.now + 2.0 * DETECT;
        self.at(t, Ev::UpstreamStart { node: n, blob: b, generation: g });
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Start(n) => {
                for b in 0..self.layers.len() {
                    self.start_blob(n, b);
                }
            }
            Ev::Locate { home, asker, blob, generation } => self.on_locate(home, asker, blob, generation),
            Ev::Located { asker, blob, generation, home, sources } => {
                self.on_located(asker, blob, generation, home, sources);
            }
            Ev::PieceReq { src, node, blob, piece, source, generation, follow } => {
                self.on_piece_req(src, node, blob, piece, source, generation, follow);
            }
            Ev::PieceFail { node, blob, piece, source, generation } => {
                self.on_piece_fail(node, blob, piece, source, generation);
            }
            Ev::FollowTimeout { src, blob } => self.on_follow_timeout(src, blob),
            Ev::Announce { home, from, holdings } => {
                if self.nodes[home].alive {
                    self.nodes[home].control += 1;
                    let id = self.nodes[from].id;
                    for h in &holdings {
                        self.nodes[home].dir.apply(id, h);
                    }
                }
            }
            Ev::Wake { node, blob } => {
                let bs = &mut self.nodes[node].blobs[blob];
                if bs.wake_at.is_some_and(|w| w <= self.now + 1e-9) {
                    bs.wake_at = None;
                }
                if let Some(g) = self.dl_generation(node, blob) {
                    self.drive(node, blob, g);
                }
            }
            Ev::UpstreamStart { node, blob, generation } => {
                // From a wait for a home to move: only if still waiting.
                let waiting = matches!(
                    self.nodes[node].blobs[blob].dl.as_ref(),
                    Some(Dl { phase: Phase::WaitHomeMove { .. }, .. })
                );
                if waiting && let Some(dl) = self.nodes[node].blobs[blob].dl.as_mut() {
                    dl.phase = Phase::Upstream { flow: None };
                }
                if matches!(
                    self.nodes[node].blobs[blob].dl.as_ref(),
                    Some(Dl { phase: Phase::Upstream { flow: None }, .. })
                ) {
                    self.on_upstream_start(node, blob, generation);
                }
            }
            Ev::HomeGone { node, blob, generation } => self.on_home_gone(node, blob, generation),
            Ev::LocateGiveUp { home } => {
                let now = self.now;
                let due: Vec<_> = self.nodes[home].deferred.iter().filter(|d| d.3 <= now).copied().collect();
                for (asker, b, g, _) in due {
                    self.on_locate(home, asker, b, g);
                }
            }
            Ev::HomeOwn { node, blob, generation } => {
                let asking = matches!(self.nodes[node].blobs[blob].dl.as_ref(),
                    Some(Dl { generation: g, phase: Phase::Asking, .. }) if *g == generation);
                if asking && self.nodes[node].alive {
                    self.home_own(node, blob, generation);
                }
            }
            Ev::Death(n) => self.on_death(n),
            Ev::ViewUpdate { node, view } => self.on_view_update(node, view),
        }
    }

    /// Upstream downloads make their bytes available to followers as they arrive.
    fn upstream_progress(&mut self) {
        let progress: Vec<(Carry, f64)> = self.net.upstream_progress().collect();
        for (c, done) in progress {
            let Carry::Upstream { node, blob, offset, .. } = c else { continue };
            let piece = u64::from(self.layers[blob].piece);
            let have = (offset + done as u64) / piece;
            if have > self.nodes[node].blobs[blob].have {
                self.nodes[node].blobs[blob].have = have;
                self.serve_waiters(node, blob);
            }
        }
    }

    /// Runs to the end: every surviving node complete, or the time limit.
    pub fn run(mut self) -> Report {
        let wall = Instant::now();
        let dt = self.p.dt;
        let mut next_check = 1.0;
        loop {
            let step_end = self.now + dt;
            // Events of this step, in order.
            let mut handled = 0u64;
            while let Some(Reverse((t, _, _))) = self.events.peek() {
                handled += 1;
                assert!(handled < 50_000_000, "events do not advance time at t = {:.3} s: a decision loop", self.now);
                let t = *t as f64 / 1e9;
                if t >= step_end {
                    break;
                }
                let Some(Reverse((_, _, id))) = self.events.pop() else { break };
                self.now = self.now.max(t);
                let ev = self.payloads[id].take();
                self.free_slots.push(id);
                if let Some(ev) = ev {
                    self.handle(ev);
                }
            }
            let start = step_end - dt;
            let mut finished = self.net.advance(dt);
            finished.sort_by(|a, b| a.at.total_cmp(&b.at));
            for f in finished {
                let t = (start + f.at).max(self.now);
                match f.carry {
                    Carry::Piece { node, blob, piece, source, generation } => {
                        self.now = t;
                        self.on_piece_done(node, blob, piece, source, generation);
                    }
                    Carry::Upstream { node, blob, generation, .. } => {
                        self.now = t;
                        if self.dl_generation(node, blob) == Some(generation) {
                            self.complete(node, blob);
                        }
                    }
                }
            }
            self.net.recycle();
            self.now = step_end;
            self.upstream_progress();
            if self.now >= next_check {
                next_check += 1.0;
                if self.debug {
                    self.trace_second();
                }
                // While views disagree (a death reaching nodes at different times), nodes on the old tree and
                // nodes on the new one may wait on each other until their view changes: only cycles that exist
                // with every view agreeing count.
                let latest = self.views.len() - 1;
                if self.nodes.iter().all(|n| !n.alive || n.view == latest) {
                    self.check_cycles();
                }
            }
            let all_done = self.nodes.iter().all(|n| !n.alive || n.done_at.is_some());
            if (all_done && self.deaths_pending == 0) || self.now > self.p.limit {
                break;
            }
        }
        if self.debug {
            self.dump_stuck();
        }
        self.report(wall.elapsed().as_secs_f64())
    }
}
