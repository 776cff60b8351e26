//! Announcing: what this node holds goes to each digest's home in batches (the [`Announcer`] decides what and to
//! whom), everything again when homes move; and, as a home, the directory those announcements build, with the
//! time it needs to settle after a membership change.

use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use shoal_proto::peer::{self, request};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Holding, Located, MembersView, Mesh, directory, lock};
use crate::oci::Digest;
use crate::swarm::announcer::Announcer;

/// Announcements sent to one home in one message, at most.
pub(super) const ANNOUNCE_BATCH: usize = 2000;
/// How often pending announcements are sent.
const ANNOUNCE_EVERY: Duration = Duration::from_millis(200);
/// Everything is announced again this often, repairing homes that lost track (anti-entropy).
const REANNOUNCE_EVERY: Duration = Duration::from_secs(60);

impl Mesh {
    pub(super) async fn announce_loop(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<Holding>,
        cancel: CancellationToken,
    ) {
        let mut ann = Announcer::new();
        let mut view = self.view.clone();
        let mut epoch = view.borrow().epoch();
        lock(&self.settling).0 = epoch;
        let mut flush = tokio::time::interval(ANNOUNCE_EVERY);
        let mut full = tokio::time::interval(REANNOUNCE_EVERY);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                h = rx.recv() => {
                    let Some(h) = h else { return };
                    ann.hold(h);
                }
                r = view.changed() => {
                    if r.is_err() { return; }
                    let v = view.borrow_and_update().clone();
                    let e = v.epoch();
                    let me = self.me;
                    let mut dir = lock(&self.directory);
                    dir.prune(|p| *p == me || v.reachable_addr(p).is_some());
                    if e != epoch {
                        // Homes may have moved: what is homed elsewhere now is told to the new home by its holders,
                        // this node included; what stayed put is not announced again.
                        dir.keep_homed(|d| v.home(d) == me);
                        *lock(&self.settling) = (e, Instant::now() + self.settle_time());
                        epoch = e;
                        let moved = ann.view_changed(|d| v.home_instance(d));
                        tracing::debug!(moved, held = ann.held(), "membership changed: re-announcing what moved");
                    }
                    self.directory_gauges(&dir);
                    drop(dir);
                }
                _ = full.tick() => ann.reannounce_all(),
                _ = flush.tick() => {
                    if ann.pending() > 0 {
                        let v = self.view();
                        for (home, batch) in ann.take_batches(|d| v.home_instance(d), ANNOUNCE_BATCH) {
                            if self.send_announcements(&v, home.0, &batch).await {
                                ann.delivered(home, &batch);
                            } else {
                                // Retried with the next flush; a later full announcement covers the rest.
                                ann.undelivered(batch);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Sends one batch of holdings to their home; returns whether it was delivered.
    async fn send_announcements(&self, view: &MembersView, home: PeerId, batch: &[Holding]) -> bool {
        if home == self.me {
            let mut dir = lock(&self.directory);
            for h in batch {
                dir.apply(self.me, h);
            }
            self.directory_gauges(&dir);
            return true;
        }
        let Some(addr) = view.transfer_addr(&home) else { return false };
        let req = request::Kind::Announce(peer::Announce { holdings: batch.iter().map(Holding::to_wire).collect() });
        match self.transfer.call(home, addr, req).await {
            Ok(_) => true,
            Err(e) => {
                self.count_failure(&e);
                tracing::debug!(%home, error = %e, "announcement not delivered");
                false
            }
        }
    }

    /// Applies a member's announcement to this home's directory. Only members the view knows (alive or suspect)
    /// are recorded: a holder nobody can reach is no source, and ids outside the view cannot fill the directory.
    pub(super) fn apply_announcement(&self, peer: PeerId, a: peer::Announce) {
        if self.view().reachable_addr(&peer).is_none() {
            tracing::debug!(%peer, "announcement from a node that is not a member ignored");
            return;
        }
        let mut dir = lock(&self.directory);
        for h in a.holdings.into_iter().take(ANNOUNCE_BATCH) {
            match Holding::from_wire(h) {
                Ok(h) => {
                    if !dir.apply(peer, &h) {
                        tracing::warn!("directory full: announcement dropped");
                        break;
                    }
                }
                Err(e) => tracing::debug!(%peer, error = %e, "bad announcement ignored"),
            }
        }
        self.directory_gauges(&dir);
        drop(dir);
        self.directory_changed.notify_waiters();
    }

    /// How long holders take to re-announce to a new home: they see the change up to a gossip round later, and
    /// batch announcements.
    pub(super) fn settle_time(&self) -> Duration {
        self.cfg.gossip_interval * 2 + ANNOUNCE_EVERY * 2
    }

    /// What this node's directory knows of `digest` (as its home), waiting while it is still being rebuilt after
    /// homes moved if it knows nobody yet.
    pub(super) async fn settled_locate(&self, digest: &Digest, usable: impl Fn(&PeerId) -> bool) -> Option<Located> {
        let latest = Instant::now() + self.settle_time();
        loop {
            let changed = self.directory_changed.notified();
            let found = lock(&self.directory).locate(digest, &self.me, &usable);
            let until = self.settling_until().min(latest);
            if found.is_some() || Instant::now() >= until {
                return found;
            }
            let _ = tokio::time::timeout_at(until.into(), changed).await;
        }
    }

    /// Until when the directory may be missing holders: a while after the last membership change, counted from
    /// now if the announcer has not even seen the latest one.
    fn settling_until(&self) -> Instant {
        let (epoch, until) = *lock(&self.settling);
        if self.view().epoch() != epoch { Instant::now() + self.settle_time() } else { until }
    }

    pub(super) fn directory_gauges(&self, dir: &directory::Directory) {
        self.metrics.mesh.directory_digests.set(dir.len() as i64);
        self.metrics.mesh.directory_holders.set(dir.holders() as i64);
    }
}
