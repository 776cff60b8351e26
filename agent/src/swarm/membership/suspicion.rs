//! Suspicions and deaths (Lifeguard's dynamic suspicion): how long a suspicion lasts, who may declare the death
//! when it runs out (the suspect's neighbours; an unwell one later; anyone else only at the backstop, after asking
//! the suspect itself), and this node's own refutation.

use std::time::Duration;

use super::wire::Update;
use super::{Liveness, MemberRecord, Membership, SUSPICION_STRETCH, Version};

/// Independent suspicions that bring a suspicion's timeout down to `suspicion`.
const CONFIRMATIONS: usize = 3;
/// A member that is not the suspect's neighbour declares it dead on its own only after this many times the
/// longest suspicion timeout: until then it waits for the suspect's neighbours to declare the death.
pub(super) const BACKSTOP: u32 = 2;

/// A suspicion being timed.
#[derive(Debug)]
pub(super) struct Suspicion {
    pub(super) since: Duration,
    pub(super) deadline: Duration,
    pub(super) version: Version,
    /// Who suspects it (distinct members; the first started it).
    pub(super) by: Vec<u128>,
    /// Its deadline was stretched for this node's poor local health (once).
    pub(super) stretched: bool,
    /// This node (not a neighbour of the suspect) asked the suspect itself at the backstop.
    pub(super) probed: bool,
}

impl Membership {
    /// An accusation (suspect or dead) of this node itself: refuted when it names the current version or a later
    /// one. Returns whether the accusation was about this node.
    pub(super) fn accused_me(&mut self, key: u128, version: Version) -> bool {
        if key != self.me.key() {
            return false;
        }
        if version >= self.me.version() {
            self.refute(version);
        }
        true
    }

    pub(super) fn apply_suspect(&mut self, key: u128, version: Version, by: u128) {
        if self.accused_me(key, version) {
            return;
        }
        let Some(e) = self.table.get(key) else { return };
        if e.rec.version() != version {
            return;
        }
        match e.state {
            Liveness::Dead => {}
            Liveness::Alive => {
                self.table.suspect(key);
                let deadline = self.now + self.suspicion_timeout(0);
                self.suspicions.insert(
                    key,
                    Suspicion { since: self.now, deadline, version, by: vec![by], stretched: false, probed: false },
                );
                self.deadlines.insert((deadline, key));
                self.broadcast(&Update::Suspect { key, version, by });
                self.changed = true;
                // A neighbour heard suspected is probed at once: a confirmation (or the news, to the suspect).
                if by != self.me.key() && self.table.is_neighbour(key) {
                    self.start_probe(key);
                }
            }
            Liveness::Suspect => {
                let timeout = |c| self.suspicion_timeout(c);
                let Some(s) = self.suspicions.get(&key) else { return };
                if s.by.contains(&by) || s.by.len() > CONFIRMATIONS {
                    return;
                }
                let deadline = s.since + timeout(s.by.len());
                let Some(s) = self.suspicions.get_mut(&key) else { return };
                s.by.push(by);
                self.deadlines.remove(&(s.deadline, key));
                s.deadline = deadline;
                self.deadlines.insert((deadline, key));
                // A new confirmation spreads: it shortens the others' timeouts too.
                self.broadcast(&Update::Suspect { key, version, by });
            }
        }
    }

    /// Lifeguard: from `SUSPICION_STRETCH × suspicion` with no confirmation down to `suspicion` with
    /// [`CONFIRMATIONS`] of them (fewer expected in a small cluster).
    fn suspicion_timeout(&self, confirmations: usize) -> Duration {
        // Beyond 1,000 members, news takes longer to reach everyone (log N rounds, as memberlist scales it).
        let n = (self.table.live() + 1) as f64;
        let min = self.timing.suspicion.mul_f64((n.log10() / 3.0).max(1.0));
        let max = min * SUSPICION_STRETCH;
        let k = CONFIRMATIONS.min(self.table.live().saturating_sub(1));
        if k == 0 {
            return min;
        }
        let frac = ((confirmations as f64) + 1.0).ln() / ((k as f64) + 1.0).ln();
        max.saturating_sub((max - min).mul_f64(frac.min(1.0))).max(min)
    }

    pub(super) fn apply_dead(&mut self, key: u128, version: Version, spread: bool) {
        if self.accused_me(key, version) {
            return;
        }
        let Some(e) = self.table.get(key) else { return };
        // A death of a later version than this node knows is the death of the earlier one too.
        if version < e.rec.version() || e.state == Liveness::Dead {
            return;
        }
        self.kill(key, version, spread);
    }

    pub(super) fn kill(&mut self, key: u128, version: Version, spread: bool) {
        if let Some(s) = self.suspicions.remove(&key) {
            self.deadlines.remove(&(s.deadline, key));
        }
        self.table.kill(key, version);
        self.dead.push_back((self.now, key));
        if spread {
            self.broadcast(&Update::Dead { key, version });
        }
        self.changed = true;
    }

    /// Suspected or declared dead while alive: a renewed record (only this node's key can sign it) supersedes
    /// the accusation.
    fn refute(&mut self, accused: Version) {
        let renewal = if accused.0 == self.me.version().0 { accused.1 } else { self.me.version().1 }.wrapping_add(1);
        let me = MemberRecord::sign(&self.key, self.me.version().0, renewal, &self.me.about());
        tracing::debug!(renewal, "suspected or declared dead while alive: refuting");
        self.me = me.clone();
        self.broadcast(&Update::Alive(Box::new(me)));
        self.sicker();
    }

    /// Suspicions whose time ran out at `now`: declared dead, waited on, or asked about (above).
    pub(super) fn expire_suspicions(&mut self, now: Duration) {
        while let Some(&(at, key)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            if let Some(s) = self.suspicions.get(&key)
                && s.deadline == at
            {
                let version = s.version;
                // Only the suspect's neighbours, which probe it and hear its refutation first, declare it dead when
                // the timeout runs out; anyone else waits for their word, up to the backstop (their death notice
                // may be lost, or the neighbours dead too).
                let backstop = s.since + self.suspicion_timeout(0) * BACKSTOP;
                // A node that is itself unwell (Lifeguard's local health: its probes go unanswered, it answers late,
                // it had to refute) handles the suspect's refutation late too: it waits longer in proportion.
                // Once per suspicion.
                let neighbour = self.table.is_neighbour(key);
                let mut wait = if neighbour { at } else { backstop };
                let stretch = !s.stretched && self.health > 0;
                if stretch {
                    wait = wait.max(s.since + (at - s.since) * (1 + self.health));
                }
                // At the backstop, a member that is not a neighbour asks the suspect itself before declaring it
                // dead: the refutation may have missed it (at 10,000 nodes, backstop deaths of live members were
                // most of the false deaths). The ping carries the suspicion; the answer carries the refutation.
                let ask = !neighbour && at >= wait && !s.probed;
                if ask {
                    self.start_probe(key);
                    wait = now + self.period();
                }
                if at < wait {
                    if let Some(s) = self.suspicions.get_mut(&key) {
                        s.deadline = wait;
                        s.stretched |= stretch;
                        s.probed |= ask;
                    }
                    self.deadlines.insert((wait, key));
                    continue;
                }
                tracing::debug!(member = ?self.table.get(key).map(|e| &e.rec), "suspect did not refute: dead");
                self.kill(key, version, true);
            }
        }
    }
}
