//! An image pull over HTTP the way containerd does it, for bursts of many nodes without a containerd each: HEAD
//! the tag, GET the manifest by digest (the first platform of an index), then the config and the layers, three at
//! a time, checking every byte against its digest. [`pull_via`] takes several endpoints and moves to the next one
//! as containerd moves down its `hosts.toml` list: when a host cannot be reached or answers an error status, never
//! once a body has started.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::{StreamExt, TryStreamExt};

use crate::sha256_digest;

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
                      application/vnd.docker.distribution.manifest.list.v2+json, \
                      application/vnd.docker.distribution.manifest.v2+json";

/// Where a pull goes: a registry itself (or a pull-through cache), or a mirror that takes `?ns=`.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `http://host:port`.
    pub base: String,
    /// The registry host for `?ns=` (mirrors only).
    pub ns: Option<String>,
}

impl Endpoint {
    fn url(&self, repo: &str, kind: &str, reference: &str) -> String {
        let mut u = format!("{}/v2/{repo}/{kind}/{reference}", self.base);
        if let Some(ns) = &self.ns {
            u.push_str("?ns=");
            u.push_str(ns);
        }
        u
    }
}

/// What one pull did.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// Every digest fetched (manifests, config, layers), each verified.
    pub digests: Vec<String>,
    /// Bytes received.
    pub bytes: u64,
    /// Time from the first request to the last verified byte.
    pub elapsed: Duration,
}

/// A complete body whose bytes do not match the digest it was asked for: a corrupt blob reached the client.
#[derive(Debug)]
pub struct Corrupt {
    /// Where it came from.
    pub url: String,
    /// What was asked for.
    pub digest: String,
}

impl std::fmt::Display for Corrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GET {}: a complete body that does not match {}", self.url, self.digest)
    }
}

impl std::error::Error for Corrupt {}

/// Pulls `repo:tag` from `ep`; fails on any error status or any digest mismatch.
pub async fn pull(http: &reqwest::Client, ep: &Endpoint, repo: &str, tag: &str) -> Result<Pulled> {
    pull_via(http, std::slice::from_ref(ep), repo, tag).await
}

/// Pulls `repo:tag`, each request from the first of `eps` that answers it with a success status; fails on a body
/// that breaks, on any digest mismatch (a [`Corrupt`] error), or when no endpoint answers.
pub async fn pull_via(http: &reqwest::Client, eps: &[Endpoint], repo: &str, tag: &str) -> Result<Pulled> {
    let start = Instant::now();
    let head = send(eps, |ep| http.head(ep.url(repo, "manifests", tag)).header("accept", ACCEPT)).await?;
    let mut digest = head
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .context("HEAD of the tag sent no Docker-Content-Digest")?
        .to_owned();
    let mut digests = Vec::new();
    let mut bytes = 0u64;
    let manifest = loop {
        let body = get(http, eps, repo, "manifests", &digest).await?;
        bytes += body.len() as u64;
        digests.push(digest.clone());
        let m: serde_json::Value = serde_json::from_slice(&body).context("manifest is not JSON")?;
        match m.get("manifests").and_then(|l| l.get(0)).and_then(|d| d.get("digest")).and_then(|d| d.as_str()) {
            Some(first) => digest = first.to_owned(),
            None => break m,
        }
    };
    let mut blobs: Vec<String> = Vec::new();
    if let Some(c) = manifest.pointer("/config/digest").and_then(|d| d.as_str()) {
        blobs.push(c.to_owned());
    }
    for l in manifest.get("layers").and_then(|l| l.as_array()).into_iter().flatten() {
        blobs.push(l.get("digest").and_then(|d| d.as_str()).context("layer without digest")?.to_owned());
    }
    let fetches: Vec<_> = blobs
        .iter()
        .map(|d| {
            let (http, d) = (http.clone(), d.clone());
            async move { get(&http, eps, repo, "blobs", &d).await.map(|b| b.len() as u64) }
        })
        .collect();
    let sizes: Vec<u64> = futures_util::stream::iter(fetches).buffer_unordered(3).try_collect().await?;
    bytes += sizes.iter().sum::<u64>();
    digests.extend(blobs);
    Ok(Pulled { digests, bytes, elapsed: start.elapsed() })
}

/// Sends the request `build` makes for each endpoint in turn, until one answers with a success status.
async fn send(eps: &[Endpoint], build: impl Fn(&Endpoint) -> reqwest::RequestBuilder) -> Result<reqwest::Response> {
    let mut errors = Vec::new();
    for ep in eps {
        let (client, req) = build(ep).build_split();
        let req = req?;
        let what = format!("{} {}", req.method(), req.url());
        match client.execute(req).await {
            Ok(resp) if resp.status().is_success() => return Ok(resp),
            Ok(resp) => errors.push(format!("{what}: {}", resp.status())),
            Err(e) => errors.push(format!("{what}: {e}")),
        }
    }
    bail!("no endpoint answered: {}", errors.join("; "))
}

async fn get(http: &reqwest::Client, eps: &[Endpoint], repo: &str, kind: &str, digest: &str) -> Result<Vec<u8>> {
    let resp = send(eps, |ep| http.get(ep.url(repo, kind, digest)).header("accept", ACCEPT)).await?;
    let url = resp.url().to_string();
    let body = resp.bytes().await.with_context(|| format!("GET {url}: body"))?.to_vec();
    if sha256_digest(&body) != digest {
        return Err(Corrupt { url, digest: digest.to_owned() }.into());
    }
    Ok(body)
}
