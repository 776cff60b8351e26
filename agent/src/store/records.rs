//! The index's small records beside the blobs: tags' last answers, which repositories serve a digest, and pins
//! (the images GC keeps), each in a column family of its own.

use std::collections::HashSet;

use rocksdb::IteratorMode;
use serde::{Deserialize, Serialize};

use super::{CF_LINKS, CF_PINS, CF_TAGS, Store, StoreError};
use crate::oci::Digest;

/// A pin: an image whose blobs GC never evicts (`shoal pin`), or its removal (kept as a tombstone so an older
/// copy of the pin coming back from a member does not revive it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinRecord {
    /// The image as pinned (`registry/repository:tag` or `…@digest`).
    pub image: String,
    /// What it resolved to when pinned.
    pub digest: Digest,
    /// Every blob it names (manifests included).
    pub blobs: Vec<Digest>,
    /// Their total size.
    pub bytes: u64,
    /// Pinned (else: unpinned).
    pub pinned: bool,
    /// When it was pinned or unpinned, milliseconds since the epoch: the latest word wins.
    pub stamp: u64,
}

/// A tag's last known answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    /// The manifest digest the tag pointed to.
    pub digest: Digest,
    /// When upstream said so, seconds since the epoch.
    pub fetched_at: u64,
    /// Whether it was resolved without a client's credentials (anyone may be given it).
    pub public: bool,
    /// The manifest's media type as upstream gave it (whether a client's `Accept` admits the cached answer).
    #[serde(default)]
    pub media_type: Option<String>,
    /// The registry itself gave this answer to this node. Records without it (written by versions that took a
    /// member's word for a tag) are ignored.
    #[serde(default)]
    pub from_upstream: bool,
}

/// Evidence that a digest is served by a repository upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkRecord {
    /// Whether upstream served it without a client's credentials (so any client may get it from the cache).
    pub public: bool,
    /// When this was learnt, seconds since the epoch.
    pub at: u64,
}

impl Store {
    /// Every tag record: `registry/repository:tag` → its last known answer.
    pub fn list_tags(&self) -> Result<Vec<(String, TagRecord)>, StoreError> {
        self.scan(CF_TAGS)
    }

    /// Every pin record (tombstones included).
    pub fn list_pins(&self) -> Result<Vec<PinRecord>, StoreError> {
        Ok(self.scan(CF_PINS)?.into_iter().map(|(_, r)| r).collect())
    }

    /// Stores `rec` unless a record of the same image with a later stamp is stored. Returns whether it was.
    pub fn put_pin(&self, rec: &PinRecord) -> Result<bool, StoreError> {
        if let Some(old) = self.get::<PinRecord>(CF_PINS, &rec.image)?
            && (old.stamp, old.pinned) >= (rec.stamp, rec.pinned)
        {
            return Ok(false);
        }
        self.put(CF_PINS, &rec.image, rec)?;
        Ok(true)
    }

    /// The blobs pinned now, and their bytes held on this node.
    pub fn pinned(&self) -> Result<(HashSet<Digest>, u64), StoreError> {
        let (set, held, _) = self.pinned_within(u64::MAX)?;
        Ok((set, held))
    }

    /// The blobs of the oldest pins whose bytes held here fit in `budget`, those bytes, and the images left out
    /// (pins are members' word: together they may not stop GC from reaching its target).
    pub fn pinned_within(&self, budget: u64) -> Result<(HashSet<Digest>, u64, Vec<String>), StoreError> {
        let mut pins: Vec<PinRecord> = self.list_pins()?.into_iter().filter(|p| p.pinned).collect();
        pins.sort_by_key(|p| p.stamp);
        let (mut set, mut held, mut left_out) = (HashSet::new(), 0u64, Vec::new());
        for p in pins {
            let mut adds = 0;
            for d in p.blobs.iter().filter(|d| !set.contains(*d)) {
                adds += self.blob(d)?.map_or(0, |m| m.size);
            }
            if held + adds > budget {
                left_out.push(p.image);
                continue;
            }
            held += adds;
            set.extend(p.blobs);
        }
        Ok((set, held, left_out))
    }

    /// A tag's last known answer. `key` is `registry/repo:tag`.
    pub fn tag(&self, key: &str) -> Result<Option<TagRecord>, StoreError> {
        self.get(CF_TAGS, key)
    }

    /// Records a tag's answer.
    pub fn put_tag(&self, key: &str, rec: &TagRecord) -> Result<(), StoreError> {
        self.put(CF_TAGS, key, rec)
    }

    /// What is known of `digest` in a repository. `key` is `registry/repo@digest`.
    pub fn link(&self, key: &str) -> Result<Option<LinkRecord>, StoreError> {
        self.get(CF_LINKS, key)
    }

    /// Records that a repository serves a digest; a public record is never downgraded to a private one.
    pub fn put_link(&self, key: &str, rec: LinkRecord) -> Result<(), StoreError> {
        if !rec.public && self.link(key)?.is_some_and(|l| l.public) {
            return Ok(());
        }
        self.put(CF_LINKS, key, &rec)
    }

    /// Forgets tag answers and repository links older than `max_age` seconds at `now` (and records that no longer
    /// parse): names clients made up must not grow the index forever. Returns (tags, links) removed.
    pub fn expire_records(&self, now: u64, max_age: u64) -> Result<(usize, usize), StoreError> {
        let old = |t: u64| now.saturating_sub(t) > max_age;
        let mut removed = (0, 0);
        for (cf, count) in [(CF_TAGS, &mut removed.0), (CF_LINKS, &mut removed.1)] {
            let mut doomed = Vec::new();
            for item in self.db.iterator_cf(self.cf(cf), IteratorMode::Start) {
                let (k, v) = item?;
                let expired = if cf == CF_TAGS {
                    serde_json::from_slice::<TagRecord>(&v).map_or(true, |r| old(r.fetched_at))
                } else {
                    serde_json::from_slice::<LinkRecord>(&v).map_or(true, |r| old(r.at))
                };
                if expired {
                    doomed.push(k);
                }
            }
            for k in doomed {
                self.db.delete_cf(self.cf(cf), k)?;
                *count += 1;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use sha2::{Digest as _, Sha256};

    use super::super::tests::put_blob;
    use super::*;

    #[test]
    fn old_tag_and_link_records_expire() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let d = Digest::from_sha256(&Sha256::digest(b"x"));
        let tag =
            |at| TagRecord { digest: d.clone(), fetched_at: at, public: true, media_type: None, from_upstream: true };
        store.put_tag("r/a:old", &tag(100)).unwrap();
        store.put_tag("r/a:new", &tag(1000)).unwrap();
        store.put_link("r/a@old", LinkRecord { public: true, at: 100 }).unwrap();
        store.put_link("r/a@new", LinkRecord { public: true, at: 1000 }).unwrap();
        assert_eq!(store.expire_records(1000, 500).unwrap(), (1, 1));
        assert!(store.tag("r/a:old").unwrap().is_none() && store.tag("r/a:new").unwrap().is_some());
        assert!(store.link("r/a@old").unwrap().is_none() && store.link("r/a@new").unwrap().is_some());
    }

    fn pin(image: &str, blobs: &[Digest], pinned: bool, stamp: u64) -> PinRecord {
        let digest = blobs.first().cloned().unwrap_or_else(|| Digest::from_sha256(&Sha256::digest(image)));
        PinRecord { image: image.into(), digest, blobs: blobs.to_vec(), bytes: 0, pinned, stamp }
    }

    #[test]
    fn the_latest_word_on_a_pin_wins_and_pins_fit_a_budget_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let (a, b) = (put_blob(&store, &[1; 100]), put_blob(&store, &[2; 300]));
        assert!(store.put_pin(&pin("r/x:1", std::slice::from_ref(&a), true, 10)).unwrap());
        // An older word, or the same one again, changes nothing; a later removal does; an older pin does not
        // revive it.
        assert!(!store.put_pin(&pin("r/x:1", std::slice::from_ref(&a), false, 9)).unwrap());
        assert!(!store.put_pin(&pin("r/x:1", std::slice::from_ref(&a), true, 10)).unwrap());
        assert!(store.put_pin(&pin("r/x:1", std::slice::from_ref(&a), false, 11)).unwrap());
        assert!(!store.put_pin(&pin("r/x:1", std::slice::from_ref(&a), true, 10)).unwrap());
        assert_eq!(store.pinned().unwrap(), (HashSet::new(), 0));
        assert!(store.put_pin(&pin("r/x:1", std::slice::from_ref(&a), true, 12)).unwrap());
        assert!(store.put_pin(&pin("r/y:1", std::slice::from_ref(&b), true, 13)).unwrap());
        assert_eq!(store.pinned().unwrap().1, 400);
        // Within 250 bytes: the older pin only.
        let (set, held, left_out) = store.pinned_within(250).unwrap();
        assert_eq!((set, held, left_out), (HashSet::from([a]), 100, vec!["r/y:1".to_owned()]));
        // Survives a reopen.
        drop(store);
        let (store, _) = Store::open(dir.path()).unwrap();
        assert_eq!(store.list_pins().unwrap().len(), 2);
    }
}
