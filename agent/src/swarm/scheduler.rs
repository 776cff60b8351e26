//! The piece scheduler of one download from one tier of sources: which source gets which piece, when.
//!
//! Sans-IO: the driver (the resolver's download, or the simulator) reports what happened — a piece delivered or
//! failed, by which source, at what time — and asks [`PieceScheduler::poll`] for what to request next. The
//! scheduler never touches bytes; the driver keeps delivered pieces and writes them in order as
//! [`PieceScheduler::next_to_write`] releases them, so a client reading the growing file sees a prefix.
//!
//! Rules:
//! - At most `window` pieces are outstanding (requested or delivered but not yet written): memory per download is
//!   bounded, and the pieces taken are those the client needs next.
//! - A piece goes to the usable source expected to deliver it soonest: its measured time per piece times the
//!   pieces it already has in flight; sources not measured yet count as average, and ties rotate so a fresh
//!   download spreads over all its sources.
//! - A source that fails a piece is never asked again in this tier; the piece goes to another one. When a piece
//!   has no usable source left the tier is exhausted: the driver asks the home where to continue.
//! - The piece everyone waits on (the first unwritten one) is hedged once when it has been in flight much longer
//!   than pieces usually take: requested from a second source, the first delivery wins and the other request is
//!   cancelled. A source that is merely behind (a partial holder following its own download) is not failed for
//!   that, only overtaken.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// Settings of a scheduler.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Pieces outstanding at most.
    pub window: usize,
    /// The head piece is hedged after this many times the usual piece time…
    pub hedge_factor: u32,
    /// …and never before this long.
    pub hedge_min: Duration,
}

impl SchedulerConfig {
    /// The agent's settings for pieces of `piece` bytes: 4 MiB of pieces outstanding, between 4 and 16 of them
    /// (far above a LAN's bandwidth-delay product, and bounded memory per download).
    pub fn for_piece(piece: u32) -> Self {
        let window = ((4u64 << 20) / u64::from(piece.max(1))).clamp(4, 16) as usize;
        Self { window, hedge_factor: 4, hedge_min: Duration::from_millis(500) }
    }
}

/// What the driver should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Request `piece` from `source` (an index into the tier's sources).
    Fetch {
        /// Piece index.
        piece: u64,
        /// Source index.
        source: usize,
    },
    /// Drop the request of `piece` from `source`: another source delivered it.
    Cancel {
        /// Piece index.
        piece: u64,
        /// Source index.
        source: usize,
    },
}

#[derive(Debug, Clone, Default)]
struct Source {
    failed: bool,
    inflight: usize,
    /// Pieces delivered, and the time they took in total.
    delivered: u32,
    busy: Duration,
}

impl Source {
    fn piece_time(&self) -> Option<Duration> {
        (self.delivered > 0).then(|| self.busy / self.delivered)
    }
}

#[derive(Debug, Clone)]
struct Flight {
    /// (source, when requested).
    requests: Vec<(usize, Instant)>,
    hedged: bool,
}

/// The scheduler of one tier.
#[derive(Debug, Clone)]
pub struct PieceScheduler {
    cfg: SchedulerConfig,
    count: u64,
    /// Pieces before this one are written.
    written: u64,
    /// The next piece never requested.
    next: u64,
    /// Pieces whose request failed, to request again.
    retry: BTreeSet<u64>,
    inflight: BTreeMap<u64, Flight>,
    /// Delivered, waiting for the pieces before them.
    done: BTreeSet<u64>,
    sources: Vec<Source>,
    /// Rotates ties between sources.
    turn: usize,
    exhausted: bool,
}

impl PieceScheduler {
    /// A scheduler for pieces `[first, count)` over `sources` sources.
    pub fn new(cfg: SchedulerConfig, count: u64, first: u64, sources: usize) -> Self {
        let cfg = SchedulerConfig { window: cfg.window.max(1), ..cfg };
        Self {
            cfg,
            count,
            written: first.min(count),
            next: first.min(count),
            retry: BTreeSet::new(),
            inflight: BTreeMap::new(),
            done: BTreeSet::new(),
            sources: vec![Source::default(); sources],
            turn: 0,
            exhausted: sources == 0,
        }
    }

    /// Every piece is written.
    pub fn is_complete(&self) -> bool {
        self.written == self.count
    }

    /// A piece needs a source and none is left: the tier has nothing more to give.
    pub fn is_exhausted(&self) -> bool {
        self.exhausted && !self.is_complete()
    }

    /// Pieces written so far (the first unwritten piece's index).
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Pieces outstanding: requested, or delivered and not yet written.
    pub fn outstanding(&self) -> usize {
        self.inflight.len() + self.done.len()
    }

    /// Requests out now (a hedged piece counts twice).
    pub fn requests(&self) -> usize {
        self.inflight.values().map(|f| f.requests.len()).sum()
    }

    /// Whether `source` failed in this tier.
    pub fn source_failed(&self, source: usize) -> bool {
        self.sources.get(source).is_none_or(|s| s.failed)
    }

    /// The usual time a piece takes, over every source that delivered one.
    fn usual_piece_time(&self) -> Option<Duration> {
        let (n, busy) = self.sources.iter().fold((0u32, Duration::ZERO), |(n, b), s| (n + s.delivered, b + s.busy));
        (n > 0).then(|| busy / n)
    }

    /// The usable source expected to deliver one more piece soonest, other than `not`.
    fn choose(&mut self, not: Option<usize>) -> Option<usize> {
        let usual = self.usual_piece_time().unwrap_or(Duration::from_millis(1));
        let n = self.sources.len();
        let start = self.turn;
        let best = (0..n).map(|k| (start + k) % n).filter(|&i| !self.sources[i].failed && Some(i) != not).min_by_key(
            |&i| {
                let s = &self.sources[i];
                s.piece_time().unwrap_or(usual) * (s.inflight as u32 + 1)
            },
        )?;
        self.turn = (best + 1) % n.max(1);
        Some(best)
    }

    fn request(&mut self, piece: u64, source: usize, now: Instant, out: &mut Vec<Action>) {
        self.sources[source].inflight += 1;
        let f = self.inflight.entry(piece).or_insert_with(|| Flight { requests: Vec::new(), hedged: false });
        f.requests.push((source, now));
        out.push(Action::Fetch { piece, source });
    }

    /// What to request now: pieces up to the window, and a hedge of the head piece when it straggles.
    pub fn poll(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if self.is_complete() {
            return out;
        }
        self.hedge(now, &mut out);
        while !self.exhausted && self.outstanding() < self.cfg.window {
            let piece = match self.retry.first().copied() {
                Some(p) => p,
                None if self.next < self.count => self.next,
                None => break,
            };
            let Some(source) = self.choose(None) else {
                self.exhausted = true;
                break;
            };
            if !self.retry.remove(&piece) {
                self.next += 1;
            }
            self.request(piece, source, now, &mut out);
        }
        out
    }

    fn hedge(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Some(usual) = self.usual_piece_time() else { return };
        let after = (usual * self.cfg.hedge_factor).max(self.cfg.hedge_min);
        let head = self.written;
        let Some(f) = self.inflight.get(&head) else { return };
        let [(first, since)] = f.requests[..] else { return };
        if f.hedged || now.saturating_duration_since(since) < after {
            return;
        }
        // Hedged once, or tried once: with no other usable source there is nothing to hedge to.
        if let Some(f) = self.inflight.get_mut(&head) {
            f.hedged = true;
        }
        if let Some(source) = self.choose(Some(first)) {
            self.request(head, source, now, out);
        }
    }

    /// When [`PieceScheduler::poll`] should be called again if nothing else happens (a hedge may be due).
    pub fn next_wakeup(&self) -> Option<Instant> {
        let usual = self.usual_piece_time()?;
        let f = self.inflight.get(&self.written)?;
        let [(_, since)] = f.requests[..] else { return None };
        (!f.hedged).then(|| since + (usual * self.cfg.hedge_factor).max(self.cfg.hedge_min))
    }

    /// Whether `piece` is still awaited (requested and not delivered): a late duplicate is not.
    pub fn awaits(&self, piece: u64) -> bool {
        self.inflight.contains_key(&piece)
    }

    /// `source` delivered `piece` (its hash checked). Returns the requests of the same piece to drop. A piece
    /// delivered twice (a hedge that lost the race but was not cancelled in time) is ignored.
    pub fn delivered(&mut self, piece: u64, source: usize, now: Instant) -> Vec<Action> {
        let Some(f) = self.inflight.remove(&piece) else { return Vec::new() };
        let mut cancel = Vec::new();
        for (s, since) in f.requests {
            let src = &mut self.sources[s];
            src.inflight -= 1;
            if s == source {
                src.delivered += 1;
                src.busy += now.saturating_duration_since(since);
            } else {
                cancel.push(Action::Cancel { piece, source: s });
            }
        }
        if piece >= self.written {
            self.done.insert(piece);
        }
        cancel
    }

    /// `source` failed `piece` (refused, stalled, a bad hash): it gets nothing more in this tier, and the piece
    /// is requested elsewhere unless another request for it is still out.
    pub fn failed(&mut self, piece: u64, source: usize) {
        if let Some(s) = self.sources.get_mut(source) {
            s.failed = true;
        }
        let Some(f) = self.inflight.get_mut(&piece) else { return };
        let Some(at) = f.requests.iter().position(|(s, _)| *s == source) else { return };
        f.requests.remove(at);
        self.sources[source].inflight -= 1;
        if f.requests.is_empty() {
            self.inflight.remove(&piece);
            self.retry.insert(piece);
            // A failure can free the last usable source's slot: exhaustion is decided again at the next poll.
        }
    }

    /// The next piece to write, if it has been delivered: the driver writes it, and the window moves on.
    pub fn next_to_write(&mut self) -> Option<u64> {
        if self.done.remove(&self.written) {
            self.written += 1;
            Some(self.written - 1)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn cfg(window: usize) -> SchedulerConfig {
        SchedulerConfig { window, hedge_factor: 4, hedge_min: Duration::from_millis(10) }
    }

    #[test]
    fn spreads_over_sources_and_writes_in_order() {
        let t0 = Instant::now();
        let mut s = PieceScheduler::new(cfg(4), 10, 0, 2);
        let a = s.poll(t0);
        assert_eq!(a.len(), 4);
        let by_source = |src| a.iter().filter(|x| matches!(x, Action::Fetch { source, .. } if *source == src)).count();
        assert_eq!((by_source(0), by_source(1)), (2, 2), "{a:?}");
        // Piece 1 first: nothing to write until piece 0 comes.
        let src1 = a
            .iter()
            .find_map(|x| match x {
                Action::Fetch { piece: 1, source } => Some(*source),
                _ => None,
            })
            .unwrap();
        s.delivered(1, src1, t0 + Duration::from_millis(5));
        assert_eq!(s.next_to_write(), None);
        assert!(s.poll(t0).is_empty(), "the window counts delivered-but-unwritten pieces");
        let src0 = a
            .iter()
            .find_map(|x| match x {
                Action::Fetch { piece: 0, source } => Some(*source),
                _ => None,
            })
            .unwrap();
        s.delivered(0, src0, t0 + Duration::from_millis(5));
        assert_eq!(s.next_to_write(), Some(0));
        assert_eq!(s.next_to_write(), Some(1));
        assert_eq!(s.next_to_write(), None);
        assert_eq!(s.poll(t0).len(), 2);
    }

    #[test]
    fn a_failed_source_is_dropped_and_its_piece_goes_elsewhere_then_the_tier_ends() {
        let t0 = Instant::now();
        let mut s = PieceScheduler::new(cfg(2), 4, 0, 2);
        let a = s.poll(t0);
        let Action::Fetch { piece, source } = a[0] else { panic!() };
        s.failed(piece, source);
        let b = s.poll(t0);
        assert_eq!(b, vec![Action::Fetch { piece, source: 1 - source }]);
        s.failed(piece, 1 - source);
        assert!(s.poll(t0).is_empty());
        assert!(s.is_exhausted());
    }

    #[test]
    fn the_head_piece_is_hedged_once_and_the_loser_cancelled() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut s = PieceScheduler::new(cfg(4), 8, 0, 2);
        let a = s.poll(t0);
        // Every piece but the head arrives quickly.
        for x in &a {
            if let Action::Fetch { piece, source } = *x
                && piece != 0
            {
                s.delivered(piece, source, t0 + ms(2));
            }
        }
        let head_src = a
            .iter()
            .find_map(|x| match x {
                Action::Fetch { piece: 0, source } => Some(*source),
                _ => None,
            })
            .unwrap();
        assert!(s.poll(t0 + ms(3)).is_empty(), "window full behind the head");
        assert_eq!(s.next_wakeup(), Some(t0 + ms(10)));
        let h = s.poll(t0 + ms(11));
        assert_eq!(h, vec![Action::Fetch { piece: 0, source: 1 - head_src }]);
        assert!(s.poll(t0 + ms(50)).is_empty(), "hedged once");
        let cancel = s.delivered(0, 1 - head_src, t0 + ms(12));
        assert_eq!(cancel, vec![Action::Cancel { piece: 0, source: head_src }]);
        assert_eq!(s.delivered(0, head_src, t0 + ms(13)), vec![], "a late duplicate is ignored");
        assert_eq!((0..4).map(|_| s.next_to_write()).collect::<Vec<_>>(), vec![Some(0), Some(1), Some(2), Some(3)]);
    }

    #[test]
    fn faster_sources_get_more_pieces() {
        let t0 = Instant::now();
        let mut s = PieceScheduler::new(cfg(4), 400, 0, 2);
        let mut now = t0;
        let mut got = [0u32; 2];
        let mut out: Vec<(u64, usize, Instant)> = Vec::new();
        while !s.is_complete() {
            for a in s.poll(now) {
                if let Action::Fetch { piece, source } = a {
                    // Source 1 takes five times as long per piece.
                    let took = Duration::from_millis(if source == 0 { 2 } else { 10 });
                    out.push((piece, source, now + took));
                }
            }
            out.sort_by_key(|x| x.2);
            let (piece, source, at) = out.remove(0);
            now = at;
            s.delivered(piece, source, now);
            got[source] += 1;
            while s.next_to_write().is_some() {}
        }
        assert!(got[0] > 3 * got[1], "{got:?}");
    }

    #[derive(Debug, Clone)]
    enum Ev {
        Deliver(usize),
        Fail(usize),
        Tick(u64),
    }

    proptest! {
        #[test]
        fn pieces_written_once_in_order_within_the_window_and_failed_sources_stay_out(
            count in 1u64..60, first in 0u64..10, sources in 1usize..5, window in 1usize..8,
            evs in prop::collection::vec(prop_oneof![
                (0usize..64).prop_map(Ev::Deliver), (0usize..64).prop_map(Ev::Fail), (1u64..50).prop_map(Ev::Tick)
            ], 1..400),
        ) {
            let first = first.min(count);
            let t0 = Instant::now();
            let mut now = t0;
            let mut s = PieceScheduler::new(cfg(window), count, first, sources);
            let mut out: Vec<(u64, usize)> = Vec::new();
            let mut failed = vec![false; sources];
            let mut written = Vec::new();
            let mut evs = evs.into_iter();
            loop {
                for a in s.poll(now) {
                    match a {
                        Action::Fetch { piece, source } => {
                            prop_assert!(!failed[source], "a failed source was asked again");
                            prop_assert!(!out.contains(&(piece, source)));
                            out.push((piece, source));
                        }
                        Action::Cancel { .. } => unreachable!("poll never cancels"),
                    }
                }
                prop_assert!(s.outstanding() <= window);
                prop_assert!(s.next_wakeup().is_none_or(|w| w > now), "a wake-up in the past would spin the driver");
                if s.is_complete() || s.is_exhausted() { break; }
                let ev = evs.next().unwrap_or(Ev::Deliver(0));
                prop_assert!(!out.is_empty(), "neither done nor exhausted, yet nothing requested");
                match ev {
                    Ev::Deliver(i) => {
                        let (piece, source) = out.remove(i % out.len());
                        for c in s.delivered(piece, source, now) {
                            let Action::Cancel { piece, source } = c else { unreachable!() };
                            out.retain(|x| *x != (piece, source));
                        }
                    }
                    Ev::Fail(i) => {
                        let (piece, source) = out.remove(i % out.len());
                        failed[source] = true;
                        s.failed(piece, source);
                    }
                    Ev::Tick(ms) => now += Duration::from_millis(ms),
                }
                while let Some(p) = s.next_to_write() { written.push(p); }
            }
            while let Some(p) = s.next_to_write() { written.push(p); }
            let expect: Vec<u64> = (first..first + written.len() as u64).collect();
            prop_assert_eq!(&written, &expect, "written once each, in order");
            if s.is_complete() { prop_assert_eq!(written.len() as u64, count - first); }
            if s.is_exhausted() { prop_assert!(failed.iter().all(|f| *f), "exhausted only when every source failed"); }
        }
    }
}
