//! One node's procedure, as the agent's resolver and mesh run it: ask the digest's home (or, as the home, take
//! what holders have, the home zone's home, then upstream), run the piece scheduler over the sources handed out,
//! follow partial holders, serve waiting requests as pieces arrive, and complete.

use std::collections::BTreeMap;

use libp2p::PeerId;
use shoal_agent::oci::Digest;
use shoal_agent::swarm::directory::{HandOut, PEERS, PEERS_ACROSS_ZONES};
use shoal_agent::swarm::scheduler::{Action, PieceScheduler, SchedulerConfig};

use super::{CONNECT_TIMEOUT, Dl, Ev, FOLLOW, PEER_ROUNDS, Phase, SETTLE, Sim, Swarm, Waiter};
use crate::net::Carry;

impl Sim {
    pub(super) fn new_dl(&mut self, n: usize, b: usize) -> u64 {
        self.generation += 1;
        let g = self.generation;
        let have = self.nodes[n].blobs[b].have;
        self.nodes[n].blobs[b].dl = Some(Dl { generation: g, phase: Phase::Asking, fruitless: 0, round_have: have });
        let h = self.holding(b, false);
        self.nodes[n].ann.hold(h);
        self.flush_announcements(n);
        g
    }

    pub(super) fn dl_generation(&self, n: usize, b: usize) -> Option<u64> {
        self.nodes[n].blobs[b].dl.as_ref().map(|d| d.generation)
    }

    /// Sends what the node's announcer has pending to the homes (its own directory directly).
    pub(super) fn flush_announcements(&mut self, n: usize) {
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

    pub(super) fn start_blob(&mut self, n: usize, b: usize) {
        let g = self.new_dl(n, b);
        self.ask(n, b, g);
    }

    /// Where to continue: the home (this node, or a locate to it).
    pub(super) fn ask(&mut self, n: usize, b: usize, g: u64) {
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

    pub(super) fn usable(&self, at: usize) -> impl Fn(&PeerId) -> bool + '_ {
        let alive = &self.view(at).1;
        move |p: &PeerId| self.index.get(p).is_some_and(|&i| alive[i])
    }

    /// The home's own download of a digest homed on it (`Mesh::sources` on the home): complete holders, else what
    /// partial holders have, else the home zone's home (from another zone) or upstream.
    pub(super) fn home_own(&mut self, n: usize, b: usize, g: u64) {
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
    pub(super) fn ask_home_zone(&mut self, n: usize, b: usize, g: u64) -> bool {
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

    pub(super) fn go_upstream(&mut self, n: usize, b: usize, g: u64) {
        let Some(dl) = self.nodes[n].blobs[b].dl.as_mut() else { return };
        dl.phase = Phase::Upstream { flow: None };
        let t = self.now + 2.0 * self.p.delay_upstream;
        self.at(t, Ev::UpstreamStart { node: n, blob: b, generation: g });
    }

    /// A locate at `home` from `asker` (in `Mesh::answer_locate`).
    pub(super) fn on_locate(&mut self, home: usize, asker: usize, b: usize, g: u64) {
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
            let how = match self.p.swarm {
                Swarm::Tree => HandOut::Tree,
                // A home bringing the blob into another zone trades with more of this zone: its intake is that
                // zone's.
                Swarm::Exchange => HandOut::Exchange { peers: if same_zone { PEERS } else { PEERS_ACROSS_ZONES } },
            };
            self.nodes[home].dir.hand_out(&digest, &asker_id, &home_id, usable, same_zone.then_some(true), how)
        };
        let sources = loc.map(|l| l.holders.iter().filter_map(|(p, _)| self.index.get(p).copied()).collect());
        self.at(reply + extra, Ev::Located { asker, blob: b, generation: g, home, sources });
    }

    pub(super) fn on_located(&mut self, n: usize, b: usize, g: u64, home: usize, sources: Option<Vec<usize>>) {
        if self.dl_generation(n, b) != Some(g) || !self.nodes[n].alive {
            return;
        }
        // A trade asking for more peers goes on with whatever came.
        if matches!(self.nodes[n].blobs[b].dl.as_ref(), Some(Dl { phase: Phase::Trade(_), .. })) {
            self.add_peers(n, b, sources.unwrap_or_default());
            self.drive_trade(n, b);
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
    pub(super) fn peers(&mut self, n: usize, b: usize, _g: u64, sources: Vec<usize>, follow: bool, home: usize) {
        if self.p.swarm == Swarm::Exchange {
            return self.trade(n, b, sources, home);
        }
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
    pub(super) fn drive(&mut self, n: usize, b: usize, g: u64) {
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

    pub(super) fn exhausted(&mut self, n: usize, b: usize, g: u64) {
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
    pub(super) fn cancel_requests(&mut self, n: usize, b: usize) {
        let Some(dl) = self.nodes[n].blobs[b].dl.as_mut() else { return };
        let taken = match &mut dl.phase {
            Phase::Peers { flows, sources, .. } => Some((std::mem::take(flows), sources.clone())),
            Phase::Trade(t) => Some((std::mem::take(&mut t.flows), t.peers.clone())),
            _ => None,
        };
        if let Some((flows, sources)) = taken {
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
    pub(super) fn on_piece_req(
        &mut self,
        src: usize,
        n: usize,
        b: usize,
        piece: u64,
        source: usize,
        g: u64,
        follow: bool,
    ) {
        if !self.nodes[src].alive {
            let t = self.now + CONNECT_TIMEOUT;
            self.at(t, Ev::PieceFail { node: n, blob: b, piece, source, generation: g });
            return;
        }
        if src == n {
            self.waits_on_self += 1;
        }
        let bs = &self.nodes[src].blobs[b];
        if bs.complete || bs.have > piece || bs.bits.get(piece) {
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

    pub(super) fn start_piece(&mut self, src: usize, n: usize, b: usize, piece: u64, source: usize, g: u64) {
        let wanted = matches!(self.nodes[n].blobs[b].dl.as_ref(), Some(dl) if dl.generation == g
        && match &dl.phase {
            Phase::Peers { flows, .. } => flows.get(&(piece, source)) == Some(&None),
            Phase::Trade(t) => t.flows.get(&(piece, source)) == Some(&None),
            _ => false,
        });
        if !wanted || !self.nodes[n].alive {
            return;
        }
        let l = &self.layers[b];
        let len = (l.size - piece * u64::from(l.piece)).min(u64::from(l.piece));
        let links = self.links(src, n);
        let conn = ((src as u64) << 32) | n as u64;
        let f =
            self.net.start(conn, &links, len as f64, Carry::Piece { node: n, blob: b, piece, source, generation: g });
        match self.nodes[n].blobs[b].dl.as_mut() {
            Some(Dl { phase: Phase::Peers { flows, .. }, .. }) => {
                flows.insert((piece, source), Some(f));
            }
            Some(Dl { phase: Phase::Trade(t), .. }) => {
                t.flows.insert((piece, source), Some(f));
            }
            _ => {}
        }
        let s = &mut self.nodes[src];
        s.uploads += 1;
        s.max_uploads = s.max_uploads.max(s.uploads);
    }

    pub(super) fn on_piece_done(&mut self, n: usize, b: usize, piece: u64, source: usize, g: u64) {
        if matches!(self.nodes[n].blobs[b].dl.as_ref(), Some(Dl { generation, phase: Phase::Trade(_), .. }) if *generation == g)
        {
            return self.trade_piece_done(n, b, piece, source);
        }
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

    pub(super) fn on_piece_fail(&mut self, n: usize, b: usize, piece: u64, source: usize, g: u64) {
        if matches!(self.nodes[n].blobs[b].dl.as_ref(), Some(Dl { generation, phase: Phase::Trade(_), .. }) if *generation == g)
        {
            return self.trade_piece_failed(n, b, piece, source);
        }
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
    pub(super) fn serve_waiters(&mut self, n: usize, b: usize) {
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

    pub(super) fn on_follow_timeout(&mut self, src: usize, b: usize) {
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

    pub(super) fn complete(&mut self, n: usize, b: usize) {
        if self.p.swarm == Swarm::Exchange {
            // The pieces its trading peers have not heard of yet (the end of an upstream download).
            let count = self.layers[b].count;
            for i in 0..count {
                self.got_piece(n, b, i, false);
            }
            // An injector told each of its pieces to one watcher: now all of them hear of every piece.
            let bs = &mut self.nodes[n].blobs[b];
            if bs.injected {
                bs.untold = (0..count).collect();
                if !bs.flush_pending && !bs.watchers.is_empty() {
                    bs.flush_pending = true;
                    self.at(self.now, Ev::HaveFlush { node: n, blob: b });
                }
            }
        }
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
        // Downloads that waited for this one to come in go on.
        if self.p.swarm == Swarm::Exchange {
            for o in 0..self.layers.len() {
                if o != b {
                    self.drive_trade(n, o);
                }
            }
        }
        if self.nodes[n].blobs.iter().all(|x| x.complete) && self.nodes[n].done_at.is_none() {
            self.nodes[n].done_at = Some(self.now);
        }
    }

    pub(super) fn on_upstream_start(&mut self, n: usize, b: usize, g: u64) {
        if self.dl_generation(n, b) != Some(g) || !self.nodes[n].alive {
            return;
        }
        let l = &self.layers[b];
        let offset = self.nodes[n].blobs[b].have * u64::from(l.piece);
        // A trader asks upstream for the pieces it lacks only (ranges), not everything past its first gap.
        let bytes = if self.p.swarm == Swarm::Exchange {
            let bs = &mut self.nodes[n].blobs[b];
            bs.up_missing = (0..l.count).filter(|&i| !bs.bits.get(i)).collect();
            bs.up_missing.iter().map(|&i| (l.size - i * u64::from(l.piece)).min(u64::from(l.piece))).sum::<u64>()
        } else {
            l.size - offset
        };
        let mut links = vec![self.upstream, self.zone_in[self.nodes[n].zone], self.nodes[n].down];
        links.extend(self.cpu);
        // Each download from upstream is a connection of its own.
        self.generation += 1;
        let conn = u64::MAX - self.generation;
        let f = self.net.start(conn, &links, bytes as f64, Carry::Upstream { node: n, blob: b, offset, generation: g });
        if let Some(Dl { phase: Phase::Upstream { flow }, .. }) = self.nodes[n].blobs[b].dl.as_mut() {
            *flow = Some(f);
        }
    }
}
