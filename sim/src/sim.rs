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
//! With [`Swarm::Exchange`] downloads trade pieces out of order instead ([`Exchange`], `trade.rs`): what the
//! agent will run, not what it runs yet.
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
use shoal_agent::swarm::bitfield::Bitfield;
use shoal_agent::swarm::directory::{Directory, Holding};
use shoal_agent::swarm::exchange::Exchange;
use shoal_agent::swarm::homes::test_id;
use shoal_agent::swarm::scheduler::PieceScheduler;

use crate::net::{Carry, FlowId, LinkId, Net};
pub use crate::report::Report;

mod diagnostics;
mod node;
mod trade;

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
    /// How downloads take pieces from peers.
    pub swarm: Swarm,
}

/// How a download takes pieces from peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swarm {
    /// In order, from sources ahead of it ([`PieceScheduler`]): what the agent runs.
    Tree,
    /// Out of order, rarest first, from every peer that has them ([`Exchange`]): simulated only so far.
    Exchange,
}

impl Swarm {
    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tree => "tree",
            Self::Exchange => "exchange",
        }
    }
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
    /// Trading pieces out of order with peers ([`Swarm::Exchange`]).
    Trade(Box<Trade>),
    Upstream {
        flow: Option<FlowId>,
    },
    Done,
}

/// A download trading pieces with its peers.
#[derive(Debug)]
struct Trade {
    x: Exchange,
    /// Node of each of the exchange's peers, and the other way round.
    peers: Vec<usize>,
    index: HashMap<usize, usize>,
    flows: BTreeMap<(u64, usize), Option<FlowId>>,
    /// The home it asked.
    home: usize,
    /// A `TradeIdle` check is pending.
    idle_check: bool,
    /// When the last piece came (or the trade began).
    progress_at: f64,
    /// A home outside the digest's home zone asked that zone's home.
    asked_far: bool,
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
    /// Pieces from the first on that are here.
    have: u64,
    /// Every piece here ([`Swarm::Exchange`] only: the tree holds a prefix).
    bits: Bitfield,
    /// Nodes told about each new piece (peers trading this blob with it), and the pieces not told yet.
    watchers: Vec<usize>,
    untold: Vec<u64>,
    /// Injected pieces told to one watcher each: (watcher, piece).
    untold_one: Vec<(usize, u64)>,
    /// The watcher told of the last injected piece.
    turn: usize,
    /// It injected pieces into its zone.
    injected: bool,
    /// The pieces its download from upstream asks for (a trader's missing pieces).
    up_missing: Vec<u64>,
    /// A `HaveFlush` is pending.
    flush_pending: bool,
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
    /// `from` starts trading the blob with `to` and sends what it has; `to` answers with what it has.
    Hello {
        to: usize,
        from: usize,
        blob: usize,
        bits: Box<Bitfield>,
    },
    HelloBack {
        to: usize,
        from: usize,
        blob: usize,
        bits: Box<Bitfield>,
        /// `from` downloads the blob by trading too (else `to` need not tell it its pieces).
        trades: bool,
    },
    /// `from` got these pieces.
    Have {
        to: usize,
        from: usize,
        blob: usize,
        pieces: std::rc::Rc<[u64]>,
    },
    /// The node tells its watchers the pieces it got since the last flush.
    HaveFlush {
        node: usize,
        blob: usize,
    },
    /// A trade with no request out looks again: asks its home for more peers, or gives up on them.
    TradeIdle {
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
    /// Homes already looked up: (view, zone, layer) → the home, if the zone has members (a lookup hashes the
    /// digest against the ring; the exchange's drivers ask for every layer at every step).
    homes: std::cell::RefCell<HashMap<(usize, usize, usize), Option<usize>>>,
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
                    blobs: layers
                        .iter()
                        .map(|l| BlobState { bits: Bitfield::new(l.count), ..Default::default() })
                        .collect(),
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
            homes: std::cell::RefCell::default(),
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
        let key = (self.nodes[n].view, self.nodes[n].zone, b);
        let home = *self.homes.borrow_mut().entry(key).or_insert_with(|| {
            let v = &self.view(n).0;
            v.home_in(&self.zone_name(n), &self.layers[b].digest).and_then(|id| self.index.get(&id).copied())
        });
        home.unwrap_or(n)
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
                let Some(dl) = &bs.dl else { continue };
                let (sources, flows) = match &dl.phase {
                    Phase::Peers { sources, flows, .. } => (sources, flows),
                    Phase::Trade(t) => (&t.peers, &t.flows),
                    _ => continue,
                };
                for (&(piece, source), f) in flows {
                    if sources[source] == n
                        && let Some(f) = f
                    {
                        stalled.push((m, b, piece, source, dl.generation, *f));
                    }
                }
            }
        }
        for (m, b, piece, source, g, f) in stalled {
            self.net.stop(f);
            match self.nodes[m].blobs[b].dl.as_mut() {
                Some(Dl { phase: Phase::Peers { flows, .. }, .. }) => {
                    flows.insert((piece, source), None);
                }
                Some(Dl { phase: Phase::Trade(t), .. }) => {
                    t.flows.insert((piece, source), None);
                }
                _ => {}
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
                // A trade goes on with its peers, and asks the new home for more.
                Phase::Trade(t) if new_home != old_home && t.home == old_home => {
                    if let Some(Dl { phase: Phase::Trade(t), .. }) = self.nodes[n].blobs[b].dl.as_mut() {
                        t.home = new_home;
                    }
                    if new_home != n {
                        self.nodes[n].control += 1;
                        let at = self.now + self.delay(n, new_home);
                        self.at(at, Ev::Locate { home: new_home, asker: n, blob: b, generation: g });
                    }
                    false
                }
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
            Ev::Hello { to, from, blob, bits } => self.on_hello(to, from, blob, &bits),
            Ev::HelloBack { to, from, blob, bits, trades } => self.on_hello_back(to, from, blob, &bits, trades),
            Ev::Have { to, from, blob, pieces } => self.on_have(to, from, blob, &pieces),
            Ev::HaveFlush { node, blob } => self.on_have_flush(node, blob),
            Ev::TradeIdle { node, blob, generation } => self.on_trade_idle(node, blob, generation),
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
            if self.p.swarm == Swarm::Exchange {
                // The missing pieces, in order, as their bytes arrive.
                let k = (done as u64 / piece) as usize;
                let bs = &self.nodes[node].blobs[blob];
                let new: Vec<u64> = bs.up_missing.iter().take(k).copied().filter(|&i| !bs.bits.get(i)).collect();
                for i in new {
                    self.got_piece(node, blob, i, true);
                }
            } else if have > self.nodes[node].blobs[blob].have {
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
