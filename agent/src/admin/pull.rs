//! `shoal pull`: an image read through the resolver as a client's pull would read it (tag, manifest or index,
//! the chosen platforms' manifests, config and layers), with progress and the bytes by where they came from.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use http::HeaderValue;
use shoal_proto::admin as pb;
use tokio::sync::mpsc;
use tonic::Status;

use super::{AdminState, resolve_status};
use crate::oci::{Digest, Kind, Reference, RegistryHost, RepoName};
use crate::resolver::{Client, Served};

/// What a pull asks upstream to answer a tag with.
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";
/// The largest manifest or index read (the mirror's own limit is the same order).
const MAX_MANIFEST: usize = 4 << 20;
/// A progress event at most this often per blob.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// An image reference: `[registry/]repository[:tag][@digest]`, as `docker pull` and `ctr` take it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// The registry.
    pub registry: RegistryHost,
    /// The repository.
    pub repo: RepoName,
    /// The tag or digest (a digest wins over a tag given with it).
    pub reference: Reference,
}

impl std::fmt::Display for ImageRef {
    /// `registry/repository:tag` or `registry/repository@digest`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sep = match self.reference {
            Reference::Tag(_) => ':',
            Reference::Digest(_) => '@',
        };
        write!(f, "{}/{}{sep}{}", self.registry, self.repo, self.reference.as_str())
    }
}

impl ImageRef {
    /// Parses `s`. A first component with a `.` or a `:`, or `localhost`, is a registry; without one the image is
    /// in `default` (Docker Hub's single-component names get `library/`). No tag means `latest`.
    pub fn parse(s: &str, default: Option<&RegistryHost>) -> Result<Self, String> {
        if s.is_empty() {
            return Err("empty".into());
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(Digest::parse(d).map_err(|e| format!("{s:?}: {e}"))?)),
            None => (s, None),
        };
        let (name, tag) = match rest.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, Some(t)),
            _ => (rest, None),
        };
        let (registry, repo) = match name.split_once('/') {
            Some((first, path)) if first.contains(['.', ':']) || first == "localhost" => {
                (RegistryHost::parse(first).map_err(|e| format!("{s:?}: {e}"))?, path.to_owned())
            }
            _ => {
                let r = default.ok_or_else(|| {
                    format!("{s:?} names no registry and the agent has no `default_registry`: write it as registry/repository")
                })?;
                let repo = if r.as_str() == "docker.io" && !name.contains('/') {
                    format!("library/{name}")
                } else {
                    name.to_owned()
                };
                (r.clone(), repo)
            }
        };
        let repo = RepoName::parse(&repo).map_err(|e| format!("{s:?}: {e}"))?;
        let reference = match (digest, tag) {
            (Some(d), _) => Reference::Digest(d),
            (None, Some(t)) => Reference::parse(t).map_err(|e| format!("{s:?}: {e}"))?,
            (None, None) => Reference::Tag("latest".into()),
        };
        Ok(Self { registry, repo, reference })
    }
}

/// A platform: `os/architecture[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    os: String,
    arch: String,
    variant: Option<String>,
}

impl Platform {
    /// Parses `os/architecture[/variant]`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok = |p: &str| !p.is_empty() && p.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-');
        match parts[..] {
            [os, arch] if ok(os) && ok(arch) => Ok(Self { os: os.into(), arch: arch.into(), variant: None }),
            [os, arch, v] if ok(os) && ok(arch) && ok(v) => {
                Ok(Self { os: os.into(), arch: arch.into(), variant: Some(v.into()) })
            }
            _ => Err(format!("{s:?} is not os/architecture[/variant] (e.g. linux/amd64)")),
        }
    }

    /// The platform this agent runs on.
    pub fn this_node() -> Self {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Self { os: "linux".into(), arch: arch.into(), variant: None }
    }

    fn matches(&self, p: &serde_json::Value) -> bool {
        let field = |k: &str| p.get(k).and_then(|v| v.as_str());
        field("os") == Some(self.os.as_str())
            && field("architecture") == Some(self.arch.as_str())
            && self.variant.as_deref().is_none_or(|v| field("variant") == Some(v))
    }
}

/// Bytes read, by where they came from.
#[derive(Default)]
pub(super) struct Counts {
    blobs: u32,
    bytes: u64,
    store: u64,
    containerd: u64,
    peers: u64,
    upstream: u64,
    /// The image's bytes as its descriptors give them (known once the manifests are read).
    total: u64,
}

/// Reads `image` through the resolver; progress goes to `tx`. `platform`: one platform of an index, `None`: all.
pub(super) async fn pull(
    st: &AdminState,
    image: &ImageRef,
    platform: Option<&Platform>,
    tx: &mpsc::Sender<Result<pb::PullEvent, Status>>,
) -> Result<pb::PullSummary, Status> {
    let start = Instant::now();
    let mut counts = Counts::default();
    let (client, root, items) = walk_counted(st, image, platform, tx, &mut counts).await?;
    read_blobs(st, image, &client, &items, Some(tx), &mut counts).await?;
    Ok(pb::PullSummary {
        digest: root.to_string(),
        blobs: counts.blobs,
        bytes: counts.bytes,
        from_store: counts.store,
        from_containerd: counts.containerd,
        from_peers: counts.peers,
        from_upstream: counts.upstream,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Reads the blobs (not the manifests) of a walked image through the resolver, to their end.
pub(super) async fn read_blobs(
    st: &AdminState,
    image: &ImageRef,
    client: &Client,
    items: &[(Digest, Kind, u64)],
    tx: Option<&mpsc::Sender<Result<pb::PullEvent, Status>>>,
    counts: &mut Counts,
) -> Result<(), Status> {
    let unheard = super::unheard();
    let tx = tx.unwrap_or(&unheard);
    counts.total = counts.bytes + items.iter().filter(|(_, k, _)| *k == Kind::Blob).map(|(_, _, s)| s).sum::<u64>();
    for (digest, kind, _) in items.iter().filter(|(_, k, _)| *k == Kind::Blob) {
        read(st, client, digest, *kind, tx, counts).await.map_err(|e| match e {
            Read::Resolve(e) => resolve_status(&format!("{}/{}@{digest}", image.registry, image.repo), e),
            Read::Failed(s) => s,
        })?;
    }
    Ok(())
}

/// The image's content as a preheat orders it: the manifests (read through this node's resolver) and the blobs
/// they name, with the sizes their descriptors give (a claim, for the summary only), root first.
pub(super) async fn walk(
    st: &AdminState,
    image: &ImageRef,
    platform: Option<&Platform>,
) -> Result<(Client, Digest, Vec<(Digest, Kind, u64)>), Status> {
    walk_counted(st, image, platform, &super::unheard(), &mut Counts::default()).await
}

/// [`walk`], counting the manifests' bytes and sending their progress.
async fn walk_counted(
    st: &AdminState,
    image: &ImageRef,
    platform: Option<&Platform>,
    tx: &mpsc::Sender<Result<pb::PullEvent, Status>>,
    counts: &mut Counts,
) -> Result<(Client, Digest, Vec<(Digest, Kind, u64)>), Status> {
    let client = Client {
        registry: image.registry.clone(),
        repo: image.repo.clone(),
        auth: None,
        accept: Some(HeaderValue::from_static(ACCEPT)),
    };
    let what = format!("{}/{}", image.registry, image.repo);
    let root = match &image.reference {
        Reference::Digest(d) => d.clone(),
        Reference::Tag(t) => {
            st.resolver.resolve_tag(&client, t).await.map_err(|e| resolve_status(&format!("{what}:{t}"), e))?
        }
    };
    let mut out: Vec<(Digest, Kind, u64)> = Vec::new();
    let mut seen = HashSet::new();
    let mut queue = vec![(root.clone(), 0u64)];
    while let Some((digest, size)) = queue.pop() {
        if !seen.insert(digest.clone()) {
            continue;
        }
        let body = read(st, &client, &digest, Kind::Manifest, tx, counts).await.map_err(|e| match e {
            Read::Resolve(e) => resolve_status(&format!("{what}@{digest}"), e),
            Read::Failed(s) => s,
        })?;
        let body = body.unwrap_or_default();
        out.push((digest.clone(), Kind::Manifest, if size == 0 { body.len() as u64 } else { size }));
        let doc: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| Status::failed_precondition(format!("{what}@{digest}: not a JSON manifest: {e}")))?;
        let descriptor = |v: &serde_json::Value| {
            let d = v.get("digest").and_then(|d| d.as_str()).and_then(|d| Digest::parse(d).ok())?;
            Some((d, v.get("size").and_then(serde_json::Value::as_u64).unwrap_or(0)))
        };
        if let Some(list) = doc.get("manifests").and_then(|m| m.as_array()) {
            let picked: Vec<_> = list
                .iter()
                .filter(|m| platform.is_none_or(|p| m.get("platform").is_some_and(|pl| p.matches(pl))))
                .filter_map(descriptor)
                .collect();
            if picked.is_empty() {
                return Err(Status::not_found(format!("{what}@{root}: the index has no manifest for this platform")));
            }
            queue.extend(picked);
        } else {
            let blobs =
                doc.get("config").into_iter().chain(doc.get("layers").and_then(|l| l.as_array()).into_iter().flatten());
            for (d, size) in blobs.filter_map(descriptor) {
                if seen.insert(d.clone()) {
                    out.push((d, Kind::Blob, size));
                }
            }
        }
    }
    Ok((client, root, out))
}

fn progress(digest: &Digest, read: u64, size: u64, counts: &Counts) -> pb::BlobProgress {
    let image_read = counts.bytes + read;
    let image_bytes = if counts.total == 0 { 0 } else { counts.total.max(image_read) };
    pb::BlobProgress { digest: digest.to_string(), read, size, image_read, image_bytes }
}

enum Read {
    Resolve(crate::resolver::ResolveError),
    Failed(Status),
}

/// Reads one manifest (returned) or blob (counted only) to its end, sending progress.
async fn read(
    st: &AdminState,
    client: &Client,
    digest: &Digest,
    kind: Kind,
    tx: &mpsc::Sender<Result<pb::PullEvent, Status>>,
    counts: &mut Counts,
) -> Result<Option<Vec<u8>>, Read> {
    let opened = st.resolver.open(client, digest, kind, false).await.map_err(Read::Resolve)?;
    let size = opened.size;
    let served = opened.served();
    let mut stream =
        std::pin::pin!(opened.stream(0, size.unwrap_or(u64::MAX), &st.metrics, st.resolver.response_budget()));
    let mut body = (kind == Kind::Manifest).then(Vec::new);
    let (mut n, mut last) = (0u64, Instant::now());
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Read::Failed(Status::unavailable(format!("{digest}: {e}"))))?;
        n += chunk.len() as u64;
        if let Some(b) = body.as_mut() {
            if b.len() + chunk.len() > MAX_MANIFEST {
                return Err(Read::Failed(Status::failed_precondition(format!("{digest}: a manifest over 4 MiB"))));
            }
            b.extend_from_slice(&chunk);
        }
        if last.elapsed() >= PROGRESS_EVERY {
            last = Instant::now();
            let p = progress(digest, n, size.unwrap_or(0), counts);
            let _ = tx.send(Ok(pb::PullEvent { event: Some(pb::pull_event::Event::Progress(p)) })).await;
        }
    }
    let p = progress(digest, n, size.unwrap_or(n), counts);
    let _ = tx.send(Ok(pb::PullEvent { event: Some(pb::pull_event::Event::Progress(p)) })).await;
    counts.blobs += 1;
    counts.bytes += n;
    match served {
        Served::Store => counts.store += n,
        Served::Containerd => counts.containerd += n,
        Served::PassThrough => counts.upstream += n,
        Served::Download(t) => {
            // The download's own split (it may have started before this pull joined it).
            let (peers, up) = (t.peers.load(Ordering::Relaxed), t.upstream.load(Ordering::Relaxed));
            let from_peers =
                if peers + up == 0 { 0 } else { (u128::from(n) * u128::from(peers) / u128::from(peers + up)) as u64 };
            counts.peers += from_peers;
            counts.upstream += n - from_peers;
        }
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_as_docker_and_ctr_take_them() {
        let hub = RegistryHost::parse("docker.io").unwrap();
        let r = ImageRef::parse("alpine", Some(&hub)).unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repo.as_str(), r.reference.as_str()),
            ("docker.io", "library/alpine", "latest")
        );
        let r = ImageRef::parse("127.0.0.1:5000/team/app:v1", None).unwrap();
        assert_eq!((r.registry.as_str(), r.repo.as_str(), r.reference.as_str()), ("127.0.0.1:5000", "team/app", "v1"));
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("localhost/app:v1@{d}"), None).unwrap();
        assert_eq!((r.registry.as_str(), r.reference.as_str()), ("localhost", d.as_str()));
        for bad in ["", "Alpine", "r.io/app:bad tag", "r.io/app@sha256:12", "r.io/app:"] {
            assert!(ImageRef::parse(bad, Some(&hub)).is_err(), "{bad:?} parsed");
        }
        let e = ImageRef::parse("alpine", None).unwrap_err();
        assert!(e.contains("default_registry"), "{e}");
    }

    #[test]
    fn platforms_parse_and_match() {
        let p = Platform::parse("linux/arm64/v8").unwrap();
        assert!(p.matches(&serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"})));
        assert!(!p.matches(&serde_json::json!({"os": "linux", "architecture": "amd64"})));
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d", "linux/am d64"] {
            assert!(Platform::parse(bad).is_err(), "{bad:?} parsed");
        }
    }
}
