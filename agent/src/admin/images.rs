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

/// The stored manifests reachable from `root` (itself included when stored) and the blobs they name.
fn walk(store: &Store, root: &Digest) -> Result<(HashSet<Digest>, HashSet<Digest>), StoreError> {
    let (mut seen, mut blobs) = (HashSet::new(), HashSet::new());
    let mut manifests = vec![root.clone()];
    while let Some(m) = manifests.pop() {
        if seen.len() >= MAX_MANIFESTS || !seen.insert(m.clone()) {
            continue;
        }
        match named(store, &m)? {
            Some((true, children)) => {
                manifests.extend(children.into_iter().filter(|c| store.blob(c).ok().flatten().is_some()))
            }
            Some((false, named)) => blobs.extend(named),
            None => {
                seen.remove(&m);
            }
        }
    }
    Ok((seen, blobs))
}

/// Whether tag record `key` (`registry/repository:tag`) is of repository `repo` (`repository` or
/// `registry/repository`).
fn of_repo(key: &str, repo: &str) -> bool {
    let name = key.rsplit_once(':').filter(|(_, tag)| !tag.contains('/')).map_or(key, |(n, _)| n);
    name == repo || name.strip_suffix(repo).is_some_and(|rest| rest.ends_with('/'))
}

/// The manifests and blobs of the images this node resolved by tag in repository `repo`.
pub(super) fn digests_of_repo(store: &Store, repo: &str) -> Result<HashSet<Digest>, StoreError> {
    let mut all = HashSet::new();
    for (key, rec) in store.list_tags()? {
        if of_repo(&key, repo) {
            let (manifests, blobs) = walk(store, &rec.digest)?;
            all.extend(manifests);
            all.extend(blobs);
        }
    }
    Ok(all)
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
        let (_, blobs) = walk(store, &rec.digest)?;
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

#[cfg(test)]
mod tests {
    use super::of_repo;

    #[test]
    fn a_tag_record_belongs_to_its_repository_with_or_without_the_registry() {
        for (key, repo, yes) in [
            ("127.0.0.1:5000/team/app:v1", "team/app", true),
            ("127.0.0.1:5000/team/app:v1", "127.0.0.1:5000/team/app", true),
            ("127.0.0.1:5000/team/app:v1", "app", true),
            ("127.0.0.1:5000/team/app:v1", "eam/app", false),
            ("127.0.0.1:5000/team/app:v1", "team/other", false),
            ("registry.example/team/app-two:latest", "team/app", false),
        ] {
            assert_eq!(of_repo(key, repo), yes, "{key} in {repo}");
        }
    }
}
