//! The upstream registry client: one place that knows how to ask a registry for a manifest or a blob.
//!
//! - Auth: a client's own `Authorization` is forwarded as is, and a 401 then goes back to the client with the
//!   registry's challenge. Without one, the agent follows the challenge itself: the Bearer token flow (anonymous
//!   or with the registry's configured credentials; tokens cached per repository until they expire) or Basic.
//! - A token realm is followed only on the registry's own host or a host configured for it (`token_hosts`;
//!   Docker Hub's `auth.docker.io` by default): a registry cannot make the agent call other services and forward
//!   what they answer. Tokens are cached per registry and repository and sent to that registry's origin only.
//! - Redirects (registries send blobs to object storage) are followed by hand, and credentials are sent to the
//!   registry's own origin only.
//! - Connection errors, timeouts, 429 and 5xx are retried with jittered exponential backoff; the caller resumes
//!   broken bodies with a `Range` from the offset it reached.
//! - A registry that could not be reached at all (every attempt a connection error or a timeout) is *down*:
//!   requests to it fail at once (cached content and last known tags are served, the rest is a fast 404 the
//!   client routes around) while a background probe asks `/v2/` every [`PROBE_EVERY`]; any answer ends the
//!   outage. An outage costs one request's timeouts, not every request's.

pub mod challenge;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::{HeaderValue, Method, StatusCode, header};
use reqwest::Url;

use crate::config::{Credentials, RegistryConfig, UpstreamConfig};
use crate::metrics::{KindLabels, UpstreamKind, UpstreamLabels, UpstreamMetrics, UpstreamOutcome};
use crate::oci::{Digest, Reference, RegistryHost, RepoName};

const MAX_REDIRECTS: usize = 5;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().expect("upstream locks are never poisoned: no panics while held")
}

/// Tokens (per registry and repository) cached at most.
const MAX_CACHED_AUTH: usize = 4096;
/// How often a registry found down is probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);
/// A registry found down that nobody asked for this long is forgotten (its probe ends; the next request tries it
/// afresh).
pub const PROBE_IDLE: Duration = Duration::from_secs(60);
/// Unlisted registries (named by clients) probed at once, at most: past it the one asked for longest ago is
/// forgotten. Configured registries are always probed.
pub const MAX_UNLISTED_PROBES: usize = 16;

/// Why an upstream request did not produce a usable response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The registry is not configured and unlisted registries are refused.
    #[error("registry {0} is not configured and unlisted registries are not allowed")]
    NotAllowed(RegistryHost),
    /// The registry says the manifest or blob does not exist.
    #[error("not found upstream")]
    NotFound,
    /// The registry wants credentials; `challenge` is its `WWW-Authenticate`, to pass back to the client.
    #[error("upstream requires authentication")]
    Unauthorized {
        /// The registry's challenge.
        challenge: Option<HeaderValue>,
    },
    /// The registry refused the credentials (403).
    #[error("upstream denied access")]
    Denied,
    /// Connection errors, timeouts or 5xx/429 answers, after every attempt.
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    /// Another unexpected status.
    #[error("upstream answered {0}")]
    Status(StatusCode),
}

/// What to fetch.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// A blob by digest.
    Blob(&'a Digest),
    /// A manifest by tag or digest.
    Manifest(&'a Reference),
}

/// One request to an upstream registry.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The registry (containerd's `ns`).
    pub registry: &'a RegistryHost,
    /// The repository.
    pub repo: &'a RepoName,
    /// Manifest or blob.
    pub target: Target<'a>,
    /// HEAD instead of GET.
    pub head: bool,
    /// The client's `Accept`, passed through for manifests.
    pub accept: Option<&'a HeaderValue>,
    /// The client's `Authorization`, forwarded as is.
    pub client_auth: Option<&'a HeaderValue>,
    /// Ask for the body from this offset on (`Range: bytes=N-`).
    pub offset: u64,
    /// And only up to this offset, exclusive (`Range: bytes=N-M`, M = end - 1). A registry may ignore the
    /// range and send the whole body: readers skip to `offset` and stop at `end` themselves.
    pub end: Option<u64>,
}

struct CachedAuth {
    value: HeaderValue,
    expires: Option<Instant>,
}

/// The upstream client, shared by every request.
#[derive(Debug)]
pub struct Upstream {
    http: reqwest::Client,
    cfg: UpstreamConfig,
    auth: Mutex<HashMap<(RegistryHost, String), CachedAuth>>,
    /// Registries found unreachable (each with its probe).
    down: Arc<Mutex<HashMap<RegistryHost, Down>>>,
    metrics: UpstreamMetrics,
}

/// A registry found unreachable: why, and the probe that ends the outage (stopped when the entry goes).
#[derive(Debug)]
struct Down {
    reason: String,
    probe: Option<tokio::task::JoinHandle<()>>,
    /// When a request for it was last refused because it is down (tokio's clock: the probes sleep on it).
    asked: tokio::time::Instant,
    /// Named by a client, not configured.
    unlisted: bool,
}

impl Drop for Down {
    fn drop(&mut self) {
        if let Some(p) = &self.probe {
            p.abort();
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // The probes hold the map: empty it so they stop with the client.
        lock(&self.down).clear();
    }
}

impl std::fmt::Debug for CachedAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedAuth").field("expires", &self.expires).finish_non_exhaustive()
    }
}

impl Upstream {
    /// Builds the client.
    pub fn new(cfg: UpstreamConfig, metrics: UpstreamMetrics) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(cfg.connect_timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("shoal/", env!("CARGO_PKG_VERSION")))
            .no_proxy()
            .build()?;
        Ok(Self { http, cfg, auth: Mutex::new(HashMap::new()), down: Arc::default(), metrics })
    }

    /// The longest wait between two body chunks.
    pub fn stall_timeout(&self) -> Duration {
        self.cfg.stall_timeout
    }

    /// The registries configured by name.
    pub fn registries(&self) -> Vec<RegistryHost> {
        let mut v: Vec<RegistryHost> = self.cfg.registries.keys().cloned().collect();
        v.sort();
        v
    }

    /// The registry used when a request names none.
    pub fn default_registry(&self) -> Option<&RegistryHost> {
        self.cfg.default_registry.as_ref()
    }

    fn registry(&self, host: &RegistryHost) -> Result<RegistryConfig, UpstreamError> {
        if let Some(r) = self.cfg.registries.get(host) {
            return Ok(r.clone());
        }
        if !self.cfg.allow_unlisted {
            return Err(UpstreamError::NotAllowed(host.clone()));
        }
        let endpoint = Url::parse(&format!("https://{host}")).map_err(|_| UpstreamError::NotAllowed(host.clone()))?;
        Ok(RegistryConfig { endpoint, credentials: None, token_hosts: Vec::new() })
    }

    /// Sends a request, following auth challenges, redirects and retries. Returns a 2xx response (200, or 206
    /// when `offset` > 0 and the registry honoured it).
    pub async fn send(&self, req: Request<'_>) -> Result<reqwest::Response, UpstreamError> {
        let reg = self.registry(req.registry)?;
        let (kind, path) = match req.target {
            Target::Blob(d) => (UpstreamKind::blob, format!("blobs/{d}")),
            Target::Manifest(r) => (UpstreamKind::manifest, format!("manifests/{}", r.as_str())),
        };
        let down = lock(&self.down).get_mut(req.registry).map(|d| {
            d.asked = tokio::time::Instant::now();
            d.reason.clone()
        });
        if let Some(reason) = down {
            self.count(kind, UpstreamOutcome::unreachable);
            return Err(UpstreamError::Unreachable(format!("{reason} (down: not asked until a probe answers)")));
        }
        let base = reg.endpoint.as_str().trim_end_matches('/');
        let url = Url::parse(&format!("{base}/v2/{}/{path}", req.repo))
            .map_err(|e| UpstreamError::Unreachable(format!("bad upstream URL: {e}")))?;
        let cache_key = (req.registry.clone(), req.repo.as_str().to_owned());
        let mut auth = match req.client_auth {
            Some(a) => Some(a.clone()),
            None => self.cached_auth(&cache_key),
        };
        let mut tried_challenge = false;
        let mut attempt = 0;
        // Whether every attempt failed before any answer (the registry is down, not merely failing).
        let mut never_answered = true;
        loop {
            attempt += 1;
            let started = Instant::now();
            let result = self.send_following_redirects(&reg, &url, &req, auth.as_ref()).await;
            self.metrics.latency.get_or_create(&KindLabels { kind }).observe(started.elapsed().as_secs_f64());
            let retry_reason = match result {
                Err(e) => {
                    self.count(kind, UpstreamOutcome::unreachable);
                    e
                }
                Ok(resp) => {
                    never_answered = false;
                    if lock(&self.down).remove(req.registry).is_some() {
                        tracing::info!(registry = %req.registry, "upstream answers again");
                    }
                    let status = resp.status();
                    match status {
                        s if s.is_success() => {
                            self.count(kind, UpstreamOutcome::ok);
                            return Ok(resp);
                        }
                        StatusCode::UNAUTHORIZED => {
                            self.count(kind, UpstreamOutcome::unauthorized);
                            let challenge = resp.headers().get(header::WWW_AUTHENTICATE).cloned();
                            if req.client_auth.is_some() || tried_challenge {
                                return Err(UpstreamError::Unauthorized { challenge });
                            }
                            tried_challenge = true;
                            match self.answer_challenge(&reg, req.registry, req.repo, challenge.as_ref()).await? {
                                Some(a) => {
                                    auth = Some(a);
                                    attempt -= 1;
                                    continue;
                                }
                                None => return Err(UpstreamError::Unauthorized { challenge }),
                            }
                        }
                        StatusCode::FORBIDDEN => {
                            self.count(kind, UpstreamOutcome::unauthorized);
                            return Err(UpstreamError::Denied);
                        }
                        StatusCode::NOT_FOUND => {
                            self.count(kind, UpstreamOutcome::not_found);
                            return Err(UpstreamError::NotFound);
                        }
                        s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                            self.count(kind, UpstreamOutcome::server_error);
                            format!("status {s}")
                        }
                        s => {
                            self.count(kind, UpstreamOutcome::other);
                            return Err(UpstreamError::Status(s));
                        }
                    }
                }
            };
            if attempt >= self.cfg.attempts {
                if never_answered {
                    self.mark_down(req.registry, &reg, &retry_reason);
                }
                return Err(UpstreamError::Unreachable(retry_reason));
            }
            tracing::debug!(%url, attempt, reason = %retry_reason, "retrying upstream request");
            tokio::time::sleep(backoff(attempt)).await;
        }
    }

    /// Whether `host` is down (found unreachable, no probe answered since).
    pub fn is_down(&self, host: &RegistryHost) -> bool {
        lock(&self.down).contains_key(host)
    }

    /// Whether the operator configured `host` (its answers about any content are believed; an unlisted
    /// registry's only about what it served itself).
    pub fn is_configured(&self, host: &RegistryHost) -> bool {
        self.cfg.registries.contains_key(host)
    }

    /// Marks `host` down and starts its probe (unless one runs): `GET /v2/` every [`PROBE_EVERY`] until anything
    /// answers, or until nobody has asked for `host` for [`PROBE_IDLE`]. At most [`MAX_UNLISTED_PROBES`] unlisted
    /// registries are tracked at once.
    fn mark_down(&self, host: &RegistryHost, reg: &RegistryConfig, reason: &str) {
        let Ok(url) = reg.endpoint.join("/v2/") else { return };
        let mut down = lock(&self.down);
        if down.contains_key(host) {
            return;
        }
        let unlisted = !self.cfg.registries.contains_key(host);
        if unlisted {
            let tracked: Vec<(&RegistryHost, tokio::time::Instant)> =
                down.iter().filter(|(_, d)| d.unlisted).map(|(h, d)| (h, d.asked)).collect();
            if tracked.len() >= MAX_UNLISTED_PROBES
                && let Some(oldest) = tracked.iter().min_by_key(|(_, t)| *t).map(|(h, _)| (*h).clone())
            {
                down.remove(&oldest);
            }
        }
        tracing::warn!(registry = %host, reason, "upstream unreachable: requests to it fail at once until it answers");
        let (http, map, h, wait) = (self.http.clone(), self.down.clone(), host.clone(), self.cfg.response_timeout);
        let probe = tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROBE_EVERY).await;
                {
                    let mut m = lock(&map);
                    if m.get(&h).is_some_and(|d| d.asked.elapsed() > PROBE_IDLE) {
                        tracing::info!(registry = %h, "nobody asked for the unreachable registry for a while: forgotten");
                        m.remove(&h);
                        return;
                    }
                }
                if let Ok(Ok(_)) = tokio::time::timeout(wait, http.get(url.clone()).send()).await {
                    tracing::info!(registry = %h, "upstream answers again");
                    lock(&map).remove(&h);
                    return;
                }
            }
        });
        down.insert(
            host.clone(),
            Down { reason: reason.to_owned(), probe: Some(probe), asked: tokio::time::Instant::now(), unlisted },
        );
    }

    /// Registries currently treated as down.
    pub fn down_count(&self) -> usize {
        lock(&self.down).len()
    }

    fn count(&self, kind: UpstreamKind, outcome: UpstreamOutcome) {
        self.metrics.requests.get_or_create(&UpstreamLabels { kind, outcome }).inc();
    }

    /// Counts body bytes received from upstream.
    pub fn count_bytes(&self, n: u64) {
        self.metrics.bytes.inc_by(n);
    }

    async fn send_following_redirects(
        &self,
        reg: &RegistryConfig,
        url: &Url,
        req: &Request<'_>,
        auth: Option<&HeaderValue>,
    ) -> Result<reqwest::Response, String> {
        let method = if req.head { Method::HEAD } else { Method::GET };
        let mut url = url.clone();
        for _ in 0..=MAX_REDIRECTS {
            let same_origin = url.origin() == reg.endpoint.origin();
            let mut rb = self.http.request(method.clone(), url.clone());
            if let (Some(a), true) = (auth, same_origin) {
                rb = rb.header(header::AUTHORIZATION, a.clone());
            }
            if let (Some(accept), Target::Manifest(_)) = (req.accept, req.target) {
                rb = rb.header(header::ACCEPT, accept.clone());
            }
            match req.end {
                Some(end) if end > req.offset => {
                    rb = rb.header(header::RANGE, format!("bytes={}-{}", req.offset, end - 1));
                }
                _ if req.offset > 0 => rb = rb.header(header::RANGE, format!("bytes={}-", req.offset)),
                _ => {}
            }
            let resp = tokio::time::timeout(self.cfg.response_timeout, rb.send())
                .await
                .map_err(|_| {
                    format!(
                        "no response from {} within {:?}",
                        url.origin().ascii_serialization(),
                        self.cfg.response_timeout
                    )
                })?
                .map_err(|e| error_chain(&e))?;
            if !resp.status().is_redirection() || resp.status() == StatusCode::NOT_MODIFIED {
                return Ok(resp);
            }
            let location = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .ok_or_else(|| format!("redirect {} without Location", resp.status()))?;
            let next = url.join(location).map_err(|e| format!("bad redirect Location: {e}"))?;
            if !matches!(next.scheme(), "http" | "https") || (url.scheme() == "https" && next.scheme() == "http") {
                return Err(format!("refusing redirect to {}", next.scheme()));
            }
            url = next;
        }
        Err(format!("more than {MAX_REDIRECTS} redirects"))
    }

    fn cached_auth(&self, key: &(RegistryHost, String)) -> Option<HeaderValue> {
        let mut map = lock(&self.auth);
        match map.get(key) {
            Some(a) if a.expires.is_none_or(|e| e > Instant::now()) => Some(a.value.clone()),
            Some(_) => {
                map.remove(key);
                None
            }
            None => None,
        }
    }

    /// Answers a challenge with the agent's own identity (anonymous or configured credentials). `None` when the
    /// agent cannot: the client must authenticate itself.
    async fn answer_challenge(
        &self,
        reg: &RegistryConfig,
        host: &RegistryHost,
        repo: &RepoName,
        challenge: Option<&HeaderValue>,
    ) -> Result<Option<HeaderValue>, UpstreamError> {
        let Some(c) = challenge.and_then(|v| v.to_str().ok()).and_then(challenge::parse) else {
            return Ok(None);
        };
        let key = (host.clone(), repo.as_str().to_owned());
        let value = match c.scheme.as_str() {
            "basic" => match &reg.credentials {
                Some(creds) => CachedAuth { value: basic(creds), expires: None },
                None => return Ok(None),
            },
            "bearer" => {
                let Some(realm) = c.params.get("realm") else { return Ok(None) };
                let scope = format!("repository:{repo}:pull");
                match self.fetch_token(reg, realm, c.params.get("service"), &scope).await? {
                    Some(t) => t,
                    None => return Ok(None),
                }
            }
            _ => return Ok(None),
        };
        let header = value.value.clone();
        let mut cache = lock(&self.auth);
        if cache.len() >= MAX_CACHED_AUTH && !cache.contains_key(&key) {
            // Repositories are clients' to name: expired tokens go first, then the one expiring soonest.
            let now = Instant::now();
            cache.retain(|_, a| a.expires.is_none_or(|e| e > now));
            if cache.len() >= MAX_CACHED_AUTH
                && let Some(k) = cache.iter().min_by_key(|(_, a)| a.expires).map(|(k, _)| k.clone())
            {
                cache.remove(&k);
            }
        }
        cache.insert(key, value);
        Ok(Some(header))
    }

    async fn fetch_token(
        &self,
        reg: &RegistryConfig,
        realm: &str,
        service: Option<&String>,
        scope: &str,
    ) -> Result<Option<CachedAuth>, UpstreamError> {
        let Ok(mut url) = Url::parse(realm) else { return Ok(None) };
        if !matches!(url.scheme(), "https" | "http") {
            return Ok(None);
        }
        if !realm_allowed(reg, &url) {
            tracing::warn!(
                registry = %reg.endpoint,
                realm = %url.origin().ascii_serialization(),
                "not following a token realm on another host (add it to the registry's `token_hosts` if it is the \
                 registry's auth service)"
            );
            return Ok(None);
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", scope);
        }
        let mut rb = self.http.get(url.clone());
        // Credentials go to the token realm only over TLS, or over plain HTTP when the registry itself is.
        if let Some(creds) = &reg.credentials
            && (url.scheme() == "https" || reg.endpoint.scheme() == "http")
        {
            rb = rb.header(header::AUTHORIZATION, basic(creds));
        }
        let started = Instant::now();
        let resp = tokio::time::timeout(self.cfg.response_timeout, rb.send()).await;
        self.metrics
            .latency
            .get_or_create(&KindLabels { kind: UpstreamKind::token })
            .observe(started.elapsed().as_secs_f64());
        let resp = match resp {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                self.count(UpstreamKind::token, UpstreamOutcome::unreachable);
                return Err(UpstreamError::Unreachable(format!("token endpoint: {}", error_chain(&e))));
            }
            Err(_) => {
                self.count(UpstreamKind::token, UpstreamOutcome::unreachable);
                return Err(UpstreamError::Unreachable("token endpoint timed out".into()));
            }
        };
        if !resp.status().is_success() {
            self.count(UpstreamKind::token, UpstreamOutcome::unauthorized);
            return Ok(None);
        }
        self.count(UpstreamKind::token, UpstreamOutcome::ok);
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let body = resp.bytes().await.map_err(|e| UpstreamError::Unreachable(error_chain(&e)))?;
        let Ok(t) = serde_json::from_slice::<TokenResponse>(&body) else { return Ok(None) };
        let Some(token) = t.token.or(t.access_token).filter(|t| !t.is_empty()) else { return Ok(None) };
        let Ok(value) = HeaderValue::from_str(&format!("Bearer {token}")) else { return Ok(None) };
        // The spec's default lifetime is 60 s; renew a little early.
        let life = Duration::from_secs(t.expires_in.unwrap_or(60).clamp(10, 3600));
        Ok(Some(CachedAuth { value, expires: Some(Instant::now() + life - Duration::from_secs(5)) }))
    }
}

/// Whether a token realm may be asked: on the registry endpoint's own host and port, or on a host configured for
/// the registry (`host` or `host:port`).
fn realm_allowed(reg: &RegistryConfig, realm: &Url) -> bool {
    let (Some(host), Some(port)) = (realm.host_str(), realm.port_or_known_default()) else { return false };
    let own = reg.endpoint.host_str() == Some(host) && reg.endpoint.port_or_known_default() == Some(port);
    own || reg.token_hosts.iter().any(|t| t == host || *t == format!("{host}:{port}"))
}

fn basic(creds: &Credentials) -> HeaderValue {
    let raw = format!("{}:{}", creds.username, creds.password);
    let mut v = HeaderValue::from_str(&format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw)))
        .expect("base64 is a valid header value");
    v.set_sensitive(true);
    v
}

fn backoff(attempt: u32) -> Duration {
    let base = 100u64 << attempt.min(6);
    Duration::from_millis(base / 2 + rand::random_range(0..=base / 2))
}

/// The error and its sources, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests;
