//! The store's upkeep: GC (least recently used first, keeping what is read, downloaded or pinned), `shoal evict`,
//! `shoal verify`, and forgetting old tag and link records.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{RECORD_MAX_AGE, ResolveError, Resolver, blocking, lock, removed};
use crate::oci::Digest;
use crate::store::{Checked, now_secs};

/// Why `shoal evict` refused.
#[derive(Debug, thiserror::Error)]
pub enum EvictError {
    /// Not in the store.
    #[error("{0} is not stored on this node")]
    NotStored(Digest),
    /// A pin keeps it.
    #[error("{0} is pinned by {1}: unpin it first")]
    Pinned(Digest, String),
    /// A client is reading it or a download of it runs.
    #[error("{0} is in use (being read or downloaded): try again when it is idle")]
    InUse(Digest),
    /// The store failed.
    #[error(transparent)]
    Failed(#[from] ResolveError),
}

impl Resolver {
    /// Tells the digest's home this node no longer holds it (unless containerd still does).
    fn tell_removed(&self, digest: Digest) {
        if let Some(mesh) = &self.mesh
            && !self.containerd_holds(&digest)
        {
            mesh.hold(removed(digest));
        }
    }

    pub(super) fn update_store_gauges(&self) {
        self.metrics.store.bytes.set(self.store.bytes() as i64);
        self.metrics.store.blobs.set(self.store.blob_count() as i64);
    }

    /// Forgets tag answers and repository links not refreshed for [`RECORD_MAX_AGE`] (clients can name any
    /// number of tags and repositories: the index must not keep them all forever).
    pub async fn expire_records(&self) {
        let store = self.store.clone();
        let max_age = RECORD_MAX_AGE.as_secs();
        match blocking(move || store.expire_records(now_secs(), max_age)).await {
            Ok((tags, links)) if tags + links > 0 => tracing::info!(tags, links, "old index records expired"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "expiring old index records failed"),
        }
    }

    /// Starts a GC pass if the store is above its high watermark and none is running.
    pub fn maybe_gc(self: &Arc<Self>) {
        self.update_store_gauges();
        if self.store.bytes() <= self.cfg.gc_high_bytes || self.gc_running.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        self.tasks.spawn(async move {
            let mut keep: HashSet<Digest> = lock(&this.in_use).keys().cloned().collect();
            keep.extend(lock(&this.downloads).keys().cloned());
            // Blobs containerd holds too go first: their bytes stay servable from containerd.
            let doubled: HashSet<Digest> = this
                .containerd
                .as_ref()
                .map(|c| c.all_held().into_iter().map(|(d, _)| d).collect())
                .unwrap_or_default();
            let store = this.store.clone();
            let target = this.cfg.gc_low_bytes;
            let evict = move || {
                // Pinned blobs are never evicted — up to the GC's target: pins come from members, and together they
                // may not stop GC (the oldest pins are kept first).
                let (pinned, _, left_out) = store.pinned_within(target)?;
                if !left_out.is_empty() {
                    tracing::warn!(?left_out, "pins beyond the store's budget are not kept from GC");
                }
                keep.extend(pinned);
                store.evict_to(target, &keep, &doubled)
            };
            match blocking(evict).await {
                Ok((evicted, bytes)) => {
                    tracing::info!(blobs = evicted.len(), bytes, "GC evicted least recently used blobs");
                    this.metrics.store.evicted_blobs.inc_by(evicted.len() as u64);
                    this.metrics.store.evicted_bytes.inc_by(bytes);
                    for digest in evicted {
                        this.tell_removed(digest);
                    }
                }
                Err(e) => tracing::error!(error = %e, "GC failed"),
            }
            this.update_store_gauges();
            this.gc_running.store(false, Ordering::Release);
        });
    }
    /// Removes a stored blob nobody is reading or downloading, and tells its home. Returns the bytes freed.
    pub async fn evict(&self, digest: &Digest) -> Result<u64, EvictError> {
        if lock(&self.in_use).contains_key(digest) || lock(&self.downloads).contains_key(digest) {
            return Err(EvictError::InUse(digest.clone()));
        }
        let store = self.store.clone();
        if let Some(p) =
            blocking(move || store.list_pins()).await?.into_iter().find(|p| p.pinned && p.blobs.contains(digest))
        {
            return Err(EvictError::Pinned(digest.clone(), p.image));
        }
        let (store, d) = (self.store.clone(), digest.clone());
        let freed = blocking(move || store.remove(&d)).await?.ok_or_else(|| EvictError::NotStored(digest.clone()))?;
        self.tell_removed(digest.clone());
        self.metrics.store.evicted_blobs.inc();
        self.metrics.store.evicted_bytes.inc_by(freed);
        self.update_store_gauges();
        Ok(freed)
    }

    /// Checks every stored blob: its file exists, has the indexed size and hashes to its digest.
    pub async fn verify(&self) -> Result<Checked, ResolveError> {
        let store = self.store.clone();
        blocking(move || store.verify()).await
    }
}
