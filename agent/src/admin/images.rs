//! `shoal images`: the tags this node resolved, with what it holds of each: the blobs its stored manifests name
//! (following an index to those of its platform manifests that are stored).

use std::collections::HashSet;

use shoal_proto::admin as pb;

use crate::oci::Digest;
use crate::store::{Store, StoreError};

/// Manifests followed per image at most (an index's platforms).
const MAX_MANIFESTS: usize = 64;

/// The digests a stored manifest or index names (config, layers, or the index's manifests); `None` when it is
/// not stored or not a manifest.
fn named(store: &Store, d: &Digest) -> Result<Option<(bool, Vec<Digest>)>, StoreError> {
    let Some(meta) = store.blob(d)? else { return Ok(None) };
    if meta.size > 4 << 20 {
        return Ok(None);
    }
    let Ok(bytes) = std::fs::read(store.blob_path(d)) else { return Ok(None) };
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&bytes) else { return Ok(None) };
    let digest = |v: &serde_json::Value| v.get("digest").and_then(|d| d.as_str()).and_then(|d| Digest::parse(d).ok());
    if let Some(list) = doc.get("manifests").and_then(|m| m.as_array()) {
        return Ok(Some((true, list.iter().filter_map(digest).collect())));
    }
    let blobs = doc.get("config").into_iter().chain(doc.get("layers").and_then(|l| l.as_array()).into_iter().flatten());
    Ok(Some((false, blobs.filter_map(digest).collect())))
}

/// Every tag record with what this node holds of its image.
pub(super) fn list(store: &Store) -> Result<Vec<pb::ImageEntry>, StoreError> {
    let mut out = Vec::new();
    for (key, rec) in store.list_tags()? {
        let mut entry = pb::ImageEntry {
            image: key,
            digest: rec.digest.to_string(),
            resolved_at: rec.fetched_at,
            public: rec.public,
            ..Default::default()
        };
        let mut blobs: HashSet<Digest> = HashSet::new();
        let mut manifests = vec![rec.digest.clone()];
        let mut followed = 0;
        while let Some(m) = manifests.pop() {
            followed += 1;
            if followed > MAX_MANIFESTS {
                break;
            }
            match named(store, &m)? {
                Some((true, children)) => {
                    manifests.extend(children.into_iter().filter(|c| store.blob(c).ok().flatten().is_some()))
                }
                Some((false, named)) => blobs.extend(named),
                None => {}
            }
        }
        entry.blobs = blobs.len() as u32;
        for b in &blobs {
            if let Some(meta) = store.blob(b)? {
                entry.held += 1;
                entry.bytes_held += meta.size;
                entry.last_access = entry.last_access.max(meta.last_access);
            }
        }
        out.push(entry);
    }
    out.sort_by(|a, b| a.image.cmp(&b.image));
    Ok(out)
}
