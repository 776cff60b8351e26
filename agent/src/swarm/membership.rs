//! Membership: SWIM with Lifeguard's refinements over member records each signed by its member's node key. Our own
//! sans-IO state machine: inputs are messages, a joining peer and `now`; outputs are messages to send
//! ([`Output`]), the time to be called again ([`Membership::next_wake`]) and the member table.
//!
//! **Probing.** Twice a period a node probes one of its neighbours (successor and predecessor on a few hash
//! rings: `membership/table.rs`), in turn; a neighbour that does not answer within the probe timeout is pinged
//! through up to [`MembershipTiming::indirect_probes`] other neighbours; with no answer within the period it becomes
//! suspect. Every member is the neighbour of 6–8 members, so it is probed about twice a period, and a node's
//! messages go to the same few members: its connections stay open (no handshake per message) and do not grow with
//! the cluster.
//!
//! **Spreading.** Joins, suspicions and deaths ride on every message (fewest-sent first; among those, refutations
//! and other news before suspicions) and, while there is news, on short gossip rounds to a few neighbours, twice
//! as often while more than 24 updates wait unsent; each update is sent `4 × ⌈log10(N)⌉` times. A joining node
//! gets a feed of members in the answer to its announcement, and the whole table on request
//! ([`Membership::table`]).
//! Every 10 periods a node compares its table's digests (64 buckets by member key) with a random neighbour's and
//! pulls the records of two of the buckets that differ (at most once per 5 periods: under churn many differ for a
//! moment), or of all of them when the neighbour holds more members (this node is behind): a member whose updates
//! all went out before this node heard them is found there, and an idle cluster exchanges 64 digests per node every
//! 10 periods, nothing more.
//!
//! **Lifeguard.** A suspicion's timeout starts at [`SUSPICION_STRETCH`] × `suspicion` and shrinks towards
//! `suspicion` as independent suspicions of the same member arrive (a member that only one prober could not reach
//! has longer to refute); a node that hears a neighbour suspected probes it at once, and every message to a
//! suspect carries the suspicion (it learns it at once and refutes); a node whose own probes fail, that gets an
//! answer to a probe that already failed (it handled the answer late) or that has to refute, is probably the slow
//! one: its local health score stretches its probe period and timeout, so a starved node stops accusing healthy
//! members; only an answer within the probe timeout heals it (a slow answer says nothing either way).
//!
//! **Who declares a death.** Only the suspect's neighbours (which probe it, and to which its refutation goes
//! first) declare it dead when the suspicion's timeout runs out; any other member that heard the suspicion waits for
//! their word, up to a backstop of twice the longest timeout, where it pings the suspect itself (the ping carries
//! the suspicion, the answer the refutation) and declares it dead only if that fails. A node whose local health is
//! poor waits
//! `1 + health` times as long: a starved node handles the refutation late and would otherwise declare a healthy
//! neighbour dead.
//!
//! **Patience.** A neighbour that refuted a suspicion is alive and slow (a starved process, a congested link): for
//! 60 periods it is probed with 3 times the time to answer. Every accusation must be refuted, and
//! every refutation must reach every node before its suspicion times out; at thousands of nodes with a few percent
//! of them slow, accusing the same slow members again and again was what made refutations miss their deadline.
//! Updates queue with this node's own first (its refutation leaves before anything else), then fewest sent and
//! newest first; at equal transmissions, suspicions after other news.
//!
//! **What is signed.** What a member says about *itself* (zone, addresses, incarnation, and its renewal number, SWIM's
//! incarnation) is a [`MemberRecord`] signed with the key its peer id is derived from: nobody can speak for another
//! member, forge its addresses, or keep a dead member alive (refuting needs a higher renewal, which only the
//! member's key can sign). A message's sender must be the peer the transport authenticated. What members say about
//! *others* (suspect, dead) cannot be signed by the subject: a false suspicion or death is refuted by the subject.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use libp2p::{PeerId, identity};
use rand::Rng;
use rand::seq::{IndexedRandom, IteratorRandom};

pub use self::exchange::TableApplied;
use self::record::Checks;
pub use self::record::{About, MemberRecord, RecordError, SignedFields, Version, tcp_multiaddr};
use self::suspicion::Suspicion;
use self::table::{Broadcasts, Class, Table};
use self::wire::{Body, Update};
use super::binding::Binding;
use crate::mesh::{Liveness, MemberInfo};

mod exchange;
mod record;
mod suspicion;
mod table;
mod wire;

/// Records this node accepts at most (a member inventing identities cannot grow the table without bound).
pub const MAX_MEMBERS: usize = 16_384;
/// The largest membership message (a probe with its piggybacked updates, or a join's feed): about a dozen
/// records. Larger messages let a backlog of updates (a burst of joins, suspicions under load) ride on every
/// probe, which multiplies the bytes and the decoding while the cluster is busiest; the whole table has its own
/// exchange.
pub const MAX_MESSAGE: usize = 2 << 10;
/// A suspicion heard from one member alone lasts this many times `suspicion` (Lifeguard's dynamic suspicion).
pub const SUSPICION_STRETCH: u32 = 3;
/// Neighbours probed per period (each probe has a period to be answered).
const PROBES_PER_PERIOD: u32 = 2;
/// Probes out at most (the regular ones and those of neighbours heard suspected).
const MAX_PROBES: usize = 6;
/// The local health score's ceiling: a node's probe period and timeout stretch up to (1 + this) times.
const MAX_HEALTH: u32 = 8;
/// Each update is sent `RETRANSMIT × ⌈log10(N + 1)⌉` times.
const RETRANSMIT: u32 = 4;
/// A neighbour that refuted a suspicion is given this many times the usual time to answer a probe (it is alive
/// and slow: a CPU-starved node, a congested link), for [`SLOW_FOR`] periods after its refutation.
const PATIENCE: u32 = 3;
/// How long (in periods) a neighbour that refuted is probed with [`PATIENCE`].
const SLOW_FOR: u32 = 60;
/// Failed probes remembered, so that an answer arriving after its probe failed is recognised.
const FAILED_KEPT: usize = 8;
/// Updates never sent beyond which gossip rounds come twice as often (about two messages' worth).
const BACKLOG: usize = 24;
/// A dead member is remembered this long (and announced to now and then, so a healed partition merges).
const REMEMBER_DEAD: Duration = Duration::from_secs(600);
/// A dead member is announced to every this many periods.
const ANNOUNCE_TO_DEAD_EVERY: u32 = 10;
/// A node compares its table's digest with a random neighbour's every this many periods (anti-entropy: a member
/// whose updates all went out before this node heard them is found here).
const SYNC_EVERY: u32 = 10;
/// At most one table pulled per this many periods.
const PULL_AT_MOST_EVERY: u32 = 5;
/// Buckets pulled at most at once. Under churn (refutations, joins) many buckets differ for a moment while the
/// updates spread; pulling all of them would be the whole table every few seconds, so a node pulls a few, at
/// random, and a difference that lasts is caught by the next exchanges.
const MAX_PULL_BUCKETS: usize = 2;
/// Every bucket of a table: [`Membership::table_request`] for the whole table.
pub const ALL_BUCKETS: u64 = u64::MAX;

/// The protocol's timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MembershipTiming {
    /// Two neighbours probed per period; a probe not answered within it is a suspicion.
    pub probe_period: Duration,
    /// Wait for a direct answer before asking others to probe (shorter than the period).
    pub probe_timeout: Duration,
    /// A suspect member's time to refute before it is dead, once three members suspect it (up to
    /// [`SUSPICION_STRETCH`] times this when fewer do).
    pub suspicion: Duration,
    /// Members asked to probe one that did not answer.
    pub indirect_probes: usize,
    /// While there are updates to spread: this many neighbours are sent them, this many times a period.
    pub gossip: (usize, u32),
}

impl MembershipTiming {
    /// The gossip the agent uses: three neighbours, four times a period, while there is news.
    pub const GOSSIP: (usize, u32) = (3, 4);
}

/// Something the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Deliver `data` to `to` (at its gossip address `addr`).
    Send {
        /// The peer.
        to: PeerId,
        /// Its gossip listener.
        addr: SocketAddr,
        /// The message.
        data: Bytes,
    },
    /// Pull the records of the buckets in `buckets` (a bit per bucket) from `to` (its digests of those differ from
    /// this node's): ask with [`Membership::table_request`] and hand the answer to [`Membership::apply_table`].
    PullTable {
        /// The peer.
        to: PeerId,
        /// Its gossip listener.
        addr: SocketAddr,
        /// The buckets.
        buckets: u64,
    },
}

/// The workspace's random numbers, seeded from the OS or fixed.
#[derive(Debug)]
pub struct SwimRng(rand::rngs::StdRng);

impl SwimRng {
    /// A generator seeded from the OS.
    pub fn from_os() -> Self {
        use rand::SeedableRng;
        Self(rand::rngs::StdRng::from_os_rng())
    }

    /// A generator with a fixed seed (tests, simulation).
    pub fn seeded(seed: u64) -> Self {
        use rand::SeedableRng;
        Self(rand::rngs::StdRng::seed_from_u64(seed))
    }
}

/// Records shared by the nodes of one process (a simulation of thousands of nodes holds each record once, not
/// once per node that knows it).
pub type RecordPool = Arc<Mutex<HashMap<(u128, Version), Arc<MemberRecord>>>>;

/// A probe out.
#[derive(Debug)]
struct Probe {
    key: u128,
    peer: PeerId,
    version: Version,
    seq: u64,
    /// Ask others after this.
    direct_until: Duration,
    /// Suspect after this.
    until: Duration,
    /// Members asked to ping it (their relayed answers count).
    helpers: Vec<PeerId>,
    /// When the ping went out.
    sent: Duration,
}

/// A ping this node sends for another (an indirect probe).
#[derive(Debug)]
struct Relay {
    origin: PeerId,
    origin_addr: SocketAddr,
    origin_seq: u64,
    target: PeerId,
    until: Duration,
}

/// This node's membership.
pub struct Membership {
    key: identity::Keypair,
    me: MemberRecord,
    timing: MembershipTiming,
    rng: rand::rngs::StdRng,
    checks: Checks,
    table: Table,
    broadcasts: Broadcasts,
    suspicions: HashMap<u128, Suspicion>,
    /// Suspicion deadlines in order (stale ones are skipped when they come up).
    deadlines: BTreeSet<(Duration, u128)>,
    /// Deaths in the order they were declared (removal after [`REMEMBER_DEAD`]; announcements to the dead).
    dead: VecDeque<(Duration, u128)>,
    /// Probes out.
    probes: Vec<Probe>,
    next_probe: Duration,
    cursor: usize,
    seq: u64,
    relays: HashMap<u64, Relay>,
    next_gossip: Duration,
    next_dead_announce: Duration,
    next_sync: Duration,
    /// When a table was last pulled.
    last_pull: Option<Duration>,
    /// Lifeguard's local health score: 0 is healthy.
    health: u32,
    /// Probes that ended in a suspicion, latest last: an answer to one of them came too late.
    failed: VecDeque<Probe>,
    /// Neighbours that refuted a suspicion, until when they are probed with [`PATIENCE`].
    slow: HashMap<u128, Duration>,
    pool: Option<RecordPool>,
    out: VecDeque<Output>,
    changed: bool,
    now: Duration,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership").field("me", &self.me).field("members", &self.table.len()).finish_non_exhaustive()
    }
}

impl Membership {
    /// Membership of the node holding `key`, described by `me` (signed with `key`), admitting members `binding`
    /// admits.
    pub fn new(
        key: identity::Keypair,
        me: MemberRecord,
        timing: MembershipTiming,
        rng: SwimRng,
        binding: Binding,
    ) -> Self {
        let mine = me.key();
        Self {
            table: Table::new(mine),
            key,
            me,
            timing,
            rng: rng.0,
            checks: Checks { binding, ..Checks::default() },
            broadcasts: Broadcasts::new(mine),
            suspicions: HashMap::new(),
            deadlines: BTreeSet::new(),
            dead: VecDeque::new(),
            probes: Vec::new(),
            next_probe: Duration::ZERO,
            cursor: 0,
            seq: 0,
            relays: HashMap::new(),
            next_gossip: Duration::ZERO,
            next_dead_announce: Duration::ZERO,
            next_sync: timing.probe_period * 2,
            last_pull: None,
            health: 0,
            failed: VecDeque::new(),
            slow: HashMap::new(),
            pool: None,
            out: VecDeque::new(),
            changed: false,
            now: Duration::ZERO,
        }
    }

    /// Stops checking records' signatures: only for simulations, where thousands of nodes each checking thousands
    /// of records would measure ed25519 rather than the protocol.
    pub fn trust_signatures(&mut self) {
        self.checks.trust = true;
    }

    /// Holds records in `pool`, shared with other nodes of this process (simulations).
    pub fn share_records(&mut self, pool: RecordPool) {
        self.pool = Some(pool);
    }

    fn intern(&self, rec: MemberRecord) -> Arc<MemberRecord> {
        let Some(pool) = &self.pool else { return Arc::new(rec) };
        let mut pool = pool.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let shared = pool.entry((rec.key(), rec.version())).or_insert_with(|| Arc::new(rec.clone()));
        if **shared == rec { shared.clone() } else { Arc::new(rec) }
    }

    /// Every other member's peer id and liveness.
    pub fn states(&self) -> impl Iterator<Item = (PeerId, Liveness)> + '_ {
        self.table.iter().map(|e| (e.rec.peer(), e.state))
    }

    /// How this node sees `peer`, if it knows it.
    pub fn liveness_of(&self, peer: &PeerId) -> Option<Liveness> {
        self.states().find(|(p, _)| p == peer).map(|(_, l)| l)
    }

    /// How this node sees the member with record key `key` ([`MemberRecord::key`]), if it knows it.
    pub fn liveness_of_key(&self, key: u128) -> Option<Liveness> {
        self.table.get(key).map(|e| e.state)
    }

    /// This node's current record.
    pub fn me(&self) -> &MemberRecord {
        &self.me
    }

    /// This node's neighbours (the members it probes and gossips with).
    pub fn neighbours(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.table.neighbours().iter().filter_map(|k| self.table.get(*k)).map(|e| e.rec.peer())
    }

    /// Lifeguard's local health score (0: healthy; higher: this node missed answers or had to refute, and probes
    /// more slowly).
    pub fn health(&self) -> u32 {
        self.health
    }

    /// Asks `peer` (reached at `addr`, its record unknown yet) to let this node in: it answers with members it
    /// knows, and tells the others.
    pub fn join(&mut self, peer: PeerId, addr: SocketAddr, now: Duration) {
        self.advance(now);
        if peer != self.me.peer() {
            self.send(peer, addr, &Body::Announce, None);
        }
    }

    /// Tells the cluster this node leaves (its neighbours spread it).
    pub fn leave(&mut self, now: Duration) {
        self.advance(now);
        let u = Update::Dead { key: self.me.key(), version: self.me.version() };
        self.broadcasts.push(self.me.key(), wire::encode_update(&u), Class::Urgent);
        for k in self.table.neighbours().to_vec() {
            if let Some((p, a)) = self.addr_of(k) {
                self.send(p, a, &Body::Gossip, None);
            }
        }
    }

    fn advance(&mut self, now: Duration) {
        self.now = self.now.max(now);
    }

    fn addr_of(&self, key: u128) -> Option<(PeerId, SocketAddr)> {
        self.table.get(key).map(|e| (e.rec.peer(), e.rec.gossip()))
    }

    fn period(&self) -> Duration {
        self.timing.probe_period * (1 + self.health)
    }

    fn retransmits(&self) -> u32 {
        let n = (self.table.live() + 1) as f64;
        RETRANSMIT * (n + 1.0).log10().ceil().max(1.0) as u32
    }

    fn healthier(&mut self) {
        self.health = self.health.saturating_sub(1);
    }

    fn sicker(&mut self) {
        self.health = (self.health + 1).min(MAX_HEALTH);
    }

    /// Queues `body` for `to`, with what this node holds against `to` first (a suspect learns it is suspected at
    /// once) and then the updates still to spread.
    fn send(&mut self, to: PeerId, addr: SocketAddr, body: &Body, about: Option<u128>) {
        let mut room = MAX_MESSAGE.saturating_sub(wire::header_len(&self.me, body));
        let mut updates: Vec<Bytes> = Vec::new();
        if let Some(k) = about
            && let Some(e) = self.table.get(k)
        {
            let u = match (e.state, self.suspicions.get(&k)) {
                (Liveness::Suspect, Some(s)) => {
                    Some(Update::Suspect { key: k, version: s.version, by: s.by.first().copied().unwrap_or(k) })
                }
                (Liveness::Dead, _) => Some(Update::Dead { key: k, version: e.down.unwrap_or(e.rec.version()) }),
                _ => None,
            };
            if let Some(u) = u {
                let b = wire::encode_update(&u);
                room = room.saturating_sub(b.len());
                updates.push(b);
            }
        }
        let limit = self.retransmits();
        updates.extend(self.broadcasts.take(room, limit, about.filter(|_| !updates.is_empty())));
        let refs: Vec<&[u8]> = updates.iter().map(|b| &b[..]).collect();
        let data = Bytes::from(wire::encode(&self.me, body, &refs));
        self.out.push_back(Output::Send { to, addr, data });
    }

    /// A message from `from` (the peer the transport authenticated). Refused whole when it is undecodable, too
    /// large, sent in another member's name, or holds a record whose signature or fields are bad; a record the
    /// binding does not admit is left out alone. Returns how many records were left out.
    pub fn handle_data(&mut self, from: PeerId, data: &[u8], now: Duration) -> Result<usize, RecordError> {
        self.advance(now);
        if data.len() > MAX_MESSAGE {
            return Err(RecordError::Field("message larger than 2 KiB"));
        }
        let env = wire::decode(data).map_err(|e| RecordError::Decode(e.to_string()))?;
        if env.from.peer() == self.me.peer() {
            // A loopback through a stale address: no one's fault.
            return Ok(0);
        }
        if env.from.peer() != from {
            return Err(RecordError::Impersonation { claimed: env.from.peer() });
        }
        self.checks.check(&env.from)?;
        if let Body::PingReq { target, .. } = &env.body {
            self.checks.check(target)?;
        }
        let mut left_out = 0;
        let mut admitted = Vec::with_capacity(env.updates.len());
        for u in env.updates {
            if let Update::Alive(r) = &u {
                match self.checks.check(r) {
                    Ok(()) => {}
                    Err(RecordError::Unbound(why)) => {
                        tracing::debug!(member = ?r, why, "unbound member left out of a message");
                        left_out += 1;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            admitted.push(u);
        }
        let sender = env.from.key();
        self.apply_alive(env.from, true);
        for u in admitted {
            self.apply(u, true);
        }
        match env.body {
            Body::Ping { seq } => {
                if let Some((p, a)) = self.addr_of(sender) {
                    self.send(p, a, &Body::Ack { seq }, Some(sender));
                }
            }
            Body::Ack { seq } => self.on_ack(from, seq),
            Body::PingReq { seq, target } if target.key() == self.me.key() => {
                // Asked to probe this node itself (the asker's view of who is who is off): answer for it.
                if let Some((p, a)) = self.addr_of(sender) {
                    self.send(p, a, &Body::Ack { seq }, Some(sender));
                }
            }
            Body::PingReq { seq, target } => {
                self.seq += 1;
                let relay = Relay {
                    origin: from,
                    origin_addr: self.addr_of(sender).map_or(target.gossip(), |(_, a)| a),
                    origin_seq: seq,
                    target: target.peer(),
                    until: self.now + self.timing.probe_period,
                };
                self.relays.insert(self.seq, relay);
                let s = self.seq;
                self.send(target.peer(), target.gossip(), &Body::Ping { seq: s }, Some(target.key()));
            }
            Body::Announce => self.feed(sender),
            Body::Feed | Body::Gossip => {}
            Body::Sync { digests, live, reply } => {
                let mine = self.digests();
                let differ = mine
                    .iter()
                    .zip(&digests)
                    .enumerate()
                    .filter(|(_, (a, b))| a.to_be_bytes() != **b)
                    .fold(0u64, |m, (i, _)| m | 1 << i);
                if digests.len() == table::BUCKETS
                    && differ != 0
                    && let Some((p, a)) = self.addr_of(sender)
                {
                    // A sender that holds more members than this node: this node is behind (it missed joins), and
                    // every differing bucket is worth pulling; otherwise the difference is churn in flight.
                    let behind = live as usize > self.table.live() + 1;
                    self.pull(p, a, differ, behind);
                    if !reply {
                        self.send_sync(p, a, sender, true);
                    }
                }
            }
        }
        Ok(left_out)
    }

    /// Lifeguard's local health, judged from answers: an answer within the probe timeout (this node keeps up)
    /// makes it healthier; a later one says nothing (the member or the path may be slow); an answer to a probe
    /// that already failed means this node accused a live member because it handled the answer late: sicker.
    fn on_ack(&mut self, from: PeerId, seq: u64) {
        if let Some(i) = self.probes.iter().position(|p| p.seq == seq && (p.peer == from || p.helpers.contains(&from)))
        {
            let p = self.probes.swap_remove(i);
            if self.now.saturating_sub(p.sent) <= self.timing.probe_timeout {
                self.healthier();
            }
            return;
        }
        if let Some(i) = self.failed.iter().position(|p| p.seq == seq && (p.peer == from || p.helpers.contains(&from)))
        {
            self.failed.remove(i);
            self.sicker();
            return;
        }
        if let Some(r) = self.relays.get(&seq)
            && r.target == from
            && let Some(r) = self.relays.remove(&seq)
        {
            self.send(r.origin, r.origin_addr, &Body::Ack { seq: r.origin_seq }, None);
        }
    }

    /// Answers an announcement from `key`: what this node holds against it, then random members' records.
    fn feed(&mut self, key: u128) {
        let Some((peer, addr)) = self.addr_of(key) else { return };
        let mut room = MAX_MESSAGE.saturating_sub(wire::header_len(&self.me, &Body::Feed) + 200);
        let n = self.table.len();
        let skip = if n > 0 { self.rng.random_range(0..n) } else { 0 };
        let mut records = Vec::new();
        for e in self.table.iter().cycle().skip(skip).take(n) {
            if e.state == Liveness::Dead || e.rec.key() == key {
                continue;
            }
            let b = wire::encode_update(&Update::Alive(Box::new((*e.rec).clone())));
            if b.len() > room {
                break;
            }
            room -= b.len();
            records.push(b);
        }
        // The records go as the feed's updates, ahead of the broadcast queue's.
        let mut head = self.against(key);
        head.extend(records);
        let refs: Vec<&[u8]> = head.iter().map(|b| &b[..]).collect();
        let data = Bytes::from(wire::encode(&self.me, &Body::Feed, &refs));
        self.out.push_back(Output::Send { to: peer, addr, data });
    }

    /// What this node holds against member `key` (suspect or dead), encoded.
    fn against(&self, key: u128) -> Vec<Bytes> {
        let Some(e) = self.table.get(key) else { return Vec::new() };
        match e.state {
            Liveness::Dead => {
                vec![wire::encode_update(&Update::Dead { key, version: e.down.unwrap_or(e.rec.version()) })]
            }
            Liveness::Suspect => self
                .suspicions
                .get(&key)
                .map(|s| {
                    let by = s.by.first().copied().unwrap_or(key);
                    vec![wire::encode_update(&Update::Suspect { key, version: s.version, by })]
                })
                .unwrap_or_default(),
            Liveness::Alive => Vec::new(),
        }
    }

    fn broadcast(&mut self, u: &Update) {
        let class = match u {
            Update::Suspect { .. } => Class::Suspicion,
            Update::Dead { .. } => Class::Urgent,
            Update::Alive(_) => Class::News,
        };
        self.broadcasts.push(u.key(), wire::encode_update(u), class);
    }

    fn apply(&mut self, u: Update, spread: bool) {
        match u {
            Update::Alive(r) => {
                self.apply_alive(*r, spread);
            }
            Update::Suspect { key, version, by } => self.apply_suspect(key, version, by),
            Update::Dead { key, version } => self.apply_dead(key, version, spread),
        }
    }

    /// A signed record, checked. Returns whether this node did not know the member.
    fn apply_alive(&mut self, rec: MemberRecord, spread: bool) -> bool {
        let key = rec.key();
        if key == self.me.key() {
            return false;
        }
        let newer = match self.table.get(key) {
            None => {
                if self.table.len() >= MAX_MEMBERS {
                    return false;
                }
                if spread {
                    self.broadcast(&Update::Alive(Box::new(rec.clone())));
                }
                let rec = self.intern(rec);
                self.table.insert(rec);
                self.changed = true;
                return true;
            }
            Some(e) => match e.state {
                Liveness::Dead => e.down.is_none_or(|d| rec.version() > d) && rec.supersedes(&e.rec),
                _ => rec.supersedes(&e.rec),
            },
        };
        if newer {
            if spread {
                // A renewed record (same incarnation, higher renewal) is a refutation: urgent.
                let refutes = self.table.get(key).is_some_and(|e| e.rec.version().0 == rec.version().0);
                let class = if refutes { Class::Urgent } else { Class::News };
                let u = Update::Alive(Box::new(rec.clone()));
                self.broadcasts.push(key, wire::encode_update(&u), class);
            }
            if self.table.get(key).is_some_and(|e| e.state == Liveness::Suspect) && self.table.is_neighbour(key) {
                // A neighbour refuted a suspicion: alive and slow. Probed with patience for a while, it is not
                // accused again and again (each accusation costs a refutation that must reach every node).
                self.slow.insert(key, self.now + self.timing.probe_period * SLOW_FOR);
            }
            self.suspicions.remove(&key);
            let rec = self.intern(rec);
            self.table.replace(rec);
            self.changed = true;
        }
        false
    }

    /// What is due at `now`: the probe, its indirect pings or the suspicion it ends in, suspicions that ran out,
    /// a gossip round, forgetting and re-announcing to dead members.
    pub fn tick(&mut self, now: Duration) {
        self.advance(now);
        let now = self.now;
        for i in 0..self.probes.len() {
            if self.probes[i].helpers.is_empty() && now >= self.probes[i].direct_until {
                self.ask_helpers(i);
            }
        }
        while let Some(i) = self.probes.iter().position(|p| now >= p.until) {
            let p = self.probes.swap_remove(i);
            self.sicker();
            let me = self.me.key();
            self.apply_suspect(p.key, p.version, me);
            if self.failed.len() >= FAILED_KEPT {
                self.failed.pop_front();
            }
            self.failed.push_back(p);
        }
        if now >= self.next_probe {
            self.next_probe = now + self.period() / PROBES_PER_PERIOD;
            let key = {
                let n = self.table.neighbours();
                (!n.is_empty()).then(|| n[(self.cursor + 1) % n.len()])
            };
            if let Some(k) = key {
                self.cursor = self.cursor.wrapping_add(1);
                self.start_probe(k);
            }
        }
        self.expire_suspicions(now);
        if !self.broadcasts.is_empty() && now >= self.next_gossip {
            // Twice as often while updates never sent pile up (a burst of suspicions and refutations when many
            // members slow down at once): they must spread before the suspicions' timeouts run out.
            let burst = if self.broadcasts.fresh() > BACKLOG { 2 } else { 1 };
            self.next_gossip = now + self.period() / (self.timing.gossip.1.max(1) * burst);
            let targets: Vec<u128> =
                self.table.neighbours().choose_multiple(&mut self.rng, self.timing.gossip.0.max(1)).copied().collect();
            for k in targets {
                if let Some((p, a)) = self.addr_of(k) {
                    self.send(p, a, &Body::Gossip, Some(k));
                }
            }
        }
        while let Some(&(at, key)) = self.dead.front() {
            if at + REMEMBER_DEAD > now {
                break;
            }
            self.dead.pop_front();
            if self.table.get(key).is_some_and(|e| e.state == Liveness::Dead)
                && let Some(e) = self.table.remove(key)
            {
                self.checks.forget(&e.rec.peer());
            }
        }
        if now >= self.next_dead_announce {
            self.next_dead_announce = now + self.timing.probe_period * ANNOUNCE_TO_DEAD_EVERY;
            let dead: Vec<u128> = self.dead.iter().map(|(_, k)| *k).collect();
            if let Some(&k) = dead.choose(&mut self.rng)
                && self.table.get(k).is_some_and(|e| e.state == Liveness::Dead)
                && let Some((p, a)) = self.addr_of(k)
            {
                self.send(p, a, &Body::Announce, Some(k));
            }
        }
        if now >= self.next_sync {
            self.next_sync = now + self.timing.probe_period * SYNC_EVERY;
            if let Some(&k) = self.table.neighbours().choose(&mut self.rng)
                && let Some((p, a)) = self.addr_of(k)
            {
                self.send_sync(p, a, k, false);
            }
        }
        if !self.relays.is_empty() {
            self.relays.retain(|_, r| r.until > now);
        }
        if !self.slow.is_empty() {
            let table = &self.table;
            self.slow.retain(|k, until| *until > now && table.is_neighbour(*k));
        }
    }

    /// Pings neighbour `key` (unless a probe of it is already out).
    fn start_probe(&mut self, key: u128) {
        if self.probes.len() >= MAX_PROBES || self.probes.iter().any(|p| p.key == key) {
            return;
        }
        let Some(e) = self.table.get(key).filter(|e| e.state != Liveness::Dead) else { return };
        let (peer, addr, version) = (e.rec.peer(), e.rec.gossip(), e.rec.version());
        self.seq += 1;
        let patience = if self.slow.get(&key).is_some_and(|until| *until > self.now) { PATIENCE } else { 1 };
        let period = self.period() * patience;
        let timeout = (self.timing.probe_timeout * (1 + self.health) * patience).min(period / 2);
        self.probes.push(Probe {
            key,
            peer,
            version,
            seq: self.seq,
            direct_until: self.now + timeout,
            until: self.now + period,
            helpers: Vec::new(),
            sent: self.now,
        });
        let seq = self.seq;
        self.send(peer, addr, &Body::Ping { seq }, Some(key));
    }

    fn ask_helpers(&mut self, i: usize) {
        let (target, seq) = (self.probes[i].key, self.probes[i].seq);
        let Some(rec) = self.table.get(target).map(|e| (*e.rec).clone()) else { return };
        let candidates: Vec<u128> = self.table.neighbours().iter().copied().filter(|k| *k != target).collect();
        let picked: Vec<u128> =
            candidates.into_iter().choose_multiple(&mut self.rng, self.timing.indirect_probes.max(1));
        let mut helpers = Vec::new();
        for k in picked {
            if let Some((peer, addr)) = self.addr_of(k) {
                helpers.push(peer);
                self.send(peer, addr, &Body::PingReq { seq, target: Box::new(rec.clone()) }, Some(k));
            }
        }
        if helpers.is_empty() {
            // Nobody to ask: a placeholder so the question is not asked again this period.
            helpers.push(self.me.peer());
        }
        self.probes[i].helpers = helpers;
    }

    /// When [`Self::tick`] is next due (`None`: nothing is, until a message arrives).
    pub fn next_wake(&self) -> Option<Duration> {
        let mut t: Option<Duration> = None;
        let mut at = |d: Duration| t = Some(t.map_or(d, |t| t.min(d)));
        for p in &self.probes {
            at(p.until);
            if p.helpers.is_empty() {
                at(p.direct_until);
            }
        }
        if self.table.live() > 0 {
            at(self.next_probe);
        }
        if let Some((d, _)) = self.deadlines.first() {
            at(*d);
        }
        if !self.broadcasts.is_empty() {
            at(self.next_gossip);
        }
        if let Some((d, _)) = self.dead.front() {
            at(*d + REMEMBER_DEAD);
            at(self.next_dead_announce);
        }
        if self.table.live() > 0 {
            at(self.next_sync);
        }
        t
    }

    /// The next message to send, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// Whether the member table changed since the last call (a member joined, left, changed record or state).
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// Every other member this node knows, with its liveness.
    pub fn members(&self) -> Vec<(MemberInfo, Liveness)> {
        let mut v: Vec<_> = self.table.iter().map(|e| (e.rec.info(), e.state)).collect();
        v.sort_by_key(|(i, _)| i.id);
        v
    }

    /// Number of members known, dead ones included.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether no other member is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Updates waiting to be spread.
    pub fn pending_updates(&self) -> usize {
        self.broadcasts.len()
    }
}

pub mod lab;
#[cfg(test)]
mod tests;
