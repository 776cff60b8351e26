//! Downloads that trade pieces out of order ([`Swarm::Exchange`]): the asker says hello to the peers its home
//! handed out (sending what it has, getting what they have back; a peer that trades the same blob takes the asker
//! as a peer of its own), every node tells the peers trading with it which pieces it got (batched every
//! [`HAVE_EVERY`]), and the [`Exchange`] asks each peer only for pieces it has, rarest first. A trade with nothing
//! to ask for asks its home for more peers every [`IDLE`]; an asker with no new piece for the follow timeout, and
//! a home whose partial holders gave nothing for [`PEER_ROUNDS`] idle rounds, go on as the tree does (the home
//! zone's home, then upstream).

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use shoal_agent::swarm::bitfield::Bitfield;
use shoal_agent::swarm::directory::PEERS;
use shoal_agent::swarm::exchange::{Action, Exchange, ExchangeConfig};

use super::{Dl, Ev, FOLLOW, PEER_ROUNDS, Phase, Sim, Trade};

/// A trade with no request out asks for more peers this often.
const IDLE: f64 = 1.0;
/// Pieces got are told to the peers at most this often (one message per peer per batch).
const HAVE_EVERY: f64 = 0.02;

impl Sim {
    fn trade_mut(&mut self, n: usize, b: usize) -> Option<(u64, &mut Trade)> {
        match self.nodes[n].blobs[b].dl.as_mut() {
            Some(Dl { generation, phase: Phase::Trade(t), .. }) => Some((*generation, t)),
            _ => None,
        }
    }

    /// Starts trading with `sources`, handed out by `home`.
    pub(super) fn trade(&mut self, n: usize, b: usize, sources: Vec<usize>, home: usize) {
        let l = &self.layers[b];
        let seed = self.p.seed ^ ((n as u64) << 16) ^ b as u64;
        let asked_far = home != self.home_of(n, b);
        let cfg = ExchangeConfig::for_piece(l.piece);
        let cfg = if asked_far { cfg.across_zones() } else { cfg };
        let x = Exchange::new(cfg, l.count, &self.nodes[n].blobs[b].bits, seed);
        self.generation += 1;
        let g = self.generation;
        let now = self.now;
        let Some(dl) = self.nodes[n].blobs[b].dl.as_mut() else { return };
        dl.generation = g;
        dl.phase = Phase::Trade(Box::new(Trade {
            x,
            peers: Vec::new(),
            index: HashMap::new(),
            flows: BTreeMap::new(),
            home,
            idle_check: false,
            progress_at: now,
            asked_far,
        }));
        self.add_peers(n, b, sources);
        self.drive_trade(n, b);
    }

    /// Says hello to those of `nodes` not yet trading with `n`.
    pub(super) fn add_peers(&mut self, n: usize, b: usize, nodes: Vec<usize>) {
        let count = self.layers[b].count;
        for s in nodes {
            let Some((_, t)) = self.trade_mut(n, b) else { return };
            if s == n || t.index.contains_key(&s) {
                continue;
            }
            let i = t.x.add_peer(&Bitfield::new(count));
            t.peers.push(s);
            t.index.insert(s, i);
            let bs = &mut self.nodes[n].blobs[b];
            if !bs.watchers.contains(&s) {
                bs.watchers.push(s);
            }
            let bits = Box::new(bs.bits.clone());
            self.nodes[n].control += 1;
            let at = self.now + self.delay(n, s);
            self.at(at, Ev::Hello { to: s, from: n, blob: b, bits });
        }
    }

    /// Whether `n` brings another blob than `b` into its zone (it is that blob's home and downloads it): `b` then
    /// takes one piece at a time, so that the zone's copy comes in at half the node's link or more (with a full
    /// window of its own, `b` took all but a thirteenth; paused outright, `b` waited behind a slow upstream).
    fn injecting_other(&self, n: usize, b: usize) -> bool {
        (0..self.layers.len()).any(|o| {
            o != b
                && !self.nodes[n].blobs[o].complete
                && self.nodes[n].blobs[o].dl.is_some()
                && self.home_of(n, o) == n
                && self.home_of(n, b) != n
        })
    }

    /// Lets the exchange act: requests out, completion, an idle check when nothing is out.
    pub(super) fn drive_trade(&mut self, n: usize, b: usize) {
        let now = self.instant(self.now);
        let throttled = self.injecting_other(n, b);
        let piece = self.layers[b].piece;
        let Some((g, t)) = self.trade_mut(n, b) else { return };
        let cfg = ExchangeConfig::for_piece(piece);
        let cfg = if t.asked_far { cfg.across_zones() } else { cfg };
        t.x.set_window(if throttled { 1 } else { cfg.window });
        let mut sends = Vec::new();
        for a in t.x.poll(now) {
            if let Action::Fetch { piece, source } = a {
                t.flows.insert((piece, source), None);
                sends.push((t.peers[source], piece, source));
            }
        }
        let complete = t.x.is_complete();
        let idle = !complete && t.x.requests() == 0 && !t.idle_check;
        if idle {
            t.idle_check = true;
        }
        for (src, piece, source) in sends {
            let at = self.now + self.delay(n, src);
            self.at(at, Ev::PieceReq { src, node: n, blob: b, piece, source, generation: g, follow: false });
        }
        if idle {
            let at = self.now + IDLE;
            self.at(at, Ev::TradeIdle { node: n, blob: b, generation: g });
        }
        if complete {
            self.complete(n, b);
        }
    }

    pub(super) fn on_hello(&mut self, to: usize, from: usize, b: usize, bits: &Bitfield) {
        if !self.nodes[to].alive {
            return;
        }
        let bs = &mut self.nodes[to].blobs[b];
        if !bs.watchers.contains(&from) {
            bs.watchers.push(from);
        }
        let mine = if bs.complete { Bitfield::full(self.layers[b].count) } else { bs.bits.clone() };
        // Members of another zone are served, never traded with: a zone takes what it lacks through its home.
        let same_zone = self.nodes[to].zone == self.nodes[from].zone;
        let trades = match self.trade_mut(to, b) {
            Some((_, t)) if same_zone => {
                match t.index.get(&from) {
                    Some(&i) => t.x.peer_has_all(i, bits),
                    None => {
                        let i = t.x.add_peer(bits);
                        t.peers.push(from);
                        t.index.insert(from, i);
                    }
                }
                true
            }
            _ => false,
        };
        self.nodes[to].control += 1;
        let at = self.now + self.delay(to, from);
        self.at(at, Ev::HelloBack { to: from, from: to, blob: b, bits: Box::new(mine), trades });
        if trades {
            self.drive_trade(to, b);
        }
    }

    pub(super) fn on_hello_back(&mut self, n: usize, s: usize, b: usize, bits: &Bitfield, trades: bool) {
        if !self.nodes[n].alive {
            return;
        }
        if !trades {
            self.nodes[n].blobs[b].watchers.retain(|w| *w != s);
        }
        if let Some((_, t)) = self.trade_mut(n, b)
            && let Some(&i) = t.index.get(&s)
        {
            t.x.peer_has_all(i, bits);
            self.drive_trade(n, b);
        }
    }

    pub(super) fn on_have(&mut self, n: usize, s: usize, b: usize, pieces: &[u64]) {
        if !self.nodes[n].alive {
            return;
        }
        if let Some((_, t)) = self.trade_mut(n, b)
            && let Some(&i) = t.index.get(&s)
        {
            for &p in pieces {
                t.x.peer_has(i, p);
            }
            self.drive_trade(n, b);
        }
    }

    /// Piece `piece` of blob `b` is here: its watchers hear of it with the next batch — all of them, or, for a
    /// piece `injected` into the zone (from upstream or from another zone), one in turn: the zone's first copy of
    /// a piece leaves this node once, and the zone spreads it (BitTorrent's super-seeding), so the node's upload
    /// carries new pieces rather than many copies of the newest one.
    pub(super) fn got_piece(&mut self, n: usize, b: usize, piece: u64, injected: bool) {
        let bs = &mut self.nodes[n].blobs[b];
        if !bs.bits.set(piece) {
            return;
        }
        bs.have = bs.bits.leading();
        if injected && !bs.watchers.is_empty() {
            bs.injected = true;
            bs.turn = (bs.turn + 1) % bs.watchers.len();
            bs.untold_one.push((bs.watchers[bs.turn], piece));
        } else {
            bs.untold.push(piece);
        }
        if !bs.flush_pending && !bs.watchers.is_empty() {
            bs.flush_pending = true;
            let at = self.now + HAVE_EVERY;
            self.at(at, Ev::HaveFlush { node: n, blob: b });
        }
    }

    pub(super) fn on_have_flush(&mut self, n: usize, b: usize) {
        let bs = &mut self.nodes[n].blobs[b];
        bs.flush_pending = false;
        if !self.nodes[n].alive {
            return;
        }
        let bs = &mut self.nodes[n].blobs[b];
        let mut one: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
        for (w, p) in std::mem::take(&mut bs.untold_one) {
            one.entry(w).or_default().push(p);
        }
        let pieces: Rc<[u64]> = std::mem::take(&mut bs.untold).into();
        let watchers = if bs.complete { std::mem::take(&mut bs.watchers) } else { bs.watchers.clone() };
        for (w, p) in one {
            self.nodes[n].control += 1;
            let at = self.now + self.delay(n, w);
            self.at(at, Ev::Have { to: w, from: n, blob: b, pieces: p.into() });
        }
        if pieces.is_empty() {
            return;
        }
        for w in watchers {
            self.nodes[n].control += 1;
            let at = self.now + self.delay(n, w);
            self.at(at, Ev::Have { to: w, from: n, blob: b, pieces: pieces.clone() });
        }
    }

    /// A piece of a trade came.
    pub(super) fn trade_piece_done(&mut self, n: usize, b: usize, piece: u64, source: usize) {
        let now = self.instant(self.now);
        let t_now = self.now;
        let Some((_, t)) = self.trade_mut(n, b) else { return };
        if t.flows.remove(&(piece, source)).is_none() {
            return;
        }
        let src = t.peers[source];
        let mut stop = Vec::new();
        for c in t.x.delivered(piece, source, now) {
            if let Action::Cancel { piece, source } = c
                && let Some(f) = t.flows.remove(&(piece, source))
            {
                stop.push((f, t.peers[source]));
            }
        }
        t.progress_at = t_now;
        self.nodes[src].uploads = self.nodes[src].uploads.saturating_sub(1);
        for (f, s) in stop {
            if let Some(f) = f {
                self.net.stop(f);
                self.nodes[s].uploads = self.nodes[s].uploads.saturating_sub(1);
            }
        }
        let injected = self.nodes[src].zone != self.nodes[n].zone;
        self.got_piece(n, b, piece, injected);
        self.drive_trade(n, b);
    }

    pub(super) fn trade_piece_failed(&mut self, n: usize, b: usize, piece: u64, source: usize) {
        let Some((_, t)) = self.trade_mut(n, b) else { return };
        if t.flows.remove(&(piece, source)).is_none() {
            return;
        }
        t.x.failed(piece, source);
        self.drive_trade(n, b);
    }

    /// Nothing was out for [`IDLE`]: more peers from the home; an asker with no new piece for the follow timeout
    /// goes upstream; a home whose partial holders gave nothing for [`PEER_ROUNDS`] rounds asks the home zone's
    /// home, then goes upstream.
    pub(super) fn on_trade_idle(&mut self, n: usize, b: usize, g: u64) {
        if !self.nodes[n].alive {
            return;
        }
        let home = self.home_of(n, b);
        let now = self.now;
        let Some((tg, t)) = self.trade_mut(n, b) else { return };
        if tg != g {
            return;
        }
        t.idle_check = false;
        if t.x.requests() > 0 || t.x.is_complete() {
            return;
        }
        let stalled = now - t.progress_at;
        let asked_far = t.asked_far;
        if home == n {
            if stalled >= IDLE * f64::from(PEER_ROUNDS) {
                let far = !asked_far && self.ask_home_zone(n, b, g);
                if far {
                    if let Some((_, t)) = self.trade_mut(n, b) {
                        t.asked_far = true;
                        t.progress_at = now;
                    }
                } else {
                    self.cancel_requests(n, b);
                    self.go_upstream(n, b, g);
                    return;
                }
            } else {
                let me = self.nodes[n].id;
                let digest = self.layers[b].digest.clone();
                let alive = self.view(n).1.clone();
                let index = &self.index;
                let usable = |p: &libp2p::PeerId| index.get(p).is_some_and(|&i| alive[i]);
                let found = self.nodes[n].dir.exchange_peers(&digest, &me, usable, PEERS);
                let more: Vec<usize> = found
                    .map(|l| l.holders.iter().filter_map(|(p, _)| self.index.get(p).copied()).collect())
                    .unwrap_or_default();
                self.add_peers(n, b, more);
            }
        } else if stalled >= FOLLOW {
            self.cancel_requests(n, b);
            self.go_upstream(n, b, g);
            return;
        } else {
            self.nodes[n].control += 1;
            let at = self.now + self.delay(n, home);
            self.at(at, Ev::Locate { home, asker: n, blob: b, generation: g });
        }
        if let Some((_, t)) = self.trade_mut(n, b)
            && !t.idle_check
        {
            t.idle_check = true;
            let at = self.now + IDLE;
            self.at(at, Ev::TradeIdle { node: n, blob: b, generation: g });
        }
        self.drive_trade(n, b);
    }
}
