//! Tags: which manifest a `repo:tag` names. Only the tag's registry decides, or this node's own earlier answer from
//! it: a member's word about a tag is never asked for. A home that answered tags for the cluster could make every
//! node serve an image of its choosing under an honest name (and bytes matching it: digests check content, not
//! names), so each node asks upstream with a `HEAD` (registries such as Docker Hub do not count those against rate
//! limits) and gets the manifest itself, by digest, through the mesh like any content.
//!
//! Order: this node's cached answer within the tag TTL; upstream's `HEAD`; while upstream is unreachable, the last
//! answer upstream gave this node (never older than what containerd holds); else containerd's image of that name,
//! when containerd's content is the node's to give. Times recorded are this node's own clock.

use std::sync::Arc;
use std::time::Instant;

use http::header;

use super::{Client, ResolveError, Resolver, accepts, blocking, lock};
use crate::metrics::{LookupKind, LookupResult};
use crate::oci::{Digest, Reference};
use crate::store::{LinkRecord, TagRecord, now_secs};
use crate::upstream::{Target, UpstreamError};

impl Resolver {
    /// Resolves a tag to a manifest digest (see the module doc for the order).
    pub async fn resolve_tag(&self, client: &Client, tag: &str) -> Result<Digest, ResolveError> {
        let key = format!("{}:{tag}", client.repo_key());
        // One resolution of a tag at a time on this node: concurrent ones wait and then find the fresh answer in
        // the cache.
        let gate = lock(&self.tag_gates).entry(key.clone()).or_default().clone();
        let result = {
            let _turn = gate.lock().await;
            self.resolve_tag_once(client, tag, key.clone()).await
        };
        let mut gates = lock(&self.tag_gates);
        if Arc::strong_count(&gate) == 2 {
            gates.remove(&key);
        }
        result
    }

    async fn resolve_tag_once(&self, client: &Client, tag: &str, key: String) -> Result<Digest, ResolveError> {
        let store = self.store.clone();
        let k = key.clone();
        let cached = blocking(move || store.tag(&k)).await.unwrap_or(None).filter(|c| c.from_upstream);
        let origin = self.access.origin(client);
        if let Some(c) = &cached {
            // A record from the future (a clock step back) counts as fresh only until the TTL has passed since now.
            let age = now_secs().saturating_sub(c.fetched_at.min(now_secs()));
            let fresh = age < self.cfg.tag_ttl.as_secs();
            let allowed = c.public || self.access.accepted_recently(&origin, Instant::now());
            if fresh && allowed && self.cached_manifest_acceptable(client, c).await {
                self.lookup(LookupKind::tag, LookupResult::hit);
                return Ok(c.digest.clone());
            }
        }
        let reference = Reference::Tag(tag.to_owned());
        let req = client.request(Target::Manifest(&reference), true);
        match self.upstream.send(req).await {
            Ok(resp) => {
                let digest = resp
                    .headers()
                    .get("docker-content-digest")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|s| Digest::parse(s).ok());
                let Some(digest) = digest else {
                    // Without the header the only way is to fetch by tag and hash; leave that to upstream itself.
                    return Err(ResolveError::Unavailable("upstream sent no valid Docker-Content-Digest".into()));
                };
                let media_type =
                    resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
                self.lookup(LookupKind::tag, LookupResult::miss);
                self.access.note_accepted(&origin, Instant::now());
                let rec = TagRecord {
                    digest: digest.clone(),
                    fetched_at: now_secs(),
                    public: client.auth.is_none(),
                    media_type,
                    from_upstream: true,
                };
                self.record_tag(key, client, rec).await?;
                Ok(digest)
            }
            Err(UpstreamError::Unreachable(reason)) => match cached {
                Some(c) if c.public || self.access.accepted_ever(&origin) => {
                    tracing::warn!(%reason, tag, "upstream unreachable: serving the last digest it gave for the tag");
                    self.lookup(LookupKind::tag, LookupResult::stale);
                    Ok(c.digest)
                }
                _ => match self.containerd_tag(client, tag) {
                    Some((digest, _)) => {
                        tracing::warn!(%reason, tag, "upstream unreachable: serving the digest containerd's image has");
                        self.lookup(LookupKind::tag, LookupResult::containerd);
                        Ok(digest)
                    }
                    None => Err(ResolveError::Unavailable(reason)),
                },
            },
            Err(e) => Err(e.into()),
        }
    }

    async fn record_tag(&self, key: String, client: &Client, rec: TagRecord) -> Result<(), ResolveError> {
        let link = format!("{}@{}", client.repo_key(), rec.digest);
        let public = rec.public;
        let store = self.store.clone();
        blocking(move || {
            store.put_tag(&key, &rec)?;
            store.put_link(&link, LinkRecord { public, at: now_secs() })
        })
        .await
    }

    /// Whether the client accepts the manifest a cached tag points to: by the media type recorded with the tag,
    /// else by the stored manifest's.
    async fn cached_manifest_acceptable(&self, client: &Client, rec: &TagRecord) -> bool {
        if rec.media_type.is_some() {
            return accepts(client.accept.as_ref(), rec.media_type.as_deref());
        }
        let store = self.store.clone();
        let d = rec.digest.clone();
        let Ok(Some(meta)) = blocking(move || store.blob(&d)).await else { return false };
        accepts(client.accept.as_ref(), meta.media_type.as_deref())
    }
}
