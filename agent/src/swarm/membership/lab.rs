//! A virtual network of [`Membership`]s: N nodes running the very membership code the agent runs, with virtual time,
//! 1 ms per message, optional loss and CPU-starved nodes (whose messages wait before they are handled). The unit
//! tests and `shoal-sim membership` drive it; no sockets, no clocks.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use libp2p::{PeerId, identity};
use rand::{Rng, SeedableRng};

use super::{ALL_BUCKETS, About, MemberRecord, Membership, MembershipTiming, Output, SwimRng};
use crate::mesh::Liveness;
use crate::swarm::binding::Binding;

enum Event {
    Deliver {
        to: usize,
        from: PeerId,
        data: Bytes,
    },
    /// Node `from`'s table (the buckets in `buckets`) reaches `to` (the join's full-state exchange, or a pull of
    /// differing buckets). Built when it arrives, not when asked for: a simulation of thousands of joining nodes
    /// holds one table at a time instead of one per node (5,000 tables of 1 MB each at 5,000 nodes).
    Table {
        to: usize,
        from: usize,
        buckets: u64,
        /// Whether its bytes count as `from`'s.
        counted: bool,
    },
    /// Node `node`'s [`Membership::tick`] is due.
    Wake {
        node: usize,
    },
}

/// Nodes on a virtual network.
pub struct Lab {
    nodes: Vec<Option<Membership>>,
    index: HashMap<PeerId, usize>,
    /// Each node's record key ([`MemberRecord::key`]).
    keys: Vec<u128>,
    /// When each node's pending wake-up is (one per node: earlier ones replace it).
    wake_at: Vec<Option<Duration>>,
    now: Duration,
    queue: BinaryHeap<Reverse<(Duration, u64)>>,
    events: HashMap<u64, Event>,
    seq: u64,
    /// Fraction of messages lost.
    pub loss: f64,
    /// Nodes whose process is starved: every message they get waits 0.2–1.5 s before it is handled.
    pub starved: Vec<bool>,
    rng: rand::rngs::StdRng,
    /// Messages each node sent.
    pub sent: Vec<u64>,
    /// Bytes each node sent (tables included).
    pub sent_bytes: Vec<u64>,
    /// Tables sent.
    pub tables: u64,
    /// Per node: tables in a row that brought no new member.
    stale: Vec<u32>,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab").field("nodes", &self.nodes.len()).field("now", &self.now).finish_non_exhaustive()
    }
}

/// A node's record: zone `z`, a 10.x address of its own.
fn record(key: &identity::Keypair, n: usize) -> MemberRecord {
    let addr = SocketAddr::from(([10, (n >> 16) as u8, (n >> 8) as u8, n as u8], 7000));
    MemberRecord::sign(key, 1, 0, &About { node: String::new(), zone: "z".into(), gossip: addr, transfer: addr })
}

impl Lab {
    /// `n` nodes that know nobody yet. With `verify` off, records' signatures are not checked (thousands of nodes
    /// each checking thousands of records would measure ed25519, not the protocol).
    pub fn new(n: usize, timing: MembershipTiming, loss: f64, seed: u64, verify: bool) -> Self {
        let mut lab = Self {
            nodes: Vec::with_capacity(n),
            index: HashMap::new(),
            keys: Vec::with_capacity(n),
            wake_at: vec![None; n],
            now: Duration::ZERO,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            seq: 0,
            loss,
            starved: vec![false; n],
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            sent: vec![0; n],
            sent_bytes: vec![0; n],
            tables: 0,
            stale: vec![0; n],
        };
        let pool = super::RecordPool::default();
        for i in 0..n {
            let key = identity::Keypair::generate_ed25519();
            let me = record(&key, i);
            lab.index.insert(me.peer(), i);
            lab.keys.push(me.key());
            let rng = SwimRng::seeded(seed.wrapping_mul(1_000_003).wrapping_add(i as u64));
            let mut m = Membership::new(key, me, timing, rng, Binding::Open);
            if !verify {
                m.trust_signatures();
            }
            m.share_records(pool.clone());
            lab.nodes.push(Some(m));
        }
        lab
    }

    /// The virtual time.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// Number of nodes (dead ones included).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there is no node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`'s peer id.
    pub fn peer(&self, i: usize) -> Option<PeerId> {
        self.nodes[i].as_ref().map(|m| m.me().peer())
    }

    /// Node `i`, if alive.
    pub fn node(&self, i: usize) -> Option<&Membership> {
        self.nodes[i].as_ref()
    }

    /// Stops node `i` at once (a crash: it says nothing).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i] = None;
    }

    fn push(&mut self, at: Duration, e: Event) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq)));
        self.events.insert(self.seq, e);
    }

    fn delay_to(&mut self, to: usize) -> Duration {
        Duration::from_millis(if self.starved[to] { self.rng.random_range(200..1500) } else { 1 })
    }

    fn drain(&mut self, i: usize) {
        let Some(m) = self.nodes[i].as_mut() else { return };
        let from = m.me().peer();
        let mut out = Vec::new();
        while let Some(o) = m.poll_output() {
            out.push(o);
        }
        let wake = m.next_wake();
        for o in out {
            match o {
                Output::Send { to, data, .. } => {
                    self.sent[i] += 1;
                    self.sent_bytes[i] += data.len() as u64;
                    if self.rng.random::<f64>() < self.loss {
                        continue;
                    }
                    if let Some(&to) = self.index.get(&to) {
                        let at = self.now + self.delay_to(to);
                        self.push(at, Event::Deliver { to, from, data });
                    }
                }
                Output::PullTable { to, buckets, .. } => {
                    if let Some(&j) = self.index.get(&to) {
                        self.pull_table(i, j, buckets);
                    }
                }
            }
        }
        if let Some(at) = wake
            && self.wake_at[i].is_none_or(|w| at < w)
        {
            self.wake_at[i] = Some(at.max(self.now));
            self.push(at.max(self.now), Event::Wake { node: i });
        }
    }

    /// Node `i` joins through node `seed` as the agent does: it announces itself and asks for the table, which
    /// arrives a millisecond later.
    pub fn join(&mut self, i: usize, seed: usize) {
        let (Some(s), Some(_)) = (self.nodes[seed].as_ref(), self.nodes[i].as_ref()) else { return };
        let (p, a) = (s.me().peer(), s.me().gossip());
        let Some(m) = self.nodes[i].as_mut() else { return };
        m.join(p, a, self.now);
        self.drain(i);
        self.push(
            self.now + Duration::from_millis(2),
            Event::Table { to: i, from: seed, buckets: ALL_BUCKETS, counted: false },
        );
    }

    /// Node `i` asks node `j` for its table (the answer arrives 2 ms later, counted as `j`'s bytes).
    fn pull_table(&mut self, i: usize, j: usize, buckets: u64) {
        self.push(self.now + Duration::from_millis(2), Event::Table { to: i, from: j, buckets, counted: true });
    }

    /// Node `j` answers node `i`'s request for the buckets in `buckets`, and `i` applies the answer.
    fn deliver_table(&mut self, i: usize, j: usize, buckets: u64, counted: bool, at: Duration) {
        let Some(m) = self.nodes[i].as_ref() else { return };
        let (me, request) = (m.me().peer(), m.table_request(buckets));
        let Some(s) = self.nodes[j].as_mut() else { return };
        let from = s.me().peer();
        let Ok(table) = s.table_for(me, &request) else { return };
        if counted {
            self.sent[j] += 1;
            self.sent_bytes[j] += table.len() as u64;
            self.tables += 1;
        }
        if let Some(m) = self.nodes[i].as_mut()
            && let Ok(r) = m.apply_table(from, &table, at)
        {
            self.stale[i] = if r.new == 0 { self.stale[i] + 1 } else { 0 };
        }
    }

    /// Each live node that knows an alive member pulls the table from a random one (what the agent does every 3 s
    /// for its first minute, until two tables in a row bring it no new member).
    pub fn pull_tables(&mut self) {
        for i in 0..self.nodes.len() {
            if self.stale[i] >= 2 {
                continue;
            }
            let Some(m) = self.nodes[i].as_ref() else { continue };
            let alive: Vec<PeerId> = m.states().filter(|(_, l)| *l == Liveness::Alive).map(|(p, _)| p).collect();
            if alive.is_empty() {
                continue;
            }
            let from = alive[self.rng.random_range(0..alive.len())];
            let Some(&j) = self.index.get(&from) else { continue };
            self.push(
                self.now + Duration::from_millis(2),
                Event::Table { to: i, from: j, buckets: ALL_BUCKETS, counted: false },
            );
        }
    }

    /// Every node joins through node `seed`.
    pub fn join_all_through(&mut self, seed: usize) {
        for i in 0..self.nodes.len() {
            if i != seed {
                self.join(i, seed);
            }
        }
    }

    /// Runs the network until virtual time `until`.
    pub fn run_until(&mut self, until: Duration) {
        while let Some(Reverse((at, seq))) = self.queue.peek().copied() {
            if at > until {
                break;
            }
            self.queue.pop();
            self.now = at;
            let Some(e) = self.events.remove(&seq) else { continue };
            let node = match e {
                Event::Deliver { to, from, data } => {
                    if let Some(m) = self.nodes[to].as_mut() {
                        let _ = m.handle_data(from, &data, at);
                    }
                    to
                }
                Event::Table { to, from, buckets, counted } => {
                    self.deliver_table(to, from, buckets, counted, at);
                    to
                }
                Event::Wake { node } => {
                    if self.wake_at[node] != Some(at) {
                        continue;
                    }
                    self.wake_at[node] = None;
                    if let Some(m) = self.nodes[node].as_mut() {
                        m.tick(at);
                    }
                    node
                }
            };
            self.drain(node);
        }
        self.now = until;
    }

    /// How each live node (other than `of`) sees member `of`: counts by state (`unknown` when it does not know it).
    pub fn seen_as(&self, of: PeerId) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for m in self.nodes.iter().flatten() {
            if m.me().peer() == of {
                continue;
            }
            let s = self.index.get(&of).and_then(|&i| m.liveness_of_key(self.keys[i])).map(|l| format!("{l:?}"));
            *counts.entry(s.unwrap_or_else(|| "unknown".into())).or_default() += 1;
        }
        counts
    }

    /// Live nodes.
    pub fn live(&self) -> usize {
        self.nodes.iter().flatten().count()
    }

    /// How many members each node sees alive (`None` for a stopped node).
    pub fn alive_counts(&self) -> Vec<Option<usize>> {
        self.nodes
            .iter()
            .map(|m| m.as_ref().map(|m| m.states().filter(|(_, l)| *l == Liveness::Alive).count()))
            .collect()
    }

    /// Whether every live node sees every other live node alive.
    pub fn all_alive(&self) -> bool {
        self.not_seeing_all() == 0
    }

    /// Live nodes that do not (yet) see every other live node alive.
    pub fn not_seeing_all(&self) -> usize {
        let live: std::collections::HashSet<PeerId> = self.nodes.iter().flatten().map(|m| m.me().peer()).collect();
        self.nodes
            .iter()
            .flatten()
            .filter(|m| {
                let alive = m.states().filter(|(p, l)| *l == Liveness::Alive && live.contains(p)).count();
                alive + 1 != live.len()
            })
            .count()
    }
}
