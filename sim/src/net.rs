//! The modelled network: links with a capacity (bytes/s) and fluid flows crossing up to five of them, sharing
//! every link max-min fairly (progressive filling) between *connections*: the flows of one connection (the pieces
//! in flight between two nodes, multiplexed on one QUIC connection) share one connection's share, as TCP and QUIC
//! congestion control share a bottleneck per connection, not per request. Rates are recomputed when the set of
//! flows changed, at most once per simulation step; between steps each flow moves at its rate.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// A link.
pub type LinkId = usize;
/// A flow's handle.
pub type FlowId = usize;

/// What a flow carries (the simulator's own bookkeeping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carry {
    /// A piece from a peer: (receiver, blob, piece, source index in the receiver's tier, download generation).
    Piece { node: usize, blob: usize, piece: u64, source: usize, generation: u64 },
    /// A download from upstream into `node`, starting at byte `offset`.
    Upstream { node: usize, blob: usize, offset: u64, generation: u64 },
}

#[derive(Debug, Clone)]
struct Flow {
    /// The connection it travels on, and that connection's slot in [`Net::conn_flows`].
    conn: u64,
    slot: usize,
    links: [LinkId; 5],
    nlinks: u8,
    size: f64,
    done: f64,
    rate: f64,
    carry: Carry,
}

/// A flow that finished during a step.
#[derive(Debug, Clone, Copy)]
pub struct Finished {
    /// When, within the step.
    pub at: f64,
    /// What it carried.
    pub carry: Carry,
}

/// Links and flows.
#[derive(Debug, Default)]
pub struct Net {
    cap: Vec<f64>,
    flows: Vec<Option<Flow>>,
    free: Vec<FlowId>,
    /// Flows that finished in the last step: their ids are reused only after [`Net::recycle`], so a handle the
    /// simulator still holds for a flow finished in the same step cannot name a new flow.
    finished: Vec<FlowId>,
    live: usize,
    dirty: bool,
    /// Each connection's slot in `conn_flows` (looked up as flows start; recomputations read the slot).
    conns: HashMap<u64, usize>,
    /// Flows per connection slot.
    conn_flows: Vec<u32>,
    free_slots: Vec<usize>,
    /// Buffers of [`Net::recompute`], kept between calls.
    scratch: Scratch,
    /// Bytes carried per link (for reports).
    pub carried: Vec<f64>,
}

#[derive(Debug, Default)]
struct Scratch {
    offset: Vec<usize>,
    fill: Vec<usize>,
    on: Vec<u32>,
    weight: Vec<f64>,
    wsum: Vec<f64>,
    count: Vec<u32>,
    remaining: Vec<f64>,
    fixed: Vec<bool>,
}

/// f64 ordered for the heap (shares are finite and non-negative).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Share(f64);
impl Eq for Share {}
impl PartialOrd for Share {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Share {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0)
    }
}

impl Net {
    /// Adds a link of `cap` bytes/s.
    pub fn link(&mut self, cap: f64) -> LinkId {
        self.cap.push(cap);
        self.carried.push(0.0);
        self.cap.len() - 1
    }

    /// Starts a flow of `bytes` over `links`, on connection `conn`.
    pub fn start(&mut self, conn: u64, links: &[LinkId], bytes: f64, carry: Carry) -> FlowId {
        let mut ls = [0; 5];
        ls[..links.len()].copy_from_slice(links);
        let slot = match self.conns.get(&conn) {
            Some(&slot) => slot,
            None => {
                let slot = self.free_slots.pop().unwrap_or_else(|| {
                    self.conn_flows.push(0);
                    self.conn_flows.len() - 1
                });
                self.conns.insert(conn, slot);
                slot
            }
        };
        self.conn_flows[slot] += 1;
        let f = Flow {
            conn,
            slot,
            links: ls,
            nlinks: links.len() as u8,
            size: bytes.max(1.0),
            done: 0.0,
            rate: 0.0,
            carry,
        };
        self.dirty = true;
        self.live += 1;
        match self.free.pop() {
            Some(id) => {
                self.flows[id] = Some(f);
                id
            }
            None => {
                self.flows.push(Some(f));
                self.flows.len() - 1
            }
        }
    }

    /// Stops a flow; returns the bytes it had carried.
    pub fn stop(&mut self, id: FlowId) -> Option<f64> {
        let f = self.flows.get_mut(id)?.take()?;
        self.forget_conn(f.conn, f.slot);
        self.free.push(id);
        self.live -= 1;
        self.dirty = true;
        Some(f.done)
    }

    /// One flow of `conn` (in `slot`) fewer.
    fn forget_conn(&mut self, conn: u64, slot: usize) {
        self.conn_flows[slot] -= 1;
        if self.conn_flows[slot] == 0 {
            self.conns.remove(&conn);
            self.free_slots.push(slot);
        }
    }

    /// Bytes a flow has carried.
    pub fn done(&self, id: FlowId) -> Option<f64> {
        self.flows.get(id)?.as_ref().map(|f| f.done)
    }

    /// Flows running.
    pub fn live(&self) -> usize {
        self.live
    }

    /// Max-min fair rates between connections: the link with the smallest fair share per connection fixes the
    /// rate of every flow crossing it (its connection's share split between the connection's flows), which frees
    /// capacity on their other links; repeat. A link's share only grows as flows elsewhere are fixed (they take no
    /// more than the smallest share), so each link is queued once and queued again only when it comes out of the
    /// queue with a share that grew (lazy updates): far fewer queue operations than one per change.
    fn recompute(&mut self) {
        let nl = self.cap.len();
        let nf = self.flows.len();
        let s = &mut self.scratch;
        // Flows by link, as one array with offsets (buffers kept between recomputations).
        s.offset.clear();
        s.offset.resize(nl + 1, 0);
        for f in self.flows.iter().flatten() {
            for &l in &f.links[..f.nlinks as usize] {
                s.offset[l + 1] += 1;
            }
        }
        for l in 0..nl {
            s.offset[l + 1] += s.offset[l];
        }
        s.fill.clear();
        s.fill.extend_from_slice(&s.offset);
        s.on.clear();
        s.on.resize(s.offset[nl], 0);
        s.weight.clear();
        s.weight.resize(nf, 0.0);
        s.wsum.clear();
        s.wsum.resize(nl, 0.0);
        s.count.clear();
        s.count.resize(nl, 0);
        for (id, f) in self.flows.iter().enumerate() {
            let Some(f) = f else { continue };
            let w = 1.0 / f64::from(self.conn_flows[f.slot]);
            s.weight[id] = w;
            for &l in &f.links[..f.nlinks as usize] {
                s.on[s.fill[l]] = id as u32;
                s.fill[l] += 1;
                s.wsum[l] += w;
                s.count[l] += 1;
            }
        }
        s.remaining.clear();
        s.remaining.extend_from_slice(&self.cap);
        s.fixed.clear();
        s.fixed.resize(nf, false);
        let share = |remaining: f64, wsum: f64| remaining.max(0.0) / wsum.max(1e-12);
        let mut heap: BinaryHeap<Reverse<(Share, LinkId)>> = (0..nl)
            .filter(|&l| s.count[l] > 0)
            .map(|l| Reverse((Share(share(s.remaining[l], s.wsum[l])), l)))
            .collect();
        while let Some(Reverse((Share(queued), l))) = heap.pop() {
            if s.count[l] == 0 {
                continue;
            }
            let now = share(s.remaining[l], s.wsum[l]);
            if now > queued * (1.0 + 1e-12) {
                heap.push(Reverse((Share(now), l)));
                continue;
            }
            for i in s.offset[l]..s.offset[l + 1] {
                let id = s.on[i] as usize;
                if s.fixed[id] {
                    continue;
                }
                s.fixed[id] = true;
                let w = s.weight[id];
                let f = self.flows[id].as_mut().expect("listed flows exist");
                f.rate = (now * w).max(0.0);
                for &l2 in &f.links[..f.nlinks as usize] {
                    s.remaining[l2] -= f.rate;
                    s.wsum[l2] -= w;
                    s.count[l2] -= 1;
                }
            }
        }
        self.dirty = false;
    }

    /// Moves every flow on by `dt` seconds; returns the flows that finished (removed), with the time into the step
    /// at which each did.
    pub fn advance(&mut self, dt: f64) -> Vec<Finished> {
        if self.dirty {
            self.recompute();
        }
        let mut out = Vec::new();
        for id in 0..self.flows.len() {
            let Some(f) = &mut self.flows[id] else { continue };
            let before = f.done;
            f.done = (f.done + f.rate * dt).min(f.size);
            let moved = f.done - before;
            for &l in &f.links[..f.nlinks as usize] {
                self.carried[l] += moved;
            }
            if f.done >= f.size {
                let at = if f.rate > 0.0 { (f.size - before) / f.rate } else { dt };
                out.push(Finished { at: at.min(dt), carry: f.carry });
                let (conn, slot) = (f.conn, f.slot);
                self.forget_conn(conn, slot);
                self.flows[id] = None;
                self.finished.push(id);
                self.live -= 1;
                self.dirty = true;
            }
        }
        out
    }

    /// Each link's load (sum of its flows' rates) as a fraction of its capacity.
    pub fn utilisation(&self) -> Vec<f64> {
        let mut load = vec![0.0; self.cap.len()];
        for f in self.flows.iter().flatten() {
            for &l in &f.links[..f.nlinks as usize] {
                load[l] += f.rate;
            }
        }
        load.iter().zip(&self.cap).map(|(l, c)| l / c).collect()
    }

    /// Makes the ids of flows that finished available again (once their completions were handled).
    pub fn recycle(&mut self) {
        self.free.append(&mut self.finished);
    }

    /// Upstream flows with how far they got: (carry, bytes done).
    pub fn upstream_progress(&self) -> impl Iterator<Item = (Carry, f64)> + '_ {
        self.flows.iter().flatten().filter(|f| matches!(f.carry, Carry::Upstream { .. })).map(|f| (f.carry, f.done))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(n: usize) -> Carry {
        Carry::Piece { node: n, blob: 0, piece: 0, source: 0, generation: 0 }
    }

    #[test]
    fn max_min_fair_shares() {
        let mut net = Net::default();
        let a = net.link(100.0);
        let b = net.link(30.0);
        // Two flows over a alone, one over a and b: the b flow is held to 30, the others share the rest of a.
        let f1 = net.start(1, &[a], 1e9, piece(1));
        let f2 = net.start(2, &[a], 1e9, piece(2));
        let f3 = net.start(3, &[a, b], 1e9, piece(3));
        net.advance(1.0);
        let rate = |f| net.done(f).unwrap();
        assert!((rate(f3) - 30.0).abs() < 1e-6);
        assert!((rate(f1) - 35.0).abs() < 1e-6 && (rate(f2) - 35.0).abs() < 1e-6);
        net.stop(f1);
        net.stop(f2);
        net.advance(1.0);
        assert!((net.done(f3).unwrap() - 60.0).abs() < 1e-6);
    }

    #[test]
    fn flows_of_one_connection_share_its_share() {
        let mut net = Net::default();
        let a = net.link(90.0);
        // Three pieces on one connection and one download on another: 45 each connection, 15 per piece.
        let pieces: Vec<FlowId> = (0..3).map(|i| net.start(7, &[a], 1e9, piece(i))).collect();
        let single = net.start(8, &[a], 1e9, piece(9));
        net.advance(1.0);
        assert!((net.done(single).unwrap() - 45.0).abs() < 1e-6);
        for p in pieces {
            assert!((net.done(p).unwrap() - 15.0).abs() < 1e-6);
        }
    }

    /// Random links and flows: every flow has a bottleneck — a saturated link on its path where no connection
    /// gets a larger share than the flow's own (the definition of max-min fairness between connections).
    #[test]
    fn every_flow_has_a_bottleneck() {
        let mut seed = 0x5eed_u64;
        let mut rnd = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for _ in 0..50 {
            let mut net = Net::default();
            let links: Vec<LinkId> = (0..12).map(|_| net.link(10.0 + rnd(100) as f64)).collect();
            let mut flows = Vec::new();
            for _ in 0..40 {
                let path: Vec<LinkId> = (0..1 + rnd(4)).map(|_| links[rnd(links.len())]).collect();
                let mut path = path;
                path.sort_unstable();
                path.dedup();
                let conn = rnd(15) as u64;
                flows.push((net.start(conn, &path, 1e12, piece(0)), conn, path));
            }
            net.recompute();
            let rate = |id: FlowId| net.flows[id].as_ref().unwrap().rate;
            let per_conn = |c: u64| flows.iter().filter(|f| f.1 == c).count() as f64;
            // A connection's share on a link: its flows' rate times their number.
            let share = |id: FlowId, c: u64| rate(id) * per_conn(c);
            let mut load = vec![0.0; links.len()];
            for (id, _, path) in &flows {
                for &l in path {
                    load[l] += rate(*id);
                }
            }
            for (l, cap) in net.cap.iter().enumerate() {
                assert!(load[l] <= cap * (1.0 + 1e-9), "link {l} overloaded: {} > {cap}", load[l]);
            }
            for (id, c, path) in &flows {
                let mine = share(*id, *c);
                let bottleneck = path.iter().any(|&l| {
                    load[l] >= net.cap[l] * (1.0 - 1e-9)
                        && flows.iter().filter(|g| g.2.contains(&l)).all(|g| share(g.0, g.1) <= mine * (1.0 + 1e-9))
                });
                assert!(bottleneck, "flow {id} (connection {c}, rate {}) has no bottleneck", rate(*id));
            }
        }
    }

    #[test]
    fn finishing_flows_report_when() {
        let mut net = Net::default();
        let a = net.link(10.0);
        net.start(1, &[a], 5.0, piece(1));
        let done = net.advance(1.0);
        assert_eq!(done.len(), 1);
        assert!((done[0].at - 0.5).abs() < 1e-9, "5 bytes at 10/s take 0.5 s, not {}", done[0].at);
    }
}
