//! The modelled network: links with a capacity (bytes/s) and fluid flows crossing up to four of them, sharing
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
    /// The connection it travels on.
    conn: u64,
    links: [LinkId; 4],
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
    /// Bytes carried per link (for reports).
    pub carried: Vec<f64>,
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
        let mut ls = [0; 4];
        ls[..links.len()].copy_from_slice(links);
        let f = Flow { conn, links: ls, nlinks: links.len() as u8, size: bytes.max(1.0), done: 0.0, rate: 0.0, carry };
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
        self.free.push(id);
        self.live -= 1;
        self.dirty = true;
        Some(f.done)
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
    /// capacity on their other links; repeat.
    fn recompute(&mut self) {
        let nl = self.cap.len();
        let mut per_conn: HashMap<u64, u32> = HashMap::with_capacity(self.live);
        for f in self.flows.iter().flatten() {
            *per_conn.entry(f.conn).or_default() += 1;
        }
        // Flows by link, as one array with offsets (no allocation per link).
        let mut offset = vec![0usize; nl + 1];
        for f in self.flows.iter().flatten() {
            for &l in &f.links[..f.nlinks as usize] {
                offset[l + 1] += 1;
            }
        }
        for l in 0..nl {
            offset[l + 1] += offset[l];
        }
        let mut fill = offset.clone();
        let mut on = vec![0u32; offset[nl]];
        let mut weight = vec![0.0f64; self.flows.len()];
        let mut wsum = vec![0.0f64; nl];
        let mut count = vec![0u32; nl];
        for (id, f) in self.flows.iter().enumerate() {
            let Some(f) = f else { continue };
            let w = 1.0 / f64::from(per_conn[&f.conn]);
            weight[id] = w;
            for &l in &f.links[..f.nlinks as usize] {
                on[fill[l]] = id as u32;
                fill[l] += 1;
                wsum[l] += w;
                count[l] += 1;
            }
        }
        let mut remaining = self.cap.clone();
        let mut version = vec![0u32; nl];
        let mut heap = BinaryHeap::new();
        for l in 0..nl {
            if count[l] > 0 {
                heap.push(Reverse((Share(remaining[l] / wsum[l]), l, 0u32)));
            }
        }
        let mut fixed = vec![false; self.flows.len()];
        while let Some(Reverse((Share(share), l, v))) = heap.pop() {
            if v != version[l] || count[l] == 0 {
                continue;
            }
            for &id in &on[offset[l]..offset[l + 1]] {
                let id = id as usize;
                if fixed[id] {
                    continue;
                }
                fixed[id] = true;
                let w = weight[id];
                let f = self.flows[id].as_mut().expect("listed flows exist");
                f.rate = (share * w).max(0.0);
                for &l2 in &f.links[..f.nlinks as usize] {
                    remaining[l2] -= f.rate;
                    wsum[l2] -= w;
                    count[l2] -= 1;
                    version[l2] += 1;
                    if l2 != l && count[l2] > 0 {
                        let share2 = remaining[l2].max(0.0) / wsum[l2].max(1e-12);
                        heap.push(Reverse((Share(share2), l2, version[l2])));
                    }
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
